"""The ASCL comparison table of docs/results.md from the runs of benchmarks/fmnist_ascl.sh.

Usage: python benchmarks/ascl_table.py RUNS_DIR. For each setting: kNN and linear top-1 (mean +- sample standard
deviation over the seeds found), the per-seed numbers, and for ASCL runs the last logged mean confidence c and
target mass outside the positive (train/ascl_confidence, train/ascl_mass in logs/csv/metrics.csv).
"""

from __future__ import annotations

import csv
import json
import statistics
import sys
from pathlib import Path

SETTINGS = ["moco", "moco_ascl1", "moco_ascl5", "byol", "byol_ascl", "simclr", "simclr_ascl"]


def last_logged(metrics: Path, column: str) -> float | None:
    if not metrics.is_file():
        return None
    values = [float(row[column]) for row in csv.DictReader(metrics.open()) if row.get(column)]
    return values[-1] if values else None


def main(runs: Path) -> None:
    print("| setting | seeds | kNN top-1 | linear top-1 | per seed (kNN / linear) | c / mass (last step, mean) | "
          "train s/run |")
    print("|---|---:|---:|---:|---|---:|---:|")
    for name in SETTINGS:
        done = [runs / f"{name}_s{s}" for s in range(3) if (runs / f"{name}_s{s}" / "results.json").is_file()]
        if not done:
            print(f"| {name} | 0 | not run | | | | |")
            continue
        res = [json.loads((d / "results.json").read_text()) for d in done]
        knn, lin = [r["knn_top1"] for r in res], [r["linear_top1"] for r in res]
        conf = [last_logged(d / "logs" / "csv" / "metrics.csv", "train/ascl_confidence") for d in done]
        mass = [last_logged(d / "logs" / "csv" / "metrics.csv", "train/ascl_mass") for d in done]
        sd = (lambda v: f"{statistics.stdev(v):.2f}") if len(res) > 1 else (lambda v: "-")
        cm = (f"{statistics.mean(conf):.2f} / {statistics.mean(mass):.2f}" if None not in conf else "-")
        seeds = ", ".join(f"{k:.2f} / {v:.2f}" for k, v in zip(knn, lin))
        print(f"| {name} | {len(res)} | {statistics.mean(knn):.2f} ± {sd(knn)} | {statistics.mean(lin):.2f} ± "
              f"{sd(lin)} | {seeds} | {cm} | {statistics.mean(r['train_seconds'] for r in res):.0f} |")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
