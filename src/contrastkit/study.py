"""``contrastkit study STUDY.yaml``: multi-seed, equal-budget comparisons of configurations ("arms").

A single run per configuration proves little: on Fashion-MNIST one seed's noise is about 0.4 points of kNN top-1,
as large as many of the differences we want to measure. A study runs every arm with several seeds at one shared
budget and reports the mean and standard deviation over seeds and, against a baseline arm, the *paired* difference
(the same seed in both arms) with a Student-t 95 % confidence interval.

A study file (YAML)::

    base: ../configs/fmnist_moco.yaml     # preset; a relative path is read from the study file's folder, else cwd
    overrides: [model.widths=[16,32,64]]  # optional, applied to every arm (a list of key=value or a mapping)
    budget: {epochs: 5}                   # exactly one of epochs, steps (optimizer steps), images (images seen)
    seeds: 3                              # a count (seeds 0..n-1) or a list; default 3
    baseline: moco                        # optional: the arm every other arm is compared with, or a mapping
                                          # {arm: its baseline arm} (grids: e.g. dcl_b32: infonce_b32)
    arms:                                 # name -> overrides (a list of key=value or a mapping; [] = the base)
      moco: []
      moco+dclw: [method.loss=dclw]
    allow_unequal_budget: false           # default: arms whose budget differs from the study's are refused
    out: runs/studies/example             # optional study folder (default runs/studies/<file stem>)

Every (arm, seed) is an ordinary training run in ``STUDY_DIR/ARM/seed-S``, given by the command line
``contrastkit train BASE overrides... train.seed=S train.run_dir=STUDY_DIR/ARM/seed-S`` (``--dry-run`` prints these
commands, for a cluster's job array). With ``--jobs 1`` the study runs them one after the other in its own process
through ``contrastkit.cli.main`` with exactly those arguments: no interpreter start-up per run (importing torch and
Lightning takes 5-20 s on a busy 2-core machine, longer than a smoke run). With ``--jobs N > 1`` each run is the
subprocess ``python -m contrastkit.cli train ...``: separate processes are what lets runs share a machine, each with
its own ``CUDA_VISIBLE_DEVICES`` (one GPU per job) or its share of the CPU threads, and a crash ends only its run.
Either way a finished run (``results.json`` exists) is skipped, so an interrupted study resumes.

Budgets: ``epochs`` sets ``train.epochs``; ``steps`` sets ``train.max_steps`` (the learning-rate schedule still
spans ``train.epochs``, so set that in the base so that it covers the steps); ``images`` sets ``train.max_steps`` of
each arm to ``images / global batch`` (which must divide exactly). The budget is applied before the arm's
overrides; an arm whose resulting budget differs from the study's (e.g. it sets ``train.epochs``,
``train.max_steps``, or, with an images budget, ``optim.batch_size`` so that the images do not divide) is refused,
unless ``allow_unequal_budget: true``.

Outputs: ``STUDY_DIR/study.json`` (the resolved study, written before the runs), ``STUDY_DIR/summary.md``,
``summary.json`` and PNG plots (written by :func:`write_summary`, also by ``contrastkit report STUDY_DIR``).
"""

from __future__ import annotations

import json
import math
import os
import re
import shlex
import subprocess
import sys
import time
import traceback
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


from contrastkit.config import Config, load_config, read_yaml_mapping
from contrastkit.errors import ConfigError, ContrastkitError
from contrastkit.io import write_json_atomic, write_text_atomic

__all__ = [
    "ArmRun", "Study", "load_study", "paired_difference", "read_study", "run_study", "study_commands",
    "write_summary",
]

#: Budget kinds a study may set (exactly one).
BUDGET_KINDS = ("epochs", "steps", "images")
#: Keys of a study file.
_STUDY_KEYS = {"base", "overrides", "budget", "seeds", "baseline", "arms", "allow_unequal_budget", "out"}
#: Arm names become folder names.
_ARM_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]*$")
#: Overrides every study run gets (no progress bar in the per-run log files).
_RUN_OVERRIDES = ("train.progress_bar=false",)
#: Name of the file in the study folder that records the resolved study.
STUDY_FILE = "study.json"
#: Folder of the runs' logs in the study folder (a run folder must hold nothing but its run).
LOG_FOLDER = "logs"


@dataclass(frozen=True)
class ArmRun:
    """One (arm, seed) of a study: a training run in its own folder."""

    arm: str
    seed: int
    run_dir: Path
    overrides: tuple[str, ...]  #: every override after the base config (base, budget, arm, seed, run_dir)

    def log_path(self, study_dir: Path) -> Path:
        """Where the study keeps this run's output: ``STUDY_DIR/logs/ARM/seed-S.log``."""
        return study_dir / LOG_FOLDER / self.arm / f"seed-{self.seed}.log"

    @property
    def finished(self) -> bool:
        """A run is finished when its ``results.json`` exists (written last, atomically, by a successful run)."""
        return (self.run_dir / "results.json").is_file()


@dataclass
class Study:
    """A resolved, validated study (see the module docstring)."""

    name: str
    base: Path | None
    out: Path
    arms: dict[str, tuple[str, ...]]  #: arm -> its own overrides
    seeds: list[int]
    budget: dict[str, int]  #: one of ``{"epochs": E}``, ``{"steps": S}``, ``{"images": I}``
    baseline: str | dict[str, str] | None = None  #: one arm for all others, or arm -> its baseline arm
    allow_unequal_budget: bool = False
    base_overrides: tuple[str, ...] = ()
    arm_budgets: dict[str, dict[str, int]] = field(default_factory=dict)  #: arm -> epochs, max_steps, images/step

    def runs(self) -> list[ArmRun]:
        """Every (arm, seed), arm-major."""
        out = []
        for arm, arm_overrides in self.arms.items():
            for seed in self.seeds:
                run_dir = self.out / arm / f"seed-{seed}"
                overrides = (*self.base_overrides, *_budget_overrides(self.budget), *arm_overrides,
                             *self._images_steps(arm, arm_overrides), *_RUN_OVERRIDES, f"train.seed={seed}",
                             f"train.run_dir={run_dir}")
                out.append(ArmRun(arm, seed, run_dir, overrides))
        return out

    def _images_steps(self, arm: str, arm_overrides: Sequence[str]) -> tuple[str, ...]:
        if "images" not in self.budget or any(_key(o) == "train.max_steps" for o in arm_overrides):
            return ()
        return (f"train.max_steps={self.arm_budgets[arm]['max_steps']}",)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "base": None if self.base is None else str(self.base), "out": str(self.out),
                "arms": {a: list(o) for a, o in self.arms.items()}, "seeds": self.seeds, "budget": self.budget,
                "baseline": self.baseline, "allow_unequal_budget": self.allow_unequal_budget,
                "base_overrides": list(self.base_overrides), "arm_budgets": self.arm_budgets}


# ---------------------------------------------------------------------------------------------------------------
# reading and validating a study file


def _key(override: str) -> str:
    return override.split("=", 1)[0].strip()


def _override_list(value: Any, where: str) -> tuple[str, ...]:
    """A list of ``key=value`` strings or a mapping ``{key: value}`` as ``key=value`` strings."""
    if value is None:
        return ()
    if isinstance(value, Mapping):
        # JSON is valid YAML flow syntax, so the CLI's YAML parsing of the value gives the same object back.
        return tuple(f"{k}={json.dumps(v)}" for k, v in value.items())
    if isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
        for v in value:
            if "=" not in v:
                raise ConfigError(f"{where}: override {v!r} is not of the form key=value (e.g. optim.lr=0.5)")
        return tuple(value)
    raise ConfigError(f"{where} must be a list of key=value strings or a mapping {{key: value}}, got {value!r}")


def _budget_overrides(budget: Mapping[str, int]) -> tuple[str, ...]:
    if "epochs" in budget:
        return (f"train.epochs={budget['epochs']}",)
    if "steps" in budget:
        return (f"train.max_steps={budget['steps']}",)
    return ()  # images: per arm, after its overrides (Study._images_steps)


def _world(cfg: Config) -> int:
    devices = cfg.train.devices if isinstance(cfg.train.devices, int) and cfg.train.devices > 0 else 1
    return devices * cfg.train.num_nodes


def _arm_budget(cfg: Config) -> dict[str, int]:
    """What an arm's configuration spends: its epochs, its step limit and its images per optimizer step."""
    return {"epochs": cfg.train.epochs, "max_steps": cfg.train.max_steps,
            "images_per_step": cfg.optim.batch_size * cfg.optim.accumulate_grad_batches * _world(cfg)}


def _check_budget(kind: str, value: int, arm: str, spent: dict[str, int], base: dict[str, int]) -> str | None:
    """Why ``arm`` does not spend the study's budget (``None``: it does). ``spent`` includes, for an images
    budget, the step limit the study gives the arm (``images / images_per_step``)."""
    if kind == "epochs":
        if spent["epochs"] != value:
            return f"arm {arm!r} trains {spent['epochs']} epochs, the study's budget is {value}"
        if spent["max_steps"] != base["max_steps"]:
            return f"arm {arm!r} sets train.max_steps={spent['max_steps']} under an epochs budget"
    elif kind == "steps":
        if spent["max_steps"] != value:
            return f"arm {arm!r} stops after train.max_steps={spent['max_steps']}, the study's budget is {value} steps"
    elif spent["max_steps"] * spent["images_per_step"] != value:
        per_step = spent["images_per_step"]
        if value % per_step:
            return (f"the budget of {value} images is not a whole number of arm {arm!r}'s optimizer steps "
                    f"({per_step} images each)")
        return (f"arm {arm!r} sees {spent['max_steps'] * per_step} images (train.max_steps={spent['max_steps']} "
                f"x {per_step}), the study's budget is {value}")
    return None


def _positive_int(value: Any, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{where} must be an integer >= 1, got {value!r}")
    return value


def load_study(path: str | os.PathLike[str], out: str | os.PathLike[str] | None = None) -> Study:
    """Read and validate a study file: every arm's configuration (for every seed) with the config validation of
    ``contrastkit train``, and the equal-budget rule. Nothing is run or written.

    Args:
        path: the study YAML file.
        out: the study folder; default the file's ``out`` key, else ``runs/studies/<file stem>``.

    Raises:
        ConfigError: a missing or malformed file, an invalid arm configuration (the message names the arm), or
            arms with unequal budgets (unless ``allow_unequal_budget: true``).
    """
    p = Path(path)
    spec = read_yaml_mapping(p, "study", "see studies/example.yaml for the format",
                             "a mapping with keys base, budget, arms, ...")
    unknown = sorted(set(spec) - _STUDY_KEYS)
    if unknown:
        raise ConfigError(f"unknown key {unknown[0]!r} in study file {str(p)!r}; valid keys: "
                          f"{', '.join(sorted(_STUDY_KEYS))}")

    base: Path | None = None
    if spec.get("base") is not None:
        given = Path(str(spec["base"]))
        beside = p.parent / given
        base = given if given.is_absolute() or not beside.is_file() else Path(os.path.normpath(beside))
        if not base.is_file():
            raise ConfigError(f"study base config {str(given)!r} not found (looked beside {str(p)!r} and in the "
                              "current folder)")
    base_overrides = _override_list(spec.get("overrides"), "study overrides")

    budget_spec = spec.get("budget")
    if not isinstance(budget_spec, dict) or len(budget_spec) != 1 or next(iter(budget_spec)) not in BUDGET_KINDS:
        raise ConfigError(f"study budget must be one of {{epochs: E}}, {{steps: S}} or {{images: I}}, got "
                          f"{budget_spec!r}")
    kind, value = next(iter(budget_spec.items()))
    budget = {kind: _positive_int(value, f"budget.{kind}")}

    seeds_spec = spec.get("seeds", 3)
    if isinstance(seeds_spec, int) and not isinstance(seeds_spec, bool):
        seeds = list(range(_positive_int(seeds_spec, "seeds")))
    elif isinstance(seeds_spec, list) and seeds_spec and all(
            isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in seeds_spec):
        seeds = list(seeds_spec)
        if len(set(seeds)) != len(seeds):
            raise ConfigError(f"seeds must be distinct, got {seeds}")
    else:
        raise ConfigError(f"seeds must be a count (e.g. 3) or a list of integers >= 0, got {seeds_spec!r}")

    arms_spec = spec.get("arms")
    if not isinstance(arms_spec, dict) or not arms_spec:
        raise ConfigError("a study needs arms: a mapping of arm name -> overrides, e.g. {moco: [], moco+dclw: "
                          "[method.loss=dclw]}")
    arms: dict[str, tuple[str, ...]] = {}
    for name, overrides in arms_spec.items():
        name = str(name)
        if not _ARM_NAME.match(name):
            raise ConfigError(f"arm name {name!r} must be a folder name: letters, digits, '.', '_', '+', '-'")
        arms[name] = _override_list(overrides, f"arm {name!r}")
        for o in arms[name]:
            if _key(o) in ("train.seed", "train.run_dir"):
                raise ConfigError(f"arm {name!r} sets {_key(o)}: the study sets it per run (use seeds / out)")

    baseline = _baseline(spec.get("baseline"), arms)
    allow = spec.get("allow_unequal_budget", False)
    if not isinstance(allow, bool):
        raise ConfigError(f"allow_unequal_budget must be true or false, got {allow!r}")

    out_dir = Path(out) if out is not None else Path(str(spec["out"])) if spec.get("out") else (
        Path("runs") / "studies" / p.stem)
    study = Study(name=p.stem, base=base, out=out_dir, arms=arms, seeds=seeds, budget=budget,
                  baseline=baseline, allow_unequal_budget=allow,
                  base_overrides=base_overrides)

    # Validate everything before anything runs: the base, every arm, every seed.
    base_cfg = _load(study, base_overrides + _budget_overrides(budget), "the study's base")
    base_spent = _arm_budget(base_cfg)
    for arm, arm_overrides in arms.items():
        spent = _arm_budget(_load(study, base_overrides + _budget_overrides(budget) + arm_overrides, f"arm {arm!r}"))
        if kind == "images" and not any(_key(o) == "train.max_steps" for o in arm_overrides):
            spent["max_steps"] = budget[kind] // spent["images_per_step"]  # what Study.runs() will set
        study.arm_budgets[arm] = spent
        problem = _check_budget(kind, budget[kind], arm, spent, base_spent)
        if problem and not allow:
            raise ConfigError(f"unequal budgets: {problem}; make the arms spend the same budget or set "
                              "allow_unequal_budget: true in the study file")
    for run in study.runs():
        _load(study, run.overrides, f"arm {run.arm!r} seed {run.seed}")
    return study


def _baseline(value: Any, arms: Mapping[str, Any]) -> str | dict[str, str] | None:
    """The study's ``baseline``: None, one arm, or a mapping arm -> baseline arm (both arms of the study)."""
    if value is None:
        return None
    pairs = value if isinstance(value, dict) else {None: value}
    for arm, base in pairs.items():
        for name in (arm, base):
            if name is not None and str(name) not in arms:
                raise ConfigError(f"baseline {name!r} is not an arm; arms: {', '.join(arms)}")
        if arm is not None and str(arm) == str(base):
            raise ConfigError(f"arm {arm!r} cannot be its own baseline")
    return str(value) if not isinstance(value, dict) else {str(a): str(b) for a, b in value.items()}


def baseline_pairs(arms: Sequence[str], baseline: str | Mapping[str, str] | None) -> dict[str, str]:
    """Arm -> the arm it is compared with: every other arm against one ``baseline``, or the given mapping."""
    if baseline is None:
        return {}
    if isinstance(baseline, str):
        return {arm: baseline for arm in arms if arm != baseline}
    return dict(baseline)


def _load(study: Study, overrides: Sequence[str], what: str) -> Config:
    try:
        return load_config(study.base, list(overrides))
    except ConfigError as e:
        raise ConfigError(f"study {study.name}, {what}: {e}") from None


# ---------------------------------------------------------------------------------------------------------------
# running


def train_command(study: Study, run: ArmRun, python: str | None = None) -> list[str]:
    """The ``contrastkit train`` command line of one run (``python -m contrastkit.cli`` when ``python`` is given)."""
    head = [python, "-m", "contrastkit.cli"] if python else ["contrastkit"]
    cmd = [*head, "train", *([str(study.base)] if study.base is not None else []), *run.overrides]
    if not run.finished and (run.run_dir / "checkpoints" / "last.ckpt").is_file():
        cmd += ["--resume", "last"]  # an interrupted run continues from its last checkpoint
    return cmd


def study_commands(study: Study) -> list[str]:
    """The shell commands of the runs that are not finished (``--dry-run``), one per line."""
    return [shlex.join(train_command(study, r)) for r in study.runs() if not r.finished]


def _gpu_ids() -> list[str]:
    """The GPUs this process may use (``CUDA_VISIBLE_DEVICES`` order), empty without CUDA."""
    try:
        import torch

        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    except Exception:  # pragma: no cover
        count = 0
    if count == 0:
        return []
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    ids = [v.strip() for v in visible.split(",") if v.strip()] if visible else []
    return ids[:count] if len(ids) >= count else [str(i) for i in range(count)]


def _job_env(slot: int, jobs: int, gpus: list[str]) -> dict[str, str]:
    """Environment of the job in ``slot``: one GPU per job where there are GPUs; else a share of the CPU cores
    (``OMP_NUM_THREADS``; torch reads it at start-up), so that ``jobs`` runs do not oversubscribe the cores."""
    env = dict(os.environ)
    if gpus:
        env["CUDA_VISIBLE_DEVICES"] = gpus[slot % len(gpus)]
    elif jobs > 1:
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // jobs))
    return env


def _eta(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    m, s = divmod(int(round(seconds)), 60)
    return f"{m}m {s:02d}s" if m < 60 else f"{m // 60}h {m % 60:02d}m"


def _run_in_process(study: Study, run: ArmRun) -> bool:
    """Run one training with ``contrastkit.cli.main`` and the same arguments as its command line; ``True`` when it
    finished. An error is printed (and written to ``STUDY_DIR/logs/ARM/seed-S.log``) and does not stop the study."""
    from contrastkit.cli import main as cli_main

    try:
        code = cli_main(train_command(study, run)[1:])
    except Exception:  # a crash of one run (a bug, out of memory) must not end the study
        text = traceback.format_exc()
        print(text, file=sys.stderr)
        log = run.log_path(study.out)
        log.parent.mkdir(parents=True, exist_ok=True)
        with open(log, "a") as f:
            f.write(text)
        code = 1
    return code == 0 and run.finished


def run_study(study: Study, jobs: int = 1, *, python: str | None = None,
              progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Run every unfinished (arm, seed) of ``study``, ``jobs`` at a time, then write the summary.

    Finished runs (``results.json`` exists) are skipped; a run interrupted after a checkpoint continues with
    ``--resume last``. A failed run does not stop the others.

    With ``jobs=1`` (default) the runs go one after the other through ``contrastkit.cli.main`` in this process, with
    the arguments of their command line (no interpreter start-up per run: importing torch and Lightning takes
    5-20 s on a busy 2-core machine). With ``jobs > 1`` each run is the subprocess ``python -m contrastkit.cli
    train ...`` with its output in ``STUDY_DIR/logs/ARM/seed-S.log``; with GPUs each job gets one (``CUDA_VISIBLE_DEVICES``,
    round-robin over the visible ones), on the CPU each gets ``cpus / jobs`` threads (``OMP_NUM_THREADS``).

    Args:
        jobs: concurrent runs (default 1).
        python: the interpreter of the subprocesses (default this one, ``sys.executable``).
        progress: called with a progress line (runs done / total, ETA); default: print to stderr.

    Returns:
        The summary (see :func:`write_summary`) plus ``"failed"``: the run folders whose run failed.
    """
    jobs = _positive_int(jobs, "--jobs")
    python = python or sys.executable
    say = progress or (lambda line: print(line, file=sys.stderr, flush=True))
    study.out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(study.out / STUDY_FILE, study.to_dict())
    runs = study.runs()
    queue = [r for r in runs if not r.finished]
    total = len(runs)
    gpus = _gpu_ids() if jobs > 1 else []
    say(f"study {study.name}: {total} runs ({len(study.arms)} arms x {len(study.seeds)} seeds), "
        f"{total - len(queue)} already finished, {len(queue)} to run, {jobs} at a time"
        f"{f' on GPUs {gpus}' if gpus else ''}")
    failed: list[str] = []
    durations: list[float] = []
    running: dict[int, tuple[subprocess.Popen[bytes], ArmRun, Any, float]] = {}  # slot -> (process, run, log, t0)

    def finished(run: ArmRun, ok: bool, seconds: float) -> None:
        durations.append(seconds)
        if not ok:
            failed.append(str(run.run_dir))
        left = len(queue) + len(running)
        eta = sum(durations) / len(durations) * math.ceil(left / jobs)
        say(f"study {study.name}: {total - left}/{total} runs done ({len(failed)} failed), ETA {_eta(eta)}; "
            f"{run.arm} seed {run.seed} {'done' if ok else 'FAILED'} in {_eta(seconds)}")

    if jobs == 1:
        while queue:
            run, t0 = queue.pop(0), time.perf_counter()
            ok = _run_in_process(study, run)
            finished(run, ok, time.perf_counter() - t0)
    else:
        try:
            while queue or running:
                for slot in range(jobs):
                    if slot not in running and queue:
                        run = queue.pop(0)
                        log_path = run.log_path(study.out)
                        log_path.parent.mkdir(parents=True, exist_ok=True)
                        log = open(log_path, "ab")  # noqa: SIM115 (closed when the process ends)
                        proc = subprocess.Popen(train_command(study, run, python), stdout=log,
                                                stderr=subprocess.STDOUT, env=_job_env(slot, jobs, gpus))
                        running[slot] = (proc, run, log, time.perf_counter())
                time.sleep(0.2)
                for slot, (proc, run, log, t0) in list(running.items()):
                    if proc.poll() is None:
                        continue
                    log.close()
                    del running[slot]
                    finished(run, proc.returncode == 0 and run.finished, time.perf_counter() - t0)
        finally:
            for proc, _, log, _ in running.values():  # interrupted: stop our own children
                proc.terminate()
                proc.wait()
                log.close()
    summary = write_summary(study.out)
    summary["failed"] = failed
    return summary


# ---------------------------------------------------------------------------------------------------------------
# statistics


def t_quantile(p: float, df: int) -> float:
    """Quantile ``p`` of Student's t distribution with ``df`` degrees of freedom (scipy.stats)."""
    from scipy import stats

    return float(stats.t.ppf(p, df))


def paired_difference(arm: Mapping[int, float], baseline: Mapping[int, float], level: float = 0.95
                      ) -> dict[str, Any] | None:
    """Mean of the paired differences ``arm[s] - baseline[s]`` over the seeds both have, with a Student-t CI.

    With ``n`` pairs, differences ``d``: ``mean(d) +- t_{(1+level)/2, n-1} * std(d, ddof=1) / sqrt(n)``.

    Returns:
        ``{"n", "seeds", "mean", "std", "ci_low", "ci_high", "t"}`` (``std``, the CI and ``t`` are ``None`` for
        ``n = 1``), or ``None`` when no seed is shared.
    """
    seeds = sorted(set(arm) & set(baseline))
    if not seeds:
        return None
    d = [arm[s] - baseline[s] for s in seeds]
    n = len(d)
    mean = sum(d) / n
    out: dict[str, Any] = {"n": n, "seeds": seeds, "mean": mean, "std": None, "ci_low": None, "ci_high": None,
                           "t": None}
    if n >= 2:
        std = math.sqrt(sum((x - mean) ** 2 for x in d) / (n - 1))
        t = t_quantile((1 + level) / 2, n - 1)
        half = t * std / math.sqrt(n)
        out.update(std=std, ci_low=mean - half, ci_high=mean + half, t=t)
    return out


def _mean_std(values: Sequence[float]) -> tuple[float | None, float | None]:
    if not values:
        return None, None
    mean = sum(values) / len(values)
    if len(values) < 2:
        return mean, None
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))


def _stat(values: Sequence[float]) -> dict[str, Any] | None:
    """``{"mean", "std", "n"}`` of ``values`` (sample std, None for one value), or None when there are none."""
    mean, std = _mean_std(values)
    return None if mean is None else {"mean": mean, "std": std, "n": len(values)}


# ---------------------------------------------------------------------------------------------------------------
# summary


#: The summary's metrics: key (see contrastkit.report.split_metrics) -> label.
SUMMARY_METRICS: dict[str, str] = {
    "knn_top1_val": "kNN top-1 (val)",
    "knn_top1_test": "kNN top-1 (test)",
    "linear_top1_val": "linear top-1 (val)",
    "linear_top1_test": "linear top-1 (test)",
    "images_per_sec": "images/s",
    "train_seconds": "training time (s)",
    "fit_wall_seconds": "wall-clock (s)",
}
#: Metrics compared against the baseline (accuracies).
_COMPARED = ("knn_top1_val", "knn_top1_test", "linear_top1_val", "linear_top1_test")


def plugin_diagnostics(run: Any) -> dict[str, float]:
    """Every value a plug-in of ``run`` (a :class:`contrastkit.report.RunSummary`) logged while training
    (``train/<plug-in>_*`` in its ``metrics.csv``: ASCL's confidence, curation's kept and rejected statistics,
    batch fusion's strength), as its mean over the logged steps."""
    names = run.config.get("plugins")
    prefixes = tuple(f"train/{n}_" for n in names) if isinstance(names, dict) else ()
    return {col: sum(v for _, v in points) / len(points) for col, points in sorted(run.curves.items())
            if col.startswith(prefixes) and points}


def read_study(study_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """The resolved study recorded in ``STUDY_DIR/study.json`` (raises :class:`ContrastkitError` if absent)."""
    path = Path(study_dir) / STUDY_FILE
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise ContrastkitError(f"{str(study_dir)!r} is not a study folder (no {STUDY_FILE})") from None
    except (OSError, ValueError) as e:
        raise ContrastkitError(f"cannot read {str(path)!r}: {e}") from None
    if not isinstance(data, dict) or not isinstance(data.get("arms"), dict):
        raise ContrastkitError(f"{str(path)!r} is not a contrastkit study record")
    return data


def is_study_dir(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` is a study folder (it holds ``study.json``)."""
    return (Path(path) / STUDY_FILE).is_file()


def write_summary(study_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """Write ``summary.json``, ``summary.md`` and the plots of a study folder from its runs' results; return the
    summary. Runs without ``results.json`` are listed as missing and left out of the statistics."""
    from contrastkit.report import load_run, split_metrics

    root = Path(study_dir)
    spec = read_study(root)
    seeds = [int(s) for s in spec["seeds"]]
    baseline = spec.get("baseline")
    arms: dict[str, Any] = {}
    runs_by_arm: dict[str, list[Any]] = {}
    missing: list[str] = []
    for arm in spec["arms"]:
        per_seed: dict[int, dict[str, float]] = {}
        logged: dict[str, list[float]] = {}  # plug-in diagnostic -> one run mean per seed
        runs_by_arm[arm] = []
        for seed in seeds:
            run_dir = root / arm / f"seed-{seed}"
            if not (run_dir / "results.json").is_file():
                missing.append(f"{arm}/seed-{seed}")
                continue
            run = load_run(run_dir, f"{arm} seed {seed}")
            runs_by_arm[arm].append(run)
            values = split_metrics(run)
            per_seed[seed] = {k: values[k] for k in SUMMARY_METRICS if values.get(k) is not None}
            per_seed[seed]["steps"] = (run.results or {}).get("steps")
            for col, value in plugin_diagnostics(run).items():
                logged.setdefault(col, []).append(value)
        stats = {key: _stat([v[key] for v in per_seed.values() if key in v]) for key in SUMMARY_METRICS}
        arms[arm] = {"overrides": spec["arms"][arm], "budget": spec.get("arm_budgets", {}).get(arm),
                     "runs": {str(s): v for s, v in per_seed.items()},
                     "stats": {key: stat for key, stat in stats.items() if stat is not None},
                     "diagnostics": {col: _stat(v) for col, v in logged.items()}}
    differences: dict[str, Any] = {}
    pairs = baseline_pairs(list(arms), baseline)
    for arm, base in pairs.items():
        if arm in arms and base in arms:
            info, base_runs = arms[arm], arms[base]["runs"]
            differences[arm] = {}
            for key in _COMPARED:
                a = {int(s): v[key] for s, v in info["runs"].items() if key in v}
                b = {int(s): v[key] for s, v in base_runs.items() if key in v}
                diff = paired_difference(a, b)
                if diff is not None:
                    differences[arm][key] = diff
    summary = {"study": spec.get("name"), "budget": spec.get("budget"), "seeds": seeds, "baseline": baseline,
               "allow_unequal_budget": spec.get("allow_unequal_budget", False), "arms": arms,
               "pairs": {a: b for a, b in pairs.items() if a in differences}, "differences": differences,
               "missing": missing}
    plots = _plot_study(root, runs_by_arm)
    summary["plots"] = [p.name for p in plots]
    write_json_atomic(root / "summary.json", summary)
    write_text_atomic(root / "summary.md", summary_markdown(summary))
    return summary


def _pm(stat: Mapping[str, Any] | None, spec: str = ".2f") -> str:
    if not stat:
        return "-"
    mean, std = stat["mean"], stat["std"]
    return f"{mean:{spec}}" if std is None else f"{mean:{spec}} ± {std:{spec}}"


def summary_markdown(summary: Mapping[str, Any]) -> str:
    """The Markdown of a study summary (:func:`write_summary`)."""
    budget = ", ".join(f"{v} {k}" for k, v in (summary.get("budget") or {}).items())
    seeds = summary["seeds"]
    lines = [f"# Study {summary['study']}", "",
             f"{len(summary['arms'])} arms x {len(seeds)} seeds ({', '.join(map(str, seeds))}), budget {budget} per "
             f"run{' (unequal budgets allowed)' if summary.get('allow_unequal_budget') else ''}. Mean ± standard "
             "deviation over seeds (sample std, n - 1).", ""]
    header = ["arm", "runs", *SUMMARY_METRICS.values()]
    lines += ["| " + " | ".join(header) + " |", "|---|--:|" + "--:|" * len(SUMMARY_METRICS)]
    for arm, info in summary["arms"].items():
        is_base = arm in summary.get("pairs", {}).values()
        cells = [arm + (" (baseline)" if is_base else ""), str(len(info["runs"]))]
        for key in SUMMARY_METRICS:
            cells.append(_pm(info["stats"].get(key), ".0f" if key in ("images_per_sec",) else
                             ".1f" if key.endswith("seconds") else ".2f"))
        lines.append("| " + " | ".join(c.replace("|", "/") for c in cells) + " |")
    lines += ["", "kNN: the final kNN monitor on the validation split and the single final kNN on the test split "
              "(bank: the training split minus the validation images). Linear: validation top-1 of the chosen "
              "hyper-parameters and the test top-1 of the final probe (`eval.linear=true`). Images/s and training "
              "time: training only; wall-clock: the whole fit.", ""]
    if summary.get("differences"):
        title = (f"against `{summary['baseline']}`" if isinstance(summary.get("baseline"), str)
                 else "against each arm's baseline")
        lines += [f"## Paired differences {title}", "",
                  "Per seed, arm minus baseline (same seed); mean ± std of the differences and the 95 % confidence "
                  "interval of the mean (Student t, n - 1 degrees of freedom). An interval that contains 0 does not "
                  "show a difference.", "",
                  "| arm | baseline | metric | n | mean difference | 95 % CI |", "|---|---|---|--:|--:|--:|"]
        pairs = summary.get("pairs", {})
        for arm, diffs in summary["differences"].items():
            for key, d in diffs.items():
                ci = "-" if d["ci_low"] is None else f"[{d['ci_low']:+.2f}, {d['ci_high']:+.2f}]"
                std = "" if d["std"] is None else f" ± {d['std']:.2f}"
                lines.append(f"| {arm} | {pairs.get(arm, summary.get('baseline'))} | {SUMMARY_METRICS[key]} | "
                             f"{d['n']} | {d['mean']:+.2f}{std} | {ci} |")
        lines.append("")
    diagnostics = [(arm, col, stat) for arm, info in summary["arms"].items()
                   for col, stat in info.get("diagnostics", {}).items()]
    if diagnostics:
        lines += ["## Plug-in diagnostics", "",
                  "What each plug-in logged while training (`train/<plug-in>_*` in each run's `logs/csv/metrics.csv`): "
                  "per run the mean over its logged steps, then mean ± std over seeds.", "",
                  "| arm | logged value | runs | mean over steps |", "|---|---|--:|--:|"]
        lines += [f"| {arm} | `{col}` | {stat['n']} | {_pm(stat, '.4g')} |" for arm, col, stat in diagnostics]
        lines.append("")
    if summary.get("missing"):
        lines += ["**Missing runs** (no `results.json`: not run yet, running, or failed): "
                  + ", ".join(f"`{m}`" for m in summary["missing"]) + ".", ""]
    for png in summary.get("plots", []):
        lines += [f"![{png}]({png})", ""]
    return "\n".join(lines)


def _plot_study(root: Path, runs_by_arm: Mapping[str, list[Any]]) -> list[Path]:
    """``knn_curves.png``: the kNN monitor (validation) by epoch of every run, one colour per arm, shared axes."""
    from matplotlib import colormaps
    from matplotlib.figure import Figure

    from contrastkit.evaluation.plots import save_figure

    if not any(run.curves.get("knn/top1") for runs in runs_by_arm.values() for run in runs):
        return []
    fig = Figure(figsize=(7.0, 4.2))
    ax = fig.add_subplot(1, 1, 1)
    colours = colormaps["tab10"]
    for i, (arm, runs) in enumerate(runs_by_arm.items()):
        for j, run in enumerate(runs):
            points = run.curves.get("knn/top1", [])
            if points:
                xs, ys = zip(*points)
                ax.plot(xs, ys, color=colours(i % 10), marker="o", markersize=3, linewidth=1.2, alpha=0.8,
                        label=arm if j == 0 else None)
    ax.set_xlabel("epoch")
    ax.set_ylabel("kNN top-1 (%)")
    ax.set_title("kNN monitor (validation split), every seed")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    return [save_figure(fig, root / "knn_curves.png")]
