"""Test-split bits/dim on the 8x8 digits: the shipped VP score model (diffkern.training.pretrained,
"digits-vp") by the probability-flow ODE, and optionally a CNF trained by tools/train_cnf_examples.sh
(runs/cnf-digits), each with uniform dequantization of the 17 grey levels (one fixed draw, bins of width
2/17, so bits_offset = log2(17/2), as score_sde's 7 for 256 levels on [-1, 1]), adaptive dopri5 at two
tolerances and a fixed grid, one Hutchinson probe with three probe seeds (the spread of the mean over
seeds) and, for the CNF, the exact trace too; wall time on this machine.

    python benchmarks/digits_bits_per_dim.py [--cnf runs/cnf-digits/checkpoint.pt]
"""
import argparse
import time

import torch

import diffkern as dk
from diffkern.training import cnf_report, load_checkpoint, load_pretrained

SETTINGS = [("dopri5, rtol = atol = 1e-4", dict(rtol=1e-4, atol=1e-4)),
            ("dopri5, rtol = atol = 1e-5", dict(rtol=1e-5, atol=1e-5))]


def measure(label: str, run, seeds=(0, 1, 2)) -> str:
    means, evals, seconds = [], [], []
    for seed in seeds:
        started = time.perf_counter()
        with torch.no_grad():
            result = run(seed)
        seconds.append(time.perf_counter() - started)
        means.append(float(result.bits_per_dim.double().mean()))
        evals.append(result.num_evals)
    spread = torch.tensor(means, dtype=torch.float64)
    across = f"+- {spread.std():.4f}" if len(seeds) > 1 else "(exact)"
    return (f"  {label:<34} {spread.mean():.4f} {across:<9} bits/dim   {sum(evals) / len(seeds):.0f} evals   "
            f"{sum(seconds) / len(seeds):.1f} s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cnf", default=None, help="a CNF checkpoint of the train command (runs/cnf-digits/...)")
    args = parser.parse_args()
    test, offset = cnf_report.digits_test()
    print("test split (300 images), bits/dim: the mean over images; +-: its spread over 3 probe seeds")
    print("digits-vp (shipped VP score model), probability-flow ODE:")
    model, sde = load_pretrained("digits-vp"), dk.VPSDE()
    for label, kwargs in SETTINGS + [("heun, 100 steps (fixed grid)", dict(num_steps=100, solver="heun"))]:
        print(measure(label, lambda seed, kwargs=kwargs: dk.log_likelihood(model, test, sde, seed=seed,
                                                                           bits_offset=offset, **kwargs)), flush=True)
    if args.cnf:
        cnf = load_checkpoint(args.cnf)
        t1 = cnf.diffkern_trained["options"]["t1"]
        print(f"CNF ({args.cnf}), t in [0, {t1}]:")

        def f(z, t):
            return cnf(z, t)

        for label, kwargs in SETTINGS + [("rk4, 8 steps (its training grid)", dict(num_steps=8, solver="rk4"))]:
            print(measure(label, lambda seed, kwargs=kwargs: cnf_log_likelihood(f, test, t1, seed, offset, **kwargs)),
                  flush=True)
        print(measure("dopri5 1e-5, exact trace", lambda seed: cnf_log_likelihood(
            f, test, t1, seed, offset, rtol=1e-5, atol=1e-5, trace="exact"), seeds=(0,)), flush=True)


def cnf_log_likelihood(f, test, t1, seed, offset, **kwargs):
    return dk.likelihood.cnf_log_likelihood(f, test, 0.0, t1, seed=seed, bits_offset=offset, **kwargs)


if __name__ == "__main__":
    main()
