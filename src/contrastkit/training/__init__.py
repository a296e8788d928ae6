"""Training: the Lightning module, optimisers and schedule, callbacks, and the :func:`train` entry point."""

from contrastkit.training.run import TrainResult, train

__all__ = ["TrainResult", "train"]
