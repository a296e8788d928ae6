"""Shared test settings: small thread counts keep the suite predictable on the 2-core CI machine."""

import os

import pytest
import torch

torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(scope="module")
def one_torch_thread():
    """One torch thread for a module of tiny-tensor tests: thread-pool overhead dominates there, most of all on a
    busy shared 2-core machine (about 3x faster); the previous count is restored afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def tiny_overrides(tmp_path):
    """Overrides for a seconds-long training run on synthetic data."""
    return [
        "data.name=synthetic",
        "data.image_size=16",
        "data.options={n: 512, channels: 3}",
        "views.preset=simclr",
        "views.common={blur_prob: 0.0}",
        "model.backbone=small_resnet",
        "model.widths=[16, 32]",
        "model.stem_stride=1",
        "method.proj_hidden_dim=64",
        "method.proj_out_dim=32",
        "optim.batch_size=64",
        "optim.lr=0.1",
        "train.epochs=2",
        "train.accelerator=cpu",
        "train.devices=1",
        "train.progress_bar=false",
        "train.knn_k=20",
        "eval.batch_size=256",
        f"train.run_dir={tmp_path / 'run'}",
    ]
