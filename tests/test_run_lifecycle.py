"""Runs a user can trust, through the CLI: resume rules, run directories, checkpoint integrity, interruptions.

Every run here is a few seconds on synthetic data (``train.num_threads=1``, no kNN monitor); runs that are
interrupted are started with ``subprocess.Popen`` and signalled once their first checkpoint exists.
"""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import threading
import time
import zipfile
from pathlib import Path

import pytest
import torch

from contrastkit.cli import main
from contrastkit.checkpoint import load_checkpoint_file, save_checkpoint
from contrastkit.config import Config, load_config, to_yaml
from contrastkit.training.callbacks import AtomicCheckpointIO, divergence_error

pytestmark = pytest.mark.slow

TINY = [
    "data.name=synthetic", "data.image_size=16", "data.options={n: 256, channels: 3}", "views.common={blur_prob: 0.0}",
    "model.widths=[8, 16]", "model.stem_stride=1", "method.proj_hidden_dim=32", "method.proj_out_dim=16",
    "optim.batch_size=64", "train.epochs=1", "train.accelerator=cpu", "train.devices=1", "train.progress_bar=false",
    "train.knn_every_n_epochs=0", "eval.knn=false", "train.num_threads=1", "train.log_every_n_steps=1",
]


def cli(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "contrastkit.cli", *args], capture_output=True, text=True,
                          timeout=300, cwd=cwd)


def error_line(proc: subprocess.CompletedProcess, *needles: str) -> str:
    """The single ``error:`` line of a run that exited with status 2, containing every needle."""
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-3000:])
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1, proc.stderr[-3000:]
    for n in needles:
        assert n in lines[0], lines[0]
    return lines[0]


def ok(proc: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    """``{relative path: (size, mtime_ns)}`` of every file below ``folder``."""
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*")) if p.is_file()}


def interrupt_after_first_checkpoint(tmp_path: Path, sig: int, epochs: int) -> tuple[Path, int, str]:
    """Start a run of 32 steps per epoch, send ``sig`` once its ``last.ckpt`` exists; ``(run dir, rc, stderr)``."""
    run = tmp_path / "run"
    args = [*TINY, "data.options={n: 1024, channels: 3}", "optim.batch_size=32", f"train.epochs={epochs}",
            f"train.run_dir={run}"]
    proc = subprocess.Popen([sys.executable, "-m", "contrastkit.cli", "train", *args], cwd=tmp_path, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    t0 = time.monotonic()
    while not (run / "checkpoints" / "last.ckpt").exists():
        if proc.poll() is not None:
            raise AssertionError(f"the run ended before its first checkpoint: {proc.stderr.read()[-3000:]}")
        if time.monotonic() - t0 > 240:
            proc.kill()
            raise AssertionError("no checkpoint within 240 s")
        time.sleep(0.02)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    return run, proc.returncode, err


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A finished 2-epoch SimCLR run (``RUN/checkpoints/epoch=000.ckpt, epoch=001.ckpt, last.ckpt``)."""
    root = tmp_path_factory.mktemp("trained")
    ok(cli(["train", *TINY, "train.epochs=2", f"train.run_dir={root / 'run'}"], root))
    return root / "run"


# -- 1. resume accepts only compatible checkpoints and changes ---------------------------------------------------


@pytest.mark.parametrize("override, key, old, new", [
    ("method.name=barlow", "method.name", "'simclr'", "'barlow'"),
    ("optim.lr=5", "optim.lr", "0.3", "5.0"),
    ("optim.batch_size=32", "optim.batch_size", "64", "32"),
    ("method.loss=dcl", "method.loss", "None", "'dcl'"),  # unset (InfoNCE) in the checkpoint
    ("model.backbone=convnet", "model.backbone", "'small_resnet'", "'convnet'"),
    ("data.options={n: 320, channels: 3}", "data.options", "256", "320"),
    ("train.epochs=1", "train.epochs", "2", "1"),  # fewer epochs than the checkpoint has already trained
])
def test_resume_refuses_changes_that_define_the_run(trained, tmp_path, monkeypatch, capsys, override, key, old, new):
    # refused before anything is loaded, so in-process through contrastkit.cli.main
    monkeypatch.chdir(tmp_path)
    before = snapshot(trained)
    assert main(["train", "--resume", str(trained / "checkpoints" / "last.ckpt"), override]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and len(err.splitlines()) == 1 and key in err, err
    assert old in err and new in err, err
    assert snapshot(trained) == before  # nothing of the run was touched
    assert not (tmp_path / "runs").exists()


def test_a_barlow_checkpoint_does_not_resume_as_simclr(trained, tmp_path):
    # matching parameter names made this load silently, and results.json then said "simclr"
    ok(cli(["train", *TINY, "method.name=barlow", f"train.run_dir={tmp_path / 'barlow'}"], tmp_path))
    err = error_line(cli(["train", *TINY, "method.name=simclr", "train.epochs=2", f"train.run_dir={tmp_path / 's'}",
                          "--resume", str(tmp_path / "barlow" / "checkpoints" / "last.ckpt")], tmp_path), "method.name")
    assert "'barlow'" in err and "'simclr'" in err
    assert not (tmp_path / "s").exists()


def test_resume_with_more_epochs_records_what_ran(trained, tmp_path):
    # allowed changes are applied, config.yaml is the resumed run's, results.json lists the resume and its changes
    run = tmp_path / "fork"
    ok(cli(["train", "--resume", str(trained / "checkpoints" / "last.ckpt"), "train.epochs=3",
            f"train.run_dir={run}"], tmp_path))
    assert "epochs: 3" in (run / "config.yaml").read_text()
    res = json.loads((run / "results.json").read_text())
    assert res["steps"] == 3 * 4 and res["method"] == "simclr"
    assert res["resumed"] == [{"step": 8, "checkpoint": str(trained / "checkpoints" / "last.ckpt"),
                               "changed": {"train.epochs": [2, 3]}}]


# -- 2. a run directory belongs to one run -----------------------------------------------------------------------


def test_second_run_into_an_existing_run_directory_is_refused(trained, tmp_path):
    before = snapshot(trained)
    error_line(cli(["train", *TINY, "optim.lr=0.1", f"train.run_dir={trained}"], tmp_path), str(trained),
               "already holds a run", "--resume")
    assert snapshot(trained) == before
    assert not list(trained.rglob("last-v*.ckpt"))


# -- 3. kill -9, then resume: the CSV log keeps the finished epochs ----------------------------------------------


def test_kill9_then_resume_keeps_the_csv_rows_of_finished_epochs(tmp_path):
    run, rc, _ = interrupt_after_first_checkpoint(tmp_path, signal.SIGKILL, epochs=3)
    assert rc == -signal.SIGKILL
    ckpt_steps = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["global_step"]
    (run / "checkpoints" / "last.ckpt.tmp").write_bytes(b"half a checkpoint")  # what a kill mid-save left before
    ok(cli(["train", "--resume", str(run / "checkpoints" / "last.ckpt")], tmp_path))
    with open(run / "logs" / "csv" / "metrics.csv", newline="") as f:
        rows = [r for r in csv.DictReader(f) if r["train/loss"]]
    steps = [int(r["step"]) for r in rows]
    assert steps == list(range(3 * 32)), f"resumed at step {ckpt_steps}, logged steps {steps}"
    assert sorted({int(r["epoch"]) for r in rows}) == [0, 1, 2]
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == [
        "epoch=000.ckpt", "epoch=001.ckpt", "epoch=002.ckpt", "last.ckpt"]


# -- 4. output paths never come from a checkpoint ----------------------------------------------------------------


def test_resume_never_writes_where_the_checkpoint_says(trained, tmp_path):
    # a downloaded checkpoint whose stored run_dir points outside, and the run it was copied from, stay untouched
    ckpt = load_checkpoint_file(trained / "checkpoints" / "last.ckpt")
    ckpt["hyper_parameters"]["config"]["train"]["run_dir"] = str(tmp_path / "victim")
    (tmp_path / "downloads").mkdir()
    save_checkpoint(ckpt, tmp_path / "downloads" / "model.ckpt")
    before = snapshot(trained)
    ok(cli(["train", "--resume", "downloads/model.ckpt", "train.epochs=3"], tmp_path))
    assert not (tmp_path / "victim").exists()
    assert snapshot(trained) == before
    assert (tmp_path / "runs" / "default" / "checkpoints" / "epoch=002.ckpt").is_file()
    assert sorted(p.name for p in (tmp_path / "downloads").iterdir()) == ["model.ckpt"]


# -- 5. a diverged run keeps no blown-up checkpoint --------------------------------------------------------------


def test_diverged_weights_are_never_checkpointed(tmp_path):
    # lr 1e4: the loss stays finite (normalised embeddings) while the weights reach ~1e14 and kNN falls to chance
    run = tmp_path / "run"
    err = error_line(cli(["train", *TINY, "optim.lr=1e4", "optim.warmup_epochs=0", "train.epochs=2",
                          f"train.run_dir={run}"], tmp_path), "diverged", "optim.lr")
    assert "train.precision" not in err  # it is already 32
    for p in run.glob("checkpoints/*.ckpt") if run.exists() else []:
        sd = torch.load(p, weights_only=True)["state_dict"]
        assert max(float(v.abs().max()) for v in sd.values() if v.is_floating_point()) < 1e12, p
    assert not (run / "results.json").exists()


def test_divergence_advice_follows_the_settings():
    cfg = Config()
    cfg.train.precision, cfg.optim.gradient_clip_val = "32-true", 1.0
    msg = str(divergence_error(cfg, "diverged"))
    assert "optim.lr" in msg and "train.precision" not in msg and "gradient_clip_val" not in msg
    cfg.train.precision, cfg.optim.gradient_clip_val = "bf16-mixed", 0.0
    msg = str(divergence_error(cfg, "diverged"))
    assert "train.precision=32" in msg and "gradient_clip_val" in msg


# -- 6. checkpoint integrity -------------------------------------------------------------------------------------


def _flip_block(path: Path, out: Path) -> None:
    """Copy ``path`` to ``out`` with 512 bytes inverted in the middle of its largest tensor record."""
    with zipfile.ZipFile(path) as z:
        info = max((i for i in z.infolist() if "/data/" in i.filename), key=lambda i: i.file_size)
    data = bytearray(path.read_bytes())
    with open(path, "rb") as f:  # the record's data start: local header (30 bytes) + name + extra field
        f.seek(info.header_offset + 26)
        name_len, extra_len = int.from_bytes(f.read(2), "little"), int.from_bytes(f.read(2), "little")
    start = info.header_offset + 30 + name_len + extra_len + info.file_size // 2
    data[start : start + 512] = bytes(b ^ 0xFF for b in data[start : start + 512])
    out.write_bytes(bytes(data))


def test_a_flipped_block_in_a_checkpoint_is_reported_corrupt(trained, tmp_path):
    bad = tmp_path / "flipped.ckpt"
    _flip_block(trained / "checkpoints" / "last.ckpt", bad)
    torch.load(bad, weights_only=True)  # control: torch itself loads the damaged file without a word
    error_line(cli(["export", str(bad), "--out", str(tmp_path / "b.pt")], tmp_path), "corrupt", "flipped.ckpt")
    error_line(cli(["train", "--resume", str(bad), f"train.run_dir={tmp_path / 'r'}"], tmp_path), "corrupt")
    assert not (tmp_path / "b.pt").exists() and not (tmp_path / "r").exists()


def test_random_bytes_are_not_a_checkpoint(tmp_path):
    noise = tmp_path / "noise.ckpt"
    noise.write_bytes(bytes(range(1, 256)) * 40)
    err = error_line(cli(["export", str(noise), "--out", str(tmp_path / "b.pt")], tmp_path), "not a checkpoint")
    assert "refusing" not in err and "unpickl" not in err


# -- 7. one-line errors and clean exits --------------------------------------------------------------------------


def test_unwritable_run_dir_is_a_one_line_error(tmp_path):
    (tmp_path / "file").write_text("a file, not a folder")
    error_line(cli(["train", *TINY, f"train.run_dir={tmp_path / 'file' / 'run'}"], tmp_path), "train.run_dir")


def test_invalid_eval_setting_fails_before_training_and_leaves_no_directory(tmp_path):
    error_line(cli(["train", *TINY, "eval.batch_size=0", f"train.run_dir={tmp_path / 'a' / 'run'}"], tmp_path),
               "eval.batch_size")
    assert not (tmp_path / "a").exists()
    # a failure after the run directory was made (here: the batch is larger than the dataset) removes it again
    error_line(cli(["train", *TINY, "optim.batch_size=4096", f"train.run_dir={tmp_path / 'b' / 'run'}"], tmp_path),
               "optim.batch_size")
    assert not (tmp_path / "b").exists()


def test_ctrl_c_exits_130_and_names_the_resume_command(tmp_path):
    run, rc, err = interrupt_after_first_checkpoint(tmp_path, signal.SIGINT, epochs=50)
    assert rc == 130, err[-3000:]
    assert "Traceback" not in err
    hint = [ln for ln in err.splitlines() if ln.startswith("interrupted")]
    assert len(hint) == 1 and f"--resume {run / 'checkpoints' / 'last.ckpt'}" in hint[0], err[-3000:]


def test_overrides_after_resume_and_resume_last_of_a_config(tmp_path):
    cfg = tmp_path / "tiny.yaml"
    cfg.write_text(to_yaml(load_config(None, [*TINY, "train.run_dir=runs/tiny"])))
    ok(cli(["train", str(cfg)], tmp_path))
    ok(cli(["train", str(cfg), "--resume", "last", "train.epochs=2"], tmp_path))  # overrides after --resume
    assert "epochs: 2" in (tmp_path / "runs" / "tiny" / "config.yaml").read_text()
    assert json.loads((tmp_path / "runs" / "tiny" / "results.json").read_text())["steps"] == 2 * 4


# -- 8. atomic writes --------------------------------------------------------------------------------------------


def test_two_checkpoint_writers_of_one_file_do_not_collide(tmp_path):
    path = tmp_path / "last.ckpt"
    payloads = [{"state_dict": {"w": torch.full((1 << 20,), float(i))}} for i in range(2)]
    errors: list[BaseException] = []
    barrier = threading.Barrier(2)

    def writer(i: int) -> None:
        try:
            for _ in range(5):
                barrier.wait()
                AtomicCheckpointIO().save_checkpoint(dict(payloads[i]), path)
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)
            barrier.abort()

    threads = [threading.Thread(target=writer, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    w = load_checkpoint_file(path)["state_dict"]["w"]
    assert float(w[0]) in (0.0, 1.0) and bool((w == w[0]).all())
    assert os.listdir(tmp_path) == ["last.ckpt"]
