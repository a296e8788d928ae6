"""Writing and reading checkpoints safely, and rebuilding trained models from them.

Checkpoints are written atomically (:func:`contrastkit.io.atomic_write`) with a SHA-256 checksum of all their
tensors under the key ``contrastkit_checksum`` (:func:`save_checkpoint`), and always read with
``torch.load(..., weights_only=True)``: a file that needs arbitrary objects to be unpickled (and could therefore run
code) is refused, a file that is not a PyTorch archive at all is "not a checkpoint", and a checkpoint whose tensors
no longer match their checksum (a flipped block on disk, a bad copy) is "corrupt", each with a one-line
:class:`~contrastkit.errors.ContrastkitError`. Files without a checksum (other tools' ``torch.save`` output) load
unchecked.
"""

from __future__ import annotations

import hashlib
import pickle
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from contrastkit.errors import ContrastkitError
from contrastkit.io import atomic_write

#: The checkpoint key that holds ``{"algorithm": "sha256", "tensors": HEX}``, see :func:`tensor_checksum`.
CHECKSUM_KEY = "contrastkit_checksum"


def _tensors(obj: Any, path: str = "") -> Iterator[tuple[str, torch.Tensor]]:
    """Every tensor inside nested dicts/lists/tuples, with its key path, in a deterministic order."""
    if isinstance(obj, torch.Tensor):
        yield path, obj
    elif isinstance(obj, dict):
        for k in sorted(obj, key=repr):
            if not (path == "" and k == CHECKSUM_KEY):
                yield from _tensors(obj[k], f"{path}/{k!r}")
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            yield from _tensors(v, f"{path}/{i}")


def tensor_checksum(checkpoint: Any) -> str:
    """SHA-256 (hex) over the key path, dtype, shape and bytes of every tensor of ``checkpoint``."""
    h = hashlib.sha256()
    for path, t in _tensors(checkpoint):
        h.update(f"{path}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.detach().contiguous().reshape(-1).view(torch.uint8).cpu().numpy().tobytes())
    return h.hexdigest()


def save_checkpoint(checkpoint: dict[str, Any], path: str | Path) -> Path:
    """``torch.save`` ``checkpoint`` (with its tensor checksum added) to ``path`` atomically."""
    checkpoint[CHECKSUM_KEY] = {"algorithm": "sha256", "tensors": tensor_checksum(checkpoint)}
    return atomic_write(path, lambda tmp: torch.save(checkpoint, tmp))


def _is_pytorch_file(p: Path) -> bool:
    """A zip archive (``torch.save``) or a pickle stream (legacy format): what ``torch.load`` can read at all."""
    if zipfile.is_zipfile(p):
        return True
    with open(p, "rb") as f:
        return f.read(1) == b"\x80"  # pickle protocol >= 2 starts with the PROTO opcode


def safe_load(path: str | Path, map_location: Any = "cpu",
              missing_hint: str = "checkpoints are in RUN_DIR/checkpoints/") -> Any:
    """``torch.load(path, weights_only=True)`` with one-line errors for missing, foreign, corrupt or unsafe files;
    verifies the tensor checksum of checkpoints that carry one."""
    p = Path(path)
    if not p.is_file():
        raise ContrastkitError(f"{str(p)!r} not found; {missing_hint}")
    try:
        if not _is_pytorch_file(p):
            raise ContrastkitError(f"{str(p)!r} is not a checkpoint (not a PyTorch file); {missing_hint}")
    except OSError as e:
        raise ContrastkitError(f"cannot read {str(p)!r}: {e.strerror or type(e).__name__}") from None
    try:
        ckpt = torch.load(p, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ContrastkitError(
            f"refusing to load {str(p)!r}: it holds objects that only unpickling code could rebuild "
            f"(weights_only=True refused it: {first[:160]}); use a checkpoint written by contrastkit"
        ) from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError) as e:
        raise ContrastkitError(
            f"checkpoint {str(p)!r} is corrupt or truncated ({type(e).__name__}); use another checkpoint, "
            "e.g. an earlier epoch in the same folder"
        ) from None
    if isinstance(ckpt, dict) and isinstance(ckpt.get(CHECKSUM_KEY), dict):
        if ckpt[CHECKSUM_KEY].get("tensors") != tensor_checksum(ckpt):
            raise ContrastkitError(
                f"checkpoint {str(p)!r} is corrupt: its tensors do not match the checksum stored when it was written "
                "(damaged on disk or in a copy); use another checkpoint, e.g. an earlier epoch in the same folder"
            )
    return ckpt


def load_checkpoint_file(path: str | Path, map_location: Any = "cpu") -> dict[str, Any]:
    """Load a training checkpoint (a dict with a ``state_dict``) safely, see :func:`safe_load`."""
    p = Path(path)
    ckpt = safe_load(p, map_location)
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt:
        raise ContrastkitError(f"{str(p)!r} is not a contrastkit checkpoint (no state_dict)")
    return ckpt


def load_module(path: str | Path, map_location: Any = "cpu") -> Any:
    """Rebuild the :class:`~contrastkit.training.module.SSLModule` of a checkpoint with its trained weights."""
    from contrastkit.training.module import SSLModule

    ckpt = load_checkpoint_file(path, map_location)
    hp = ckpt.get("hyper_parameters")
    if not isinstance(hp, dict) or "config" not in hp:
        raise ContrastkitError(f"{str(path)!r} has no contrastkit hyper-parameters; was it written by contrastkit?")
    module = SSLModule(**hp)
    module.load_state_dict(ckpt["state_dict"])
    module.eval()
    return module
