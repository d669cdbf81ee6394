"""Fixed-grid Euler and Heun on a LinearODE with its trace: one fused launch per evaluation
(ops.likelihood_step advances x, the log-density integral and the trace reduction together), no
host decision, the same number of model evaluations on every rank of a distributed run."""
from __future__ import annotations

import math

import torch

from .. import ops
from .._model import progress as progress_bar
from .system import LinearODE, Solution, model_times


def integrate(system: LinearODE, x: torch.Tensor, grid, solver: str, *, progress: bool = False, desc: str = ""):
    """The Solution at grid[-1] (x, the integral of tr(dF/dx) dt from grid[0], model evaluations and the
    regularisers' integrals) with ``solver`` "euler" or "heun" on the times of ``grid``.
    ``system.probes`` must be given. Differentiable (ops.likelihood_step has a backward)."""
    features = math.prod(x.shape[1:])
    v, scale = system.probes, system.trace_scale
    delta = torch.zeros(x.shape[0], dtype=torch.float64, device=x.device)
    regularisers = None

    def regularise(weight, x_at, m, products, a, b):
        nonlocal regularisers
        if system.regulariser is not None:
            increment = weight * system.regulariser(x_at, m, products, a, b)
            regularisers = increment if regularisers is None else regularisers + increment

    for i in progress_bar(range(len(grid) - 1), progress, desc):
        t0, t1 = float(grid[i]), float(grid[i + 1])
        dt = t1 - t0
        a0, b0 = system.velocity_terms(t0)
        m0, jv0 = system.evaluate(x, model_times(t0, x), True)
        if solver == "euler":
            regularise(dt, x, m0, jv0, a0, b0)
            x, delta, _ = ops.likelihood_step(x, m0, None, v, jv0, delta, None, c_x=1 + dt * a0, c_model=dt * b0,
                                              l0=dt * a0 * features, l_trace=dt * b0, trace_scale=scale)
            continue
        a1, b1 = system.velocity_terms(t1)
        x_pred, _, trace0 = ops.likelihood_step(x, m0, None, v, jv0, delta, None, c_x=1 + dt * a0, c_model=dt * b0,
                                                trace_scale=scale)
        m1, jv1 = system.evaluate(x_pred, model_times(t1, x), True)
        regularise(0.5 * dt, x, m0, jv0, a0, b0)
        regularise(0.5 * dt, x_pred, m1, jv1, a1, b1)
        # Heun: x + dt (F0 + F1) / 2 with F1 at x_pred = x + dt F0, written in x, m0 and m1
        x, delta, _ = ops.likelihood_step(
            x, m1, m0, v, jv1, delta, trace0, c_x=1 + 0.5 * dt * (a0 + a1 * (1 + dt * a0)), c_model=0.5 * dt * b1,
            c_prev=0.5 * dt * b0 * (1 + dt * a1), l0=0.5 * dt * (a0 + a1) * features, l_prev=0.5 * dt * b0,
            l_trace=0.5 * dt * b1, trace_scale=scale)
    return Solution(x, delta, (len(grid) - 1) * (1 if solver == "euler" else 2), regularisers)
