#!/usr/bin/env bash
# Reproduces the ASCL comparison of docs/results.md: MoCo, BYOL and SimCLR with and without the ASCL plug-in on
# Fashion-MNIST at an equal budget (the same backbone, batch, steps and images seen; only plugins.ascl differs),
# seeds 0, 1, 2, kNN (k=200, T=0.1, 10k-image bank) and linear probe on the frozen backbone.
# Budget: the demo ConvNet at half width, batch 256, STEPS optimizer steps of a one-epoch schedule (0.1 warm-up
# epochs, then cosine; the run stops after STEPS), one torch thread. Runs are sequential; each writes
# RUNS/NAME/results.json, and the summary table (mean +- std over seeds) is printed at the end.
# Usage: benchmarks/fmnist_ascl.sh [STEPS] [RUNS_DIR]      (PY: the Python interpreter, default .venv/bin/python)
set -uo pipefail
STEPS=${1:-60}
RUNS=${2:-runs/ascl}
PY=${PY:-.venv/bin/python}
mkdir -p "$RUNS"
run() {  # NAME CONFIG [OVERRIDES...]
  local name=$1 config=$2; shift 2
  [ -f "${RUNS}/${name}/results.json" ] && return 0  # finished already (the script can be restarted)
  echo "$(date -u +%H:%M:%S) ${name}"
  "$PY" -m contrastkit.cli train "$config" "train.run_dir=${RUNS}/${name}" train.epochs=1 "train.max_steps=${STEPS}" \
    model.backbone=convnet "model.widths=[16,32,64,128]" optim.warmup_epochs=0.1 train.num_threads=1 \
    train.progress_bar=false data.monitor_bank_size=10000 eval.baselines=false eval.linear=true \
    eval.linear_epochs=20 "$@" > "${RUNS}/${name}.log" 2>&1 || echo "run ${name} failed, see ${RUNS}/${name}.log"
}
for seed in 0 1 2; do
  s="train.seed=${seed}"
  run "moco_s${seed}" configs/fmnist_moco.yaml "$s"
  run "moco_ascl1_s${seed}" configs/fmnist_moco_ascl.yaml "$s" plugins.ascl.neighbours=1
  run "moco_ascl5_s${seed}" configs/fmnist_moco_ascl.yaml "$s" plugins.ascl.neighbours=5
  run "byol_s${seed}" configs/fmnist_byol.yaml "$s"
  run "byol_ascl_s${seed}" configs/fmnist_byol.yaml "$s" "plugins.ascl={}"
  run "simclr_s${seed}" configs/fmnist_simclr_dcl.yaml "$s" method.loss=infonce
  run "simclr_ascl_s${seed}" configs/fmnist_simclr_dcl.yaml "$s" method.loss=infonce "plugins.ascl={}"
done
"$PY" benchmarks/ascl_table.py "$RUNS"
