"""Sample quality against model evaluations on the digits: every sampler that fits one of the shipped
models (diffkern.training.pretrained), at a budget of model evaluations, scored by digit_metrics
(digits-FD, class coverage, precision, recall) against the test split, and timed.

What runs each sampler (one model per family, so samplers of a family differ only in the solver):

- the DDPM epsilon model on its own timesteps ("trailing" spacing, so that every run starts from pure
  noise at t = 999 however few its steps): DDPM, DDIM, DPM-Solver++ 2M / 3M / SDE-2M
  (dk.sample_dpmpp with the schedule), UniPC (diffusers' UniPCMultistepScheduler, diffkern's drop-in);
- the same model as a denoiser (k-diffusion's DiscreteEpsDDPMDenoiser) on Karras sigmas spanning the
  model's noise range: Euler, Heun, Euler-ancestral (EDM), DPM++ 2M and DPM++ 3M SDE (the k-diffusion
  drop-ins);
- the VP score model: Euler-Maruyama, predictor-corrector, the probability-flow ODE by Heun steps and by
  adaptive dopri5 (its budget is a tolerance; the evaluations it used are counted);
- the flow-matching model: Euler and Heun;
- the PFGM field model: ``dk.sample_pfgm``'s Euler and Heun (in log z) from the plane z = PFGM_Z_MAX, the
  prior's radii truncated at pretrained.PFGM_MAX_RADIUS.

Evaluations are counted by wrapping the model, never derived from the step count.

    from diffkern import sampler_table
    rows = sampler_table.run(sampler_table.plan(evals=(10, 20)), samples=256)
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Callable, Dict, Optional, Sequence

import torch

from ._model import model_output_of
from ._model import progress as progress_bar
from ._validate import check_positive_int

EVALS = (5, 10, 20, 50, 100, 1000)
# dopri5's budgets: tolerances (rtol = atol), loosest first
DOPRI5_TOLERANCES = (1e-1, 3e-2, 1e-2, 1e-3, 1e-4)
SHAPE = (1, 8, 8)
# where the PFGM model's samples start: PFGM's own z_max (its CIFAR-10 value, dk.sample_pfgm's default),
# the prior's radii truncated where its training perturbations end (pretrained.PFGM_MAX_RADIUS)
PFGM_Z_MAX = 40.0


class Counted(torch.nn.Module):
    """model with a count of its calls (``calls``)."""

    def __init__(self, model):
        super().__init__()
        self.model, self.calls = model, 0

    def forward(self, *args, **kwargs):
        self.calls += 1
        return self.model(*args, **kwargs)


@dataclass(frozen=True)
class TableSampler:
    """A sampler of the table: its label, the shipped model it takes ("ddpm", "denoiser", "vp", "flow", "pfgm"),
    model calls per step, the budgets it runs at (a subset of EVALS; None: all), and
    ``sample(model, evals, seed, samples, models)`` -> samples [N, 1, 8, 8]."""

    label: str
    model: str
    per_step: int
    sample: Callable
    budgets: Optional[Sequence[int]] = None
    stochastic: bool = False
    needs: Optional[str] = None  # a package the sampler imports (the UniPC drop-in: diffusers)


def available(name: str) -> bool:
    """Whether the table's sampler ``name`` can run here (its ``needs`` is importable)."""
    import importlib.util

    needs = samplers()[name].needs
    return needs is None or importlib.util.find_spec(needs) is not None


def _steps(evals: int, per_step: int) -> int:
    return max(1, evals // per_step)


def _heun_steps(evals: int) -> int:
    """Steps of a Heun method whose last step is one call (2 n - 1 calls: EDM's, flow's)."""
    return (evals + 1) // 2


def _timestep_sampler(kind: str, **options):
    import diffkern as dk

    def sample(model, evals, seed, samples, context):
        sched, shape = context["schedule"], (samples, *SHAPE)
        if kind == "ddpm":
            return dk.sample_ddpm(model, shape, sched, num_inference_steps=evals, seed=seed,
                                  timestep_spacing="trailing")
        if kind == "ddim":
            return dk.sample_ddim(model, shape, sched, num_inference_steps=evals, seed=seed,
                                  timestep_spacing="trailing")
        return dk.sample_dpmpp(model, shape, sched=sched, num_steps=evals, timestep_spacing="trailing", seed=seed,
                               **options)
    return sample


def _unipc(model, evals, seed, samples, context):
    import diffkern as dk

    from .diffusers import UniPCMultistepScheduler

    scheduler = UniPCMultistepScheduler(timestep_spacing="trailing")
    scheduler.set_timesteps(evals)
    x = dk.randn((samples, *SHAPE), seed=seed)
    for t in scheduler.timesteps:
        x = scheduler.step(model_output_of(model(x, t)), t, x).prev_sample
    return x


def _karras(function, per_step_calls: int = 1, **options):
    import diffkern as dk

    def sample(model, evals, seed, samples, context):
        steps = _heun_steps(evals) if per_step_calls == 2 else evals
        sigmas = dk.karras_sigmas(steps, context["sigma_min"], context["sigma_max"])
        return function(model, (samples, *SHAPE), sigmas, seed=seed, **options)
    return sample


def _k_drop_in(name: str):
    import diffkern as dk
    import diffkern.k_diffusion as K

    function = getattr(K, f"sample_{name}")

    def sample(model, evals, seed, samples, context):
        sigmas = dk.karras_sigmas(evals, context["sigma_min"], context["sigma_max"]).to(torch.float32)
        x = dk.randn((samples, *SHAPE), seed=seed) * sigmas[0]
        return function(model, x, sigmas, disable=True, **({"seed": seed} if name.endswith("sde") else {}))
    return sample


def _score_sde(kind: str, **options):
    import diffkern as dk

    def sample(model, evals, seed, samples, context):
        shape, sde = (samples, *SHAPE), dk.VPSDE()
        if kind == "euler_maruyama":
            return dk.sample_euler_maruyama(model, shape, sde, evals, seed=seed)
        if kind == "pc":
            return dk.sample_pc(model, shape, sde, _steps(evals, 2), seed=seed)
        if kind == "dopri5":  # evals is the index of a tolerance
            tol = DOPRI5_TOLERANCES[evals]
            return dk.sample_ode(model, shape, sde, solver="dopri5", rtol=tol, atol=tol, seed=seed)
        return dk.sample_ode(model, shape, sde, _steps(evals, 2), solver="heun", seed=seed)
    return sample


def _flow(solver: str):
    import diffkern as dk

    def sample(model, evals, seed, samples, context):
        steps = _heun_steps(evals) if solver == "heun" else evals
        return dk.sample_flow(model, (samples, *SHAPE), num_steps=steps, solver=solver, seed=seed)
    return sample


def _pfgm(solver: str):
    import diffkern as dk

    from .training.pretrained import PFGM_MAX_RADIUS

    def sample(model, evals, seed, samples, context):
        steps = _steps(evals, 2) if solver == "heun" else evals  # PFGM's Heun: two calls every step
        return dk.sample_pfgm(model, (samples, *SHAPE), z_max=PFGM_Z_MAX, num_steps=steps, solver=solver, seed=seed,
                              max_radius=PFGM_MAX_RADIUS)
    return sample


def samplers() -> Dict[str, TableSampler]:
    """The table's samplers by key."""
    import diffkern as dk

    few = (5, 10, 20, 50, 100)
    return {s.label: s for s in (
        TableSampler("DDPM", "ddpm", 1, _timestep_sampler("ddpm"), stochastic=True),
        TableSampler("DDIM", "ddpm", 1, _timestep_sampler("ddim")),
        TableSampler("DPM-Solver++ 2M", "ddpm", 1, _timestep_sampler("dpmpp", order=2), few),
        TableSampler("DPM-Solver++ 3M", "ddpm", 1, _timestep_sampler("dpmpp", order=3), few),
        TableSampler("SDE-DPM-Solver++ 2M", "ddpm", 1, _timestep_sampler("dpmpp", order=2, eta=1.0), few, True),
        TableSampler("UniPC (drop-in)", "ddpm", 1, _unipc, few, needs="diffusers"),
        TableSampler("Euler (EDM)", "denoiser", 1, _karras(dk.sample_euler), few),
        TableSampler("Heun (EDM)", "denoiser", 2, _karras(dk.sample_heun, 2), (5, 9, 19, 49, 99)),
        TableSampler("Euler-ancestral", "denoiser", 1, _karras(dk.sample_euler_ancestral), None, True),
        TableSampler("DPM++ 2M (k-diffusion)", "denoiser", 1, _k_drop_in("dpmpp_2m"), few),
        TableSampler("DPM++ 3M SDE (k-diffusion)", "denoiser", 1, _k_drop_in("dpmpp_3m_sde"), few, True),
        TableSampler("Euler-Maruyama (VP)", "vp", 1, _score_sde("euler_maruyama"), None, True),
        # score_sde's discrete VP chain needs more than beta_max = 20 steps
        TableSampler("predictor-corrector (VP)", "vp", 2, _score_sde("pc"), (50, 100, 1000), True),
        TableSampler("probability-flow ODE, Heun", "vp", 2, _score_sde("ode"), few),
        TableSampler("probability-flow ODE, dopri5", "vp", 1, _score_sde("dopri5"),
                     tuple(range(len(DOPRI5_TOLERANCES)))),
        TableSampler("flow, Euler", "flow", 1, _flow("euler"), few),
        TableSampler("flow, Heun", "flow", 2, _flow("heun"), (5, 9, 19, 49, 99)),
        TableSampler("PFGM, Euler", "pfgm", 1, _pfgm("euler"), few),
        TableSampler("PFGM, Heun", "pfgm", 2, _pfgm("heun"), (10, 20, 50, 100)),
    )}


@dataclass
class Row:
    sampler: str
    budget: float  # the evaluations asked for (dopri5: its tolerance)
    evals: int  # counted model calls of the run
    fd: float
    coverage_tv: float
    precision: float
    recall: float
    wall_s: float


def models() -> dict:
    """The shipped models the table's samplers take, and the denoiser's noise range."""
    import diffkern as dk

    from .training.pretrained import denoiser, load_pretrained

    wrapped, sigma_min, sigma_max = denoiser("digits-ddpm")
    return {"ddpm": load_pretrained("digits-ddpm"), "denoiser": wrapped, "vp": load_pretrained("digits-vp"),
            "flow": load_pretrained("digits-flow"), "pfgm": load_pretrained("digits-pfgm"),
            "schedule": dk.DDPMSchedule(), "sigma_min": sigma_min,
            "sigma_max": sigma_max}


def plan(evals: Sequence[int] = EVALS, names: Optional[Sequence[str]] = None) -> list:
    """(sampler label, budget) of each run of the table: every sampler of ``names`` (default: all) at each
    budget of ``evals`` it takes (Heun: the odd budget just below; dopri5: every tolerance once evals
    reach 100)."""
    table = samplers()
    names = list(table) if names is None else list(names)
    unknown = [n for n in names if n not in table]
    if unknown:
        raise ValueError(f"names: unknown sampler {', '.join(unknown)}; choose from {', '.join(table)}")
    evals = [check_positive_int("evals", budget) for budget in evals]
    jobs = []
    for name in names:
        entry = table[name]
        if entry.label.endswith("dopri5"):
            jobs += [(name, i) for i in entry.budgets if max(evals) >= 100]
            continue
        allowed = entry.budgets if entry.budgets is not None else EVALS
        for budget in evals:
            match = [b for b in allowed if b <= budget and budget - b < 2]  # Heun's 2 n - 1 calls
            if match:
                jobs.append((name, match[0]))
    return jobs


def run(jobs: Sequence[tuple], samples: int = 1000, seed: int = 0, progress: bool = True,
        context: Optional[dict] = None, keep: Optional[dict] = None) -> list:
    """A Row for each (sampler label, budget) of ``jobs`` (``plan``; dopri5's budget is the index of its
    tolerance): ``samples`` samples from ``seed`` on the CPU, scored against the test split. ``keep``
    (a dict) receives each run's samples by (label, budget)."""
    from .training.digit_metrics import metrics

    check_positive_int("samples", samples)
    table = samplers()
    context = models() if context is None else context
    rows = []
    for name, budget in progress_bar(list(jobs), progress, "digits samplers"):
        if name not in table:
            raise ValueError(f"jobs: unknown sampler {name!r}; choose from {', '.join(table)}")
        entry = table[name]
        model = Counted(context[entry.model])
        started = time.perf_counter()
        with torch.no_grad():
            x = entry.sample(model, budget, seed, samples, context).float().clamp(-1, 1)
        wall = time.perf_counter() - started
        scores = metrics(x)
        if keep is not None:
            keep[(name, budget)] = x
        label_budget = DOPRI5_TOLERANCES[budget] if entry.label.endswith("dopri5") else budget
        rows.append(Row(entry.label, label_budget, model.calls, scores["fd"], scores["coverage_tv"],
                        scores["precision"], scores["recall"], wall))
    return rows


def markdown(rows: list) -> str:
    lines = ["| sampler | budget | model evaluations | digits-FD | coverage TV | precision | recall | wall s |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        budget = f"tol {r.budget:g}" if r.sampler.endswith("dopri5") else f"{r.budget:g}"
        lines.append(f"| {r.sampler} | {budget} | {r.evals} | {r.fd:.1f} | {r.coverage_tv:.3f} | {r.precision:.2f} | "
                     f"{r.recall:.2f} | {r.wall_s:.2f} |")
    return "\n".join(lines)


FAMILIES = {"ddpm": "DDPM epsilon model, its own timesteps", "denoiser": "the same model as a denoiser, Karras sigmas",
            "vp": "VP score model", "flow": "rectified-flow model", "pfgm": "PFGM field model"}


def plot(rows: list, path: str, floor: Optional[float] = None) -> bool:
    """digits-FD against counted evaluations (log-log), one panel per model family and one line per
    sampler; False without matplotlib."""
    try:
        import matplotlib
    except ImportError:
        return False
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    table = samplers()
    fig, axes = plt.subplots(2, 3, figsize=(14, 7.5), sharex=True, sharey=True, layout="constrained")
    for ax in axes.flat[len(FAMILIES):]:
        ax.set_visible(False)
    for ax, (family, title) in zip(axes.flat, FAMILIES.items()):
        names = [n for n in dict.fromkeys(r.sampler for r in rows) if table[n].model == family]
        for name in names:
            mine = sorted((r.evals, r.fd) for r in rows if r.sampler == name)
            ax.plot([e for e, _ in mine], [f for _, f in mine], marker="o", ms=3.5,
                    ls="--" if table[name].stochastic else "-", label=name)
        if floor is not None:
            ax.axhline(floor, color="k", lw=0.8, ls=":", label="real digits (floor)")
        ax.set_title(title, fontsize=10)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=7.5)
    for ax in axes[1]:
        ax.set_xlabel("model evaluations")
    for ax in axes[:, 0]:
        ax.set_ylabel("digits-FD (lower is better)")
    fig.suptitle("digits: sample quality against model evaluations (dashed: stochastic samplers)", fontsize=11)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def as_dicts(rows: list) -> list:
    return [asdict(r) for r in rows]
