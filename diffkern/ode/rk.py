"""Embedded Runge-Kutta pairs (Dormand-Prince 5(4), Bogacki-Shampine 3(2)) for a LinearODE
dx/dt = a(t) x + b(t) m(x, t) and, with probes, the log-density integral q = int tr(dF/dx) dt.

Each stage is one model evaluation and one fused launch (ops.rk_stage): it forms the stage's
velocity k_i = a_i x_i + b_i m_i, the next stage point x_n + h sum_j A_ij k_j, and the trace
a_i d + b_i tr(dm/dx); the last stage (both pairs are FSAL: it is evaluated at x_{n+1} and reused as
the next step's first) also forms q_{n+1}, the embedded error of x and q and its norm per sample.
One more launch per step forms the first stage point x_n + h A_10 k_0 once h is known.

The coefficient rows are affine in (1, a, b, h, h a, h b) of the stage, so each stage kind keeps a
constant matrix P [6, width] and its row is basis @ P: one row on the host for the whole batch
(``error_norm="batch"``), or one per sample on the device (``error_norm="sample"``).

The error of each sample is the RMS over features of e / (atol + rtol max(|x_n|, |x_{n+1}|)), with
the log-density held to atol per dimension (its error divided by the number of features); step
control in diffkern.ode.control.
"""
from __future__ import annotations

import math
from typing import Callable, Optional

import torch

from .. import ops
from .._model import interval_bar
from .._model import progress as progress_bar
from . import control
from .system import LinearODE, Solution, SolverChoice
from .tableaus import TABLEAUS, Tableau

_ONE, _A, _B, _H, _HA, _HB = range(6)  # the basis of a coefficient row


class _Rows:
    """P [6, width] of one kind of stage launch: its row is [1, a, b, h, h a, h b] @ P."""

    def __init__(self, width: int, device):
        self.p = torch.zeros(6, width, dtype=torch.float64)
        self.device = device

    def set(self, position: int, basis: int, value: float) -> "_Rows":
        self.p[basis, position] += value
        return self

    def done(self) -> "_Rows":
        self.p_device = self.p.to(self.device)
        return self

    def row(self, a, b, h) -> torch.Tensor:
        if isinstance(h, torch.Tensor):  # one row per sample, on the device
            a, b = (v if isinstance(v, torch.Tensor) else torch.full_like(h, v) for v in (a, b))
            basis = torch.stack([torch.ones_like(h), a, b, h, h * a, h * b], 1)
            return basis @ self.p_device
        basis = torch.tensor([[1.0, a, b, h, h * a, h * b]], dtype=torch.float64)
        return (basis @ self.p).to(self.device)


def _output_field(inputs: int, j: int) -> int:
    """Offset of output j's coefficients in a row (output `outputs` is the error row)."""
    return 2 + j * inputs


def _stage_rows(tableau: Tableau, features: int, device, with_trace: bool) -> dict:
    """The P matrices of the launches of one step (see ops.rk_stage for the row layout)."""
    s = len(tableau.c)
    rows = {}

    def trace_terms(r: _Rows) -> _Rows:  # tr = a d + b tr(dm/dx)
        return r.set(0, _A, float(features)).set(1, _B, 1.0)

    # the solve's first evaluation: inputs [x, m] -> k
    rows["start"] = trace_terms(_Rows(ops.rk_row_width(2, 1, 0, False), device)).set(2, _A, 1.0).set(3, _B, 1.0).done()
    # the first stage point: inputs [x_n, k_0] -> x_n + h A_10 k_0 (no trace)
    rows["first"] = _Rows(ops.rk_row_width(2, 1, 0, False), device).set(2, _ONE, 1.0).set(3, _H, tableau.a[1][0]).done()
    for i in range(1, s - 1):  # inputs [x_i, m_i, x_n, k_0 .. k_{i-1}] -> k_i, x_{i+1}
        n = 3 + i
        r = trace_terms(_Rows(ops.rk_row_width(n, 2, 0, False), device))
        k_i, x_next = _output_field(n, 0), _output_field(n, 1)
        r.set(k_i + 0, _A, 1.0).set(k_i + 1, _B, 1.0)
        coefficient = tableau.a[i + 1][i]
        r.set(x_next + 0, _HA, coefficient).set(x_next + 1, _HB, coefficient).set(x_next + 2, _ONE, 1.0)
        for j in range(i):
            r.set(x_next + 3 + j, _H, tableau.a[i + 1][j])
        rows[i] = r.done()
    # the last stage at x_{n+1}: inputs [x_{n+1}, m, x_n, k_0 .. k_{s-2}] -> k_{s-1}; error, q update
    n, traces = s + 2, (s - 1 if with_trace else 0)
    r = trace_terms(_Rows(ops.rk_row_width(n, 1, traces, True), device))
    k_last, err = _output_field(n, 0), _output_field(n, 1)
    r.set(k_last + 0, _A, 1.0).set(k_last + 1, _B, 1.0)
    r.set(err + 0, _HA, tableau.error[s - 1]).set(err + 1, _HB, tableau.error[s - 1])
    for j in range(s - 1):
        r.set(err + 3 + j, _H, tableau.error[j])
    if with_trace:
        beta = err + n
        for j in range(s):
            r.set(beta + j, _H, tableau.b[j]).set(beta + s + j, _H, tableau.error[j])
    rows["last"] = r.done()
    return rows


def _velocity(a, b, x, m):
    if isinstance(a, torch.Tensor):
        shape = (-1,) + (1,) * (x.dim() - 1)
        return a.reshape(shape).to(x.dtype) * x + b.reshape(shape).to(x.dtype) * m
    return a * x + b * m


def _where(t):
    return float(t.min()) if isinstance(t, torch.Tensor) else t


class _Stepper:
    """The launches and model evaluations of one solve with one tableau."""

    def __init__(self, system: LinearODE, tableau: Tableau, x: torch.Tensor, tolerance: tuple, max_num_evals: int):
        self.system, self.tableau = system, tableau
        self.with_trace = system.probes is not None
        self.rows = _stage_rows(tableau, math.prod(x.shape[1:]), x.device, self.with_trace)
        self.atol, self.rtol = tolerance
        self.max_num_evals, self.num_evals = max_num_evals, 0
        self.t1 = None

    def stage(self, kind, inputs, terms, h, products=None, **kwargs):
        a, b = terms
        return ops.rk_stage(inputs, self.rows[kind].row(a, b, h),
                            probes=self.system.probes if products is not None else None, products=products,
                            trace_scale=self.system.trace_scale, atol=self.atol, rtol=self.rtol, **kwargs)

    def call(self, x_at, t, need_products=True):
        if self.num_evals >= self.max_num_evals:
            raise RuntimeError(f"the adaptive solve reached max_num_evals={self.max_num_evals} model evaluations "
                               f"before t = {self.t1} (rtol={self.rtol}, atol={self.atol}): loosen the tolerances, "
                               "raise max_num_evals, or check the model for very stiff outputs")
        self.num_evals += 1
        return self.system.evaluate(x_at, t, need_products and self.with_trace)

    def regularise(self, x_at, m, products, terms):
        """The regularisers' integrands at one stage (float64 [B, R]), or None."""
        if self.system.regulariser is None:
            return None
        return self.system.regulariser(x_at, m, products, *terms)

    def step(self, x_n, q, k0, tr0, t, step, r0=None):
        """One step of the pair from (x_n, q) at t by step (floats, or tensors [B] per sample): returns
        (x_{n+1}, q_{n+1}, k and trace of its last stage (the next step's first: FSAL), error norm, the
        last stage's regularisers, the step's regulariser increment h sum_j b_j r_j)."""
        tableau = self.tableau
        s = len(tableau.c)
        per_sample = isinstance(step, torch.Tensor)
        (x_stage,), _, _, _ = self.stage("first", [x_n, k0], (0.0, 0.0), step)
        ks, traces, regs = [k0], [tr0], [r0]
        if not per_sample:  # the step's a(t_i), b(t_i), as floats (constants of a compiled graph)
            stage_times = [t + c * step for c in tableau.c]
            a_all, b_all = self.system.velocity_terms(tuple(stage_times))
        for i in range(1, s):
            if per_sample:
                t_i = t + tableau.c[i] * step
                terms = self.system.velocity_terms(t_i)
            else:
                t_i, terms = stage_times[i], (a_all[i], b_all[i])
            m_i, products = self.call(x_stage, t_i)
            regs.append(self.regularise(x_stage, m_i, products, terms))
            inputs = [x_stage, m_i, x_n] + ks
            if i < s - 1:
                (k_i, x_stage), tr_i, _, _ = self.stage(i, inputs, terms, step, products=products, outputs=2)
                ks.append(k_i)
                traces.append(tr_i)
            else:
                (k_last,), tr_last, q_next, norm = self.stage(
                    "last", inputs, terms, step, products=products, outputs=1, error=True,
                    traces=traces if self.with_trace else (), log_density=q)
        increment = None
        if r0 is not None:
            increment = sum(w * r for w, r in zip(tableau.b, regs) if w != 0.0)
            increment = increment * (step.reshape(-1, 1) if per_sample else step)
        return x_stage, (q_next if self.with_trace else None), k_last, tr_last, norm.detach(), regs[-1], increment


def _check_start(x: torch.Tensor, m: torch.Tensor, t) -> None:
    """The one host check of a solve's start: non-finite values there would make every step fail
    its error test until max_num_evals, hours later with a real network."""
    if not bool(torch.isfinite(x).all()):
        raise ValueError("x holds non-finite values (nan or inf): the ODE cannot start from them")
    if not bool(torch.isfinite(m).all()):
        raise RuntimeError(f"the model returned non-finite values (nan or inf) at its first evaluation (t = "
                         f"{_where(t)}), from finite inputs: check the model")


def solve(system: LinearODE, x: torch.Tensor, t0: float, t1: float, choice: SolverChoice, *, max_num_evals: int,
          progress: bool = False, desc: str = "", grid: Optional[list] = None,
          on_step: Optional[Callable] = None):
    """Integrate from t0 to t1 with the pair ``choice.solver`` to choice.rtol / atol / error_norm, or,
    with ``grid``, a fixed step on each of its intervals (no error control, no host decision,
    batch-independent results). Returns the Solution (x(t1), q [B] float64 or None without probes,
    num_evals, the regularisers' integrals). Differentiable through the fused stages (ops.rk_stage has
    a backward); the step sizes are constants to autograd.

    ``on_step(i, x_before, k_before, x_after)`` (fixed grids only) sees every step, k_before being the
    velocity at x_before."""
    batch = x.shape[0]
    tableau = TABLEAUS[choice.solver]
    with_trace = system.probes is not None
    if batch == 0:
        return Solution(x, torch.zeros(0, dtype=torch.float64, device=x.device) if with_trace else None, 0,
                        None if system.regulariser is None else torch.zeros(0, 0, dtype=torch.float64,
                                                                            device=x.device))
    per_sample = choice.error_norm == "sample"
    atol, rtol = choice.atol, choice.rtol
    if grid is not None:  # every step accepted: the norm is not read (atol only keeps it finite)
        t0, t1, per_sample, atol, rtol = float(grid[0]), float(grid[-1]), False, 1.0, 0.0
    stepper = _Stepper(system, tableau, x, (atol, rtol), max_num_evals)
    stepper.t1 = t1
    span = abs(t1 - t0)
    direction = 1.0 if t1 > t0 else -1.0
    if per_sample:
        t = torch.full((batch,), float(t0), dtype=torch.float64, device=x.device)
        end = torch.full_like(t, float(t1))
    else:
        t = float(t0)
    terms0 = system.velocity_terms(t)
    m, products = stepper.call(x, t)
    if grid is None:
        _check_start(x, m, t)
    (k0,), tr0, _, _ = stepper.stage("start", [x, m], terms0, 0.0 if not per_sample else torch.zeros_like(t),
                                     products=products)
    r0 = stepper.regularise(x, m, products, terms0)
    regularisers = None if r0 is None else torch.zeros_like(r0)

    x_n, q = x, (torch.zeros(batch, dtype=torch.float64, device=x.device) if with_trace else None)
    if grid is not None:
        for i in progress_bar(range(len(grid) - 1), progress, desc):
            x_before, k_before = x_n, k0
            x_n, q, k0, tr0, _, r0, increment = stepper.step(x_n, q, k0, tr0, float(grid[i]),
                                                             float(grid[i + 1]) - float(grid[i]), r0)
            if increment is not None:
                regularisers = regularisers + increment
            if on_step is not None:
                on_step(i, x_before, k_before, x_n)
        return Solution(x_n, q, stepper.num_evals, regularisers)

    # step-size control is host arithmetic outside autograd
    x_control, k_control = x.detach(), k0.detach()
    h0, d1, scale = control.initial_step_sizes(x_control, k_control, atol, rtol)
    h0 = (h0 if per_sample else h0.min()).clamp(max=span)
    h0_value = h0 if per_sample else float(h0)
    probe_t = t + direction * h0_value
    with torch.no_grad():
        (x_probe,), _, _, _ = stepper.stage("first", [x_control, k_control], (0.0, 0.0),
                                            direction * h0_value / tableau.a[1][0])
        a_p, b_p = system.velocity_terms(probe_t)
        m_p, _ = stepper.call(x_probe, probe_t, need_products=False)
        d2 = control.rms(_velocity(a_p, b_p, x_probe, m_p.detach()) - k_control, scale) / h0
    h = control.refined_step_size(h0, d1, d2, tableau.order)
    h = h if per_sample else float(h.min())

    bar = interval_bar(progress, desc, span)
    while True:
        if per_sample:
            remaining = (end - t).abs()
            active = remaining > 1e-12 * span
            h = torch.minimum(h, remaining)
            # the one host sync of a step: the smallest step of the samples left (inf when none is)
            smallest = float(torch.where(active, h, math.inf).min())
            if smallest == math.inf:
                break
            step = torch.where(active, direction * h, torch.zeros_like(h))
            last_step = h >= remaining
        else:
            remaining = abs(t1 - t)
            if remaining <= 1e-12 * span:
                break
            h = min(h, remaining)
            step, last_step, smallest = direction * h, h >= remaining, h
        if not smallest >= 1e-12 * span:  # also a nan step size
            raise RuntimeError(f"the adaptive step size fell below {1e-12 * span:.3g} at t = {_where(t)}: the model "
                               "output is probably non-finite or the ODE very stiff there")
        x_stage, q_next, k_last, tr_last, norm, r_last, increment = stepper.step(x_n, q, k0, tr0, t, step, r0)
        if per_sample:
            accept = norm <= 1.0
            x_n = torch.where(accept.reshape(-1, *[1] * (x.dim() - 1)), x_stage, x_n)
            k0 = torch.where(accept.reshape(-1, *[1] * (x.dim() - 1)), k_last, k0)
            tr0 = torch.where(accept, tr_last, tr0)
            if with_trace:
                q = torch.where(accept, q_next, q)
            if increment is not None:
                regularisers = torch.where(accept[:, None], regularisers + increment, regularisers)
                r0 = torch.where(accept[:, None], r_last, r0)
            new_t = torch.where(last_step, end, t + step)
            t = torch.where(accept, new_t, t)
            grow = control.factor(norm, tableau.order)
            h = h * torch.where(accept, grow, grow.clamp(max=1.0))
            if progress:  # a host sync, only for the bar
                bar(float((t - t0).abs().min()))
        else:
            if not batch:
                r = 0.0
            elif choice.error_norm == "rms":
                r = float(norm.pow(2).mean().sqrt())
            else:
                r = float(norm.max())
            accepted = r <= 1.0
            if accepted:
                x_n, k0, tr0, q = x_stage, k_last, tr_last, q_next
                if increment is not None:
                    regularisers, r0 = regularisers + increment, r_last
                t = t1 if last_step else t + step
                bar(abs(t - t0))
            grow = float(control.factor(torch.tensor(r, dtype=torch.float64), tableau.order))
            h = h * (grow if accepted else min(grow, 1.0))
    bar(None)
    return Solution(x_n, q, stepper.num_evals, regularisers)
