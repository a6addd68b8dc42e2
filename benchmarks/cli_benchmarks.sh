#!/usr/bin/env bash
# Throughput/latency of every config's network on this machine through `main.py benchmark`
# (predict and train steps, AMP off/on, several batch sizes). Each config needs a published
# checkpoint; pass them as env vars (defaults: the runs made by the README's commands).
# Writes runs/bench/<config>_<mode>/benchmark.json and prints the tables.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
declare -A CKPT=(
  [unet2d]="${UNET2D_CKPT:-runs/isbi_small/model/unet2d.pt}"
  [unet3d]="${UNET3D_CKPT:-runs/hippo120/model/unet3d.pt}"
  [nnunet]="${NNUNET_CKPT:-runs/nn120_long/model/nnunet.pt}"
  [nnunet2d]="${NNUNET2D_CKPT:-runs/cli_nn2d/model/nnunet2d.pt}"
)
WARMUP=${WARMUP:-3}
STEPS=${STEPS:-10}
for config in unet2d unet3d nnunet nnunet2d; do
  ckpt=${CKPT[$config]}
  if [ ! -f "$ckpt" ]; then echo "## $config: no checkpoint at $ckpt (skipped)"; continue; fi
  for mode in predict train; do
    echo "## $config $mode ($ckpt)"
    $PY main.py benchmark --config "$config" --ckpt "$ckpt" --results "runs/bench/${config}_${mode}" \
      --bench_mode "$mode" --batch_size "${BATCHES:-1,2,4}" --warmup_steps "$WARMUP" --bench_steps "$STEPS" 2>/dev/null \
      | grep '^|'
  done
done
