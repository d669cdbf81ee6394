"""Log-likelihoods through the probability-flow ODE of a score model, and of continuous normalizing flows.

d log p(x_t) / dt = -tr(dF/dx) along an ODE dx/dt = F(x, t) (the probability-flow ODE; CNFs;
FFJORD), so
    log p_{t0}(x) = log p_{t1}(x_{t1}) + integral_{t0}^{t1} tr(dF/dx(x_t, t)) dt
with x_{t1} the ODE solution from x. The state, the log-density integral and the trace reduction
advance in one fused kernel per model evaluation (diffkern.ode: fixed-grid Euler / Heun, adaptive
dopri5 / bosh3).

Gradients: these functions do not differentiate their result yet. They refuse an x that requires
grad and a model whose output requires grad (its parameters do) while gradients are recorded, rather
than return a gradient that would be wrong; call them under torch.no_grad() to evaluate.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, NamedTuple, Optional

import torch

from .._model import model_output_of
from .._validate import check_choice, check_finite
from ..ode import ADAPTIVE_SOLVERS, LinearODE, fixed, resolve_solver, rk
from ..sde import VPSDE
from .traces import basis_probes, check_x, jacobian_products, probes

TRACES = ("hutchinson", "exact")
TIME_GRIDS = ("auto", "uniform", "quadratic")


class LogLikelihood(NamedTuple):
    """Per-sample results of log_likelihood / cnf_log_likelihood (float64 tensors [batch])."""

    log_p: torch.Tensor          # log p(x) in nats: prior_log_p + delta_log_p
    bits_per_dim: torch.Tensor   # -log_p / (d ln 2) + bits_offset
    prior_log_p: torch.Tensor    # log density of the ODE's end point under the prior / base
    delta_log_p: torch.Tensor    # the integral of tr(dF/dx) dt
    x_end: torch.Tensor          # the ODE's end point (the latent)
    num_evals: int = 0           # model evaluations (batched calls, each with its Jacobian products)


@dataclass(frozen=True)
class _Trace:
    """How the trace is taken: Hutchinson with num_probes probes of ``distribution`` from the probe
    stream (seed, sample_offset), or exact; Jacobian products by ``mode`` (vjp or jvp)."""

    kind: str = "hutchinson"
    num_probes: int = 1
    distribution: str = "rademacher"
    seed: int = 0
    mode: str = "vjp"
    sample_offset: int = 0

    def probes(self, x):
        """(probes [K, B, ...], the trace's scale)."""
        check_choice("trace", self.kind, TRACES)
        if self.kind == "exact":
            return basis_probes(x), 1.0
        # one set of probes for the whole solve, as FFJORD and score_sde do
        return probes(x, self.num_probes, self.distribution, self.seed, 0, self.sample_offset), 1.0 / self.num_probes


_NO_GRADIENTS = ("diffkern's log-likelihoods are not differentiable yet (their Jacobian products are not "
                 "recorded), so a gradient would be wrong; evaluate under torch.no_grad()")


def _refuse_gradients(x: torch.Tensor) -> bool:
    """Whether gradients are being recorded (then the model is checked at its first call)."""
    recording = torch.is_grad_enabled()
    if recording and x.requires_grad:
        raise ValueError(f"x requires grad: {_NO_GRADIENTS} or pass x.detach()")
    return recording


def _records_parameters(output: torch.Tensor, x_in: Optional[torch.Tensor]) -> bool:
    """Whether ``output``'s autograd graph reaches a leaf other than x_in (the model's parameters)."""
    if x_in is None:
        return output.requires_grad
    seen, stack = set(), [output.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        variable = getattr(node, "variable", None)
        if variable is not None and variable is not x_in:
            return True
        stack.extend(next_node for next_node, _ in node.next_functions)
    return False


def _solve(system_parts: tuple, x: torch.Tensor, span: tuple, choice, trace: _Trace, *, max_num_evals: int,
           progress: bool, desc: str):
    """(x(t1), the integral of tr(dF/dx) dt, model evaluations) on the fixed grid span[2] or adaptive
    steps from span[0] to span[1]. system_parts = (velocity_terms, model_at): model_at(t) is the
    network m(., t) as a function of x."""
    velocity_terms, model_at = system_parts
    t0, t1, grid = span
    v, scale = trace.probes(x)
    time_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    unchecked = [_refuse_gradients(x)]  # a model whose parameters require grad is refused at its first call

    def inspect(output, x_in):
        unchecked[0] = False
        if _records_parameters(output, x_in):
            raise ValueError(f"the model's output requires grad (its parameters do): {_NO_GRADIENTS}")

    def evaluate(y, t, need_products):
        t_batch = (t.to(time_dtype) if isinstance(t, torch.Tensor)
                   else torch.full((x.shape[0],), t, dtype=time_dtype, device=x.device))
        fn = model_at(t_batch)
        if need_products:
            return jacobian_products(fn, y, v, trace.mode, inspect=inspect if unchecked[0] else None)
        output = fn(y)
        if not isinstance(output, torch.Tensor) or output.shape != y.shape:
            raise ValueError(f"the model must return a tensor of x's shape {tuple(y.shape)}, got "
                             f"{tuple(output.shape) if isinstance(output, torch.Tensor) else type(output).__name__}")
        if unchecked[0]:
            inspect(output, None)
        return output.detach().to(y.dtype), None

    system = LinearODE(velocity_terms, evaluate, v, scale)
    if choice.solver in ADAPTIVE_SOLVERS:
        return rk.solve(system, x, float(t0), float(t1), choice, max_num_evals=max_num_evals, progress=progress,
                        desc=desc, grid=None if grid is None else grid.tolist())
    return fixed.integrate(system, x, grid, choice.solver, progress=progress, desc=desc)


def _result(x_end, delta, prior_log_p, features, bits_offset, num_evals):
    log_p = prior_log_p + delta
    return LogLikelihood(log_p, -log_p / (features * math.log(2)) + bits_offset, prior_log_p, delta, x_end, num_evals)


def likelihood_time_grid(sde, num_steps: int, eps: float, time_grid: str = "auto") -> torch.Tensor:
    """The num_steps + 1 times from eps to T of a likelihood solve. "uniform" spaces them evenly;
    "quadratic" (t = eps + (T - eps) u^2, u uniform) crowds them near the data, where a VP or sub-VP
    flow changes fastest; "auto" is quadratic for VP / sub-VP and uniform for VE (whose time is
    already log sigma). Measured with Heun on 3-d Gaussian data (tests/test_likelihood.py), worst
    error per dimension: VP 3e-4 at 100 steps (2e-3 on the uniform grid), sub-VP 5e-4 at 100,
    VE 2e-3 at 300 and 5e-4 at 600 steps; the error falls as 1 / steps^2."""
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
    check_x(x)
    choice = resolve_solver(solver, num_steps, rtol, atol, error_norm, max_num_evals=max_num_evals,
                            fixed_grid_options=(("time_grid", time_grid, "auto"),))
    sde.time_grid(1, eps)  # checks eps
    check_choice("time_grid", time_grid, TIME_GRIDS)

    def model_at(t_batch):
        return lambda y: model_output_of(score_fn(y, t_batch))

    t_grid = None if choice.num_steps is None else likelihood_time_grid(sde, choice.num_steps, eps, time_grid)
    desc = f"log-likelihood ({choice.solver})" if choice.solver in ADAPTIVE_SOLVERS else "log-likelihood"
    x_end, delta, num_evals = _solve((sde.velocity_terms(parameterization), model_at), x, (eps, sde.T, t_grid),
                                     choice, _Trace(trace, num_probes, distribution, seed, mode, sample_offset),
                                     max_num_evals=max_num_evals, progress=progress, desc=desc)
    return _result(x_end, delta, sde.prior_logp(x_end), math.prod(x.shape[1:]), bits_offset, num_evals)


def standard_normal_logp(z: torch.Tensor) -> torch.Tensor:
    """log N(z; 0, I) per sample (sum over all but dim 0), in float64."""
    z = z.flatten(1).double() if z.dim() > 1 else z.reshape(-1, 1).double()
    return -0.5 * z.shape[1] * math.log(2 * math.pi) - 0.5 * (z ** 2).sum(1)


def _cnf_velocity_terms(t):
    if isinstance(t, torch.Tensor):
        return torch.zeros_like(t, dtype=torch.float64), torch.ones_like(t, dtype=torch.float64)
    return 0.0, 1.0


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
    check_x(x)
    choice = resolve_solver(solver, num_steps, rtol, atol, error_norm, max_num_evals=max_num_evals)
    t0, t1 = check_finite("t0", t0), check_finite("t1", t1)
    if t0 == t1:
        raise ValueError(f"t0 and t1 must differ (the flow's interval), got {t0} and {t1}")

    def model_at(t_batch):
        return lambda y: model_output_of(f(y, t_batch))

    t_grid = None if choice.num_steps is None else torch.linspace(t0, t1, choice.num_steps + 1, dtype=torch.float64)
    desc = f"CNF log-likelihood ({choice.solver})" if choice.solver in ADAPTIVE_SOLVERS else "CNF log-likelihood"
    z, delta, num_evals = _solve((_cnf_velocity_terms, model_at), x, (t0, t1, t_grid), choice,
                                 _Trace(trace, num_probes, distribution, seed, mode, sample_offset),
                                 max_num_evals=max_num_evals, progress=progress, desc=desc)
    base = (base_logp or standard_normal_logp)(z)
    return _result(z, delta, base.double(), math.prod(x.shape[1:]), bits_offset, num_evals)
