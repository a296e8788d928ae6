#!/usr/bin/env bash
# Reproduces the recipe screen of docs/results.md ("Choosing the demo recipe"): variations of the demo preset
# configs/fmnist_simclr_dcl.yaml on Fashion-MNIST, kNN (k=200, T=0.1, 60k bank, test queries) after every epoch.
# Two runs at a time with one torch thread each (2-core machine), so seconds are per single thread.
# The screen ran on the preset as it was before the ConvNet became its backbone, so the small ResNet is pinned
# here and the ConvNet rows name it explicitly.
# Usage: benchmarks/fmnist_recipe_screen.sh [RUNS_DIR]
set -euo pipefail
RUNS=${1:-runs/tune}
run() {  # NAME EPOCHS [OVERRIDES...]
  local name=$1 epochs=$2; shift 2
  OMP_NUM_THREADS=1 .venv/bin/contrastkit train configs/fmnist_simclr_dcl.yaml "train.epochs=${epochs}" \
    "train.run_dir=${RUNS}/${name}" train.num_threads=1 train.progress_bar=false eval.baselines=false \
    model.backbone=small_resnet "model.widths=[32,64,128,256]" model.stem_stride=2 "$@" \
    > "${RUNS}/${name}.log" 2>&1 || { echo "run ${name} failed, see ${RUNS}/${name}.log"; return 1; }
}
mkdir -p "$RUNS"
export -f run; export RUNS
printf '%s\n' \
  "base1 1" \
  "base1_seed1 1 train.seed=1" \
  "t007 1 method.temperature=0.07" \
  "t02 1 method.temperature=0.2" \
  "t05 1 method.temperature=0.5" \
  "crop01 1 views.common={crop_scale:[0.1,1.0]}" \
  "crop04 1 views.common={crop_scale:[0.4,1.0]}" \
  "lr015 1 optim.lr=0.15" \
  "lr06 1 optim.lr=0.6" \
  "bs128 1 optim.batch_size=128" \
  "w16_3ep 3 model.widths=[16,32,64,128]" \
  "w16_12ep 12 model.widths=[16,32,64,128]" \
  "convnet_3ep 3 model.backbone=convnet" \
  "convnet_8ep 8 model.backbone=convnet" \
  "convnet_w512_3ep 3 model.backbone=convnet model.widths=[32,64,128,512]" \
  | xargs -P 2 -L 1 bash -c 'run "$@"' _
for f in "$RUNS"/*/results.json; do
  .venv/bin/python -c "import json,sys; r=json.load(open(sys.argv[1])); \
print(sys.argv[1].split('/')[-2], [h['knn_top1'] for h in r['knn_history']], round(r['images_per_sec']))" "$f"
done
