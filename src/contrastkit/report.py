"""``contrastkit report``: compare training runs in one Markdown file with PNG plots.

For every run directory (written by :func:`contrastkit.training.train`) it reads

* ``RUN_DIR/config.yaml``: method, plug-ins, loss, backbone, dataset, batch size, epochs;
* ``RUN_DIR/results.json``: kNN top-1, linear top-1 (``eval.linear=true``), time per epoch, images/s, peak memory.
  A linear-probe result of ``contrastkit eval linear RUN_DIR/checkpoints/last.ckpt`` is used when ``results.json``
  has none, if it is on the run's own protocol (its dataset and splits, backbone features, ``eval.linear_epochs``
  epochs, no augmentation; see :meth:`~contrastkit.evaluation.offline.CheckpointEvaluator.own_protocol`) and
  ``last.ckpt`` is unchanged since; other saved evaluations (a transfer probe on another dataset, a 2-epoch probe)
  are listed below the table with their settings, never as the run's linear top-1. A run without ``results.json``
  (still running, interrupted or failed) is marked *incomplete*: its curves are drawn, its final numbers are ``-``;
* ``RUN_DIR/logs/csv/metrics.csv`` (Lightning's CSV log): the training curves ``train/loss``, ``knn/top1`` and
  ``train/lr``, plotted for all runs on shared axes against the epoch (fractional for per-step values:
  ``(step + 1) / steps_per_epoch``; kNN values at the end of their epoch).

and writes ``OUT/report.md`` plus ``OUT/loss.png``, ``OUT/knn_top1.png``, ``OUT/lr.png`` and, when a run used
``train.online_linear=true``, ``OUT/online_linear.png``, and with ``plugins.ascl``, ``OUT/ascl_confidence.png`` and
``OUT/ascl_mass.png``, and with ``plugins.batch_fusion``, ``OUT/batch_fusion_strength.png`` and
``OUT/batch_fusion_relative_norm.png`` (a plot is left out when no run logged that metric; the Markdown then says
so, except for the optional online probe and plug-in curves). Every file is written to a temporary name and renamed.
"""

from __future__ import annotations

import csv
import datetime as _dt
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from contrastkit.config import yaml_error
from contrastkit.errors import ContrastkitError
from contrastkit.io import writable_folder, write_text_atomic

#: The curves of the report: CSV column -> (file stem, title, y label).
CURVES: dict[str, tuple[str, str, str]] = {
    "train/loss": ("loss", "training loss", "loss"),
    "knn/top1": ("knn_top1", "kNN top-1 (monitor)", "top-1 (%)"),
    "train/lr": ("lr", "learning rate", "learning rate"),
    "online_linear/acc": ("online_linear", "online linear probe accuracy (train.online_linear)", "top-1 (%)"),
    "train/ascl_confidence": ("ascl_confidence", "ASCL mean confidence c (plugins.ascl)", "c"),
    "train/ascl_mass": ("ascl_mass", "ASCL target mass outside the positive (plugins.ascl)", "mass"),
    "train/batch_fusion_strength": ("batch_fusion_strength", "batch fusion strength alpha (plugins.batch_fusion)",
                                    "alpha"),
    "train/batch_fusion_relative_norm": ("batch_fusion_relative_norm",
                                         "batch fusion: norm of the fused part / norm of the input", "ratio"),
}
#: Curves drawn only when some run logged them (optional monitors and plug-ins).
_OPTIONAL = ("online_linear", "train/ascl_", "train/batch_fusion_")


@dataclass
class RunSummary:
    """What the report knows about one run directory.

    Attributes:
        path: the run directory. name: its label in the table and legends.
        config: ``config.yaml`` as a dict. results: ``results.json`` as a dict, ``None`` when the run is incomplete.
        curves: CSV column -> list of ``(epoch, value)`` points, sorted by epoch.
        linear_top1: linear-probe top-1 from ``results.json`` or a saved ``eval linear`` result (``None``: none).
        linear_source: ``"results.json"``, ``"eval"`` or ``None``.
        linear_split: the split ``linear_top1`` was measured on (``None``: the run's ``data.monitor_query_split``).
        other_evaluations: saved ``contrastkit eval linear`` records that are not on the run's own protocol (another
            dataset, other probe settings, projector features): listed with their settings, never in the table.
    """

    path: Path
    name: str
    config: dict[str, Any]
    results: dict[str, Any] | None
    curves: dict[str, list[tuple[float, float]]] = field(default_factory=dict)
    linear_top1: float | None = None
    linear_source: str | None = None
    linear_split: str | None = None
    other_evaluations: list[dict[str, Any]] = field(default_factory=list)

    @property
    def complete(self) -> bool:
        return self.results is not None


def _float(text: str | None) -> float | None:
    if text is None or text == "":
        return None
    try:
        v = float(text)
    except ValueError:
        return None
    return v if math.isfinite(v) else None


def read_metrics_csv(path: str | Path) -> dict[str, list[tuple[float, float]]]:
    """The curves of a Lightning ``metrics.csv``: column -> sorted ``(epoch, value)`` points.

    Rows of per-step values (``train/*``) are placed at ``(step + 1) / steps_per_epoch``; epoch-end values (any other
    column, e.g. ``knn/top1``) at ``epoch + 1``. ``steps_per_epoch`` is the largest ``(step + 1) / (epoch + 1)`` of
    the file, exact as soon as one epoch-end row exists (they are logged at the last step of their epoch). A step
    logged twice (a resumed run) keeps its last value. A missing file gives ``{}``.
    """
    p = Path(path)
    if not p.is_file():
        return {}
    with open(p, newline="") as f:
        rows = list(csv.DictReader(f))
    spe = 0.0
    for r in rows:
        step, epoch = _float(r.get("step")), _float(r.get("epoch"))
        if step is not None and epoch is not None:
            spe = max(spe, (step + 1) / (epoch + 1))
    curves: dict[str, dict[float, float]] = {}
    for r in rows:
        step, epoch = _float(r.get("step")), _float(r.get("epoch"))
        for col, raw in r.items():
            if col in ("step", "epoch") or col is None:
                continue
            v = _float(raw)
            if v is None:
                continue
            if col.startswith("train/") and step is not None and spe > 0:
                x = (step + 1) / spe
            elif epoch is not None:
                x = epoch + 1
            else:
                continue
            curves.setdefault(col, {})[x] = v
    return {col: sorted(points.items()) for col, points in curves.items()}


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ContrastkitError(f"{str(path)!r} is not valid YAML: {yaml_error(e)}") from None
    except OSError as e:
        raise ContrastkitError(f"cannot read {str(path)!r}: {e.strerror or type(e).__name__}") from None
    if not isinstance(data, dict):
        raise ContrastkitError(f"{str(path)!r} is not a contrastkit config (not a mapping)")
    return data


def load_run(run_dir: str | Path, name: str | None = None) -> RunSummary:
    """Read one run directory (see the module docstring). Raises :class:`ContrastkitError` when it is not one."""
    p = Path(run_dir)
    if not p.is_dir():
        raise ContrastkitError(f"run directory {str(p)!r} not found")
    cfg_path = p / "config.yaml"
    if not cfg_path.is_file():
        raise ContrastkitError(f"{str(p)!r} is not a contrastkit run directory (no config.yaml); pass the folder "
                               "given as train.run_dir")
    config = _read_yaml(cfg_path)
    results: dict[str, Any] | None = None
    res_path = p / "results.json"
    if res_path.is_file():
        try:
            results = json.loads(res_path.read_text())
        except (OSError, ValueError):
            raise ContrastkitError(f"{str(res_path)!r} is not valid JSON; re-run the evaluation or delete it"
                                   ) from None
        if not isinstance(results, dict):
            raise ContrastkitError(f"{str(res_path)!r} is not a results mapping")
    run = RunSummary(p, name or p.name, config, results, read_metrics_csv(p / "logs" / "csv" / "metrics.csv"))
    if results is not None and isinstance(results.get("linear_top1"), (int, float)):
        run.linear_top1, run.linear_source = float(results["linear_top1"]), "results.json"
        run.linear_split = "test" if "linear_top1_test" in results else None
    from contrastkit.evaluation.offline import saved_results

    for saved in saved_results(p / "checkpoints" / "last.ckpt", "linear"):
        if not isinstance(saved.get("top1"), (int, float)):
            continue
        if not saved.get("own_protocol"):
            run.other_evaluations.append(saved)
        elif run.linear_top1 is None:
            run.linear_top1, run.linear_source = float(saved["top1"]), "eval"
            run.linear_split = saved.get("query_split")
    return run


def _number(v: Any) -> float | None:
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) else None


def split_metrics(run: RunSummary) -> dict[str, float | None]:
    """A run's final numbers by the split they were measured on.

    Keys: ``knn_top1_val``, ``knn_top1_test``, ``linear_top1_val`` (validation top-1 of the probe's chosen
    hyper-parameters), ``linear_top1_test``, ``images_per_sec``, ``train_seconds``, ``fit_wall_seconds``; ``None``
    when unknown. ``results.json`` written since the validation split existed names these keys itself; for older
    files the kNN monitor's ``knn_top1`` counts for the split named by the run's ``data.monitor_query_split``
    (``test`` before the validation split existed), and the linear probe's test top-1 likewise.
    """
    res = run.results or {}
    out: dict[str, float | None] = {k: _number(res.get(k)) for k in (
        "knn_top1_val", "knn_top1_test", "linear_top1_val", "linear_top1_test", "images_per_sec", "train_seconds",
        "fit_wall_seconds")}
    query = str(_section(run.config, "data").get("monitor_query_split") or "test")
    legacy = "test" if query == "test" else "val"
    if out["knn_top1_val"] is None and out["knn_top1_test"] is None:
        out[f"knn_top1_{legacy}"] = _number(res.get("knn_top1"))
    if out["linear_top1_test"] is None and run.linear_top1 is not None:
        key = "linear_top1_test" if (run.linear_split or legacy) == "test" else "linear_top1_val"
        if out[key] is None:
            out[key] = run.linear_top1
    return out


def describe_evaluation(record: dict[str, Any]) -> str:
    """One evaluation record in words with its settings, e.g. ``linear top-1 41.20 on cifar10 test (bank train),
    2 epochs, backbone features``."""
    words = [f"{record.get('protocol', '?')} top-1 {_fmt(record.get('top1'))} on {record.get('dataset', '?')} "
             f"{record.get('query_split', '?')} (bank {record.get('bank_split', '?')})"]
    if record.get("epochs") is not None:
        words.append(f"{record['epochs']} epochs")
    if record.get("augmented"):
        words.append(f"{record['augmented'].get('passes', '?')} augmented passes")
    if record.get("k") is not None:
        words.append(f"k={record['k']}, T={record.get('temperature')}, {record.get('metric', 'cosine')}")
    words.append(f"{record.get('features', '?')} features")
    return ", ".join(words)


def _section(cfg: dict[str, Any], name: str) -> dict[str, Any]:
    sec = cfg.get(name)
    return sec if isinstance(sec, dict) else {}


def plugins_of(cfg: dict[str, Any]) -> str:
    """The plug-ins a run trained with (the names of its ``plugins`` section, see :mod:`contrastkit.plugins`), or
    ``-``."""
    raw = cfg.get("plugins")
    return ", ".join(sorted(map(str, raw))) if isinstance(raw, dict) and raw else "-"


def _fmt(v: Any, spec: str = ".2f", unit: str = "") -> str:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        return "-"
    return f"{v:{spec}}{unit}"


def _duration(seconds: Any) -> str:
    if isinstance(seconds, bool) or not isinstance(seconds, (int, float)) or not math.isfinite(seconds):
        return "-"
    if seconds < 60:
        return f"{seconds:.1f} s"
    m, s = divmod(int(round(seconds)), 60)
    return f"{m}m {s:02d}s" if m < 60 else f"{m // 60}h {m % 60:02d}m"


def table_row(run: RunSummary) -> list[str]:
    """The report's table cells for one run (see :data:`TABLE_HEADER`)."""
    cfg, res = run.config, run.results or {}
    method, optim, train_ = _section(cfg, "method"), _section(cfg, "optim"), _section(cfg, "train")
    name = str(method.get("name", "-"))
    from contrastkit.config import DEFAULT_LOSS
    from contrastkit.methods import METHODS

    own = METHODS[name].own_loss if name in METHODS else None
    loss = own or str(method.get("loss") or DEFAULT_LOSS)  # method.loss applies to simclr, moco and nnclr only
    batch = res.get("batch_size", optim.get("batch_size", "-"))
    world = res.get("world_size", 1)
    batch_s = f"{batch}" if not isinstance(world, int) or world <= 1 else f"{batch} x {world}"
    epochs = train_.get("epochs", res.get("epochs", "-"))
    if not run.complete:
        done = max((x for pts in run.curves.values() for x, _ in pts), default=0.0)
        epochs_s = f"{math.floor(done + 1e-9)}/{epochs} (incomplete)"
    else:
        epochs_s = str(epochs)
    split = split_metrics(run)
    linear = _fmt(split["linear_top1_test"])
    if run.linear_source == "eval" and split["linear_top1_test"] is not None:
        linear += " (eval)"
    return [
        run.name, name, plugins_of(cfg), loss, str(_section(cfg, "model").get("backbone", "-")),
        str(_section(cfg, "data").get("name", "-")), batch_s, epochs_s, _fmt(split["knn_top1_val"]),
        _fmt(split["knn_top1_test"]), linear, _duration(res.get("seconds_per_epoch")),
        _fmt(res.get("images_per_sec"), ".0f"), _fmt(res.get("peak_memory_mb"), ".0f", " MB"),
    ]


TABLE_HEADER = ["run", "method", "plug-ins", "loss", "backbone", "dataset", "batch size", "epochs", "kNN val",
                "kNN test", "linear test", "time / epoch", "images/s", "peak memory"]


def _unique_names(paths: list[Path]) -> list[str]:
    names = [p.name or str(p) for p in paths]
    for depth in range(2, 6):
        dup = {n for n in names if names.count(n) > 1}
        if not dup:
            break
        names = [("/".join(p.resolve().parts[-depth:]) if n in dup else n) for p, n in zip(paths, names)]
    return [n if names.count(n) == 1 else f"{n} ({i + 1})" for i, n in enumerate(names)]


def plot_curves(runs: list[RunSummary], column: str, out: Path) -> Path | None:
    """One PNG with the ``column`` curve of every run on shared axes; ``None`` when no run has it."""
    from matplotlib.figure import Figure

    from contrastkit.evaluation.plots import save_figure

    series = [(r, r.curves.get(column, [])) for r in runs]
    if not any(points for _, points in series):
        return None
    _, title, ylabel = CURVES.get(column, (column, column, column))
    fig = Figure(figsize=(7.0, 4.2))
    ax = fig.add_subplot(1, 1, 1)
    for run, points in series:
        if not points:
            continue
        xs, ys = zip(*points)
        label = run.name + ("" if run.complete else " (incomplete)")
        marker = "o" if not column.startswith("train/") or len(points) < 30 else None
        ax.plot(xs, ys, label=label, marker=marker, markersize=3, linewidth=1.4)
    ax.set_xlabel("epochs trained")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    if column == "train/lr":
        ax.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
    ax.legend(fontsize=8)
    return save_figure(fig, out)


def build_report(run_dirs: list[str | Path], out_dir: str | Path = "report") -> Path:
    """Compare ``run_dirs`` in ``out_dir/report.md`` with PNG curves; returns the Markdown path.

    Raises:
        ContrastkitError: no run given, a path that is not a run directory, or an unwritable ``out_dir``.
    """
    if not run_dirs:
        raise ContrastkitError("give at least one run directory")
    paths = [Path(p) for p in run_dirs]
    runs = [load_run(p, n) for p, n in zip(paths, _unique_names(paths))]
    out = writable_folder(out_dir, "report folder")

    lines = [
        "# contrastkit run comparison",
        "",
        f"{len(runs)} run(s), generated {_dt.datetime.now().astimezone().strftime('%Y-%m-%d %H:%M %Z')} by "
        "`contrastkit report`.",
        "",
        "| " + " | ".join(TABLE_HEADER) + " |",
        "|" + "|".join(["---"] * 7 + ["--:"] * 7) + "|",
    ]
    for run in runs:
        lines.append("| " + " | ".join(c.replace("|", "/") for c in table_row(run)) + " |")
    lines += [
        "",
        "kNN val: the final kNN monitor top-1 (weighted kNN on `data.monitor_query_split`, the validation split "
        "by default; bank `data.monitor_bank_split`, `train.knn_k`, `train.knn_temperature`). kNN test: the single "
        "final kNN top-1 on `data.test_split` (older runs that monitored the test split show that value here). "
        "Linear test: `eval.linear=true` at the end of training (hyper-parameters chosen on the validation split), "
        "or `(eval)`: a later `contrastkit eval linear` of `checkpoints/last.ckpt` on the run's own protocol (its "
        "dataset and splits, backbone features, `eval.linear_epochs` epochs, no augmentation). "
        "Time / epoch and images/s: training only (monitors excluded). Peak memory: CUDA max allocated on a GPU, "
        "the process's peak RSS on the CPU.",
        "",
    ]
    others = [(r, rec) for r in runs for rec in r.other_evaluations]
    if others:
        lines += ["**Other evaluations** (not on the run's own protocol, so not in the table):", ""]
        lines += [f"- `{r.name}`: {describe_evaluation(rec)}" for r, rec in others]
        lines.append("")
    incomplete = [r for r in runs if not r.complete]
    if incomplete:
        lines += ["**Incomplete runs** (no `results.json`: still running, interrupted or failed): "
                  + ", ".join(f"`{r.name}` ({r.path})" for r in incomplete) + ".", ""]
    lines += ["## Training curves", ""]
    for column, (stem, title, _) in CURVES.items():
        png = plot_curves(runs, column, out / f"{stem}.png")
        if png is None and column.startswith(_OPTIONAL):
            continue
        if png is None:
            lines += [f"*{title}: not logged by any run.*", ""]
        else:
            lines += [f"![{title}]({png.name})", ""]
    lines += ["## Runs", ""]
    for run in runs:
        lines.append(f"- `{run.name}`: {run.path.resolve()}")
    return write_text_atomic(out / "report.md", "\n".join(lines) + "\n")
