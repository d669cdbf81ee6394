"""Flow matching / rectified flow on the widened fused step: Euler or Heun along dx/dt = v(x, t) from
t = 1 (noise) to t = 0 (data), one launch per model call, rows computed before the loop."""
from __future__ import annotations

from typing import Callable, Optional

import torch

from .. import coefficients
from .._graph import constant_levels, plan
from .._model import model_output_of
from .._validate import check_choice, check_positive, check_positive_int
from ..sde import check_sigmas
from ._engine import Run, RunSpec

FLOW_SOLVERS = ("euler", "heun")


def sample_flow(velocity_fn, shape, sigmas=None, *, num_steps: int = 50, shift: float = 1.0,
                solver: str = "euler", seed: int = 0, device=None, dtype: torch.dtype = torch.float32,
                sample_offset: int = 0, x_T: Optional[torch.Tensor] = None, progress: bool = False,
                callback: Optional[Callable] = None) -> torch.Tensor:
    """Flow matching / rectified flow: integrates dx/dt = v(x, t) from t = 1 (x_T = z) to t = 0 (the
    data), where x_t = (1 - t) x0 + t z and ``velocity_fn(x, t)`` (t a float tensor [batch]) returns the
    velocity v = z - x0 (diffusers' FlowMatch* schedulers and SD3 / Flux transformers predict it; they
    take the timestep 1000 t).

    The times: ``sigmas`` if given (decreasing from 1 toward 0, e.g. a diffusers scheduler's
    ``sigmas``), else ``num_steps`` equal steps from 1 to 0 warped by ``shift`` as diffusers' shift does
    (t -> shift t / (1 + (shift - 1) t); shift > 1 spends more steps at high noise). ``solver``:
    "euler" (one call per step, first order) or "heun" (two calls, second order; the step onto t = 0
    is an Euler step, as diffusers' FlowMatchHeunDiscreteScheduler and EDM do). Deterministic given
    x_T. ``callback(info)`` sees each step, its denoised = x_t - t v the current estimate of the data.
    """
    check_choice("solver", solver, FLOW_SOLVERS)
    levels, euler_rows, heun_rows = _plan(num_steps, shift, constant_levels("sigmas", sigmas))
    run = Run(RunSpec(shape, seed, device, dtype, sample_offset, x_T, progress, callback), "t",
              legacy=("i", "level", "x", "denoised"))
    euler, heun = run.table(euler_rows), run.table(heun_rows)
    times = run.per_step(levels)
    x = run.initial(1.0)
    want_x0 = run.callback is not None
    for i in run.steps(len(levels) - 1, f"flow ({solver})"):
        v = run.model_output(model_output_of(velocity_fn(x, times[i])), x)
        if solver == "heun" and levels[i + 1] > 0:
            (x_pred,) = run.linear([x, v], euler, i)
            v_next = run.model_output(model_output_of(velocity_fn(x_pred, times[i + 1])), x)
            result = run.linear([x, v, v_next], heun, i, x0=want_x0)
        else:
            result = run.linear([x, v], euler, i, x0=want_x0)
        x = result[0]
        if want_x0:
            run.report(i, (levels[i], levels[i + 1]), x, result[1])
    return x


@plan
def _plan(num_steps, shift, sigmas):
    """The times (a list from 1 toward 0) and the Euler and Heun rows (float64 [steps, width])."""
    if sigmas is None:
        num_steps = check_positive_int("num_steps", num_steps)
        shift = check_positive("shift", shift)
        t = torch.linspace(1.0, 0.0, num_steps + 1, dtype=torch.float64)
        t = shift * t / (1 + (shift - 1) * t)
    else:
        if shift != 1.0:
            raise ValueError(f"shift={shift!r} goes with num_steps (it warps their even grid); with sigmas= the times "
                             "are given: warp them yourself or leave shift at 1")
        t = check_sigmas(sigmas)
        if float(t[0]) > 1.0:
            raise ValueError(f"sigmas are flow times in [0, 1], got a first value {float(t[0])}")
    levels = t.tolist()
    euler_rows, heun_rows = [], []
    for i in range(len(levels) - 1):
        s, dt = levels[i], levels[i + 1] - levels[i]
        euler_rows.append(coefficients.linear_row([1.0, -s], [(0.0, [1.0, dt], 0.0)]))
        heun_rows.append(coefficients.linear_row([1.0, -s, 0.0], [(0.0, [1.0, dt / 2, dt / 2], 0.0)]))
    return levels, torch.tensor(euler_rows, dtype=torch.float64), torch.tensor(heun_rows, dtype=torch.float64)
