"""Evaluation protocols for frozen representations: feature extraction, weighted kNN and the linear probe.

See ``docs/evaluation.md`` for the exact settings and references. :class:`CheckpointEvaluator` runs the protocols
on a training checkpoint with cached features; ``contrastkit.evaluation.online.OnlineLinearProbe`` is the online
linear probe of ``train.online_linear``; ``contrastkit.evaluation.plots`` draws embedding maps and retrieval grids.
"""

from contrastkit.evaluation.cache import CachedFeatures
from contrastkit.evaluation.features import extract_augmented_features, extract_features
from contrastkit.evaluation.knn import knn_evaluate, knn_grid, knn_predict
from contrastkit.evaluation.linear import (
    DEFAULT_LRS,
    DEFAULT_WEIGHT_DECAYS,
    FeatureFn,
    LinearProbeResult,
    linear_probe,
)
from contrastkit.evaluation.metrics import topk_accuracy
from contrastkit.evaluation.offline import FEATURE_KINDS, CheckpointEvaluator

__all__ = [
    "FEATURE_KINDS",
    "CachedFeatures",
    "CheckpointEvaluator",
    "DEFAULT_LRS",
    "DEFAULT_WEIGHT_DECAYS",
    "FeatureFn",
    "LinearProbeResult",
    "extract_augmented_features",
    "extract_features",
    "knn_evaluate",
    "knn_grid",
    "knn_predict",
    "linear_probe",
    "topk_accuracy",
]
