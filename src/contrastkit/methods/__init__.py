"""Self-supervised methods: each a short composition of backbones, heads and losses.

``METHODS`` maps the configuration name (``method.name``) to the class; :func:`build_method` constructs one.
"""

from __future__ import annotations

from torch import nn

from contrastkit.config import MethodConfig
from contrastkit.errors import ConfigError
from contrastkit.methods.all4one import All4One
from contrastkit.methods.barlow import BarlowTwins
from contrastkit.methods.base import ParamGroup, SSLMethod
from contrastkit.methods.byol import BYOL
from contrastkit.methods.moco import MoCo
from contrastkit.methods.nnclr import NNCLR
from contrastkit.methods.simclr import SimCLR

METHODS: dict[str, type[SSLMethod]] = {
    "simclr": SimCLR,
    "moco": MoCo,
    "nnclr": NNCLR,
    "byol": BYOL,
    "barlow": BarlowTwins,
    "all4one": All4One,
}


def loss_name(cfg: MethodConfig) -> str:
    """The loss a method config trains with: the method's own (byol, barlow) or its contrastive loss."""
    own = METHODS[cfg.name].own_loss if cfg.name in METHODS else None
    return own or cfg.contrastive_loss


def build_method(backbone: nn.Module, feature_dim: int, cfg: MethodConfig) -> SSLMethod:
    """Instantiate the method named by ``cfg.name`` around ``backbone``."""
    if cfg.name not in METHODS:
        raise ConfigError(f"unknown method.name {cfg.name!r}; choose one of {', '.join(sorted(METHODS))}")
    return METHODS[cfg.name](backbone, feature_dim, cfg)


__all__ = ["All4One", "BYOL", "METHODS", "NNCLR", "BarlowTwins", "MoCo", "ParamGroup", "SSLMethod", "SimCLR",
           "build_method",
           "loss_name"]
