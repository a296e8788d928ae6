#!/usr/bin/env bash
# Reproduces the method comparison of docs/results.md: every preset at the same budget on Fashion-MNIST
# (small ResNet, batch 256, the `gray` views), kNN (k=200, T=0.1) every epoch, final linear probe.
# Usage: benchmarks/fmnist_methods.sh [EPOCHS] [RUNS_DIR]
set -euo pipefail
EPOCHS=${1:-3}
RUNS=${2:-runs/compare}
for preset in simclr_dcl moco nnclr byol barlow; do
  .venv/bin/contrastkit train "configs/fmnist_${preset}.yaml" "train.epochs=${EPOCHS}" \
    "train.run_dir=${RUNS}/${preset}" train.progress_bar=false eval.linear=true eval.baselines=false
done
.venv/bin/contrastkit report "${RUNS}"/* --out "${RUNS}/report"
