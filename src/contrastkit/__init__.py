"""contrastkit: contrastive self-supervised learning of image representations.

Top-level API (imported lazily, so ``import contrastkit`` and the CLI start fast):

* :func:`load_backbone` — a trained backbone (``nn.Module`` in eval mode) from an exported ``backbone.pt`` or a
  training checkpoint; :func:`read_backbone_info` — its architecture and input normalisation.
* :func:`export_backbone` — write a checkpoint's backbone as a plain state dict + JSON sidecar.

Everything else lives in the sub-packages (``contrastkit.training``, ``contrastkit.evaluation``, ...).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

__all__ = ["BackboneInfo", "export_backbone", "load_backbone", "read_backbone_info"]

if TYPE_CHECKING:  # pragma: no cover
    from contrastkit.export import BackboneInfo, export_backbone, load_backbone, read_backbone_info


def __getattr__(name: str) -> Any:
    if name in __all__:
        from contrastkit import export

        return getattr(export, name)
    raise AttributeError(f"module 'contrastkit' has no attribute {name!r}")
