"""Exports train runs as the shipped digits models (diffkern/datasets/models: EMA weights, command line,
sha256 and recorded test metrics in manifest.json); tools/train_digit_models.sh calls it.

    python tools/export_digit_models.py runs/digits-ddpm runs/digits-vp runs/digits-flow
"""
import sys

from diffkern.training import pretrained

if __name__ == "__main__":
    sys.exit(pretrained.main(sys.argv[1:]))
