"""The demo's digits part: the models shipped with diffkern (diffkern.training.pretrained, trained on
the 8x8 handwritten digits) sampled by a handful of samplers at small budgets, scored against the test
split (digits-FD, class coverage, precision, recall: diffkern.training.digit_metrics, with real digits'
own scores as the floor), a grid of samples per sampler beside real test digits, and the VP model's
test-split bits/dim by the probability-flow ODE.

The full quality-against-evaluations table (every sampler at 5 to 1000 evaluations) is
``benchmarks/digits_sampler_quality.py``; its committed result is in the README.
"""
from __future__ import annotations

import math
import os
import time
from dataclasses import asdict

import torch

import diffkern as dk

from . import sampler_table
from .training import cnf_report, digit_metrics
from .training.data import digits

# (sampler label of sampler_table, budget of model evaluations)
PLAN = [("DDPM", 100), ("DDIM", 20), ("DPM-Solver++ 2M", 10), ("UniPC (drop-in)", 10), ("Heun (EDM)", 19),
        ("Euler-Maruyama (VP)", 100), ("probability-flow ODE, Heun", 20), ("flow, Heun", 20), ("PFGM, Euler", 20)]
QUICK_PLAN = [("DDIM", 10), ("DPM-Solver++ 2M", 10), ("Euler-Maruyama (VP)", 50), ("flow, Euler", 10)]
# test images, and dopri5's tolerance: the score's 1 / std near t = 0 makes a coarse fixed grid's
# likelihood far off (25 Heun steps: 1.95 bits/dim where the converged value is 2.2), an adaptive
# solver puts its steps there
LIKELIHOOD_IMAGES, QUICK_LIKELIHOOD_IMAGES, LIKELIHOOD_TOLERANCE = 300, 100, 1e-3


def likelihood(images: int, seed: int, progress: bool) -> dict:
    """Test-split bits/dim of the shipped VP model: uniform dequantization of the 17 grey levels (one
    draw from ``seed``), the probability-flow ODE by dopri5 at LIKELIHOOD_TOLERANCE, one Hutchinson probe."""
    from .training.pretrained import load_pretrained

    x, offset = cnf_report.digits_test(seed)
    x = x[:images]  # each image's draw is its own (keyed by its index): the first ones are the same alone
    started = time.perf_counter()
    with torch.no_grad():
        result = dk.log_likelihood(load_pretrained("digits-vp"), x, dk.VPSDE(), solver="dopri5", seed=seed,
                                   rtol=LIKELIHOOD_TOLERANCE, atol=LIKELIHOOD_TOLERANCE,
                                   bits_offset=offset, progress=progress)
    bits = result.bits_per_dim.double()
    return {"images": images, "tolerance": LIKELIHOOD_TOLERANCE, "model_calls": result.num_evals,
            "wall_s": time.perf_counter() - started,
            "bits_per_dim": float(bits.mean()), "stderr": float(bits.std() / math.sqrt(images))}


def format_report(rows: list, floor: dict, lk: dict, samples: int) -> str:
    lines = [f"digits: 8x8 handwritten digits, the shipped models, {samples} samples per sampler on cpu "
             f"(floor, {floor['images']} real training digits: digits-FD {floor['fd']:.1f}, coverage TV "
             f"{floor['coverage_tv']:.3f}, precision {floor['precision']:.2f}, recall {floor['recall']:.2f})",
             f"  {'sampler':<30}{'model calls':>12}{'wall s':>9}{'digits-FD':>11}{'coverage TV':>13}"
             f"{'precision':>11}{'recall':>8}"]
    for r in rows:
        lines.append(f"  {r.sampler:<30}{r.evals:>12}{r.wall_s:>9.2f}{r.fd:>11.1f}{r.coverage_tv:>13.3f}"
                     f"{r.precision:>11.2f}{r.recall:>8.2f}")
    lines.append(f"  bits/dim of the VP model on {lk['images']} test images (probability-flow ODE, dopri5 at "
                 f"{lk['tolerance']:g}, {lk['model_calls']} model calls, {lk['wall_s']:.1f} s): "
                 f"{lk['bits_per_dim']:.3f} +- {lk['stderr']:.3f} (standard error over images; converged values: "
                 "benchmarks/digits_bits_per_dim.py)")
    return "\n".join(lines)


def _tile(x: torch.Tensor, columns: int = 8):
    """[N, 1, 8, 8] in [-1, 1] -> one image of columns x rows tiles with a 1-pixel gap, values in [0, 1]."""
    n = x.shape[0]
    rows = math.ceil(n / columns)
    canvas = torch.ones(rows * 9 + 1, columns * 9 + 1)
    for i in range(n):
        r, c = divmod(i, columns)
        canvas[1 + 9 * r:9 + 9 * r, 1 + 9 * c:9 + 9 * c] = (x[i, 0].clamp(-1, 1) + 1) / 2
    return canvas.numpy()


def plot(rows: list, kept: dict, floor: dict, path: str) -> bool:
    """A grid of 64 samples per sampler beside 64 real test digits."""
    try:
        import matplotlib
    except ImportError:
        return False
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("real digits (test split)", f"floor: digits-FD {floor['fd']:.1f}", digits("test")[:64])]
    for (name, budget), r in zip(kept, rows):
        panels.append((r.sampler, f"{r.evals} calls, digits-FD {r.fd:.1f}", kept[(name, budget)][:64]))
    columns = min(5, len(panels))
    grid_rows = math.ceil(len(panels) / columns)
    fig, axes = plt.subplots(grid_rows, columns, figsize=(2.3 * columns, 2.55 * grid_rows + 0.5), squeeze=False,
                             layout="constrained")
    for ax in axes.flat:
        ax.axis("off")
    for ax, (title, subtitle, x) in zip(axes.flat, panels):
        ax.imshow(_tile(x), cmap="gray_r", vmin=0, vmax=1, interpolation="nearest")
        ax.set_title(f"{title}\n{subtitle}", fontsize=8)
    fig.suptitle("diffkern demo: the shipped digits models, 64 samples per sampler (digits-FD: lower is better)",
                 fontsize=10)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def run(out: str, samples: int, seed: int, quick: bool, progress: bool) -> dict:
    """The digits part: the table printed, digits.png written, the summary returned."""
    jobs = QUICK_PLAN if quick else PLAN
    missing = [(name, sampler_table.samplers()[name].needs) for name, _ in jobs if not sampler_table.available(name)]
    for name, needs in missing:
        print(f"digits: {name} needs {needs}, which is not installed (pip install {needs}); skipped", flush=True)
    jobs = [(name, budget) for name, budget in jobs if sampler_table.available(name)]
    kept: dict = {}
    rows = sampler_table.run(jobs, samples=samples, seed=seed, progress=progress, keep=kept)
    # real digits scored as the samplers are, as many of them: FD's bias depends on the sample count
    real = digits("train")[:samples]
    floor = dict(digit_metrics.metrics(real), images=real.shape[0])
    lk = likelihood(QUICK_LIKELIHOOD_IMAGES if quick else LIKELIHOOD_IMAGES, seed, progress)
    print(format_report(rows, floor, lk, samples), flush=True)
    png = os.path.join(out, "digits.png")
    drew = plot(rows, kept, floor, png)
    return {"samples": samples, "samplers": [asdict(r) for r in rows], "floor": {k: v for k, v in floor.items()
                                                                                 if k != "class_shares"},
            "likelihood": lk, "picture": png if drew else None}
