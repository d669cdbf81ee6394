"""Sampling along the probability-flow ODE of a score SDE: dx = [f(x, t) - g(t)^2 s(x, t) / 2] dt from
T to eps, with fixed Euler / Heun steps through the fused step, or the adaptive Runge-Kutta pairs of
diffkern.ode."""
from __future__ import annotations

from typing import Callable, Optional

import torch

from .. import coefficients
from .._graph import plan
from .._model import model_output_of
from .._validate import check_choice
from ..ode import ADAPTIVE_SOLVERS, FIXED_GRID_SOLVERS, LinearODE, adjoint, model_times, resolve_solver, rk
from ._engine import Run, RunSpec
from .score_sde import denoised_from_score

ODE_SOLVERS = FIXED_GRID_SOLVERS + ADAPTIVE_SOLVERS
GRADIENTS = ("backprop", "adjoint")


def sample_ode(score_fn, shape, sde, num_steps: Optional[int] = None, *, solver: str = "heun", eps: float = 1e-3,
               rtol: Optional[float] = None, atol: Optional[float] = None, error_norm: Optional[str] = None,
               max_num_evals: int = 10000, parameterization: str = "score", seed: int = 0, device=None,
               dtype: torch.dtype = torch.float32, sample_offset: int = 0, x_T=None, progress: bool = False,
               callback: Optional[Callable] = None, gradient: str = "backprop",
               adjoint_rtol: Optional[float] = None, adjoint_atol: Optional[float] = None, adjoint_params=None):
    """The probability-flow ODE dx = [f(x, t) - g(t)^2 s(x, t) / 2] dt from T to eps. ``solver``:
    "euler" (one model call per step) or "heun" (two; second order) on num_steps (default 100) equal
    steps; or the embedded Runge-Kutta pairs "dopri5" / "bosh3" of log_likelihood, adaptive to
    ``rtol`` / ``atol`` (default 1e-5; ``error_norm`` "batch" or "sample", ``max_num_evals``) or, with
    num_steps, on the same fixed grid. ``callback(info)`` sees each fixed step (adaptive steps
    refuse it). Deterministic given x_T (drawn from the prior with ``seed``). "rk4" takes num_steps
    classic fourth-order steps (four model calls each).

    Gradients: with ``gradient="backprop"`` (default) autograd records the loop when x_T or the
    model's parameters require grad (every step and Runge-Kutta stage has a backward);
    ``gradient="adjoint"`` keeps nothing of the trajectory and integrates the adjoint ODE backwards
    (diffkern.ode.adjoint) to ``adjoint_rtol`` / ``adjoint_atol`` (default: the forward's; the
    reversed grid for fixed steps), differentiating ``adjoint_params`` (default: score_fn's
    parameters when it is an nn.Module) and x_T. Adjoint solves run through the Runge-Kutta stages
    for every solver (Euler and Heun as their first-same-as-last tableaus) and refuse a callback."""
    check_choice("solver", solver, ODE_SOLVERS)
    check_choice("gradient", gradient, GRADIENTS)
    choice = resolve_solver(solver, num_steps, rtol, atol, error_norm, max_num_evals=max_num_evals)
    run = Run(RunSpec(shape, seed, device, dtype, sample_offset, x_T, progress, callback), "t")
    if gradient == "adjoint":
        if callback is not None:
            raise ValueError("callback does not go with gradient='adjoint' (the forward solve is not recorded)")
        return _sample_ode_adjoint(score_fn, sde, choice, eps, parameterization, run, max_num_evals,
                                   (adjoint_params, adjoint_rtol, adjoint_atol))
    for name, value in (("adjoint_rtol", adjoint_rtol), ("adjoint_atol", adjoint_atol),
                        ("adjoint_params", adjoint_params)):
        if value is not None:
            raise ValueError(f"{name} goes with gradient='adjoint'")
    if choice.solver not in ("euler", "heun"):
        if callback is not None and choice.num_steps is None:
            raise ValueError("callback goes with fixed steps (give num_steps); adaptive steps are not known ahead")
        return _sample_ode_rk(score_fn, sde, choice, eps, parameterization, run, max_num_evals)
    num_steps = choice.num_steps
    levels, scale, euler_rows, heun_rows = _fixed_plan(sde, num_steps, eps, parameterization)
    euler, heun = run.fused_table(euler_rows), run.fused_table(heun_rows)
    times = run.per_step(levels)
    x = run.initial(sde.prior_std)
    for i in run.steps(num_steps, f"ODE ({solver})"):
        m = model_output_of(score_fn(x, times[i]))
        x_before = x
        if solver == "euler":
            x = run.step(x, euler, i, m)
        else:
            x_pred = run.step(x, euler, i, m, into="predicted")
            m_next = model_output_of(score_fn(x_pred, times[i + 1]))
            x = run.step(x, heun, i, m_next, third=m)
        if run.callback is not None:
            score = run.model_output(m, x_before) * scale[i]
            run.report(i, (levels[i], levels[i + 1]), x, denoised_from_score(sde, levels[i], x_before, score))
    return x


@plan
def _time_grid(sde, num_steps, eps) -> list:
    return sde.time_grid(num_steps, eps).tolist()


@plan
def _fixed_plan(sde, num_steps, eps, parameterization):
    """The times and score scales (lists) and the Euler and Heun-corrector rows of the ODE's grid."""
    t = sde.time_grid(num_steps, eps)
    dt = t[1:] - t[:-1]
    scale = sde.score_scale(t, parameterization)
    f, g = sde.drift_coef(t), sde.diffusion(t)
    euler = coefficients.ode_euler_rows(f[:-1], g[:-1], dt, scale[:-1])
    heun = coefficients.ode_heun_corrector_rows(f[:-1], g[:-1], f[1:], g[1:], dt, scale[:-1], scale[1:])
    return t.tolist(), scale.tolist(), euler, heun


def _sample_ode_rk(score_fn, sde, choice, eps, parameterization, run: Run, max_num_evals):
    grid = None if choice.num_steps is None else _time_grid(sde, choice.num_steps, eps)
    if grid is None:
        sde.time_grid(1, eps)  # checks eps
    x = run.initial(sde.prior_std)
    model_at = _model_at(score_fn, run)

    def evaluate(y, t, need_products):
        return model_at(model_times(t, y))(y), None

    terms = sde.velocity_terms(parameterization)
    system = LinearODE(terms, evaluate)
    on_step = None
    if run.callback is not None:
        def on_step(i, x_before, k_before, x_after):
            # the model output at x_before, from the velocity k = a x + b m, then Tweedie's estimate
            a, b = terms(grid[i])
            score = (k_before - a * x_before) / b * float(sde.score_scale(grid[i], parameterization))
            run.report(i, (grid[i], grid[i + 1]), x_after, denoised_from_score(sde, grid[i], x_before, score))
    x = rk.solve(system, x, float(sde.T), float(eps), choice, max_num_evals=max_num_evals,
                       progress=run.progress_enabled, desc=f"ODE ({choice.solver})", grid=grid, on_step=on_step).x
    return x


def _sample_ode_adjoint(score_fn, sde, choice, eps, parameterization, run: Run, max_num_evals, options):
    adjoint_params, adjoint_rtol, adjoint_atol = options
    grid = None if choice.num_steps is None else sde.time_grid(choice.num_steps, eps)
    if grid is None:
        sde.time_grid(1, eps)  # checks eps
    x = run.initial(sde.prior_std)
    params = adjoint.resolve_params(score_fn, adjoint_params, x, model_name="score_fn", x_name="x_T")
    backward = adjoint.backward_choice(choice, adjoint_rtol, adjoint_atol)
    model_at = _model_at(score_fn, run)

    def evaluate(y, t, need_products):
        return model_at(model_times(t, y))(y).detach(), None

    terms = sde.velocity_terms(parameterization)
    span = (float(sde.T), float(eps), None if grid is None else grid.tolist())

    def forward(x_start):
        return rk.solve(LinearODE(terms, evaluate), x_start, span[0], span[1], choice, max_num_evals=max_num_evals,
                        progress=run.progress_enabled, desc=f"ODE ({choice.solver})", grid=span[2])

    flow = adjoint.Flow(terms, model_at, params=params)
    return adjoint.solve(flow, forward, x, span, backward, max_num_evals=max_num_evals,
                         progress=run.progress_enabled, desc=f"ODE ({choice.solver})").x


def _model_at(score_fn, run: Run):
    """model_at(t_batch): the network at times t_batch as a function of x, its output checked by the run."""
    def model_at(t_batch):
        return lambda y: run.model_output(model_output_of(score_fn(y, t_batch)), y)
    return model_at
