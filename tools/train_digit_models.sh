#!/usr/bin/env bash
# The four models shipped in diffkern/datasets/models/ (diffkern.training.pretrained): an epsilon DDPM,
# a VP score model, a flow-matching model and a PFGM field model of the 8x8 digits, each a ConvUNet
# (plain PyTorch, so they load without diffusers) trained with the train command into runs/digits-NAME (git-ignored), then
# exported as its EMA weights with this command line and its sha256, and scored on the test split
# (the recorded metrics the tests check). CPU, single process, about 5 minutes a model on 2 cores.
#   bash tools/train_digit_models.sh [STEPS]
set -euo pipefail
cd "$(dirname "$0")/.."
STEPS=${1:-4000}
COMMON=(--data digits --model convunet --model-kwargs '{"block_out_channels": [32, 64]}' --steps "$STEPS"
        --batch-size 128 --lr 1e-3 --ema-decay 0.999 --checkpoint-every 1000 --no-progress)
python -m diffkern train "${COMMON[@]}" --objective ddpm --out runs/digits-ddpm
python -m diffkern train "${COMMON[@]}" --objective score_matching --objective-options '{"sde": "vp"}' \
    --out runs/digits-vp
python -m diffkern train "${COMMON[@]}" --objective flow_matching --out runs/digits-flow
# PFGM's objective with its CIFAR-10 defaults (M = 291, tau = 0.03, sigma_end = 0.01): at 64 features the
# perturbations reach z of about 40, the sampler's z_max, where the prior's radii are (about 8 z). Three
# times the steps: its samples were still improving at 4000 and 6000 (digits-FD 108 and 76 at z_max 40)
python -m diffkern train "${COMMON[@]}" --steps $((STEPS * 3)) --checkpoint-every 2000 --objective pfgm \
    --out runs/digits-pfgm
if [ "${DIFFKERN_EXPORT:-1}" = 1 ]; then
  python tools/export_digit_models.py runs/digits-ddpm runs/digits-vp runs/digits-flow runs/digits-pfgm
fi
