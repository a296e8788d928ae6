"""The command line: config handling and bad input (one-line error, exit code 2, nothing half-written)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from contrastkit.cli import main


def _run(args: list[str], tmp_path: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "contrastkit.cli", *args], capture_output=True, text=True,
                          timeout=300, cwd=tmp_path)


def _assert_clean_error(proc: subprocess.CompletedProcess, *needles: str) -> None:
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-2000:])
    lines = [ln for ln in proc.stderr.strip().splitlines() if ln.startswith("error:")]
    assert len(lines) == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    for n in needles:
        assert n in lines[0], lines[0]


def test_print_config_applies_overrides(capsys):
    assert main(["train", "configs/fmnist_simclr_dcl.yaml", "optim.lr=0.7", "--print-config"]) == 0
    out = capsys.readouterr().out
    assert "lr: 0.7" in out and "loss: dcl" in out


@pytest.mark.parametrize(
    "override, needle",
    [
        ("optim.lrr=0.1", "optim.lrr"),
        ("optim.lr=-1", "optim.lr"),
        ("method.loss=nope", "method.loss"),
        ("train.precision=8", "train.precision"),
        ("optim.batch_size=abc", "optim.batch_size"),
        ("nosection.x=1", "nosection"),
    ],
)
def test_bad_config_values_are_refused(override, needle, capsys):
    assert main(["train", override, "--print-config"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and needle in err and len(err.splitlines()) == 1


def test_missing_config_file(capsys):
    assert main(["train", "does-not-exist.yaml"]) == 2
    assert "not found" in capsys.readouterr().err


@pytest.mark.slow
def test_missing_dataset_path(tmp_path):
    proc = _run(["train", "data.name=cifar10", f"data.root={tmp_path / 'nowhere'}",
                 f"train.run_dir={tmp_path / 'run'}"], tmp_path)
    _assert_clean_error(proc, "nowhere")
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_corrupt_image(tmp_path):
    from PIL import Image

    root = tmp_path / "imgs" / "cls"
    root.mkdir(parents=True)
    for i in range(3):
        Image.new("RGB", (20, 20), (i * 40, 0, 0)).save(root / f"{i}.png")
    (root / "bad.png").write_bytes(b"not an image at all")
    proc = _run(["train", "data.name=imagefolder", f"data.root={tmp_path / 'imgs'}", "data.image_size=16",
                 f"train.run_dir={tmp_path / 'run'}"], tmp_path)
    _assert_clean_error(proc, "bad.png")
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_float_image_is_refused_naming_file_and_mode(tmp_path):
    # 32-bit float pixels have no known range: refused (16-bit greyscale is scaled, see tests/test_data.py).
    import numpy as np
    from PIL import Image

    root = tmp_path / "imgs" / "cls"
    root.mkdir(parents=True)
    Image.new("RGB", (20, 20), (40, 0, 0)).save(root / "0.png")
    Image.fromarray(np.full((20, 20), 0.5, np.float32)).save(root / "depth.tif")
    proc = _run(["train", "data.name=imagefolder", f"data.root={tmp_path / 'imgs'}", "data.image_size=16",
                 f"train.run_dir={tmp_path / 'run'}"], tmp_path)
    _assert_clean_error(proc, "depth.tif", "mode F")
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_empty_dataset(tmp_path):
    (tmp_path / "empty").mkdir()
    proc = _run(["train", "data.name=imagefolder", f"data.root={tmp_path / 'empty'}", "data.image_size=16",
                 f"train.run_dir={tmp_path / 'run'}"], tmp_path)
    _assert_clean_error(proc)
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_batch_larger_than_dataset(tmp_path, tiny_overrides):
    args = [a for a in tiny_overrides if not a.startswith("optim.batch_size")] + ["optim.batch_size=4096"]
    proc = _run(["train", *args], tmp_path)
    _assert_clean_error(proc, "optim.batch_size")
    assert not (tmp_path / "run" / "checkpoints").exists()
    assert not (tmp_path / "run" / "results.json").exists()


@pytest.mark.slow
def test_diverging_loss_stops_without_result(tmp_path, tiny_overrides):
    args = [a for a in tiny_overrides if not a.startswith("optim.lr")] + ["optim.lr=1e30", "optim.warmup_epochs=0"]
    proc = _run(["train", *args], tmp_path)
    _assert_clean_error(proc, "diverged")
    assert not (tmp_path / "run" / "results.json").exists()
    assert not list((tmp_path / "run").glob("checkpoints/*.ckpt"))


@pytest.mark.slow
def test_resume_missing_checkpoint(tmp_path, tiny_overrides):
    proc = _run(["train", *tiny_overrides, f"train.resume={tmp_path / 'none.ckpt'}"], tmp_path)
    _assert_clean_error(proc, "none.ckpt")


@pytest.mark.slow
def test_bench_throughput_json_record(tmp_path, monkeypatch, capsys):
    # A seconds-long bench: one JSON record per setting, consistent numbers, and no checkpoint left behind.
    import json

    monkeypatch.chdir(tmp_path)
    code = main(["bench", "throughput", "--backbone", "small_resnet", "--dataset", "synthetic", "--batch-size", "32",
                 "--steps", "3", "--warmup", "1", "--json", "model.widths=[8,16]", "data.options={n: 256, channels: 3}"])
    assert code == 0
    lines = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("{")]
    assert len(lines) == 1
    rec = json.loads(lines[0])
    assert rec["backbone"] == "small_resnet" and rec["batch_size"] == 32 and rec["image_shape"] == [3, 32, 32]
    for key in ("views_images_per_sec", "model_images_per_sec", "end_to_end_images_per_sec", "peak_memory_mb"):
        assert rec[key] > 0, key
    e2e, model = rec["end_to_end_images_per_sec"], rec["model_images_per_sec"]  # each rounded to 0.1
    rounding = e2e / model * (0.05 / e2e + 0.05 / model)  # the ratio is of the unrounded values (slow, busy machines)
    assert rec["ratio_end_to_end_over_model"] == pytest.approx(e2e / model, abs=rounding + 1e-3)
    assert not list(tmp_path.rglob("*.ckpt"))


# ---------------------------------------------------------------------------------------------------------------
# Settings refused before anything runs (one line, exit 2, no run directory)


@pytest.mark.parametrize(
    "overrides, needle",
    [
        (["train.accelerator=gpu"], "train.accelerator=gpu"),  # the README's CIFAR recipe on a CPU box
        (["train.accelerator=tpu"], "train.accelerator"),
        (["train.devices=0"], "train.devices"),
        (["train.max_steps=-5"], "train.max_steps"),
        (["train.max_steps=0"], "train.max_steps"),
        (["train.seed=-1"], "train.seed"),
        (["optim.momentum=-0.5"], "optim.momentum"),
        (["optim.name=adamw", "optim.betas=[0.9, 1.0]"], "optim.betas"),
        (["train.precision=64-true"], "train.precision"),
        (["train.precision=16-mixed"], "16-mixed needs a CUDA GPU"),  # Lightning would silently run bf16 on CPU
        (["train.knn_every_n_epochs=-1"], "train.knn_every_n_epochs"),
        (["eval.batch_size=0"], "eval.batch_size"),
        (["eval.linear=true", "data.monitor_bank_split=null"], "eval.linear=true needs labelled splits"),
        (["views.crop_size=200"], "views.crop_size=200 is larger than the dataset's 16 px"),
        (["views.common={crop_scale: [-1, 0.5]}"], "crop_scale"),
    ],
)
def test_bad_settings_are_refused_before_the_run_starts(overrides, needle, tiny_overrides, tmp_path, monkeypatch,
                                                        capsys):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # the same answer on a GPU machine
    assert main(["train", *tiny_overrides, *overrides]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and needle in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    "args, needle",
    [
        (["--device", "cuda"], "CUDA is not available"),
        (["--steps", "0"], "--steps must be an integer >= 1"),
        (["--repeats", "0"], "--repeats must be an integer >= 1"),
        (["--precision", "16"], "needs a CUDA device"),
    ],
)
def test_bench_bad_options_are_refused(args, needle, monkeypatch, tmp_path, capsys):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.chdir(tmp_path)
    assert main(["bench", "throughput", "--backbone", "small_resnet", "--device", "cpu", *args]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and needle in err and len(err.splitlines()) == 1, err


def test_yaml_error_keeps_line_and_column(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("optim:\n  lr: 0.1\n  betas: [0.9, 0.99\ntrain:\n  epochs: 2\n")
    assert main(["train", str(bad), "--print-config"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "bad.yaml" in err and "line 4, column 6" in err, err


def test_cli_import_does_not_import_torch(tmp_path):
    # `contrastkit --help` must start fast: the CLI module and its parser import neither torch nor Lightning.
    code = ("import sys, contrastkit.cli as c; c.build_parser(); "
            "print(sorted(m for m in ('torch', 'lightning', 'numpy') if m in sys.modules))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert proc.returncode == 0 and proc.stdout.strip() == "[]", proc.stdout + proc.stderr


def test_readme_loss_snippet_runs():
    import re

    import torch

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", readme, flags=re.S)
    snippet = next(b for b in blocks if "Loss(" in b)
    scope: dict = {}
    exec(compile(snippet, "README.md", "exec"), scope)  # noqa: S102 - our own README
    loss = scope["loss"]
    assert isinstance(loss, torch.Tensor) and loss.ndim == 0 and torch.isfinite(loss)


# ---------------------------------------------------------------------------------------------------------------
# What a run prints and records


@pytest.mark.slow
def test_run_output_is_clean_and_reports_what_ran(tmp_path, tiny_overrides):
    import csv
    import json

    args = [a for a in tiny_overrides if not a.startswith(("train.epochs", "train.progress_bar", "train.knn_k"))]
    args += ["train.epochs=20", "train.max_steps=3", "train.knn_k=100000", "train.progress_bar=true",
             "train.log_every_n_steps=50"]
    proc = _run(["train", *args], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    # the progress bar is on stderr, the result table alone on stdout
    assert "it/s" not in proc.stdout and "Epoch 0" in proc.stderr
    # the summary says what ran: 3 of 8 steps of the first epoch, k clamped to the bank (train minus validation)
    res = json.loads((tmp_path / "run" / "results.json").read_text())
    bank = res["knn_bank_size"]
    assert 400 < bank < 512
    assert "3 steps = 0.38 of 20 ep, train.max_steps" in proc.stdout and "20 ep)" not in proc.stdout, proc.stdout
    assert f"k={bank}," in proc.stdout and "k=100000" not in proc.stdout
    # Lightning's benign banners, tips and deprecations are gone; its actionable hints are not
    for noise in ("GPU available", "TPU available", "Tip:", "litlogger", "LeafSpec", "`Trainer.fit` stopped"):
        assert noise not in proc.stderr, noise
    assert "logging interval" in proc.stderr
    # epochs are 0-based everywhere: results.json's history and metrics.csv agree on the epoch of step 3
    assert res["epochs_completed"] == 0 and res["steps"] == 3 and res["knn_k"] == bank
    assert [(h["epoch"], h["step"]) for h in res["knn_history"]] == [(0, 2)]  # the third step has index 2
    with open(tmp_path / "run" / "logs" / "csv" / "metrics.csv", newline="") as f:
        knn_rows = [r for r in csv.DictReader(f) if r.get("knn/top1")]
    assert [(int(r["epoch"]), int(r["step"])) for r in knn_rows] == [(0, 2)]


@pytest.mark.slow
def test_linear_probe_runs_without_the_knn_monitor(tmp_path, tiny_overrides):
    # eval.linear=true with the kNN monitor and final kNN off used to skip the probe without a word
    import json

    proc = _run(["train", *tiny_overrides, "train.epochs=1", "train.knn_every_n_epochs=0", "eval.knn=false",
                 "eval.linear=true", "eval.linear_epochs=2"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads((tmp_path / "run" / "results.json").read_text())
    assert 0 <= res["linear_top1"] <= 100 and "knn_top1" not in res
    assert f"{res['linear_top1']:.2f}" in proc.stdout and "linear probe" in proc.stdout


@pytest.mark.slow
def test_summary_prints_knn_and_linear_for_the_backbone_and_the_baselines(tmp_path, tiny_overrides):
    # what `make demo` prints: test kNN and linear probe of the trained backbone, the random-init backbone and raw
    # pixels, each number the one results.json holds
    import json

    proc = _run(["train", *tiny_overrides, "train.epochs=1", "eval.baselines=true", "eval.linear=true",
                 "eval.linear_epochs=2"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads((tmp_path / "run" / "results.json").read_text())
    lines = proc.stdout.splitlines()
    assert any(ln.split() == ["kNN", "top-1", "linear"] for ln in lines), proc.stdout

    def row(name: str) -> list[str]:
        return next(ln[len(name):].split() for ln in lines if ln.startswith(name))

    assert row("simclr+")[-2:] == [f"{res['knn_top1_test']:.2f}", f"{res['linear_top1_test']:.2f}"]
    assert row("random-init small_resnet") == [f"{res['random_init_knn']['top1']:.2f}",
                                               f"{res['random_init_linear']['top1']:.2f}"]
    assert row("raw pixels (normalised)") == [f"{res['raw_pixels_knn']['top1']:.2f}",
                                              f"{res['raw_pixels_linear']['top1']:.2f}"]
    assert row("raw pixels (in [0, 1])") == [f"{res['raw_pixels_unnormalised_knn']['top1']:.2f}",
                                             f"{res['raw_pixels_linear']['top1']:.2f}"]


@pytest.mark.slow
def test_bench_honours_dataset_for_every_backbone(tmp_path, monkeypatch, capsys):
    import json

    monkeypatch.chdir(tmp_path)
    assert main(["bench", "throughput", "--backbone", "resnet18", "--dataset", "fashion-mnist", "--batch-size", "8",
                 "--steps", "1", "--warmup", "0", "--device", "cpu", "--json"]) == 0
    (line,) = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("{")]
    rec = json.loads(line)
    assert rec["backbone"] == "resnet18" and rec["dataset"] == "fashion-mnist" and rec["image_shape"] == [1, 28, 28]
