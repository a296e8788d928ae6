#!/usr/bin/env bash
# Reproduces the method comparison of docs/results.md: every preset at the same budget on Fashion-MNIST
# (small ResNet, batch 256, the `gray` views), kNN (k=200, T=0.1) after every epoch, final linear probe.
# The backbone is pinned below because the SimCLR demo preset has since moved to the ConvNet.
# Two runs at a time with one torch thread each (2-core machine), so "time per epoch" is per single thread.
# Usage: benchmarks/fmnist_methods.sh [EPOCHS] [RUNS_DIR]
set -euo pipefail
EPOCHS=${1:-2}
RUNS=${2:-runs/compare}
run() {  # NAME CONFIG [OVERRIDES...]
  local name=$1 config=$2; shift 2
  .venv/bin/contrastkit train "$config" "train.epochs=${EPOCHS}" "train.run_dir=${RUNS}/${name}" \
    train.num_threads=1 train.progress_bar=false eval.linear=true eval.linear_epochs=30 eval.baselines=false \
    model.backbone=small_resnet "model.widths=[32,64,128,256]" model.stem_stride=2 "$@" \
    > "${RUNS}/${name}.log" 2>&1 || { echo "run ${name} failed, see ${RUNS}/${name}.log"; return 1; }
}
mkdir -p "$RUNS"
export -f run; export EPOCHS RUNS
printf '%s\n' \
  "simclr_dcl configs/fmnist_simclr_dcl.yaml" \
  "simclr_infonce configs/fmnist_simclr_dcl.yaml method.loss=infonce" \
  "moco configs/fmnist_moco.yaml" \
  "nnclr configs/fmnist_nnclr.yaml" \
  "byol configs/fmnist_byol.yaml" \
  "barlow configs/fmnist_barlow.yaml" \
  | xargs -P 2 -L 1 bash -c 'run "$@"' _
.venv/bin/contrastkit report "${RUNS}"/simclr_dcl "${RUNS}"/simclr_infonce "${RUNS}"/moco "${RUNS}"/nnclr \
  "${RUNS}"/byol "${RUNS}"/barlow --out "${RUNS}/report"
