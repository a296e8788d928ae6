"""Reading checkpoints safely and rebuilding trained models from them.

Checkpoints are always read with ``torch.load(..., weights_only=True)``: a file that needs arbitrary objects to be
unpickled (and could therefore run code) is refused with a :class:`~contrastkit.errors.ContrastkitError`.
"""

from __future__ import annotations

import pickle
import zipfile
from pathlib import Path
from typing import Any

import torch

from contrastkit.errors import ContrastkitError


def safe_load(path: str | Path, map_location: Any = "cpu",
              missing_hint: str = "checkpoints are in RUN_DIR/checkpoints/") -> Any:
    """``torch.load(path, weights_only=True)`` with one-line errors for missing, corrupt or unsafe files."""
    p = Path(path)
    if not p.is_file():
        raise ContrastkitError(f"{str(p)!r} not found; {missing_hint}")
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
