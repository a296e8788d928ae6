"""Resume under DDP: 2 gloo CPU processes trained by ``train()`` with ``train.strategy=ddp`` (the workers started
like torchrun starts them, see distributed_utils), interrupted after epoch 1 and resumed, end bit-exactly where the
uninterrupted 2-process run ends. MoCo is used because it has every kind of state: queue (global, gathered), EMA
teacher, shuffling BN (its permutation is drawn on rank 0 from torch's global generator and broadcast), and
per-rank augmentation generators (each rank must continue its own after the resume, not rank 0's)."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch

from contrastkit.config import load_config
from contrastkit.training.run import train

from distributed_utils import run_gloo

pytestmark = pytest.mark.slow

OVERRIDES = [
    "data.name=synthetic", "data.image_size=16", "data.options={n: 256, channels: 3}", "views.preset=simclr",
    "views.common={blur_prob: 0.0}", "model.backbone=small_resnet", "model.widths=[8, 16]", "model.stem_stride=1",
    "method.name=moco", "method.proj_hidden_dim=32", "method.proj_out_dim=16", "method.queue_size=48",
    "method.momentum_final=0.999", "optim.batch_size=32", "optim.lr=0.1", "train.epochs=2", "train.accelerator=cpu",
    "train.devices=2", "train.strategy=ddp", "train.progress_bar=false", "train.knn_every_n_epochs=0",
    "eval.knn=false",
]
STEPS_PER_EPOCH = 256 // 2 // 32


class _StopAfterFirstEpoch(L.Callback):
    def on_train_epoch_end(self, trainer, pl_module):
        trainer.should_stop = True


def _resume_worker(rank: int, world: int, tmp: str) -> dict[str, int]:
    steps = {}
    full = train(load_config(None, OVERRIDES + [f"train.run_dir={Path(tmp) / 'full'}"]))
    part = train(load_config(None, OVERRIDES + [f"train.run_dir={Path(tmp) / 'part'}"]),
                 callbacks=[_StopAfterFirstEpoch()])
    resumed = train(load_config(None, OVERRIDES + [f"train.run_dir={Path(tmp) / 'part'}", "train.resume=last"]))
    for name, res in (("full", full), ("part", part), ("resumed", resumed)):
        steps[name] = res.metrics["steps"]
    return steps


def test_ddp_resume_continues_exactly(tmp_path: Path) -> None:
    results = run_gloo(_resume_worker, 2, tmp_path, str(tmp_path), timeout_s=400, launcher="lightning")
    for steps in results:
        assert steps == {"full": 2 * STEPS_PER_EPOCH, "part": STEPS_PER_EPOCH, "resumed": 2 * STEPS_PER_EPOCH}
    full = torch.load(tmp_path / "full" / "checkpoints" / "last.ckpt", weights_only=True)
    resumed = torch.load(tmp_path / "part" / "checkpoints" / "last.ckpt", weights_only=True)
    a, b = full["state_dict"], resumed["state_dict"]
    assert a.keys() == b.keys() and "method.queue.keys" in a and "method.teacher.backbone.stem.0.weight" in a
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} differs after the resume"
    for s, t in zip(full["optimizer_states"][0]["state"].values(), resumed["optimizer_states"][0]["state"].values()):
        assert torch.equal(s["momentum_buffer"], t["momentum_buffer"])
