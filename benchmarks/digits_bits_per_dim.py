"""Test-split bits/dim of a VP score model trained on the digits (tools/train_cnf_examples.sh's sibling
command below), by the probability-flow ODE: uniform dequantization of the 17 grey levels (one fixed
draw, bins of width 2/17, so bits_offset = log2(17/2), as score_sde's 7 for 256 levels on [-1, 1]),
adaptive dopri5 at two tolerances and fixed Heun steps, one Hutchinson probe with three probe seeds
(the spread of the mean over seeds), wall time on this machine.

    python -m diffkern train --data digits --objective score_matching --objective-options '{"sde": "vp"}' \
        --model unet --model-kwargs '{"block_out_channels": [32, 64]}' --steps 1500 --batch-size 128 \
        --lr 2e-3 --ema-decay 0.995 --out runs/vp-digits
    python benchmarks/digits_bits_per_dim.py runs/vp-digits/checkpoint.pt
"""
import math
import sys
import time

import torch

import diffkern as dk
from diffkern.training import cnf_report, data

WIDTH = 2 / data.DIGITS_LEVELS


def main(path: str) -> None:
    model = dk.training.load_checkpoint(path)
    sde = dk.VPSDE()
    test = cnf_report.dequantized(data.digits("test"), WIDTH)
    offset = math.log2(1 / WIDTH)
    settings = [("dopri5, rtol = atol = 1e-4", dict(rtol=1e-4, atol=1e-4)),
                ("dopri5, rtol = atol = 1e-5", dict(rtol=1e-5, atol=1e-5)),
                ("heun, 100 steps", dict(num_steps=100, solver="heun"))]
    print(f"{path}: test split (300 images), bits/dim (mean over images; spread over 3 probe seeds)")
    for label, kwargs in settings:
        means, evals, seconds = [], [], []
        for seed in range(3):
            started = time.perf_counter()
            with torch.no_grad():
                result = dk.log_likelihood(model, test, sde, seed=seed, bits_offset=offset, **kwargs)
            seconds.append(time.perf_counter() - started)
            means.append(float(result.bits_per_dim.mean()))
            evals.append(result.num_evals)
        spread = torch.tensor(means, dtype=torch.float64)
        print(f"  {label:<28} {spread.mean():.4f} +- {spread.std():.4f} bits/dim   {sum(evals) / 3:.0f} evals   "
              f"{sum(seconds) / 3:.1f} s")


if __name__ == "__main__":
    main(*sys.argv[1:])
