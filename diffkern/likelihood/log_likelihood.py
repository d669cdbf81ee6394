"""Log-likelihoods through the probability-flow ODE of a score model, and of continuous normalizing flows.

d log p(x_t) / dt = -tr(dF/dx) along an ODE dx/dt = F(x, t) (the probability-flow ODE; CNFs;
FFJORD), so
    log p_{t0}(x) = log p_{t1}(x_{t1}) + integral_{t0}^{t1} tr(dF/dx(x_t, t)) dt
with x_{t1} the ODE solution from x. The state, the log-density integral and the trace reduction
advance in one fused kernel per model evaluation (diffkern.ode: fixed-grid Euler / Heun, adaptive
dopri5 / bosh3).

Gradients (``gradient=``): "backprop" records the solve for autograd (through the fused stages,
whose backward is linear, and Jacobian products made with create_graph, so the trace estimate's
dependence on x and the model's parameters is differentiated; memory grows with the steps);
"adjoint" keeps nothing of the trajectory and integrates the adjoint ODE backwards (diffkern.ode.adjoint;
constant memory, gradients to the adjoint tolerances); "none" never records; "auto" (default) is
"backprop" when gradients are recorded and x or the model's parameters require grad, else "none".
Step-size control stays outside autograd. With ``regularise`` the solve also integrates RNODE's
kinetic energy int ||F||^2 dt and Jacobian norm int ||v^T dF/dx||^2 dt (Finlay et al. 2020) from the
same model evaluations and Jacobian products.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, NamedTuple, Optional

import torch

from .._model import model_output_of
from .._validate import check_choice, check_finite
from ..ode import ADAPTIVE_SOLVERS, LinearODE, adjoint, fixed, model_times, resolve_solver, rk
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
    kinetic_energy: Optional[torch.Tensor] = None  # with regularise: int ||F||^2 dt per sample
    jacobian_norm: Optional[torch.Tensor] = None   # with regularise: int ||v^T dF/dx||^2 dt per sample


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
    step: int = 0

    def probes(self, x):
        """(probes [K, B, ...], the trace's scale)."""
        check_choice("trace", self.kind, TRACES)
        if self.kind == "exact":
            return basis_probes(x), 1.0
        # one set of probes for the whole solve, as FFJORD and score_sde do
        return (probes(x, self.num_probes, self.distribution, self.seed, self.step, self.sample_offset),
                1.0 / self.num_probes)


GRADIENTS = ("auto", "none", "backprop", "adjoint")
_JVP_NOT_DIFFERENTIATED = ("mode='jvp' Jacobian products are not differentiated (torch.func's forward mode is not "
                           "recorded here): use mode='vjp', gradient='adjoint', or evaluate under torch.no_grad()")


class _NeedsGraph(Exception):
    """Raised at the first model evaluation of gradient="auto" when the model's output records its
    parameters: the solve restarts with gradient="backprop"."""


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


def _rnode_integrands(probes: torch.Tensor, trace_scale: float) -> Callable:
    """RNODE's regularisers at one evaluation, float64 [B, 2]: ||F||^2 and the Hutchinson estimate
    trace_scale sum_k ||v_k^T dF/dx||^2 of ||dF/dx||_F^2, with F = a x + b m and
    v^T dF/dx = a v + b v^T dm/dx (the products the trace already needs)."""
    def integrands(x, m, products, a, b):
        if isinstance(a, torch.Tensor):
            shape = (-1,) + (1,) * (x.dim() - 1)
            a, b = a.reshape(shape).to(x.dtype), b.reshape(shape).to(x.dtype)
        kinetic = (a * x + b * m).flatten(1).pow(2).sum(1)
        jacobian = trace_scale * (a * probes + b * products).flatten(2).pow(2).sum(2).sum(0)
        return torch.stack([kinetic, jacobian], 1).double()
    return integrands


@dataclass(frozen=True)
class _Gradient:
    """How the result is differentiated: ``mode`` (GRADIENTS), the adjoint's solver choice and the
    tensors it differentiates (``params``)."""

    mode: str = "auto"
    params: tuple = ()
    adjoint_choice: Optional[object] = None
    regularise: bool = False


def _gradient(gradient: str, model, x, choice, *, adjoint_params, adjoint_rtol, adjoint_atol, trace: _Trace,
              regularise) -> _Gradient:
    """Checks the gradient arguments; for "adjoint", the parameters and the backward solver."""
    check_choice("gradient", gradient, GRADIENTS)
    if not isinstance(regularise, bool):
        raise ValueError(f"regularise must be True or False, got {regularise!r}")
    if gradient in ("auto", "backprop") and trace.mode == "jvp" and torch.is_grad_enabled() and (
            gradient == "backprop" or x.requires_grad):
        raise ValueError(_JVP_NOT_DIFFERENTIATED)
    if gradient != "adjoint":
        for name, value in (("adjoint_rtol", adjoint_rtol), ("adjoint_atol", adjoint_atol),
                            ("adjoint_params", adjoint_params)):
            if value is not None:
                raise ValueError(f"{name} goes with gradient='adjoint', not gradient={gradient!r}")
        return _Gradient(gradient, regularise=regularise)
    params = adjoint.resolve_params(model, adjoint_params, x)
    backward = adjoint.backward_choice(choice, adjoint_rtol, adjoint_atol)
    return _Gradient("adjoint", params, backward, regularise)


def _solve(system_parts: tuple, x: torch.Tensor, span: tuple, choice, trace: _Trace, gradient: _Gradient, *,
           max_num_evals: int, progress: bool, desc: str):
    """The Solution (x(t1), the integral of tr(dF/dx) dt, model evaluations, the regularisers) on the
    fixed grid span[2] or adaptive steps from span[0] to span[1], differentiated as ``gradient`` says.
    system_parts = (velocity_terms, model_at): model_at(t) is the network m(., t) as a function of x."""
    velocity_terms, model_at = system_parts
    t0, t1, grid = span
    v, scale = trace.probes(x)
    regulariser = _rnode_integrands(v, scale) if gradient.regularise else None

    def evaluator(differentiable: bool, watch: bool):
        """evaluate(y, t, need_products) of the solve; ``watch``: raise _NeedsGraph at the first
        evaluation if the model's output records parameters."""
        unchecked = [watch]

        def inspect(output, x_in):
            unchecked[0] = False
            if _records_parameters(output, x_in):
                raise _NeedsGraph

        def evaluate(y, t, need_products):
            fn = model_at(model_times(t, y))
            if need_products:
                if differentiable:
                    if trace.mode == "jvp":
                        raise ValueError(_JVP_NOT_DIFFERENTIATED)
                    return jacobian_products(fn, y, v, trace.mode, create_graph=True)
                return jacobian_products(fn, y, v, trace.mode, inspect=inspect if unchecked[0] else None)
            output = fn(y)
            if not isinstance(output, torch.Tensor) or output.shape != y.shape:
                got = tuple(output.shape) if isinstance(output, torch.Tensor) else type(output).__name__
                raise ValueError(f"the model must return a tensor of x's shape {tuple(y.shape)}, got {got}")
            if unchecked[0]:
                inspect(output, None)
            output = output.to(y.dtype)
            return (output if differentiable else output.detach()), None
        return evaluate

    def forward(x_start, differentiable=False, watch=False):
        system = LinearODE(velocity_terms, evaluator(differentiable, watch), v, scale, regulariser)
        if choice.solver in ("euler", "heun"):
            return fixed.integrate(system, x_start, grid, choice.solver, progress=progress, desc=desc)
        return rk.solve(system, x_start, float(t0), float(t1), choice, max_num_evals=max_num_evals, progress=progress,
                        desc=desc, grid=None if grid is None else grid.tolist())

    mode = gradient.mode
    if mode == "adjoint":
        flow = adjoint.Flow(velocity_terms, model_at, v, scale, regulariser, gradient.params)
        return adjoint.solve(flow, forward, x, (t0, t1, grid), gradient.adjoint_choice, max_num_evals=max_num_evals,
                             progress=progress, desc=desc)
    if mode == "none" or not torch.is_grad_enabled():
        with torch.no_grad():
            return forward(x)
    if mode == "backprop" or x.requires_grad:
        return forward(x, differentiable=True)
    try:  # "auto": the first evaluation tells whether the model's parameters record gradients
        return forward(x, watch=True)
    except _NeedsGraph:
        return forward(x, differentiable=True)


def _result(solution, prior_log_p, features, bits_offset):
    log_p = prior_log_p + solution.log_density
    kinetic = jacobian = None
    if solution.regularisers is not None:
        kinetic, jacobian = solution.regularisers[:, 0], solution.regularisers[:, 1]
    return LogLikelihood(log_p, -log_p / (features * math.log(2)) + bits_offset, prior_log_p, solution.log_density,
                         solution.x, solution.num_evals, kinetic, jacobian)


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
                   sample_offset: int = 0, max_num_evals: int = 10000, progress: bool = False,
                   gradient: str = "auto", adjoint_rtol: Optional[float] = None,
                   adjoint_atol: Optional[float] = None, adjoint_params=None,
                   regularise: bool = False) -> LogLikelihood:
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
      results independent of the batch split, at a few more evaluations. ``error_norm="rms"``
      steps the batch with the root mean square of the samples' errors, as torchdiffeq's RMS over the
      whole state does (fewer evaluations than "batch"; the worst sample is held to the tolerance
      only on average). ``max_num_evals`` bounds
      the model evaluations. With ``num_steps`` they take that many fixed steps on ``time_grid``
      instead (fifth / third order, no error control, batch-independent).
    * ``"heun"`` (second order, two evaluations per step), ``"euler"`` and ``"rk4"`` (the classic
      fourth-order method, four evaluations per step: RNODE's training solver): ``num_steps`` fixed
      steps (default 100) on ``time_grid`` (see likelihood_time_grid), no host decision per step, the
      same number of model calls on every rank of a distributed run. Fixed steps refuse ``rtol``, ``atol``
      and ``error_norm``; adaptive steps refuse ``time_grid``.
    * ``"auto"`` (default): ``"dopri5"``, or ``"heun"`` when ``num_steps`` is given. dopri5 is the
      default because it reaches a given accuracy with the fewest model evaluations of these solvers
      (measured on Gaussian data and an MLP: benchmarks/test_bench_likelihood_accuracy.py and the
      README's table); for bits/dim, rtol = atol = 1e-4 keeps the solver's error near 1e-4 nats/dim.

    Bits per dimension: -log_p / (d ln 2) + bits_offset. As in score_sde, for 8-bit data with uniform
    dequantisation noise the discrete likelihood adds log2 of the number of bins per unit of the
    data's scale: bits_offset = 7 for data scaled to [-1, 1], 8 for [0, 1] (the default 0 reports the
    density itself). ``parameterization="epsilon"`` for noise-prediction models. The result's
    ``num_evals`` counts model evaluations (of the forward solve).

    Gradients of the result with respect to x and the model's parameters (module docstring):
    ``gradient`` "auto" (default), "backprop", "adjoint" or "none". The adjoint integrates backwards
    with the forward solver, to ``adjoint_rtol`` / ``adjoint_atol`` (default: the forward's
    tolerances; torchdiffeq's names) on adaptive steps, on the reversed grid for fixed ones, and
    differentiates ``adjoint_params`` (default: score_fn's parameters when it is an nn.Module).
    ``regularise=True`` fills the result's ``kinetic_energy`` and ``jacobian_norm``.
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
    how = _Trace(trace, num_probes, distribution, seed, mode, sample_offset)
    grad = _gradient(gradient, score_fn, x, choice, adjoint_params=adjoint_params, adjoint_rtol=adjoint_rtol,
                     adjoint_atol=adjoint_atol, trace=how, regularise=regularise)
    solution = _solve((sde.velocity_terms(parameterization), model_at), x, (eps, sde.T, t_grid), choice, how, grad,
                      max_num_evals=max_num_evals, progress=progress, desc=desc)
    return _result(solution, sde.prior_logp(solution.x), math.prod(x.shape[1:]), bits_offset)


def standard_normal_logp(z: torch.Tensor) -> torch.Tensor:
    """log N(z; 0, I) per sample (sum over all but dim 0), in float64."""
    z = z.flatten(1).double() if z.dim() > 1 else z.reshape(-1, 1).double()
    return -0.5 * z.shape[1] * math.log(2 * math.pi) - 0.5 * (z ** 2).sum(1)


def cnf_log_likelihood(f: Callable, x: torch.Tensor, t0: float = 0.0, t1: float = 1.0,
                       num_steps: Optional[int] = None, *, solver: str = "auto", rtol: Optional[float] = None,
                       atol: Optional[float] = None, error_norm: Optional[str] = None, num_probes: int = 1,
                       seed: int = 0, trace: str = "hutchinson", distribution: str = "rademacher", mode: str = "vjp",
                       base_logp: Optional[Callable] = None, bits_offset: float = 0.0, sample_offset: int = 0,
                       max_num_evals: int = 10000, progress: bool = False, gradient: str = "auto",
                       adjoint_rtol: Optional[float] = None, adjoint_atol: Optional[float] = None,
                       adjoint_params=None, regularise: bool = False, step: int = 0) -> LogLikelihood:
    """log p(x) of a continuous normalizing flow dz/dt = f(z, t) (FFJORD): the flow carries x at t0 to
    z at t1, where the base density (default N(0, I)) is evaluated, and
    log p(x) = base_logp(z(t1)) + integral_{t0}^{t1} tr(df/dz) dt. f(z, t) gets t as a float tensor [B]
    (per-sample times with ``error_norm="sample"``). Solvers, tolerances, ``num_evals``, gradients
    (``gradient``, ``adjoint_rtol``, ``adjoint_atol``, ``adjoint_params``) and RNODE's regularisers
    (``regularise``) as in log_likelihood: adaptive dopri5 by default, ``num_steps`` uniform Heun
    steps when given. The probes are the stream's (seed, step, sample_offset + n): a training loop
    passes its step for fresh probes every step. To train a CNF by maximum likelihood, minimise
    -log_p (plus the regularisers, each with its weight) with gradient="backprop" or "adjoint"; see
    the README section "Training a CNF"."""
    check_x(x)
    choice = resolve_solver(solver, num_steps, rtol, atol, error_norm, max_num_evals=max_num_evals)
    t0, t1 = check_finite("t0", t0), check_finite("t1", t1)
    if t0 == t1:
        raise ValueError(f"t0 and t1 must differ (the flow's interval), got {t0} and {t1}")

    def model_at(t_batch):
        return lambda y: model_output_of(f(y, t_batch))

    t_grid = None if choice.num_steps is None else torch.linspace(t0, t1, choice.num_steps + 1, dtype=torch.float64)
    desc = f"CNF log-likelihood ({choice.solver})" if choice.solver in ADAPTIVE_SOLVERS else "CNF log-likelihood"
    how = _Trace(trace, num_probes, distribution, seed, mode, sample_offset, step)
    grad = _gradient(gradient, f, x, choice, adjoint_params=adjoint_params, adjoint_rtol=adjoint_rtol,
                     adjoint_atol=adjoint_atol, trace=how, regularise=regularise)
    solution = _solve((adjoint.unit_velocity_terms, model_at), x, (t0, t1, t_grid), choice, how, grad,
                      max_num_evals=max_num_evals, progress=progress, desc=desc)
    z = solution.x
    base = (base_logp or standard_normal_logp)(z)
    return _result(solution, base.double(), math.prod(x.shape[1:]), bits_offset)
