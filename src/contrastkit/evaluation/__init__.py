"""Evaluation protocols for frozen representations: feature extraction, weighted kNN and the linear probe.

See ``docs/evaluation.md`` for the exact settings and references.
"""

from contrastkit.evaluation.features import extract_features
from contrastkit.evaluation.knn import knn_evaluate, knn_grid, knn_predict
from contrastkit.evaluation.linear import (
    DEFAULT_LRS,
    DEFAULT_WEIGHT_DECAYS,
    FeatureFn,
    LinearProbeResult,
    linear_probe,
)
from contrastkit.evaluation.metrics import topk_accuracy

__all__ = [
    "DEFAULT_LRS",
    "DEFAULT_WEIGHT_DECAYS",
    "FeatureFn",
    "LinearProbeResult",
    "extract_features",
    "knn_evaluate",
    "knn_grid",
    "knn_predict",
    "linear_probe",
    "topk_accuracy",
]
