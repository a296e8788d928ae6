"""Self-supervised methods: each a short composition of backbones, heads and losses.

``METHODS`` maps the configuration name (``method.name``) to the class; :func:`build_method` constructs one.
"""

from __future__ import annotations

from torch import nn

from contrastkit.config import MethodConfig
from contrastkit.errors import ConfigError
from contrastkit.methods.base import ParamGroup, SSLMethod
from contrastkit.methods.simclr import SimCLR

METHODS: dict[str, type[SSLMethod]] = {"simclr": SimCLR}


def build_method(backbone: nn.Module, feature_dim: int, cfg: MethodConfig) -> SSLMethod:
    """Instantiate the method named by ``cfg.name`` around ``backbone``."""
    if cfg.name not in METHODS:
        raise ConfigError(f"unknown method.name {cfg.name!r}; choose one of {', '.join(sorted(METHODS))}")
    return METHODS[cfg.name](backbone, feature_dim, cfg)


__all__ = ["METHODS", "ParamGroup", "SSLMethod", "SimCLR", "build_method"]
