"""Evaluation protocols for frozen representations: feature extraction, weighted kNN and the linear probe.

See ``docs/evaluation.md`` for the exact settings and references. :class:`CheckpointEvaluator` runs the protocols
on a training checkpoint with cached features; ``contrastkit.evaluation.online.OnlineLinearProbe`` is the online
linear probe of ``train.online_linear``; :func:`final_evaluation` is the baselines and linear probe at the end of a
training run; ``contrastkit.evaluation.plots`` draws embedding maps and retrieval grids.
"""

from contrastkit.evaluation.cache import CachedFeatures
from contrastkit.evaluation.features import extract_augmented_features, extract_features
from contrastkit.evaluation.final import eval_size, final_evaluation, monitor_bank
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
    "eval_size",
    "final_evaluation",
    "knn_evaluate",
    "knn_grid",
    "knn_predict",
    "linear_probe",
    "monitor_bank",
    "topk_accuracy",
]
