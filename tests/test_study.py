"""`contrastkit study`: validation, equal budgets, dry-run, resume, paired CIs, a tiny study end to end."""

from __future__ import annotations

import json
import math
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from contrastkit.cli import main
from contrastkit.errors import ConfigError
from contrastkit.study import (
    baseline_pairs, load_study, paired_difference, run_study, study_commands, write_summary)

#: A seconds-long run on synthetic data (as tests/conftest.py's tiny_overrides), without run_dir / seed.
TINY = [
    "data.name=synthetic", "data.image_size=16", "data.options={n: 256, channels: 3}", "views.common={blur_prob: 0.0}",
    "model.backbone=small_resnet", "model.widths=[8, 16]", "model.stem_stride=1", "method.proj_hidden_dim=32",
    "method.proj_out_dim=16", "optim.batch_size=64", "optim.lr=0.1", "train.accelerator=cpu", "train.devices=1",
    "train.knn_k=10", "train.log_every_n_steps=1", "eval.batch_size=256",
]


def _study(tmp_path: Path, **spec) -> Path:
    data = {"overrides": TINY, "budget": {"epochs": 1}, "seeds": 2, "baseline": "infonce",
            "arms": {"infonce": ["method.loss=infonce"], "dcl": ["method.loss=dcl"]}, "out": str(tmp_path / "st")}
    data.update(spec)
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def _one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err, err
    return err


# ------------------------------------------------------------------------------------------ statistics


def test_paired_difference_matches_a_hand_computation():
    # Differences per seed: 1.0, 0.5, 2.1 -> mean 1.2, sample std sqrt(((-.2)^2 + (-.7)^2 + .9^2) / 2) = sqrt(0.67);
    # t_{0.975, 2} = 4.302653 (table value), so the half-width is 4.302653 * sqrt(0.67) / sqrt(3).
    arm = {0: 81.0, 1: 80.5, 2: 82.6, 7: 99.0}  # seed 7 has no baseline partner: not paired
    base = {0: 80.0, 1: 80.0, 2: 80.5}
    d = paired_difference(arm, base)
    half = 4.302653 * math.sqrt(0.67) / math.sqrt(3)
    assert d["n"] == 3 and d["seeds"] == [0, 1, 2]
    assert d["mean"] == pytest.approx(1.2)
    assert d["std"] == pytest.approx(math.sqrt(0.67))
    assert d["t"] == pytest.approx(4.302653, abs=1e-6)
    assert (d["ci_low"], d["ci_high"]) == (pytest.approx(1.2 - half), pytest.approx(1.2 + half))
    # a single pair has a mean but no interval; no shared seed gives nothing
    assert paired_difference({0: 2.0}, {0: 1.0}) == {"n": 1, "seeds": [0], "mean": 1.0, "std": None,
                                                     "ci_low": None, "ci_high": None, "t": None}
    assert paired_difference({0: 2.0}, {1: 1.0}) is None


# ------------------------------------------------------------------------------------------ validation


def test_unequal_budgets_are_refused_unless_allowed(tmp_path, capsys):
    path = _study(tmp_path, arms={"a": [], "b": ["train.epochs=2"]}, baseline="a")
    with pytest.raises(ConfigError, match="unequal budgets: arm 'b' trains 2 epochs, the study's budget is 1"):
        load_study(path)
    assert main(["study", str(path), "--dry-run"]) == 2
    assert "unequal budgets" in _one_line_error(capsys)
    assert not (tmp_path / "st").exists()  # nothing written
    allowed = load_study(_study(tmp_path, arms={"a": [], "b": ["train.epochs=2"]}, allow_unequal_budget=True,
                                baseline="a"))
    assert allowed.arm_budgets["b"]["epochs"] == 2
    # steps budget: a step limit in an arm differs; a batch size does not change the number of steps
    with pytest.raises(ConfigError, match="train.max_steps=3, the study's budget is 5 steps"):
        load_study(_study(tmp_path, budget={"steps": 5}, arms={"a": [], "b": ["train.max_steps=3"]}, baseline="a"))
    load_study(_study(tmp_path, budget={"steps": 5}, arms={"a": [], "b": ["optim.batch_size=32"]}, baseline="a"))
    # images budget: each arm gets images / (its global batch) steps; the batch must divide the budget
    st = load_study(_study(tmp_path, budget={"images": 640}, arms={"a": [], "b": ["optim.batch_size=32"]},
                           baseline="a"))
    steps = {r.arm: [o for o in r.overrides if o.startswith("train.max_steps=")] for r in st.runs()}
    assert steps == {"a": ["train.max_steps=10"], "b": ["train.max_steps=20"]}
    with pytest.raises(ConfigError, match="not a whole number of arm 'b'"):
        load_study(_study(tmp_path, budget={"images": 640}, arms={"a": [], "b": ["optim.batch_size=48"]},
                          baseline="a"))


def test_every_arm_is_validated_before_anything_runs(tmp_path):
    with pytest.raises(ConfigError, match="arm 'bad'.*method.loss"):
        load_study(_study(tmp_path, arms={"infonce": [], "bad": ["method.loss=nope"]}))
    with pytest.raises(ConfigError, match="baseline 'x' is not an arm"):
        load_study(_study(tmp_path, baseline="x"))
    with pytest.raises(ConfigError, match="unknown key 'armz'"):
        load_study(_study(tmp_path, armz={}))
    with pytest.raises(ConfigError, match="budget must be one of"):
        load_study(_study(tmp_path, budget={"epochs": 1, "steps": 3}))
    with pytest.raises(ConfigError, match="arm name 'a/b'"):
        load_study(_study(tmp_path, arms={"a/b": []}, baseline=None))
    with pytest.raises(ConfigError, match="sets train.seed"):
        load_study(_study(tmp_path, arms={"infonce": ["train.seed=3"]}))
    with pytest.raises(ConfigError, match="not found"):
        load_study(tmp_path / "missing.yaml")


def test_dry_run_prints_one_train_command_per_run(tmp_path, capsys):
    path = _study(tmp_path, seeds=[0, 5], arms={"infonce": ["method.loss=infonce"],
                                                "moco+x": {"method.options": {"a": 1}}})
    assert main(["study", str(path), "--dry-run"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 4
    cmds = [shlex.split(line) for line in lines]
    assert all(c[:2] == ["contrastkit", "train"] for c in cmds)
    assert [(c[-2], c[-1]) for c in cmds] == [
        ("train.seed=0", f"train.run_dir={tmp_path / 'st' / 'infonce' / 'seed-0'}"),
        ("train.seed=5", f"train.run_dir={tmp_path / 'st' / 'infonce' / 'seed-5'}"),
        ("train.seed=0", f"train.run_dir={tmp_path / 'st' / 'moco+x' / 'seed-0'}"),
        ("train.seed=5", f"train.run_dir={tmp_path / 'st' / 'moco+x' / 'seed-5'}"),
    ]
    assert 'method.options={"a": 1}' in cmds[2] and "train.epochs=1" in cmds[0]
    assert not (tmp_path / "st").exists()
    # the printed command gives `contrastkit train` the configuration the study validated
    assert main(cmds[2][1:] + ["--print-config"]) == 0
    cfg = yaml.safe_load(capsys.readouterr().out)
    assert cfg["method"]["options"] == {"a": 1} and cfg["train"]["seed"] == 0 and cfg["train"]["epochs"] == 1
    assert cfg["train"]["run_dir"] == str(tmp_path / "st" / "moco+x" / "seed-0")


def test_resume_skips_finished_runs(tmp_path, monkeypatch):
    study = load_study(_study(tmp_path))
    runs = study.runs()
    finished = runs[1]
    finished.run_dir.mkdir(parents=True)
    (finished.run_dir / "results.json").write_text("{}")
    interrupted = runs[2]
    (interrupted.run_dir / "checkpoints").mkdir(parents=True)
    (interrupted.run_dir / "checkpoints" / "last.ckpt").write_text("")

    cmds = study_commands(study)
    assert len(cmds) == 3 and not any(f"run_dir={finished.run_dir}" in c for c in cmds)
    assert [c.endswith("--resume last") for c in cmds] == [False, True, False]

    launched: list[list[str]] = []

    class FakeProcess:  # stands for `contrastkit train`: records the command, "finishes" the run
        def __init__(self, cmd, stdout, stderr, env):
            launched.append(cmd)
            self.run_dir = Path(next(c for c in cmd if c.startswith("train.run_dir=")).split("=", 1)[1])
            self.returncode = None

        def poll(self):
            self.run_dir.mkdir(parents=True, exist_ok=True)
            (self.run_dir / "results.json").write_text("{}")
            self.returncode = 0
            return 0

    monkeypatch.setattr(subprocess, "Popen", FakeProcess)
    monkeypatch.setattr("contrastkit.study.write_summary", lambda root: {})
    lines: list[str] = []
    summary = run_study(study, jobs=2, progress=lines.append)
    assert summary["failed"] == []
    ran = {next(c for c in cmd if c.startswith("train.run_dir=")) for cmd in launched}
    assert ran == {f"train.run_dir={r.run_dir}" for r in runs if r is not finished}
    assert launched[0][:3] == [sys.executable, "-m", "contrastkit.cli"]
    assert "1 already finished, 3 to run" in lines[0]
    assert lines[-1].startswith(f"study {study.name}: 4/4 runs done (0 failed), ETA 0m 00s")
    launched.clear()
    run_study(study, progress=lines.append)  # everything finished now: nothing runs
    assert launched == []


def test_summary_from_results(tmp_path):
    study = load_study(_study(tmp_path))
    values = {("infonce", 0): 80.0, ("infonce", 1): 81.0, ("dcl", 0): 81.5, ("dcl", 1): 81.9}
    study.out.mkdir(parents=True)
    (study.out / "study.json").write_text(json.dumps(study.to_dict()))
    for run in study.runs():
        run.run_dir.mkdir(parents=True)
        (run.run_dir / "config.yaml").write_text("data: {monitor_query_split: val}\n")
        if run.arm == "dcl" and run.seed == 1:
            continue  # missing run
        (run.run_dir / "results.json").write_text(json.dumps(
            {"knn_top1_val": values[run.arm, run.seed], "knn_top1_test": values[run.arm, run.seed] - 1,
             "images_per_sec": 100.0 + run.seed, "steps": 4}))
    s = write_summary(study.out)
    assert s["missing"] == ["dcl/seed-1"]
    assert s["arms"]["infonce"]["stats"]["knn_top1_val"] == {"mean": 80.5, "std": pytest.approx(math.sqrt(0.5)),
                                                             "n": 2}
    d = s["differences"]["dcl"]["knn_top1_test"]
    assert d["n"] == 1 and d["mean"] == pytest.approx(1.5) and d["ci_low"] is None
    md = (study.out / "summary.md").read_text()
    assert "| infonce (baseline) | 2 | 80.50 ± 0.71 | 79.50 ± 0.71 |" in md
    assert "`dcl/seed-1`" in md
    assert json.loads((study.out / "summary.json").read_text())["missing"] == ["dcl/seed-1"]


def test_summary_with_a_baseline_per_arm(tmp_path):
    # a grid: each DCL arm is paired with the InfoNCE arm of its own batch size, never with the other batch size's
    arms = {f"{loss}_b{b}": [f"method.loss={loss}", f"optim.batch_size={b}"] for b in (32, 64)
            for loss in ("infonce", "dcl")}
    pairs = {"dcl_b32": "infonce_b32", "dcl_b64": "infonce_b64"}
    study = load_study(_study(tmp_path, arms=arms, baseline=pairs))
    assert study.baseline == pairs
    study.out.mkdir(parents=True)
    (study.out / "study.json").write_text(json.dumps(study.to_dict()))
    value = {"infonce_b32": 70.0, "dcl_b32": 72.0, "infonce_b64": 75.0, "dcl_b64": 74.0}
    for run in study.runs():
        run.run_dir.mkdir(parents=True)
        (run.run_dir / "config.yaml").write_text("data: {monitor_query_split: val}\n")
        (run.run_dir / "results.json").write_text(json.dumps({"knn_top1_val": value[run.arm] + run.seed}))
    s = write_summary(study.out)
    assert s["pairs"] == pairs and set(s["differences"]) == set(pairs)
    assert s["differences"]["dcl_b32"]["knn_top1_val"]["mean"] == pytest.approx(2.0)
    assert s["differences"]["dcl_b64"]["knn_top1_val"]["mean"] == pytest.approx(-1.0)
    md = (study.out / "summary.md").read_text()
    assert "## Paired differences against each arm's baseline" in md
    assert "| dcl_b64 | infonce_b64 | kNN top-1 (val) | 2 | -1.00 ± 0.00 |" in md
    assert "| infonce_b32 (baseline) |" in md and "| dcl_b32 |" in md


def test_summary_lists_what_the_plugins_logged(tmp_path):
    # curation's premise evidence reaches the summary: per run the mean over the logged steps of each
    # train/<plug-in>_* column (steps where the plug-in logged nothing do not count), then mean and std over seeds;
    # the host's columns (loss) and the arm without the plug-in are left out
    arms = {"host": [], "cur": ["plugins.curation={}"]}
    study = load_study(_study(tmp_path, arms=arms, baseline="host"))
    study.out.mkdir(parents=True)
    (study.out / "study.json").write_text(json.dumps(study.to_dict()))
    kept = {0: [0.2, 0.4, None], 1: [0.3, None, 0.5]}
    for run in study.runs():
        run.run_dir.mkdir(parents=True)
        plugins = "plugins: {curation: {criterion: pair}}\n" if run.arm == "cur" else ""
        (run.run_dir / "config.yaml").write_text("data: {monitor_query_split: val}\n" + plugins)
        (run.run_dir / "results.json").write_text(json.dumps({"knn_top1_val": 70.0}))
        rows = ["epoch,step,train/loss,train/curation_knn_error_kept,train/curation_rejected"]
        for i, k in enumerate(kept[run.seed]):
            rows.append(f"0,{i},{5 - i},{'' if k is None else k},0.25")
        (run.run_dir / "logs" / "csv").mkdir(parents=True)
        (run.run_dir / "logs" / "csv" / "metrics.csv").write_text("\n".join(rows) + "\n")
    s = write_summary(study.out)
    assert s["arms"]["host"]["diagnostics"] == {}
    diag = s["arms"]["cur"]["diagnostics"]
    assert set(diag) == {"train/curation_knn_error_kept", "train/curation_rejected"}
    assert diag["train/curation_knn_error_kept"] == {"mean": pytest.approx(0.35), "std": pytest.approx(math.sqrt(0.005)),
                                                     "n": 2}
    assert diag["train/curation_rejected"]["mean"] == pytest.approx(0.25)
    md = (study.out / "summary.md").read_text()
    assert "## Plug-in diagnostics" in md
    assert "| cur | `train/curation_knn_error_kept` | 2 | 0.35 ± 0.07071 |" in md


STUDIES = sorted((Path(__file__).resolve().parents[1] / "studies").glob("*.yaml"))


@pytest.mark.parametrize("path", STUDIES, ids=[p.stem for p in STUDIES])
def test_shipped_studies_validate(path):
    # every study file of the repository (the ones docs/results.md reports) loads: its base config, every arm's
    # overrides and the shared budget are valid, and each arm has its seeds and a baseline that is an arm
    study = load_study(path)
    assert len(study.runs()) == len(study.arms) * len(study.seeds) >= 3
    assert set(baseline_pairs(list(study.arms), study.baseline).values()) <= set(study.arms)


def test_bad_baseline_mappings_are_refused(tmp_path):
    with pytest.raises(ConfigError, match="baseline 'nope' is not an arm"):
        load_study(_study(tmp_path, baseline={"dcl": "nope"}))
    with pytest.raises(ConfigError, match="cannot be its own baseline"):
        load_study(_study(tmp_path, baseline={"dcl": "dcl"}))


@pytest.mark.slow
def test_tiny_study_end_to_end(tmp_path, capsys):
    # 2 arms x 2 seeds, 2 steps each, on 256 synthetic images, in this process (--jobs 1).
    path = _study(tmp_path, budget={"steps": 2})
    assert main(["study", str(path)]) == 0
    root = tmp_path / "st"
    for arm in ("infonce", "dcl"):
        for seed in (0, 1):
            res = json.loads((root / arm / f"seed-{seed}" / "results.json").read_text())
            assert res["steps"] == 2
            cfg = yaml.safe_load((root / arm / f"seed-{seed}" / "config.yaml").read_text())
            assert cfg["train"]["seed"] == seed and cfg["method"]["loss"] == arm
    summary = json.loads((root / "summary.json").read_text())
    assert summary["missing"] == [] and set(summary["arms"]) == {"infonce", "dcl"}
    stats = summary["arms"]["dcl"]["stats"]
    assert stats["knn_top1_val"]["n"] == 2 and stats["images_per_sec"]["mean"] > 0
    d = summary["differences"]["dcl"]["knn_top1_val"]
    runs = summary["arms"]
    diffs = [runs["dcl"]["runs"][s]["knn_top1_val"] - runs["infonce"]["runs"][s]["knn_top1_val"] for s in ("0", "1")]
    assert d["mean"] == pytest.approx(sum(diffs) / 2) and d["ci_low"] <= d["mean"] <= d["ci_high"]
    assert (root / "knn_curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "## Paired differences against `infonce`" in (root / "summary.md").read_text()
    err = capsys.readouterr().err
    assert "4/4 runs done (0 failed)" in err
    # resuming a finished study runs nothing; report re-renders the summary
    (root / "summary.md").unlink()
    assert main(["study", str(path)]) == 0
    assert "0 to run" in capsys.readouterr().err
    (root / "summary.md").unlink()
    assert main(["report", str(root)]) == 0
    assert (root / "summary.md").is_file()


@pytest.mark.slow
def test_parallel_jobs_run_as_subprocesses(tmp_path, capsys):
    # --jobs 2: each run is a `python -m contrastkit.cli train` process with its output in STUDY_DIR/logs/.
    path = _study(tmp_path, budget={"steps": 1}, arms={"infonce": ["method.loss=infonce"]}, baseline=None)
    assert main(["study", str(path), "--jobs", "2"]) == 0
    for seed in (0, 1):
        run = tmp_path / "st" / "infonce" / f"seed-{seed}"
        assert json.loads((run / "results.json").read_text())["steps"] == 1
        assert (tmp_path / "st" / "logs" / "infonce" / f"seed-{seed}.log").is_file()
    assert "2/2 runs done (0 failed)" in capsys.readouterr().err


def test_parallel_jobs_get_one_gpu_each_or_a_share_of_the_cores(monkeypatch):
    from contrastkit.study import _gpu_ids, _job_env

    assert [_job_env(slot, 3, ["2", "5"])["CUDA_VISIBLE_DEVICES"] for slot in range(3)] == ["2", "5", "2"]
    monkeypatch.setattr("os.cpu_count", lambda: 16)
    assert _job_env(0, 4, [])["OMP_NUM_THREADS"] == "4"  # 16 cores / 4 jobs, no GPU
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,6")
    assert _gpu_ids() == ["4", "6"]  # the GPUs this process may use, as the jobs must name them
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    assert _gpu_ids() == ["0", "1"]
