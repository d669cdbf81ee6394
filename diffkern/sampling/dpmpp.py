"""DPM-Solver++ (Lu et al. 2022) on the widened fused step (ops.linear_step): one model call and
one launch per step; the rows of the whole run are computed once, in float64, before the loop
(diffkern.coefficients.dpmpp_update).

Noise contract (as the other samplers): x_T is ``dk.randn(shape, seed, step=0, sample_offset)`` times
the prior scale, and step i (0-based) of a stochastic run draws ``dk.randn(shape, seed, step=i + 1,
sample_offset)`` inside the kernel, so a batch split into calls with matching ``sample_offset`` gives
the same samples, on the CPU and on CUDA.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch

from .. import coefficients
from .._graph import constant_levels, plan
from .._model import call_model
from .._validate import check_bool, check_choice, check_positive_int, check_real
from ..schedules import DDPMSchedule
from ..sde import SDE, check_sigmas
from ._engine import Run, RunSpec

ORDERS = (1, 2, 3)
SOLVER_TYPES = ("midpoint", "heun")


class _Grid:
    """A sampling run's noise levels as (alpha, sigma) pairs with x_t = alpha x0 + sigma eps, what
    the model is given at each level, and how its output becomes an x0 prediction."""

    def __init__(self, alphas, sigmas, model_times, x0_from_output, prior_scale, levels):
        self.alphas, self.sigmas = [float(a) for a in alphas], [float(s) for s in sigmas]
        self.model_times = model_times  # a tensor: int64 timesteps or float levels
        self.x0_from_output = x0_from_output  # (alpha, sigma, i) -> (coefficient of x, of model output)
        self.prior_scale = prior_scale
        self.levels = levels  # (level name, the values handed to callbacks)


@dataclass(frozen=True)
class _Schedule:
    """The one noise schedule of a run (sigmas, sched or sde) and the options that go with it."""

    sigmas: object = None
    sched: Optional[DDPMSchedule] = None
    sde: Optional[SDE] = None
    num_steps: Optional[int] = None
    timesteps: Optional[Sequence[int]] = None
    timestep_spacing: Optional[str] = None
    eps: float = 1e-3


def _check_timesteps(timesteps, T: int) -> list:
    values = torch.as_tensor(timesteps).flatten().tolist() if isinstance(timesteps, torch.Tensor) else list(timesteps)
    if not values or not all(isinstance(t, int) and not isinstance(t, bool) for t in values):
        raise ValueError(f"timesteps must be a non-empty sequence of ints, got {timesteps!r}")
    if not all(0 <= t < T for t in values) or any(a <= b for a, b in zip(values, values[1:])):
        raise ValueError(f"timesteps must decrease strictly within [0, {T}), got {values[:8]}")
    return values


def _dpmpp_grid(schedule: _Schedule, prediction_type: str, parameterization: str) -> _Grid:
    sigmas, sched, sde = schedule.sigmas, schedule.sched, schedule.sde
    num_steps, timesteps = schedule.num_steps, schedule.timesteps
    given = [name for name, value in (("sigmas", sigmas), ("sched", sched), ("sde", sde)) if value is not None]
    if len(given) != 1:
        raise ValueError("give exactly one of sigmas= (a denoiser D(x, sigma)), sched= (a DDPM model(x, t)) "
                         f"and sde= (a score model(x, t)); got {given or 'none'}")
    if sched is None and prediction_type != "epsilon":
        raise ValueError(f"prediction_type={prediction_type!r} goes with sched= (a DDPM model); with sigmas= the "
                         "model is a denoiser and with sde= a score model (see parameterization)")
    if sde is None and parameterization != "score":
        raise ValueError(f"parameterization={parameterization!r} goes with sde= (a score model)")
    if sigmas is not None:
        if num_steps is not None or timesteps is not None:
            raise ValueError("num_steps and timesteps go with sched= or sde=; with sigmas= the steps are "
                             "len(sigmas) - 1")
        s = check_sigmas(sigmas)
        return _Grid([1.0] * len(s), s.tolist(), s, lambda a, sg, i: (0.0, 1.0), float(s[0]), ("sigma", s.tolist()))
    if sched is not None:
        if not isinstance(sched, DDPMSchedule):
            raise TypeError(f"sched must be a diffkern.DDPMSchedule, got {type(sched).__name__}")
        coefficients.check_prediction_type(prediction_type)
        if timesteps is not None:
            if num_steps is not None or schedule.timestep_spacing is not None:
                raise ValueError("give timesteps= or num_steps= (with timestep_spacing=), not both")
            timesteps = _check_timesteps(timesteps, sched.num_train_timesteps)
        else:
            timesteps = sched.timesteps(num_steps, schedule.timestep_spacing)
        abar = [float(sched.alphas_cumprod[t]) for t in timesteps] + [1.0]

        def x0_ddpm(alpha, sigma, i):
            if prediction_type == "epsilon":
                return 1.0 / alpha, -sigma / alpha
            if prediction_type == "sample":
                return 0.0, 1.0
            return alpha, -sigma  # v = alpha eps - sigma x0

        return _Grid([math.sqrt(a) for a in abar], [math.sqrt(1.0 - a) for a in abar],
                     torch.tensor(timesteps, dtype=torch.int64), x0_ddpm, 1.0, ("timestep", timesteps + [-1]))
    if timesteps is not None:
        raise ValueError("timesteps= goes with sched=")
    if not isinstance(sde, SDE):
        raise TypeError(f"sde must be a diffkern SDE (VPSDE, SubVPSDE, VESDE), got {type(sde).__name__}")
    t = sde.time_grid(check_positive_int("num_steps", 100 if num_steps is None else num_steps), schedule.eps)
    scale = sde.score_scale(t, parameterization).tolist()  # the model output times scale is the score
    alphas, stds = sde.mean_coef(t), sde.marginal_std(t)

    def x0_score(alpha, sigma, i):
        # x0 = (x + sigma^2 score) / alpha
        return 1.0 / alpha, sigma ** 2 * scale[i] / alpha

    return _Grid(alphas.tolist(), stds.tolist(), t, x0_score, sde.prior_std, ("t", t.tolist()))


def _dpmpp_orders(grid: _Grid, order: int, lower_order_final: bool) -> list:
    n = len(grid.sigmas) - 1
    orders = []
    for i in range(n):
        k = min(order, i + 1)
        if grid.sigmas[i + 1] == 0.0:
            k = 1  # the step onto the data: x = x0 (both k-diffusion and diffusers)
        if lower_order_final and n < 15:  # diffusers' lower_order_final, for short schedules
            k = min(k, n - i)
        orders.append(k)
    return orders


def sample_dpmpp(model, shape, sigmas=None, *, sched: Optional[DDPMSchedule] = None, sde: Optional[SDE] = None,
                 num_steps: Optional[int] = None, timesteps: Optional[Sequence[int]] = None,
                 timestep_spacing: Optional[str] = None, prediction_type: str = "epsilon",
                 parameterization: str = "score", eps: float = 1e-3,
                 order: int = 2, solver_type: str = "midpoint", eta: float = 0.0, s_noise: float = 1.0,
                 lower_order_final: bool = True, seed: int = 0, device=None, dtype: torch.dtype = torch.float32,
                 sample_offset: int = 0, x_T: Optional[torch.Tensor] = None, progress: bool = False,
                 callback: Optional[Callable] = None) -> torch.Tensor:
    """DPM-Solver++ (Lu et al. 2022): multistep exponential-integrator sampling with x0 predictions,
    of order 1, 2 or 3 (``order``; 2M and 3M), deterministic (``eta=0``, the probability-flow ODE)
    or stochastic (``eta > 0``; ``eta=1`` is SDE-DPM-Solver++). One model call per step.

    Give exactly one noise schedule, which also says what ``model`` is:

    * ``sigmas`` (decreasing, e.g. ``dk.karras_sigmas(n, ...)`` ending in 0): ``model(x, sigma)`` is a
      denoiser returning x0 (k-diffusion / EDM); x_T = sigmas[0] z. With eta=0 this is k-diffusion's
      ``sample_dpmpp_2m`` (order 2, midpoint), with eta > 0 ``sample_dpmpp_2m_sde``, and order 3 with
      ``solver_type="heun"`` is ``sample_dpmpp_3m_sde``.
    * ``sched`` (a dk.DDPMSchedule): ``model(x, t)`` with int64 timesteps returns ``prediction_type``
      (epsilon, sample, v_prediction) as diffusers' UNets do; ``num_steps`` timesteps spaced by
      ``timestep_spacing`` as ``sched.timesteps`` spaces them (diffusers' DDIM rules; for
      DPMSolverMultistepScheduler's own leading / linspace rounding pass its ``timesteps=``, a
      decreasing list of ints), and a last step onto the data (diffusers' DPMSolverMultistepScheduler with
      ``final_sigmas_type="zero"``); x_T = z.
    * ``sde`` (VPSDE, SubVPSDE, VESDE): ``model(x, t)`` with float times returns the score (or, with
      ``parameterization="epsilon"``, the noise prediction); ``num_steps`` (default 100) equal steps
      in t from T to ``eps``, as dk.sample_ode; x_T from the prior.

    The order rises as x0 predictions accumulate (first step order 1, second at most 2); the step onto
    sigma = 0 is first order; ``lower_order_final`` lowers the last steps of schedules shorter than 15
    steps as diffusers does. ``solver_type`` picks the second-order correction (midpoint or heun) of
    every second-order step, the warm-up step of order 3 included, as diffusers does; the third-order
    step itself is heun-type. ``s_noise`` scales the injected noise. ``callback(info)``
    sees each step (level: sigma, timestep or t). Returns x0 of ``shape`` and ``dtype`` on ``device``.
    """
    grid = (num_steps, constant_levels("timesteps", timesteps), timestep_spacing, eps)
    plan_ = _dpmpp_plan(constant_levels("sigmas", sigmas), sched, sde, grid, (prediction_type, parameterization),
                        (order, solver_type, eta, s_noise, lower_order_final))
    (level_name, levels), model_times, prior_scale, orders, row_of, noisy, rows = plan_
    run = Run(RunSpec(shape, seed, device, dtype, sample_offset, x_T, progress, callback), level_name,
              legacy=("i", "level", "x", "denoised"))
    tables = {k: run.table(r) for k, r in rows}
    times = run.per_step(model_times, dtype=torch.int64 if sched is not None else None)
    x = run.initial(prior_scale)
    history: list = []  # x0 predictions, newest first
    for i in run.steps(len(orders), f"DPM-Solver++({order}M)"):
        k = orders[i]
        m = run.model_output(call_model(model, x, times[i]), x)
        x, x0 = run.linear([x, m] + history[:k - 1], tables[k], row_of[i], x0=True,
                           noise_step=i + 1 if noisy[i] else None)
        history = [x0] + history[:order - 2]
        if run.callback is not None:
            run.report(i, (levels[i], levels[i + 1]), x, x0)
    return x


@plan
def _dpmpp_plan(sigmas, sched, sde, grid: tuple, model: tuple, solver: tuple) -> tuple:
    """The run's levels (name and values), the model's times, the prior scale, each step's order, row
    and noise flag (lists), and the rows of each order ((order, float64 rows) pairs). ``grid``: the
    rest of _Schedule's fields (a plan's arguments are plain values, and objects at their top);
    ``model``: (prediction_type, parameterization); ``solver``: (order, solver_type, eta, s_noise,
    lower_order_final)."""
    prediction_type, parameterization = model
    order, solver_type, eta, s_noise, lower_order_final = solver
    order = check_choice("order", order, ORDERS)
    check_choice("solver_type", solver_type, SOLVER_TYPES)
    eta, s_noise = check_real("eta", eta), check_real("s_noise", s_noise)
    check_bool("lower_order_final", lower_order_final)
    grid = _dpmpp_grid(_Schedule(sigmas, sched, sde, *grid), prediction_type, parameterization)
    orders = _dpmpp_orders(grid, order, lower_order_final)
    lam = [math.log(a) - math.log(s) if s > 0 else math.inf for a, s in zip(grid.alphas, grid.sigmas)]
    rows, noisy = {}, []
    for i, k in enumerate(orders):
        alpha, sigma = grid.alphas[i], grid.sigmas[i]
        c_x, c_m, c_z = coefficients.dpmpp_update(
            k, alpha, sigma, grid.alphas[i + 1], grid.sigmas[i + 1],
            [lam[i - j] - lam[i - j - 1] for j in range(k - 1)], eta=eta, s_noise=s_noise, solver_type=solver_type)
        a_x, a_m = grid.x0_from_output(alpha, sigma, i)
        # inputs: x, model output, then the kept x0 predictions m1, m2
        rows.setdefault(k, []).append(coefficients.linear_row(
            [a_x, a_m] + [0.0] * (k - 1), [(c_m[0], [c_x, 0.0] + c_m[1:], c_z)]))
        noisy.append(c_z != 0.0)
    row_of, seen = [], {}
    for k in orders:
        row_of.append(seen.get(k, 0))
        seen[k] = seen.get(k, 0) + 1
    tables = tuple((k, torch.tensor(r, dtype=torch.float64)) for k, r in rows.items())
    return grid.levels, grid.model_times.tolist(), grid.prior_scale, orders, row_of, noisy, tables
