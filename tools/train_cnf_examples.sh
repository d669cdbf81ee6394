#!/usr/bin/env bash
# The CNF results quoted in the README ("Training a CNF"): FFJORD's five 2-d toys and the 8x8 digits,
# each trained with the train command into runs/cnf-NAME (git-ignored). CPU, single process.
#   bash tools/train_cnf_examples.sh [STEPS_TOYS] [STEPS_DIGITS]
set -euo pipefail
cd "$(dirname "$0")/.."
TOY_STEPS=${1:-2000}
DIGIT_STEPS=${2:-3000}
python -m diffkern train --data digits --objective cnf --steps "$DIGIT_STEPS" --batch-size 128 --lr 1e-3 \
    --objective-options '{"dequantize": 0.11764705882352941, "solver": "rk4", "num_steps": 8, "kinetic_weight": 0.01, "jacobian_weight": 0.01}' \
    --model-kwargs '{"hidden": [256, 256]}' --checkpoint-every 1000 --out runs/cnf-digits --no-progress
for data in 8gaussians checkerboard pinwheel 2spirals rings; do
  python -m diffkern train --data "$data" --objective cnf --steps "$TOY_STEPS" --batch-size 256 --lr 2e-3 \
      --ema-decay 0.99 --objective-options '{"kinetic_weight": 0.01, "jacobian_weight": 0.01}' \
      --checkpoint-every 1000 --out "runs/cnf-$data" --no-progress
done
