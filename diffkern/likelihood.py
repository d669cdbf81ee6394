"""Hutchinson trace estimates and log-likelihoods through the probability-flow ODE and CNFs.

d log p(x_t) / dt = -tr(dF/dx) along an ODE dx/dt = F(x, t) (seeds 002, 004; FFJORD), so
    log p_{t0}(x) = log p_{t1}(x_{t1}) + integral_{t0}^{t1} tr(dF/dx(x_t, t)) dt
with x_{t1} the ODE solution from x. Traces are estimated with Hutchinson's tr(A) = E[v^T A v]
(Rademacher or Gaussian probes v) or computed exactly (small d). The state, the log-density
integral and the trace reduction advance in one fused kernel per step (ops.likelihood_step).
"""
from __future__ import annotations

import math
import numbers
from typing import Callable, NamedTuple, Optional

import torch

from . import ops, rk
from .noise import rademacher, randn
from .samplers import _progress, model_output_of
from .steps import check_real

PROBE_STREAM = 1  # the probes' stream id: distinct from the sampling noise (stream 0)
DISTRIBUTIONS = ("rademacher", "gaussian")
FIXED_GRID_SOLVERS = ("euler", "heun")
ADAPTIVE_SOLVERS = tuple(rk.TABLEAUS)  # dopri5, bosh3
SOLVERS = ("auto",) + FIXED_GRID_SOLVERS + ADAPTIVE_SOLVERS
ERROR_NORMS = ("batch", "sample")
DEFAULT_RTOL = DEFAULT_ATOL = 1e-5  # score_sde's likelihood tolerances


class LogLikelihood(NamedTuple):
    """Per-sample results of log_likelihood / cnf_log_likelihood (float64 tensors [batch])."""

    log_p: torch.Tensor          # log p(x) in nats: prior_log_p + delta_log_p
    bits_per_dim: torch.Tensor   # -log_p / (d ln 2) + bits_offset
    prior_log_p: torch.Tensor    # log density of the ODE's end point under the prior / base
    delta_log_p: torch.Tensor    # the integral of tr(dF/dx) dt
    x_end: torch.Tensor          # the ODE's end point (the latent)
    num_evals: int = 0           # model evaluations (batched calls, each with its Jacobian products)


def _check_x(x) -> None:
    if not isinstance(x, torch.Tensor) or not x.is_floating_point() or x.dim() < 2:
        raise ValueError("x must be a floating-point tensor [batch, ...] with at least one feature dim")


def probes(x: torch.Tensor, num_probes: int, distribution: str = "rademacher", seed: int = 0, step: int = 0,
           sample_offset: int = 0) -> torch.Tensor:
    """K probes per sample as a [K, B, ...] view: probe k of sample n is features k d .. (k + 1) d - 1
    of sample n in the probe stream (stream 1, so independent of the sampling noise), i.e.
    dk.rademacher / dk.randn((B, K d), seed, step, sample_offset, stream=1). Batch-split invariant."""
    _check_x(x)
    if isinstance(num_probes, bool) or not isinstance(num_probes, int) or num_probes < 1:
        raise ValueError(f"num_probes must be an int >= 1, got {num_probes!r}")
    if distribution not in DISTRIBUTIONS:
        raise ValueError(f"distribution must be one of {DISTRIBUTIONS}, got {distribution!r}")
    batch, features = x.shape[0], math.prod(x.shape[1:])
    draw = rademacher if distribution == "rademacher" else randn
    flat = draw((batch, num_probes * features), seed=seed, step=step, sample_offset=sample_offset, stream=PROBE_STREAM,
                device=x.device, dtype=x.dtype)
    return flat.view(batch, num_probes, *x.shape[1:]).movedim(1, 0)


def basis_probes(x: torch.Tensor) -> torch.Tensor:
    """The d unit vectors as [d, B, ...] probes: the Hutchinson sum over them is the exact trace."""
    features = math.prod(x.shape[1:])
    eye = torch.eye(features, dtype=x.dtype, device=x.device)
    return eye[:, None, :].expand(features, x.shape[0], features).reshape(features, *x.shape)


def jacobian_products(fn: Callable, x: torch.Tensor, v: torch.Tensor, mode: str = "vjp"):
    """(fn(x), products [K, B, ...]): v^T J for every probe (mode "vjp": one forward with autograd and
    one probe-batched backward pass; works with any differentiable model) or J v (mode "jvp": one
    forward-mode pass, the model run once on x and its tangents for all K probes batched by
    torch.func.vmap). Both give the same trace estimate v^T J v. On the 2-core CPU the reverse
    mode was measured twice as fast (PyTorch's forward-mode AD costs ~3.5 forward passes)."""
    def call(x_in):
        output = fn(x_in)
        if not isinstance(output, torch.Tensor):
            raise TypeError(f"fn must return one tensor of x's shape, got {type(output).__name__}")
        return output

    if mode == "jvp":
        output, products = torch.func.vmap(lambda t: torch.func.jvp(call, (x,), (t,)), out_dims=(None, 0))(v)
    elif mode == "vjp":
        with torch.enable_grad():
            x_in = x.detach().requires_grad_(True)
            output = call(x_in)
            if not output.requires_grad:
                raise ValueError("fn's output does not depend on x through autograd (it was detached, computed "
                                 "under torch.no_grad, or does not use x): the trace needs d fn / dx")
            if output.shape != x.shape:
                raise ValueError(f"fn must return a tensor of x's shape {tuple(x.shape)} (one output per input "
                                 f"feature, samples independent), got {tuple(output.shape)}")
            if v.shape[0] == 1:
                products = torch.autograd.grad(output, x_in, v[0])[0][None]
            else:
                products = torch.autograd.grad(output, x_in, v, is_grads_batched=True)[0]
        output = output.detach()
    else:
        raise ValueError(f"mode must be 'jvp' or 'vjp', got {mode!r}")
    if output.shape != x.shape:
        raise ValueError(f"fn must return a tensor of x's shape {tuple(x.shape)} (one output per input "
                         f"feature, samples independent), got {tuple(output.shape)}")
    return output, products


def hutchinson_trace(fn: Callable, x: torch.Tensor, num_probes: int = 1, distribution: str = "rademacher",
                     seed: int = 0, mode: str = "vjp", *, step: int = 0, sample_offset: int = 0,
                     return_output: bool = False):
    """Per-sample estimate of tr(d fn / dx) [B]: the mean over K probes of v^T J v (Hutchinson; FFJORD).
    Unbiased for Rademacher and Gaussian probes; the variance of one probe is 2 (||S||_F^2 - sum_i
    S_ii^2) for Rademacher and 2 ||S||_F^2 for Gaussian probes, S = (J + J^T) / 2, divided by K.
    fn maps [B, ...] to [B, ...] with samples independent (no batch norm across samples). Returns
    float64 [B] (and fn(x) with return_output)."""
    _check_x(x)
    v = probes(x, num_probes, distribution, seed, step, sample_offset)
    output, products = jacobian_products(fn, x, v, mode)
    trace = ops.probe_trace(v, products, 1.0 / num_probes)
    return (trace, output) if return_output else trace


def exact_trace(fn: Callable, x: torch.Tensor, mode: str = "vjp") -> torch.Tensor:
    """tr(d fn / dx) per sample from d Jacobian-vector products (one per feature): float64 [B]. For small d."""
    _check_x(x)
    v = basis_probes(x)
    _, products = jacobian_products(fn, x, v, mode)
    return ops.probe_trace(v, products, 1.0)


def _integrate(velocity_terms, model_at, x, t_grid, solver, trace, num_probes, distribution, seed, mode,
               sample_offset, progress, desc):
    """Integrate dx/dt = a(t) x + b(t) m(x, t) and the log-density change from t_grid[0] to t_grid[-1]
    on the fixed grid. velocity_terms(t) -> (a, b); model_at(t) -> the network m(., t) as a function of x."""
    features = math.prod(x.shape[1:])
    v, scale = _trace_probes(x, trace, num_probes, distribution, seed, sample_offset)
    delta = torch.zeros(x.shape[0], dtype=torch.float64, device=x.device)
    time_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    for i in _progress(range(len(t_grid) - 1), progress, desc):
        t0, t1 = float(t_grid[i]), float(t_grid[i + 1])
        dt = t1 - t0
        a0, b0 = velocity_terms(t0)
        m0, jv0 = jacobian_products(model_at(torch.full((x.shape[0],), t0, dtype=time_dtype, device=x.device)), x, v, mode)
        if solver == "euler":
            x, delta, _ = ops.likelihood_step(x, m0, None, v, jv0, delta, None, c_x=1 + dt * a0, c_model=dt * b0,
                                              l0=dt * a0 * features, l_trace=dt * b0, trace_scale=scale)
            continue
        a1, b1 = velocity_terms(t1)
        x_pred, _, trace0 = ops.likelihood_step(x, m0, None, v, jv0, delta, None, c_x=1 + dt * a0, c_model=dt * b0,
                                                trace_scale=scale)
        m1, jv1 = jacobian_products(model_at(torch.full((x.shape[0],), t1, dtype=time_dtype, device=x.device)), x_pred,
                                    v, mode)
        # Heun: x + dt (F0 + F1) / 2 with F1 at x_pred = x + dt F0, written in x, m0 and m1
        x, delta, _ = ops.likelihood_step(
            x, m1, m0, v, jv1, delta, trace0, c_x=1 + 0.5 * dt * (a0 + a1 * (1 + dt * a0)), c_model=0.5 * dt * b1,
            c_prev=0.5 * dt * b0 * (1 + dt * a1), l0=0.5 * dt * (a0 + a1) * features, l_prev=0.5 * dt * b0,
            l_trace=0.5 * dt * b1, trace_scale=scale)
    return x, delta, (len(t_grid) - 1) * (1 if solver == "euler" else 2)


def _result(x_end, delta, prior_log_p, features, bits_offset, num_evals):
    log_p = prior_log_p + delta
    return LogLikelihood(log_p, -log_p / (features * math.log(2)) + bits_offset, prior_log_p, delta, x_end, num_evals)


class _SolverChoice(NamedTuple):
    solver: str
    num_steps: Optional[int]
    rtol: float
    atol: float
    error_norm: str


def resolve_solver(solver, num_steps, rtol, atol, error_norm, max_num_evals, fixed_grid_options=()) -> _SolverChoice:
    """Checks the solver arguments of log_likelihood / cnf_log_likelihood / sample_ode. "auto" is
    dopri5 unless num_steps is given (then Heun on that grid, as before the adaptive solvers).
    fixed_grid_options: (name, value, default) of arguments only the fixed grids read."""
    if solver not in SOLVERS:
        raise ValueError(f"solver must be one of {SOLVERS}, got {solver!r}")
    if isinstance(max_num_evals, bool) or not isinstance(max_num_evals, int) or max_num_evals < 1:
        raise ValueError(f"max_num_evals must be an int >= 1, got {max_num_evals!r}")
    if solver == "auto":
        solver = "dopri5" if num_steps is None else "heun"
    if solver in FIXED_GRID_SOLVERS or num_steps is not None:
        for name, value in (("rtol", rtol), ("atol", atol), ("error_norm", error_norm)):
            if value is not None:
                raise ValueError(f"{name} goes with adaptive steps (solver in {ADAPTIVE_SOLVERS} without num_steps); "
                                 f"solver={solver!r} with num_steps takes fixed steps")
        num_steps = 100 if num_steps is None else num_steps
        if isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps < 1:
            raise ValueError(f"num_steps must be an int >= 1, got {num_steps!r}")
        return _SolverChoice(solver, num_steps, 0.0, 0.0, "batch")
    for name, value, default in fixed_grid_options:
        if value != default:
            raise ValueError(f"{name} goes with the fixed-grid solvers {FIXED_GRID_SOLVERS}, not solver={solver!r}")
    rtol = DEFAULT_RTOL if rtol is None else check_real("rtol", rtol)
    atol = DEFAULT_ATOL if atol is None else check_real("atol", atol)
    if not 0 <= rtol < 1:
        raise ValueError(f"rtol must lie in [0, 1), got {rtol}")
    if not atol > 0:
        raise ValueError(f"atol must be > 0, got {atol}")
    error_norm = "batch" if error_norm is None else error_norm
    if error_norm not in ERROR_NORMS:
        raise ValueError(f"error_norm must be one of {ERROR_NORMS}, got {error_norm!r}")
    return _SolverChoice(solver, None, rtol, atol, error_norm)


def _trace_probes(x, trace, num_probes, distribution, seed, sample_offset):
    if trace not in ("hutchinson", "exact"):
        raise ValueError(f"trace must be 'hutchinson' or 'exact', got {trace!r}")
    if trace == "exact":
        return basis_probes(x), 1.0
    # one set of probes for the whole solve, as FFJORD and score_sde do
    return probes(x, num_probes, distribution, seed, 0, sample_offset), 1.0 / num_probes


def _adaptive(choice, velocity_terms, model_at, x, t0, t1, trace, num_probes, distribution, seed, mode, sample_offset,
              max_num_evals, progress, desc, grid=None):
    """(x(t1), the integral of tr(dF/dx) dt, model evaluations) with an embedded Runge-Kutta pair:
    adaptive steps, or one step per interval of ``grid``."""
    v, scale = _trace_probes(x, trace, num_probes, distribution, seed, sample_offset)
    time_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32

    def evaluate(y, t, need_products):
        t_batch = (t.to(time_dtype) if isinstance(t, torch.Tensor)
                   else torch.full((x.shape[0],), t, dtype=time_dtype, device=x.device))
        if need_products:
            return jacobian_products(model_at(t_batch), y, v, mode)
        output = model_at(t_batch)(y)
        if not isinstance(output, torch.Tensor) or output.shape != y.shape:
            raise ValueError(f"the model must return a tensor of x's shape {tuple(y.shape)}, got "
                             f"{tuple(output.shape) if isinstance(output, torch.Tensor) else type(output).__name__}")
        return output.to(y.dtype), None

    x_end, delta, num_evals = rk.solve(velocity_terms, evaluate, x, float(t0), float(t1),
                                       tableau=rk.TABLEAUS[choice.solver], rtol=choice.rtol, atol=choice.atol,
                                       error_norm=choice.error_norm, probes=v, trace_scale=scale,
                                       max_num_evals=max_num_evals, progress=progress, desc=desc, grid=grid)
    return x_end, delta, num_evals


def likelihood_time_grid(sde, num_steps: int, eps: float, time_grid: str = "auto") -> torch.Tensor:
    """The num_steps + 1 times from eps to T of a likelihood solve. "uniform" spaces them evenly;
    "quadratic" (t = eps + (T - eps) u^2, u uniform) crowds them near the data, where a VP or sub-VP
    flow changes fastest; "auto" is quadratic for VP / sub-VP and uniform for VE (whose time is
    already log sigma). Measured with Heun on 3-d Gaussian data (tests/test_likelihood.py), worst
    error per dimension: VP 3e-4 at 100 steps (2e-3 on the uniform grid), sub-VP 5e-4 at 100,
    VE 2e-3 at 300 and 5e-4 at 600 steps; the error falls as 1 / steps^2."""
    from .sde import VPSDE

    u = torch.linspace(0, 1, num_steps + 1, dtype=torch.float64)
    if time_grid == "auto":
        time_grid = "quadratic" if isinstance(sde, VPSDE) else "uniform"
    if time_grid == "quadratic":
        u = u ** 2
    elif time_grid != "uniform":
        raise ValueError(f"time_grid must be 'auto', 'uniform' or 'quadratic', got {time_grid!r}")
    return eps + (sde.T - eps) * u


def log_likelihood(score_fn: Callable, x: torch.Tensor, sde, num_steps: Optional[int] = None, *,
                   solver: str = "auto", rtol: Optional[float] = None, atol: Optional[float] = None,
                   error_norm: Optional[str] = None, num_probes: int = 1, seed: int = 0, eps: float = 1e-5,
                   trace: str = "hutchinson", distribution: str = "rademacher", mode: str = "vjp",
                   parameterization: str = "score", bits_offset: float = 0.0, time_grid: str = "auto",
                   sample_offset: int = 0, max_num_evals: int = 10000, progress: bool = False) -> LogLikelihood:
    """log p_eps(x) of a score model through the probability-flow ODE dx/dt = f(t) x - g(t)^2 s(x, t) / 2,
    integrated from t = eps to T, with the trace of dF/dx = f(t) I - g(t)^2 ds/dx / 2 estimated by
    Hutchinson (num_probes probes, fixed for the whole solve) or computed exactly (``trace="exact"``).

    Solvers (``diffkern.likelihood.SOLVERS``):

    * ``"dopri5"`` (Dormand-Prince 5(4)) and ``"bosh3"`` (Bogacki-Shampine 3(2)): adaptive steps to
      the tolerances ``rtol`` and ``atol`` (default 1e-5 each, as score_sde), as torchdiffeq's and
      scipy's solvers read them; the log-density is held to ``atol`` nats per dimension. Each stage
      is one model evaluation and one fused launch. ``error_norm="batch"`` (default) steps the whole
      batch together with the worst sample's error: fewest model evaluations, but the steps (so the
      results, at the level of the tolerance) depend on which samples share the batch.
      ``error_norm="sample"`` gives every sample its own steps (the model sees per-sample times):
      results independent of the batch split, at a few more evaluations. ``max_num_evals`` bounds
      the model evaluations. With ``num_steps`` they take that many fixed steps on ``time_grid``
      instead (fifth / third order, no error control, batch-independent).
    * ``"heun"`` (second order, two evaluations per step) and ``"euler"``: ``num_steps`` fixed steps
      (default 100) on ``time_grid`` (see likelihood_time_grid), no host decision per step, the same
      number of model calls on every rank of a distributed run. Fixed steps refuse ``rtol``, ``atol``
      and ``error_norm``; adaptive steps refuse ``time_grid``.
    * ``"auto"`` (default): ``"dopri5"``, or ``"heun"`` when ``num_steps`` is given. dopri5 is the
      default because it reaches a given accuracy with the fewest model evaluations of these solvers
      (measured on Gaussian data and an MLP: benchmarks/test_bench_likelihood_accuracy.py and the
      README's table); for bits/dim, rtol = atol = 1e-4 keeps the solver's error near 1e-4 nats/dim.

    Bits per dimension: -log_p / (d ln 2) + bits_offset. As in score_sde, for 8-bit data with uniform
    dequantisation noise the discrete likelihood adds log2 of the number of bins per unit of the
    data's scale: bits_offset = 7 for data scaled to [-1, 1], 8 for [0, 1] (the default 0 reports the
    density itself). ``parameterization="epsilon"`` for noise-prediction models. The result's
    ``num_evals`` counts model evaluations.
    """
    from .samplers import probability_flow_terms

    _check_x(x)
    choice = resolve_solver(solver, num_steps, rtol, atol, error_norm, max_num_evals,
                            (("time_grid", time_grid, "auto"),))
    if isinstance(eps, bool) or not isinstance(eps, numbers.Real) or not 0 < eps < sde.T:
        raise ValueError(f"eps must lie in (0, {sde.T}), got {eps!r}")

    velocity_terms = probability_flow_terms(sde, parameterization)

    def model_at(t_batch):
        return lambda y: model_output_of(score_fn(y, t_batch))

    t_grid = None if choice.num_steps is None else likelihood_time_grid(sde, choice.num_steps, eps, time_grid)
    if choice.solver in ADAPTIVE_SOLVERS:
        x_end, delta, num_evals = _adaptive(choice, velocity_terms, model_at, x, eps, sde.T, trace, num_probes,
                                            distribution, seed, mode, sample_offset, max_num_evals, progress,
                                            f"log-likelihood ({choice.solver})", t_grid)
    else:
        x_end, delta, num_evals = _integrate(velocity_terms, model_at, x, t_grid, choice.solver, trace, num_probes,
                                             distribution, seed, mode, sample_offset, progress, "log-likelihood")
    return _result(x_end, delta, sde.prior_logp(x_end), math.prod(x.shape[1:]), bits_offset, num_evals)


def standard_normal_logp(z: torch.Tensor) -> torch.Tensor:
    z = z.flatten(1).double() if z.dim() > 1 else z.reshape(-1, 1).double()
    return -0.5 * z.shape[1] * math.log(2 * math.pi) - 0.5 * (z ** 2).sum(1)


def cnf_log_likelihood(f: Callable, x: torch.Tensor, t0: float = 0.0, t1: float = 1.0,
                       num_steps: Optional[int] = None, *, solver: str = "auto", rtol: Optional[float] = None,
                       atol: Optional[float] = None, error_norm: Optional[str] = None, num_probes: int = 1,
                       seed: int = 0, trace: str = "hutchinson", distribution: str = "rademacher", mode: str = "vjp",
                       base_logp: Optional[Callable] = None, bits_offset: float = 0.0, sample_offset: int = 0,
                       max_num_evals: int = 10000, progress: bool = False) -> LogLikelihood:
    """log p(x) of a continuous normalizing flow dz/dt = f(z, t) (FFJORD): the flow carries x at t0 to
    z at t1, where the base density (default N(0, I)) is evaluated, and
    log p(x) = base_logp(z(t1)) + integral_{t0}^{t1} tr(df/dz) dt. f(z, t) gets t as a float tensor [B]
    (per-sample times with ``error_norm="sample"``). Solvers, tolerances and ``num_evals`` as in
    log_likelihood: adaptive dopri5 by default, ``num_steps`` uniform Heun steps when given."""
    _check_x(x)
    choice = resolve_solver(solver, num_steps, rtol, atol, error_norm, max_num_evals)
    for name, value in (("t0", t0), ("t1", t1)):
        if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
            raise ValueError(f"{name} must be a finite number, got {value!r}")
    if t0 == t1:
        raise ValueError(f"t0 and t1 must differ (the flow's interval), got {t0} and {t1}")

    def velocity_terms(t):
        if isinstance(t, torch.Tensor):
            return torch.zeros_like(t, dtype=torch.float64), torch.ones_like(t, dtype=torch.float64)
        return 0.0, 1.0

    def model_at(t_batch):
        return lambda y: model_output_of(f(y, t_batch))

    t_grid = (None if choice.num_steps is None
              else torch.linspace(float(t0), float(t1), choice.num_steps + 1, dtype=torch.float64))
    if choice.solver in ADAPTIVE_SOLVERS:
        z, delta, num_evals = _adaptive(choice, velocity_terms, model_at, x, t0, t1, trace, num_probes, distribution,
                                        seed, mode, sample_offset, max_num_evals, progress,
                                        f"CNF log-likelihood ({choice.solver})", t_grid)
    else:
        z, delta, num_evals = _integrate(velocity_terms, model_at, x, t_grid, choice.solver, trace, num_probes,
                                         distribution, seed, mode, sample_offset, progress, "CNF log-likelihood")
    base = (base_logp or standard_normal_logp)(z)
    return _result(z, delta, base.double(), math.prod(x.shape[1:]), bits_offset, num_evals)
