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
