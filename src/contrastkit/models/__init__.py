"""Backbones and MLP heads; the shared parts of the methods: memory queue, nearest neighbours, momentum teacher,
All4One's centroid transformer."""

from contrastkit.models.backbones import (
    BACKBONE_ARGS,
    BACKBONES,
    ConvNet,
    SmallResNet,
    backbone_args,
    backbone_stages,
    build_backbone,
    stage_names,
)
from contrastkit.models.centroid import CentroidTransformer, sinusoidal_token_code
from contrastkit.models.heads import mlp
from contrastkit.models.momentum import MomentumTeacher, cosine_momentum, fixed_momentum
from contrastkit.models.neighbours import Neighbours, cosine_similarities, cosine_topk, nearest_neighbours
from contrastkit.models.queue import MemoryQueue

__all__ = [
    "BACKBONES",
    "BACKBONE_ARGS",
    "CentroidTransformer",
    "ConvNet",
    "MemoryQueue",
    "MomentumTeacher",
    "Neighbours",
    "SmallResNet",
    "backbone_args",
    "backbone_stages",
    "build_backbone",
    "cosine_momentum",
    "cosine_similarities",
    "cosine_topk",
    "fixed_momentum",
    "mlp",
    "nearest_neighbours",
    "sinusoidal_token_code",
    "stage_names",
]
