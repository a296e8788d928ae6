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
import numpy as np
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


def assert_config_refused(overrides: list[str], needle: str) -> None:
    """Loading a configuration with ``overrides`` raises a one-line ConfigError that contains ``needle``."""
    import pytest

    from contrastkit.config import load_config
    from contrastkit.errors import ConfigError

    with pytest.raises(ConfigError) as e:
        load_config(None, overrides)
    assert needle in str(e.value) and "\n" not in str(e.value)


def numeric_grad(f, x: np.ndarray, eps: float = 1e-6) -> np.ndarray:
    """Central differences of the scalar function ``f`` at ``x`` (the gradients of the NumPy references)."""
    g = np.zeros_like(x)
    for idx in np.ndindex(*x.shape):
        hi, lo = x.copy(), x.copy()
        hi[idx] += eps
        lo[idx] -= eps
        g[idx] = (f(hi) - f(lo)) / (2 * eps)
    return g


def per_step_losses(overrides: list[str], run_dir: Path) -> list[float]:
    from contrastkit.config import load_config
    from contrastkit.training.run import train

    torch.set_num_threads(1)  # the fixture was written with one thread (reduction order)
    recorder = LossRecorder()
    train(load_config(None, tiny(run_dir) + overrides), callbacks=[recorder])
    return recorder.losses


def assert_resume_exact(overrides: list[str], tmp_path: Path) -> dict[str, torch.Tensor]:
    """Train ``overrides`` (2 epochs) straight through, and again interrupted after epoch 1 and resumed; assert the
    two final checkpoints hold identical weights and buffers; return them."""
    from contrastkit.config import load_config
    from contrastkit.training.run import train

    from test_training import _StopAfterFirstEpoch, _weights

    full = train(load_config(None, overrides + [f"train.run_dir={tmp_path / 'full'}"]))
    part_dir = tmp_path / "part"
    train(load_config(None, overrides + [f"train.run_dir={part_dir}"]), callbacks=[_StopAfterFirstEpoch()])
    resumed = train(load_config(None, overrides + [f"train.run_dir={part_dir}", "train.resume=last"]))
    assert resumed.metrics["steps"] == full.metrics["steps"]
    a, b = _weights(full.last_checkpoint), _weights(resumed.last_checkpoint)
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0, msg=f"{key} differs after resume")
    return a


def bench_records(options: list[str], overrides: list[str], capsys) -> list[dict]:
    """``contrastkit bench throughput OPTIONS --json OVERRIDES`` on tiny synthetic data: the JSON records printed
    (``--json`` ends a list-valued option such as ``--method a b``)."""
    from contrastkit.cli import main

    code = main(["bench", "throughput", "--backbone", "small_resnet", "--dataset", "synthetic", "--batch-size", "16",
                 "--steps", "2", "--warmup", "1", *options, "--json", "model.widths=[8,16]",
                 "data.options={n: 128, channels: 3}", *overrides])
    assert code == 0
    return [json.loads(ln) for ln in capsys.readouterr().out.splitlines() if ln.startswith("{")]


if __name__ == "__main__":
    import tempfile

    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, ov in HOSTS.items():
            out[name] = per_step_losses(ov, Path(tmp) / name)
            print(name, out[name], file=sys.stderr)
    FIXTURE.write_text(json.dumps({"commit": sys.argv[1] if len(sys.argv) > 1 else "", "steps": STEPS,
                                   "losses": out}, indent=1) + "\n")
