"""Datasets held in memory as uint8 tensors.

Every dataset loads into an :class:`ImageTensors` (``images``: uint8 ``N x C x H x W``; ``labels``: int64 ``N`` or
``None``), read straight from its on-disk format with numpy or Pillow; nothing is ever downloaded. Augmentation and
normalisation happen later, batched on the training device.

>>> from contrastkit.data import load_dataset
>>> train = load_dataset("synthetic", split="train", n=256)
>>> train.images.shape, train.labels.shape
(torch.Size([256, 3, 32, 32]), torch.Size([256]))
"""

from contrastkit.data.tensors import ImageTensors, IndexLike
from contrastkit.data.registry import available_datasets, dataset_options, dataset_splits, load_dataset

__all__ = [
    "ImageTensors",
    "IndexLike",
    "available_datasets",
    "dataset_options",
    "dataset_splits",
    "load_dataset",
]
