"""`python -m diffkern demo`: every sampler on exact Gaussian-mixture models, timed and scored, then the
models shipped with diffkern on the 8x8 digits (diffkern.demo_digits).

The mixtures' scores are closed-form at every noise level (diffkern.models), so they stand in for a
trained network and the output can be checked against the exact distribution: sliced Wasserstein
distance to exact samples (with the distance between two exact sample sets as its noise floor),
mode coverage, and the log-likelihood's error against the exact log-density.
"""
from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict, dataclass, field
from typing import Dict, List, Optional

import torch

import diffkern as dk

from ._validate import check_choice
from .models import EmpiricalPoissonField, GaussianMixture
from .sampling import registry

# What the demo shows by default (any registry sampler can be asked for by name), and the settings it
# runs them with: (steps, quick steps, registry options).
DEFAULT_SAMPLERS = ("ddpm", "ddim", "euler_maruyama", "heun", "langevin", "dpmpp", "flow", "pfgm")
SETTINGS = {
    "ddpm": (1000, 100, {}), "ddim": (50, 20, {}), "euler_maruyama": (1000, 100, {}), "ode": (100, 20, {}),
    "pc": (1000, 100, {}), "euler": (50, 20, {}), "heun": (18, 18, {}), "euler_ancestral": (50, 20, {}),
    "langevin": (10, 5, {"sigma_max": 10.0, "sigma_min": 0.05, "step_size": 2e-3, "langevin_steps": 100}),
    "dpmpp": (20, 15, {}), "flow": (50, 20, {"solver": "heun"}), "pfgm": (50, 20, {}),
}
QUICK_LANGEVIN_STEPS = 20
SAMPLERS = registry.SAMPLERS + ("likelihood",)  # what --sampler accepts
LABELS = {**{name: entry.label for name, entry in registry.ENTRIES.items()},
          "euler_maruyama": "Euler-Maruyama (VP)", "pfgm": "PFGM (empirical field)", "likelihood": "log-likelihood"}
# PFGM's field is the exact one of a reference set of exact samples drawn with this seed offset (not
# the evaluation set's seed nor the noise floor's).
PFGM_REFERENCE_SEED = 101


@dataclass
class SamplerResult:
    steps: int
    model_calls: int
    wall_s: float
    samples_per_s: float
    sliced_wasserstein: float
    modes_covered: int
    mode_tv: float


@dataclass
class LikelihoodResult:
    samples: int
    steps: int
    trace: str
    wall_s: float
    mean_abs_error_per_dim: float
    max_abs_error_per_dim: float
    bias_per_dim: float
    mean_log_p: float
    exact_mean_log_p: float
    bits_per_dim: float


@dataclass
class DatasetReport:
    name: str
    dim: int
    modes: int
    samples: int
    exact_sliced_wasserstein: float
    samplers: Dict[str, SamplerResult] = field(default_factory=dict)
    likelihood: Optional[LikelihoodResult] = None


def sliced_wasserstein(a: torch.Tensor, b: torch.Tensor, projections: int = 256, seed: int = 0) -> float:
    """Mean over random unit directions of the 1-d Wasserstein-1 distance between the projections
    (equal sample counts: the mean gap between sorted projections)."""
    gen = torch.Generator().manual_seed(seed)
    directions = torch.randn(projections, a.shape[1], generator=gen, dtype=torch.float64)
    directions /= directions.norm(dim=1, keepdim=True)
    pa = torch.sort(a.double().cpu() @ directions.T, dim=0).values
    pb = torch.sort(b.double().cpu() @ directions.T, dim=0).values
    return (pa - pb).abs().mean().item()


def mode_statistics(mixture: GaussianMixture, x: torch.Tensor):
    """(modes holding at least half their weight, total variation between mode frequencies and weights)."""
    frequency = torch.bincount(mixture.assign(x.cpu()), minlength=mixture.num_components).double() / x.shape[0]
    covered = int((frequency >= 0.5 * mixture.weights).sum())
    return covered, 0.5 * (frequency - mixture.weights).abs().sum().item()


def _model(kind: str, mixture: GaussianMixture, reference_set: torch.Tensor):
    """The mixture as the model a registry sampler takes (PFGM: the exact field of reference_set)."""
    if kind == "epsilon":
        return mixture.epsilon_model(dk.DDPMSchedule())
    if kind == "score":
        return mixture.score_model(dk.VPSDE())
    if kind == "field":
        return EmpiricalPoissonField(reference_set)
    return {"denoiser": mixture.denoiser, "noise_level_score": mixture.noise_level_score,
            "velocity": mixture.velocity}[kind]


def _sample(name: str, mixture: GaussianMixture, n: int, device, seed: int, quick: bool, progress: bool):
    """(samples, steps, model calls) of one registry sampler."""
    steps, quick_steps, options = SETTINGS[name]
    if quick and name == "langevin":
        options = dict(options, langevin_steps=QUICK_LANGEVIN_STEPS)
    sampler = registry.make_sampler(name, steps=quick_steps if quick else steps, **options)
    reference_set = None
    if sampler.entry.model == "field":
        reference_set = mixture.sample(n, seed=seed + PFGM_REFERENCE_SEED, dtype=torch.float64, device=device)
    model = _model(sampler.entry.model, mixture, reference_set)
    x = sampler(model, (n, mixture.dim), seed=seed, device=device, progress=progress)
    total_steps = sampler.steps * (dict(sampler.options).get("langevin_steps", 1))
    return x, total_steps, sampler.model_calls()


def _likelihood_steps(quick: bool) -> int:
    return 20 if quick else 100


def _likelihood(mixture: GaussianMixture, n: int, device, seed: int, quick: bool, progress: bool) -> LikelihoodResult:
    sde = dk.VPSDE()
    x = mixture.sample(n, seed=seed + 1, dtype=torch.float64, device=device)
    steps = _likelihood_steps(quick)
    trace = "exact" if mixture.dim <= 8 else "hutchinson"
    start = time.perf_counter()
    result = dk.log_likelihood(mixture.score_model(sde), x, sde, steps, trace=trace, num_probes=4, seed=seed,
                               progress=progress)
    wall = time.perf_counter() - start
    exact = mixture.log_prob(x).cpu()
    error = (result.log_p.cpu() - exact) / mixture.dim
    return LikelihoodResult(n, steps, trace if trace == "exact" else "hutchinson, 4 probes", wall,
                            error.abs().mean().item(), error.abs().max().item(), error.mean().item(),
                            result.log_p.mean().item(), exact.mean().item(), result.bits_per_dim.mean().item())


def run_dataset(name: str, mixture: GaussianMixture, samplers: List[str], n: int, device, seed: int, quick: bool,
                progress: bool, keep: Dict[str, torch.Tensor]) -> DatasetReport:
    exact = mixture.sample(n, seed=seed)
    floor = sliced_wasserstein(exact, mixture.sample(n, seed=seed + 7))
    report = DatasetReport(name, mixture.dim, mixture.num_components, n, floor)
    keep["exact"] = exact
    for sampler in samplers:
        if sampler == "likelihood":
            report.likelihood = _likelihood(mixture, min(n, 512), device, seed, quick, progress)
            continue
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        x, steps, calls = _sample(sampler, mixture, n, device, seed, quick, progress)
        if device.type == "cuda":
            torch.cuda.synchronize()
        wall = time.perf_counter() - start
        x = x.cpu()
        keep[sampler] = x
        covered, tv = mode_statistics(mixture, x)
        report.samplers[sampler] = SamplerResult(steps, calls, wall, n / wall, sliced_wasserstein(x, exact), covered,
                                                 tv)
    return report


def format_report(report: DatasetReport, device) -> str:
    lines = [f"{report.name}: {report.dim}-d, {report.modes} modes, {report.samples} samples on {device} "
             f"(sliced Wasserstein between two exact sample sets: {report.exact_sliced_wasserstein:.4f})",
             f"  {'sampler':<22}{'steps':>7}{'model calls':>13}{'wall s':>9}{'samples/s':>12}{'sliced W1':>11}"
             f"{'modes':>8}{'mode TV':>9}"]
    for name, r in report.samplers.items():
        lines.append(f"  {LABELS[name]:<22}{r.steps:>7}{r.model_calls:>13}{r.wall_s:>9.2f}{r.samples_per_s:>12.0f}"
                     f"{r.sliced_wasserstein:>11.4f}{f'{r.modes_covered}/{report.modes}':>8}{r.mode_tv:>9.3f}")
    if "pfgm" in report.samplers:
        lines.append(f"  PFGM follows the exact field of {report.samples} reference samples (seed + "
                     f"{PFGM_REFERENCE_SEED}): an exact empirical field carries its samples onto those points, so "
                     "its sliced W1 measures the reference set's size, not a model.")
    if report.likelihood is not None:
        lk = report.likelihood
        lines.append(f"  log-likelihood (probability-flow ODE, Heun, {lk.steps} steps, {lk.trace} trace) on "
                     f"{lk.samples} exact samples, {lk.wall_s:.2f} s:\n    error vs the exact log-density, nats/dim: "
                     f"|mean| {lk.mean_abs_error_per_dim:.2e}, max {lk.max_abs_error_per_dim:.2e}, "
                     f"bias {lk.bias_per_dim:+.1e}"
                     f"{' (the spread is the estimator' + chr(39) + 's)' if lk.trace != 'exact' else ''}; "
                     f"mean log p {lk.mean_log_p:.4f} (exact {lk.exact_mean_log_p:.4f}), "
                     f"{lk.bits_per_dim:.4f} bits/dim")
    return "\n".join(lines)


def _projection(mixture: GaussianMixture) -> torch.Tensor:
    """[dim, 2]: the plane of a picture. The data's own two axes in 2-d; above, the two principal axes
    of the component means (where the modes are told apart)."""
    if mixture.dim == 2:
        return torch.eye(2, dtype=torch.float64)
    centred = mixture.means - (mixture.weights[:, None] * mixture.means).sum(0)
    return torch.linalg.svd(centred * mixture.weights.sqrt()[:, None], full_matrices=False).Vh[:2].T


def _panels(ax_grid, mixture: GaussianMixture, samples: Dict[str, torch.Tensor], report: DatasetReport):
    """One row block of the figure: the exact density (shading) and each sampler's samples (dots)."""
    import numpy as np

    plane = _projection(mixture)
    exact = samples["exact"].double() @ plane
    lim = float(exact.abs().max()) * 1.05
    if mixture.dim == 2:
        grid = torch.linspace(-lim, lim, 200, dtype=torch.float64)
        gx, gy = torch.meshgrid(grid, grid, indexing="xy")
        shade = mixture.log_prob(torch.stack([gx.flatten(), gy.flatten()], 1)).exp().reshape(200, 200).numpy()
        extent = (gx.numpy(), gy.numpy())
    else:  # the exact samples' projected density, as a 2-d histogram
        shade, xe, ye = np.histogram2d(exact[:, 0].numpy(), exact[:, 1].numpy(), bins=40, range=[[-lim, lim]] * 2,
                                       density=True)
        centres = (xe[:-1] + xe[1:]) / 2, (ye[:-1] + ye[1:]) / 2
        extent = np.meshgrid(*centres, indexing="xy")
        shade = shade.T
    names = [n for n in samples if n != "exact"]
    for ax, name in zip(ax_grid, ["exact"] + names):
        x = (samples[name][:2000].double() @ plane).numpy()
        ax.contourf(*extent, shade, levels=12, cmap="Blues")
        ax.scatter(x[:, 0], x[:, 1], s=1.5, c="#d62728", alpha=0.5, linewidths=0)
        if name == "exact":
            title = f"exact samples\nnoise floor W1 {report.exact_sliced_wasserstein:.3f}"
        else:
            r = report.samplers[name]
            title = (f"{LABELS[name]} ({r.model_calls} calls)\nW1 {r.sliced_wasserstein:.3f}, "
                     f"{r.modes_covered}/{report.modes} modes")
        ax.set_title(title, fontsize=8.5)
        ax.set_xlim(-lim, lim)
        ax.set_ylim(-lim, lim)
        ax.set_aspect("equal")
        ax.tick_params(labelsize=7)


def plot(datasets: List[tuple], path: str) -> bool:
    """The demo's picture: for each (mixture, samples by name with "exact" first, report), a row block
    of panels, the target density shaded and each sampler's samples as dots, its sliced Wasserstein
    distance and modes in the title. False (and a note) when matplotlib, an optional dependency, is
    not installed."""
    try:
        import matplotlib
    except ImportError:
        print("the demo's picture needs matplotlib, which is not installed: pip install matplotlib (or "
              "pip install 'diffkern[demo]'); the tables and demo.json are complete without it", flush=True)
        return False

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    cols = 3
    rows = max(math.ceil(len(samples) / cols) for _, samples, _ in datasets)
    fig = plt.figure(figsize=(3.0 * cols * len(datasets) + 0.4, 3.15 * rows + 1.1), layout="constrained")
    for subfig, (mixture, samples, report) in zip(np.atleast_1d(fig.subfigures(1, len(datasets), wspace=0.04)),
                                                  datasets):
        axes = subfig.subplots(rows, cols, squeeze=False)
        for ax in axes.flat:
            ax.axis("off")
        used = list(axes.flat)[:len(samples)]
        for ax in used:
            ax.axis("on")
        _panels(used, mixture, samples, report)
        where = "in the data plane" if mixture.dim == 2 else "projected on the means' two principal axes"
        subfig.suptitle(f"{report.name}: {mixture.dim}-d, {mixture.num_components} modes, {report.samples} samples, "
                        f"{where}", fontsize=10, fontweight="bold")
    fig.legend(handles=[Patch(color="#6baed6", label="exact density of the target (shading)"),
                        Line2D([], [], marker="o", ls="", color="#d62728", ms=4,
                               label="the sampler's samples (dots, first 2000)")],
               loc="outside lower center", ncol=2, fontsize=9, frameon=False)
    fig.suptitle("diffkern demo: every sampler on exact Gaussian mixtures (W1: sliced Wasserstein distance to exact "
                 "samples; calls: model evaluations)", fontsize=11)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return True


DATA = ("all", "mixtures", "digits")
DIGIT_SAMPLES, QUICK_DIGIT_SAMPLES = 500, 200


def run(device: torch.device, samples: int, seed: int, out: str, samplers: List[str], quick: bool = False,
        progress: bool = True, high_dim: bool = True, data: str = "all", digit_samples: Optional[int] = None) -> dict:
    """The exact-mixture part (``data`` "all" or "mixtures": ``samplers`` on each mixture, ``samples``
    each, on ``device``) and the digits part ("all" or "digits": the shipped models on the CPU,
    ``digit_samples`` each; diffkern.demo_digits). Writes demo.png, digits.png and demo.json in ``out``."""
    check_choice("data", data, DATA)
    os.makedirs(out, exist_ok=True)
    mixtures = [("ring2d", GaussianMixture.ring())] if data != "digits" else []
    if high_dim and data != "digits":
        mixtures.append(("mixture64d", GaussianMixture.high_dimensional()))
    reports, pictured = [], []
    for name, mixture in mixtures:
        kept: Dict[str, torch.Tensor] = {}
        reports.append(run_dataset(name, mixture, samplers, samples, device, seed, quick, progress, kept))
        print(format_report(reports[-1], device), flush=True)
        if len(kept) > 1:
            pictured.append((mixture, kept, reports[-1]))
    png = os.path.join(out, "demo.png")
    drew = bool(pictured) and plot(pictured, png)
    summary = {"diffkern": dk.__version__, "device": str(device), "seed": seed, "quick": quick,
               "datasets": {r.name: asdict(r) for r in reports}}
    written = [png] if drew else []
    if data != "mixtures":
        from . import demo_digits

        if digit_samples is None:
            digit_samples = QUICK_DIGIT_SAMPLES if quick else DIGIT_SAMPLES
        summary["digits"] = demo_digits.run(out, digit_samples, seed, quick, progress)
        written += [summary["digits"]["picture"]] if summary["digits"]["picture"] else []
    json_path = os.path.join(out, "demo.json")
    with open(json_path, "w") as f:
        json.dump(summary, f, indent=2)
    print(f"wrote {', '.join(written + [json_path])}")
    return summary
