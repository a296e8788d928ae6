#!/usr/bin/env bash
# Our pipeline vs lightly's on the same model, on this machine: REPS alternating runs of each (the machine's speed
# drifts by +-10 % between runs, so alternate and compare medians). Needs lightly in LIGHTLY_PY's environment,
# see benchmarks/lightly_pipeline.py. Usage: benchmarks/vs_lightly.sh [REPS] [LIGHTLY_PY]
set -euo pipefail
REPS=${1:-3}
LIGHTLY_PY=${2:-/tmp/lvenv/bin/python}
for i in $(seq "$REPS"); do
  .venv/bin/contrastkit bench throughput --backbone convnet --steps 100 --warmup 10 --json 2>/dev/null | grep '^{'
  "$LIGHTLY_PY" benchmarks/lightly_pipeline.py --steps 100 --warmup 10 2>/dev/null | grep '^{'
done
