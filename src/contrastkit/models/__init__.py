"""Backbones and MLP heads."""

from contrastkit.models.backbones import BACKBONES, SmallResNet, build_backbone
from contrastkit.models.heads import mlp

__all__ = ["BACKBONES", "SmallResNet", "build_backbone", "mlp"]
