"""Adaptive embedded Runge-Kutta pairs (Dormand-Prince 5(4), Bogacki-Shampine 3(2)) for the
probability-flow / CNF ODE dx/dt = F(x, t) = a(t) x + b(t) m(x, t) and, with a trace, the
log-density integral q = int tr(dF/dx) dt = int (a(t) d + b(t) tr(dm/dx)) dt.

Each stage is one model evaluation and one fused launch (ops.rk_stage): it forms the stage's
velocity k_i = a_i x_i + b_i m_i, the next stage point x_n + h sum_j A_ij k_j, and the trace
a_i d + b_i tr(dm/dx); the last stage (both pairs are FSAL: it is evaluated at x_{n+1} and reused as
the next step's first) also forms q_{n+1}, the embedded error of x and q and its norm per sample.
One more launch per step forms the first stage point x_n + h A_10 k_0 once h is known.

The coefficient rows are affine in (1, a, b, h, h a, h b) of the stage, so each stage kind keeps a
constant matrix P [6, width] and its row is basis @ P: one row on the host for the whole batch
(``error_norm="batch"``), or one per sample on the device (``error_norm="sample"``).

Step control as torchdiffeq's and scipy's: the error of each sample is the RMS over features of
e / (atol + rtol max(|x_n|, |x_{n+1}|)), with the log-density held to atol per dimension (its
error divided by the number of features), a step is accepted when the norm is <= 1, and
h <- h min(10, max(0.2, 0.9 norm^(-1 / order))) (at most 1 after a rejection); the first step is
Hairer's estimate (one extra model evaluation).
"""
from __future__ import annotations

import math
from typing import Callable, NamedTuple, Optional

import torch

from . import ops


class Tableau(NamedTuple):
    order: int        # order of the propagated solution; the embedded one is order - 1
    c: tuple          # stage times
    a: tuple          # a[i]: the coefficients of stage i (i >= 1) on k_0 .. k_{i-1}
    b: tuple          # the solution's weights (the last stage's a row: FSAL)
    error: tuple      # b - b_hat: the weights of the error estimate


TABLEAUS = {
    # Dormand & Prince (1980): the 5(4) pair of torchdiffeq's dopri5, scipy's RK45 and MATLAB's ode45
    "dopri5": Tableau(
        5, (0.0, 1 / 5, 3 / 10, 4 / 5, 8 / 9, 1.0, 1.0),
        ((), (1 / 5,), (3 / 40, 9 / 40), (44 / 45, -56 / 15, 32 / 9),
         (19372 / 6561, -25360 / 2187, 64448 / 6561, -212 / 729),
         (9017 / 3168, -355 / 33, 46732 / 5247, 49 / 176, -5103 / 18656),
         (35 / 384, 0.0, 500 / 1113, 125 / 192, -2187 / 6784, 11 / 84)),
        (35 / 384, 0.0, 500 / 1113, 125 / 192, -2187 / 6784, 11 / 84, 0.0),
        (35 / 384 - 5179 / 57600, 0.0, 500 / 1113 - 7571 / 16695, 125 / 192 - 393 / 640,
         -2187 / 6784 + 92097 / 339200, 11 / 84 - 187 / 2100, -1 / 40)),
    # Bogacki & Shampine (1989): the 3(2) pair of torchdiffeq's bosh3, scipy's RK23 and MATLAB's ode23
    "bosh3": Tableau(
        3, (0.0, 1 / 2, 3 / 4, 1.0),
        ((), (1 / 2,), (0.0, 3 / 4), (2 / 9, 1 / 3, 4 / 9)),
        (2 / 9, 1 / 3, 4 / 9, 0.0),
        (2 / 9 - 7 / 24, 1 / 3 - 1 / 4, 4 / 9 - 1 / 3, -1 / 8)),
}

_ONE, _A, _B, _H, _HA, _HB = range(6)  # the basis of a coefficient row
SAFETY, MIN_FACTOR, MAX_FACTOR = 0.9, 0.2, 10.0


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


def _output_field(inputs: int, j: int) -> int:
    """Offset of output j's coefficients in a row (output `outputs` is the error row)."""
    return 2 + j * inputs


def _rms(values: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return (values / scale).flatten(1).pow(2).mean(1).sqrt()


def solve(velocity_coefs: Callable, evaluate: Callable, x: torch.Tensor, t0: float, t1: float, *, tableau: Tableau,
          rtol: float, atol: float, error_norm: str, probes: Optional[torch.Tensor], trace_scale: float,
          max_num_evals: int, progress: bool, desc: str, grid: Optional[list] = None):
    """Integrate from t0 to t1 (or, with ``grid``, a fixed step on each of its intervals: no error
    control, no host decision, batch-independent results); returns (x(t1), q [B] float64 or None without probes, num_evals).

    velocity_coefs(t) -> (a, b): floats for a float t, float64 tensors [B] for a tensor t.
    evaluate(x, t, need_products) -> (m, products): the model output at x (t a float or a float64
    tensor [B]) and, when need_products, the Jacobian products of m for the probes (else None)."""
    batch, features = x.shape[0], math.prod(x.shape[1:])
    with_trace = probes is not None
    if batch == 0:
        return x, (torch.zeros(0, dtype=torch.float64, device=x.device) if with_trace else None), 0
    rows = _stage_rows(tableau, features, x.device, with_trace)
    s = len(tableau.c)
    per_sample = error_norm == "sample"
    span = abs(t1 - t0)
    direction = 1.0 if t1 > t0 else -1.0
    num_evals = 0

    def stage(kind, inputs, a, b, h, products=None, **kwargs):
        return ops.rk_stage(inputs, rows[kind].row(a, b, h), probes=probes if products is not None else None,
                            products=products, trace_scale=trace_scale, atol=atol, rtol=rtol, **kwargs)

    def call(x_at, t, need_products=True):
        nonlocal num_evals
        if num_evals >= max_num_evals:
            raise RuntimeError(f"the adaptive solve reached max_num_evals={max_num_evals} model evaluations before "
                               f"t = {t1} (rtol={rtol}, atol={atol}): loosen the tolerances, raise max_num_evals, or "
                               "check the model for non-finite or very stiff outputs")
        num_evals += 1
        return evaluate(x_at, t, need_products and with_trace)

    if grid is not None:  # every step accepted: the norm is not read (atol only keeps it finite)
        t0, t1, per_sample, atol, rtol = float(grid[0]), float(grid[-1]), False, 1.0, 0.0
    if per_sample:
        t = torch.full((batch,), float(t0), dtype=torch.float64, device=x.device)
        end = torch.full_like(t, float(t1))
    else:
        t = float(t0)
    a0, b0 = velocity_coefs(t)
    m, products = call(x, t)
    (k0,), tr0, _, _ = stage("start", [x, m], a0, b0, 0.0 if not per_sample else torch.zeros_like(t),
                             products=products)

    x_n, q = x, (torch.zeros(batch, dtype=torch.float64, device=x.device) if with_trace else None)
    if grid is not None:
        for i in _progress_range(len(grid) - 1, progress, desc):
            x_n, q, k0, tr0, _ = _step(stage, call, velocity_coefs, tableau, x_n, q, k0, tr0, float(grid[i]),
                                       float(grid[i + 1]) - float(grid[i]), with_trace)
        return x_n, q, num_evals

    # Hairer, Norsett & Wanner (1993), II.4: h from the sizes of x and F, refined by one Euler step
    scale = atol + rtol * x.abs()
    d0, d1 = _rms(x, scale), _rms(k0, scale)
    h0 = torch.where((d0 < 1e-5) | (d1 < 1e-5), torch.full_like(d0, 1e-6), 0.01 * d0 / d1)
    h0 = (h0 if per_sample else h0.min()).clamp(max=span)
    h0_value = h0 if per_sample else float(h0)
    probe_t = t + direction * h0_value
    (x_probe,), _, _, _ = stage("first", [x, k0], 0.0, 0.0, direction * h0_value / tableau.a[1][0])
    a_p, b_p = velocity_coefs(probe_t)
    m_p, _ = call(x_probe, probe_t, need_products=False)
    k_p = _velocity(a_p, b_p, x_probe, m_p)
    d2 = _rms(k_p - k0, scale) / h0
    big = torch.maximum(d1, d2)
    h1 = torch.where(big <= 1e-15, torch.clamp(h0 * 1e-3, min=1e-6), (0.01 / big) ** (1.0 / tableau.order))
    h = torch.minimum(100 * h0, h1)
    h = h if per_sample else float(h.min())

    bar = _bar(progress, desc, span)
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
        if smallest < 1e-12 * span:
            raise RuntimeError(f"the adaptive step size fell below {1e-12 * span:.3g} at t = {_where(t)}: the model "
                               "output is probably non-finite or the ODE very stiff there")
        x_stage, q_next, k_last, tr_last, norm = _step(stage, call, velocity_coefs, tableau, x_n, q, k0, tr0, t, step,
                                                        with_trace)
        if per_sample:
            accept = norm <= 1.0
            x_n = torch.where(accept.reshape(-1, *[1] * (x.dim() - 1)), x_stage, x_n)
            k0 = torch.where(accept.reshape(-1, *[1] * (x.dim() - 1)), k_last, k0)
            tr0 = torch.where(accept, tr_last, tr0)
            if with_trace:
                q = torch.where(accept, q_next, q)
            new_t = torch.where(last_step, end, t + step)
            t = torch.where(accept, new_t, t)
            factor = _factor(norm, tableau.order)
            h = h * torch.where(accept, factor, factor.clamp(max=1.0))
            if progress:  # a host sync, only for the bar
                bar(float((t - t0).abs().min()))
        else:
            r = float(norm.max()) if batch else 0.0
            accepted = r <= 1.0
            if accepted:
                x_n, k0, tr0, q = x_stage, k_last, tr_last, q_next
                t = t1 if last_step else t + step
                bar(abs(t - t0))
            factor = float(_factor(torch.tensor(r, dtype=torch.float64), tableau.order))
            h = h * (factor if accepted else min(factor, 1.0))
    bar(None)
    return x_n, q, num_evals


def _step(stage, call, velocity_coefs, tableau, x_n, q, k0, tr0, t, step, with_trace):
    """One step of the pair from (x_n, q) at t by step (floats, or tensors [B] per sample): returns
    (x_{n+1}, q_{n+1}, k and trace of its last stage (the next step's first: FSAL), error norm)."""
    s = len(tableau.c)
    per_sample = isinstance(step, torch.Tensor)
    (x_stage,), _, _, _ = stage("first", [x_n, k0], 0.0, 0.0, step)
    ks, traces = [k0], [tr0]
    if not per_sample:  # the step's a(t_i), b(t_i) in one call
        stage_times = [t + c * step for c in tableau.c]
        a_all, b_all = (v.tolist() for v in velocity_coefs(torch.tensor(stage_times, dtype=torch.float64)))
    for i in range(1, s):
        if per_sample:
            t_i = t + tableau.c[i] * step
            a_i, b_i = velocity_coefs(t_i)
        else:
            t_i, a_i, b_i = stage_times[i], a_all[i], b_all[i]
        m_i, products = call(x_stage, t_i)
        inputs = [x_stage, m_i, x_n] + ks
        if i < s - 1:
            (k_i, x_stage), tr_i, _, _ = stage(i, inputs, a_i, b_i, step, products=products, outputs=2)
            ks.append(k_i)
            traces.append(tr_i)
        else:
            (k_last,), tr_last, q_next, norm = stage("last", inputs, a_i, b_i, step, products=products, outputs=1,
                                                     error=True, traces=traces if with_trace else (), log_density=q)
    return x_stage, (q_next if with_trace else None), k_last, tr_last, norm


def _progress_range(n, enabled, desc):
    if not enabled:
        return range(n)
    from tqdm.auto import tqdm

    return tqdm(range(n), desc=desc)


def _velocity(a, b, x, m):
    if isinstance(a, torch.Tensor):
        shape = (-1,) + (1,) * (x.dim() - 1)
        return a.reshape(shape).to(x.dtype) * x + b.reshape(shape).to(x.dtype) * m
    return a * x + b * m


def _factor(norm: torch.Tensor, order: int) -> torch.Tensor:
    """The step-size factor after an error norm: 0.9 norm^(-1/order) within [0.2, 10]; a norm of 0
    grows the step 10x, a non-finite one shrinks it 5x."""
    safe = torch.where(torch.isfinite(norm), norm, torch.full_like(norm, math.inf))
    factor = SAFETY * safe.clamp(min=1e-30) ** (-1.0 / order)
    return torch.where(safe == 0, torch.full_like(safe, MAX_FACTOR), factor.clamp(MIN_FACTOR, MAX_FACTOR))


def _where(t):
    return float(t.min()) if isinstance(t, torch.Tensor) else t


def _bar(enabled: bool, desc: str, span: float):
    """A tqdm bar over the integration interval (updated to the distance covered; None closes it)."""
    if not enabled:
        return lambda covered: None
    from tqdm.auto import tqdm

    bar = tqdm(total=span, desc=desc, bar_format="{l_bar}{bar}| {n:.3g}/{total:.3g} [{elapsed}]")

    def update(covered):
        if covered is None:
            bar.close()
        else:
            bar.update(covered - bar.n)
    return update
