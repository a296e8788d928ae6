"""Per-step training losses of every host on tiny synthetic data: the reference for "no plug-ins = the old run".

``python tests/plugin_reference.py`` rewrote ``tests/fixtures/no_plugin_losses.json`` from the code *before* the
plug-in seam existed (commit 66473b5); ``tests/test_plugins.py`` recomputes the same runs with the current code and
compares them step by step. Each contrastive host (simclr, moco, nnclr) gets an explicit ``method.loss`` so that a
change of the default loss does not change the run; byol and barlow have their own loss and leave it unset.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import lightning as L
import torch

FIXTURE = Path(__file__).parent / "fixtures" / "no_plugin_losses.json"

HOSTS = {  # run name -> overrides
    "simclr_infonce": ["method.name=simclr", "method.loss=infonce"],
    "simclr_dcl": ["method.name=simclr", "method.loss=dcl"],
    "moco_infonce": ["method.name=moco", "method.loss=infonce", "method.queue_size=128"],
    "nnclr_infonce": ["method.name=nnclr", "method.loss=infonce", "method.queue_size=128"],
    "byol": ["method.name=byol"],  # byol and barlow have their own loss: method.loss stays unset
    "barlow": ["method.name=barlow"],
}

STEPS = 4


def tiny(run_dir: Path) -> list[str]:
    """A seconds-long run on synthetic data (as the tiny_overrides fixture of conftest.py, fewer steps)."""
    return [
        "data.name=synthetic", "data.image_size=16", "data.options={n: 256, channels: 3}", "views.preset=simclr",
        "views.common={blur_prob: 0.0}", "model.backbone=small_resnet", "model.widths=[8, 16]",
        "model.stem_stride=1", "method.proj_hidden_dim=32", "method.proj_out_dim=16", "method.pred_hidden_dim=32",
        "optim.batch_size=32", "optim.lr=0.1", "train.epochs=2", f"train.max_steps={STEPS}",
        "train.accelerator=cpu", "train.devices=1", "train.progress_bar=false", "train.knn_every_n_epochs=0",
        "eval.knn=false", "data.monitor_bank_split=null", "data.monitor_query_split=null",
        f"train.run_dir={run_dir}",
    ]


class LossRecorder(L.Callback):
    """Collects the training loss of every step."""

    def __init__(self) -> None:
        self.losses: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        self.losses.append(float(loss.detach()))


def per_step_losses(overrides: list[str], run_dir: Path) -> list[float]:
    from contrastkit.config import load_config
    from contrastkit.training.run import train

    torch.set_num_threads(1)  # the fixture was written with one thread (reduction order)
    recorder = LossRecorder()
    train(load_config(None, tiny(run_dir) + overrides), callbacks=[recorder])
    return recorder.losses


if __name__ == "__main__":
    import tempfile

    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, ov in HOSTS.items():
            out[name] = per_step_losses(ov, Path(tmp) / name)
            print(name, out[name], file=sys.stderr)
    FIXTURE.write_text(json.dumps({"commit": sys.argv[1] if len(sys.argv) > 1 else "", "steps": STEPS,
                                   "losses": out}, indent=1) + "\n")
