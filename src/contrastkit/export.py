"""Using a trained backbone outside contrastkit: export, load, embed.

* :func:`export_backbone` writes the backbone's plain ``state_dict`` (``{name: tensor}``, nothing else) to
  ``OUT.pt`` and a JSON sidecar ``OUT.json`` with the architecture arguments and the input normalisation. The keys
  are those of the model class itself: torchvision's ResNet keys for ``resnet18``/``resnet50`` (with ``fc`` =
  ``nn.Identity``, so no ``fc.*`` keys), :class:`~contrastkit.models.SmallResNet`'s for ``small_resnet``. Loading it
  in plain PyTorch (``cifar_stem: true`` in the sidecar)::

      import json, torch, torchvision
      from torch import nn
      info = json.load(open("backbone.json"))
      m = torchvision.models.resnet18(weights=None)                  # resnet50 alike
      m.conv1 = nn.Conv2d(info["args"]["in_channels"], 64, 3, 1, 1, bias=False)   # cifar_stem: 3x3/1 conv ...
      m.maxpool = nn.Identity()                                      # ... and no max-pool
      m.fc = nn.Identity()                                           # features, not logits
      m.load_state_dict(torch.load("backbone.pt", weights_only=True))
      m.eval()   # inputs: float in [0, 1], normalised with info["mean"], info["std"], info["input_size"] px

  Without the CIFAR stem and with ``in_channels != 3``, ``conv1`` is ``nn.Conv2d(in_channels, 64, 7, 2, 3,
  bias=False)`` and the max-pool stays. For ``small_resnet`` and ``convnet``: ``SmallResNet(**info["args"])`` or
  ``ConvNet(**info["args"])`` from ``contrastkit.models``.
* :func:`load_backbone` returns the ready backbone (``nn.Module`` in eval mode) from an export or from a training
  checkpoint; :func:`read_backbone_info` returns its :class:`BackboneInfo` (architecture, normalisation).
* :func:`embed` writes the features of a dataset split as ``.npy`` (+ ``.labels.npy``) or ``.npz``.

Every file is read with ``torch.load(weights_only=True)``: an export or checkpoint can never run code. Every file
is written atomically (:mod:`contrastkit.io`), so there are never half-written outputs.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from contrastkit.errors import ContrastkitError, DataError
from contrastkit.io import atomic_write, write_text_atomic
from contrastkit.models.backbones import backbone_args

EXPORT_FORMAT = "contrastkit-backbone"
EXPORT_VERSION = 1


@dataclass
class BackboneInfo:
    """What a user of an exported backbone needs besides the weights (the JSON sidecar).

    Attributes:
        architecture: ``small_resnet``, ``convnet``, ``resnet18`` or ``resnet50``.
        args: keyword arguments of :func:`contrastkit.models.build_backbone` besides the name
            (:data:`contrastkit.models.BACKBONE_ARGS`): ``in_channels``, ``cifar_stem`` (torchvision ResNets);
            ``in_channels``, ``widths``, ``blocks``, ``stem_stride`` (small_resnet); ``in_channels``, ``widths``
            (convnet). They are also the class's own arguments: ``SmallResNet(**args)``, ``ConvNet(**args)``.
        feature_dim: output width D of the backbone.
        mean, std: per-channel input normalisation on the 0-1 pixel scale (the training set's statistics).
        input_size: side of the square input the backbone was trained on (the training crop size).
        dataset: training dataset name. method: SSL method. source: the checkpoint it came from.
        torchvision: how to build the matching torchvision model (``None`` for small_resnet and convnet).
    """

    architecture: str
    args: dict[str, Any]
    feature_dim: int
    mean: list[float]
    std: list[float]
    input_size: int
    dataset: str = ""
    method: str = ""
    source: str = ""
    torchvision: dict[str, str] | None = None
    format: str = EXPORT_FORMAT
    version: int = EXPORT_VERSION
    weights_sha256: str = field(default="", repr=False)

    def build(self) -> nn.Module:
        """A freshly initialised backbone of this architecture (load the weights into it)."""
        from contrastkit.models import build_backbone

        model, _ = build_backbone(self.architecture, **self.args)
        return model


def sidecar_path(path: str | Path) -> Path:
    """The JSON sidecar of an export: ``backbone.pt`` -> ``backbone.json``."""
    p = Path(path)
    return p.with_suffix(".json") if p.suffix != ".json" else p.with_name(p.name + ".json")


def _torch_load(path: Path, map_location: Any = "cpu") -> Any:
    """A training checkpoint or an export, read safely (see :func:`contrastkit.checkpoint.safe_load`)."""
    from contrastkit.checkpoint import safe_load

    return safe_load(path, map_location, "pass a training checkpoint (.ckpt) or an exported backbone")


def _is_checkpoint(obj: Any) -> bool:
    return isinstance(obj, dict) and "state_dict" in obj and "hyper_parameters" in obj


def _info_from_hparams(hp: dict[str, Any], source: str) -> BackboneInfo:
    from contrastkit.config import config_from_dict

    if not isinstance(hp, dict) or "config" not in hp:
        raise ContrastkitError(f"{source!r} has no contrastkit hyper-parameters; was it written by contrastkit?")
    cfg = config_from_dict(hp["config"])
    m = cfg.model
    args = backbone_args(m.backbone, m, int(hp["in_channels"]))
    tv = _torchvision_recipe(m.backbone, args) if m.backbone in ("resnet18", "resnet50") else None
    dim = {"resnet18": 512, "resnet50": 2048}.get(m.backbone) or args["widths"][-1]
    return BackboneInfo(
        architecture=m.backbone, args=args, feature_dim=int(dim), mean=[float(v) for v in hp["mean"]],
        std=[float(v) for v in hp["std"]], input_size=int(cfg.views.crop_size or hp["image_size"]),
        dataset=cfg.data.name, method=cfg.method.name, source=source, torchvision=tv,
    )


def _torchvision_recipe(name: str, args: dict[str, Any]) -> dict[str, str]:
    """How to build the torchvision model an exported ResNet's weights load into: Python expressions (``nn`` is
    ``torch.nn``) for the constructor and for the modules that replace ``conv1``/``maxpool``/``fc``, or
    ``"unchanged"``; the same changes :func:`contrastkit.models.build_backbone` makes."""
    c = args["in_channels"]
    if args["cifar_stem"]:
        conv1 = f"nn.Conv2d({c}, 64, kernel_size=3, stride=1, padding=1, bias=False)"
    elif c != 3:
        conv1 = f"nn.Conv2d({c}, 64, kernel_size=7, stride=2, padding=3, bias=False)"
    else:
        conv1 = "unchanged"
    return {"constructor": f"torchvision.models.{name}(weights=None)", "conv1": conv1,
            "maxpool": "nn.Identity()" if args["cifar_stem"] else "unchanged", "fc": "nn.Identity()"}


def _backbone_state(state_dict: dict[str, Tensor], source: str) -> dict[str, Tensor]:
    """The backbone's entries of an :class:`SSLModule` state dict (``method.backbone.*``), prefix removed."""
    prefix = "method.backbone."
    out = {}
    for k, v in state_dict.items():
        if k.startswith(prefix):
            name = k[len(prefix):].replace("_orig_mod.", "")
            out[name] = v.detach().cpu().contiguous()
    if not out:
        raise ContrastkitError(f"{source!r} has no backbone weights (no method.backbone.* entries)")
    return out


def _checkpoint_backbone(path: Path, ckpt: dict[str, Any]) -> tuple[dict[str, Tensor], BackboneInfo]:
    info = _info_from_hparams(ckpt.get("hyper_parameters"), str(path))  # type: ignore[arg-type]
    return _backbone_state(ckpt["state_dict"], str(path)), info


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def export_backbone(checkpoint: str | Path, out: str | Path = "backbone.pt") -> tuple[Path, Path]:
    """Write the backbone of a training checkpoint as a plain state dict plus a JSON sidecar.

    Args:
        checkpoint: a ``.ckpt`` written by ``contrastkit train`` (read with ``weights_only=True``).
        out: the weights file (default ``backbone.pt``); the sidecar goes to :func:`sidecar_path` (``backbone.json``).

    Returns:
        ``(weights_path, sidecar_path)``. Both are written atomically; the sidecar records the SHA-256 of the
        weights, so :func:`load_backbone` notices a sidecar that belongs to other weights.
    """
    from contrastkit.checkpoint import load_checkpoint_file

    src = Path(checkpoint)
    out = Path(out)
    if out.suffix == ".json":
        raise ContrastkitError(f"--out {str(out)!r} would collide with the JSON sidecar; use a .pt name")
    if out.resolve() == src.resolve():
        raise ContrastkitError("--out must differ from the checkpoint")
    state, info = _checkpoint_backbone(src, load_checkpoint_file(src))
    side = sidecar_path(out)

    def write_weights(tmp: Path) -> None:
        torch.save(state, tmp)
        info.weights_sha256 = _sha256(tmp)

    atomic_write(out, write_weights)
    write_text_atomic(side, json.dumps(asdict(info), indent=2) + "\n")
    return out, side


def read_backbone_info(path: str | Path) -> BackboneInfo:
    """The :class:`BackboneInfo` of an export (from its sidecar) or of a training checkpoint."""
    p = Path(path)
    side = sidecar_path(p)
    if side.is_file() and p.suffix != ".ckpt":
        return _read_sidecar(side)
    obj = _torch_load(p)
    if _is_checkpoint(obj):
        return _info_from_hparams(obj["hyper_parameters"], str(p))
    raise ContrastkitError(f"{str(p)!r} has no sidecar {str(side)!r} with its architecture; re-export it")


def _read_sidecar(side: Path) -> BackboneInfo:
    try:
        data = json.loads(side.read_text())
        if data.get("format") != EXPORT_FORMAT:
            raise ValueError("format")
        return BackboneInfo(**{k: v for k, v in data.items() if k in BackboneInfo.__dataclass_fields__})
    except (OSError, ValueError, TypeError, AttributeError):
        raise ContrastkitError(f"{str(side)!r} is not a contrastkit backbone sidecar; re-export the backbone") from None


def load_backbone(path: str | Path, map_location: str | torch.device = "cpu") -> nn.Module:
    """A ready backbone (``nn.Module`` in eval mode, on ``map_location``) from an export or a training checkpoint.

    Args:
        path: ``backbone.pt`` written by :func:`export_backbone` (its ``backbone.json`` sidecar must be beside it),
            or a training checkpoint (``.ckpt``).
        map_location: device of the returned module (default ``"cpu"``).

    The module maps ``B x C x s x s`` float images, normalised with the info's ``mean``/``std``
    (:func:`read_backbone_info`), to ``B x D`` features. Files are read with ``torch.load(weights_only=True)``.
    """
    p = Path(path)
    obj = _torch_load(p, map_location="cpu")
    if _is_checkpoint(obj):
        state, info = _checkpoint_backbone(p, obj)
    elif isinstance(obj, dict) and obj and all(isinstance(k, str) and isinstance(v, Tensor) for k, v in obj.items()):
        side = sidecar_path(p)
        if not side.is_file():
            raise ContrastkitError(f"{str(p)!r} has no sidecar {str(side)!r} with its architecture; export it with "
                                   "`contrastkit export` (both files are needed)")
        info = _read_sidecar(side)
        if info.weights_sha256 and info.weights_sha256 != _sha256(p):
            raise ContrastkitError(f"{str(side)!r} belongs to other weights than {str(p)!r} (SHA-256 differs); "
                                   "re-export the backbone")
        state = obj
    else:
        raise ContrastkitError(f"{str(p)!r} is neither a contrastkit checkpoint nor an exported backbone state dict")
    model = info.build()
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        raise ContrastkitError(f"the weights in {str(p)!r} do not fit a {info.architecture} with {info.args} "
                               f"({str(e).splitlines()[0][:160]})") from None
    return model.to(map_location).eval()


# ---------------------------------------------------------------------------------------------------------------
# embed


def embed(
    checkpoint: str | Path,
    dataset: str,
    *,
    split: str = "test",
    root: str | None = None,
    out: str | Path = "features.npy",
    kind: str = "backbone",
    image_size: int | None = None,
    device: torch.device | str | None = None,
    batch_size: int | None = None,
    cache: bool = True,
    progress: bool = False,
) -> dict[str, Any]:
    """Write the features of a dataset split under a checkpoint's backbone (or projector).

    Args:
        checkpoint: a training checkpoint.
        dataset: dataset name (``contrastkit.data.available_datasets()``); the checkpoint's own dataset uses its
            ``data.root`` and options unless ``root`` is given.
        split: split (default ``test``).
        root: dataset folder (default ``None``: the checkpoint's for its own dataset, else the dataset's default).
        out: ``*.npy`` (default ``features.npy``): N x D float32 features there and, for a labelled split, N int64
            labels in ``<stem>.labels.npy`` beside it (``features.labels.npy``); or ``*.npz``: arrays ``features``
            and (labelled) ``labels`` in one file.
        kind: ``backbone`` (default) or ``projector``.
        image_size: decode size for ``imagefolder`` (default: the model's input size).
        device, batch_size, cache, progress: see :class:`~contrastkit.evaluation.offline.CheckpointEvaluator`.

    Images are normalised with the training set's mean/std and resized to the training crop size when they differ.

    Returns:
        ``{"features": path, "labels": path or None, "shape": [N, D]}``.
    """
    from contrastkit.evaluation.offline import CheckpointEvaluator

    out = Path(out)
    if out.suffix not in (".npy", ".npz"):
        raise ContrastkitError(f"--out {str(out)!r} must end in .npy or .npz")
    ev = CheckpointEvaluator(checkpoint, device=device, batch_size=batch_size, cache=cache, progress=progress)
    entry = ev.features(split, kind, dataset=dataset, root=root, image_size=image_size)
    feats = entry.features.detach().cpu().numpy().astype(np.float32, copy=False)  # N x D
    labels = None if entry.labels is None else entry.labels.cpu().numpy().astype(np.int64)
    if not np.isfinite(feats).all():
        raise DataError("the features contain NaN or Inf; the checkpoint's backbone diverged")
    if out.suffix == ".npz":
        arrays = {"features": feats} if labels is None else {"features": feats, "labels": labels}

        def write_npz(tmp: Path) -> None:
            with open(tmp, "wb") as f:
                np.savez(f, **arrays)

        atomic_write(out, write_npz)
        return {"features": out, "labels": out if labels is not None else None, "shape": list(feats.shape)}

    def writer(arr: np.ndarray) -> Any:
        def write(tmp: Path) -> None:
            with open(tmp, "wb") as f:
                np.save(f, arr)
        return write

    label_path = out.with_name(out.stem + ".labels.npy")
    if labels is not None:
        atomic_write(label_path, writer(labels))
    elif label_path.exists():
        label_path.unlink()  # a stale file from an earlier labelled embedding would be misleading
    atomic_write(out, writer(feats))
    return {"features": out, "labels": label_path if labels is not None else None, "shape": list(feats.shape)}
