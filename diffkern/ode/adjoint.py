"""Gradients of an ODE solve by the adjoint method (Pontryagin; Chen et al. 2018, FFJORD): the
forward solve keeps nothing for autograd, and the backward pass integrates the augmented state
(x, a_x, a_theta) from t1 back to t0 with the same fused Runge-Kutta stages.

For dx/dt = F(x, t) = a(t) x + b(t) m_theta(x, t) with the running costs of the solve,
q = int tr(dF/dx) dt (the log-density change, Hutchinson's probes held fixed over the trajectory)
and R = int r(x, t) dt (RNODE's regularisers), and a loss L(x(t1), q, R), the adjoint
a_x(t) = dL/dx(t) obeys, backwards from a_x(t1) = dL/dx(t1),

    da_x/dt     = -(a_x^T dF/dx + g_q d tr/dx + g_R . dr/dx)
    da_theta/dt = -(a_x^T dF/dtheta + g_q d tr/dtheta + g_R . dr/dtheta),   a_theta(t1) = 0,

with g_q = dL/dq and g_R = dL/dR constant (q and R do not feed back into the dynamics). Then
dL/dx(t0) = a_x(t0) and dL/dtheta = a_theta(t0). One vector-Jacobian product of the scalar
a_x . F + g_q tr + g_R . r per evaluation gives both right-hand sides; the trace estimate's own
dependence on x and theta comes from Jacobian products made with create_graph.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

from .. import ops
from . import rk
from .system import LinearODE, Solution, SolverChoice, model_times


def unit_velocity_terms(t):
    """(a, b) = (0, 1): dx/dt is the model output itself (CNFs; the adjoint's augmented state)."""
    if isinstance(t, torch.Tensor):
        return torch.zeros_like(t, dtype=torch.float64), torch.ones_like(t, dtype=torch.float64)
    if isinstance(t, tuple):
        return [0.0] * len(t), [1.0] * len(t)
    return 0.0, 1.0


@dataclass
class Flow:
    """F(x, t) = a(t) x + b(t) m(x, t) as the backward pass needs it.

    velocity_terms(t) -> (a, b) for a float t; model_at(t_batch) -> the network as a function of x;
    probes [K, B, ...] and trace_scale for the log-density (None: no trace); regulariser(x, m,
    products, a, b) -> float64 [B, R] or None; params: the tensors to differentiate (those that
    require grad)."""

    velocity_terms: Callable
    model_at: Callable
    probes: Optional[torch.Tensor] = None
    trace_scale: float = 1.0
    regulariser: Optional[Callable] = None
    params: tuple = ()
    forward_evals: int = field(default=0, init=False)
    backward_evals: int = field(default=0, init=False)


class _Adjoint(torch.autograd.Function):
    """forward(flow, forward_solve, backward_solve, x, *params) -> (x(t1), q, R); nothing of the
    trajectory is saved, only x(t1)."""

    @staticmethod
    def forward(ctx, flow, forward_solve, backward_solve, x, *params):
        with torch.no_grad():
            solution = forward_solve(x)
        flow.forward_evals = solution.num_evals
        ctx.backward_solve = backward_solve
        ctx.save_for_backward(solution.x)
        batch = x.shape[0]
        q = solution.log_density if solution.log_density is not None else x.new_zeros(batch, dtype=torch.float64)
        r = (solution.regularisers if solution.regularisers is not None
             else x.new_zeros(batch, 0, dtype=torch.float64))
        return solution.x, q, r

    @staticmethod
    def backward(ctx, grad_x, grad_q, grad_r):
        (x_end,) = ctx.saved_tensors
        grads = ctx.backward_solve(x_end, grad_x, grad_q, grad_r)
        return (None, None, None, *grads)


def _augmented_system(flow: Flow, like: torch.Tensor, grad_q, grad_r):
    """The augmented ODE d(x, a_x, a_theta)/dt on one flat row [1, 2 n + P] (n = x's elements)."""
    batch, n = like.shape[0], like.numel()
    features = n // batch if batch else 0
    params = flow.params
    need_trace = flow.probes is not None and grad_q is not None
    need_products = need_trace or (flow.regulariser is not None and grad_r is not None)

    def evaluate(y, t, _need_products):
        flow.backward_evals += 1
        z, a_z = y[0, :n].view(like.shape), y[0, n:2 * n].view(like.shape)
        a, b = flow.velocity_terms(t)
        with torch.enable_grad():
            z_in = z.detach().requires_grad_(True)
            m = flow.model_at(model_times(t, like))(z_in)
            m = m if m.dtype == like.dtype else m.to(like.dtype)
            velocity = a * z_in + b * m
            total = (a_z * velocity).sum()
            if need_products:
                v = flow.probes
                products = torch.autograd.grad(m, z_in, v if v.shape[0] > 1 else v[0], create_graph=True,
                                               allow_unused=True, is_grads_batched=v.shape[0] > 1)[0]
                products = torch.zeros_like(v) if products is None else products.reshape(v.shape)
                if need_trace:  # the trace as the solve's stages form it: a d + b tr(dm/dx), in float64
                    trace = a * features + b * ops.probe_trace(v, products, flow.trace_scale)
                    total = total + (grad_q * trace).sum().to(like.dtype)
                if flow.regulariser is not None and grad_r is not None:
                    total = total + (grad_r * flow.regulariser(z_in, m, products, a, b)).sum().to(like.dtype)
            wanted = [z_in] + [p for p in params]
            grads = torch.autograd.grad(total, wanted, allow_unused=True)
        pieces = [velocity.detach().reshape(-1)]
        for g, w in zip(grads, wanted):
            pieces.append(torch.zeros(w.numel(), dtype=like.dtype, device=like.device) if g is None
                          else -g.detach().reshape(-1).to(like.dtype))
        return torch.cat(pieces)[None], None

    return LinearODE(unit_velocity_terms, evaluate)


def solve(flow: Flow, forward_solve: Callable, x: torch.Tensor, span: tuple, backward_choice: SolverChoice, *,
          max_num_evals: int, progress: bool = False, desc: str = "") -> Solution:
    """forward_solve(x) -> Solution (run without autograd); the returned Solution's x, log_density and
    regularisers are differentiable by the adjoint method, its backward integrated from span[1] to
    span[0] with ``backward_choice`` (on the reversed grid span[2] when that is given)."""
    t0, t1, grid = span
    batch = x.shape[0]
    params = flow.params

    def backward_solve(x_end, grad_x, grad_q, grad_r):
        n = x_end.numel()
        if grad_q is not None and (grad_q.numel() != batch or not bool(grad_q.any())):
            grad_q = None
        if grad_r is not None and (grad_r.numel() == 0 or not bool(grad_r.any())):
            grad_r = None
        a_x = grad_x if grad_x is not None else torch.zeros_like(x_end)
        state = torch.cat([x_end.detach().reshape(-1), a_x.detach().reshape(-1).to(x_end.dtype)]
                          + [torch.zeros(p.numel(), dtype=x_end.dtype, device=x_end.device) for p in params])[None]
        system = _augmented_system(flow, x_end, grad_q, grad_r)
        reversed_grid = None if grid is None else [float(t) for t in reversed(list(grid))]
        end = rk.solve(system, state, float(t1), float(t0), backward_choice, max_num_evals=max_num_evals,
                       progress=progress, desc=f"{desc} adjoint" if desc else "adjoint", grid=reversed_grid).x[0]
        grad_x0 = end[n:2 * n].view(x_end.shape) if x_requires_grad else None
        offset, grad_params = 2 * n, []
        for p in params:
            grad_params.append(end[offset:offset + p.numel()].view(p.shape).to(p.dtype))
            offset += p.numel()
        return (grad_x0, *grad_params)

    x_requires_grad = x.requires_grad
    x_end, q, r = _Adjoint.apply(flow, forward_solve, backward_solve, x, *params)
    return Solution(x_end, q if flow.probes is not None else None, flow.forward_evals,
                    r if flow.regulariser is not None else None)


def resolve_params(model, adjoint_params, x: torch.Tensor, *, model_name: str = "the model", x_name: str = "x"):
    """The tensors the adjoint differentiates: ``adjoint_params`` (default: the model's parameters when it
    is an nn.Module), those that require grad; an error names what is missing."""
    if adjoint_params is None:
        if not isinstance(model, torch.nn.Module):
            raise ValueError(f"gradient='adjoint' needs the tensors to differentiate: pass adjoint_params=(the "
                             f"model's parameters) when {model_name} is not an nn.Module")
        adjoint_params = model.parameters()
    try:
        params = tuple(adjoint_params)
    except TypeError:
        raise ValueError("adjoint_params must be an iterable of tensors (the model's parameters)") from None
    if not all(isinstance(p, torch.Tensor) for p in params):
        raise ValueError("adjoint_params must be an iterable of tensors (the model's parameters)")
    params = tuple(p for p in params if p.requires_grad)
    if not params and not x.requires_grad:
        raise ValueError(f"gradient='adjoint' with nothing to differentiate: neither {x_name} nor any of the "
                         "model's parameters (adjoint_params) requires grad")
    return params


def backward_choice(choice: SolverChoice, adjoint_rtol, adjoint_atol) -> SolverChoice:
    """The backward solve's solver: adaptive steps to the adjoint tolerances (default: the forward's) on the
    whole augmented state, or the forward's fixed grid reversed (which takes no tolerances)."""
    if choice.num_steps is not None:
        for name, value in (("adjoint_rtol", adjoint_rtol), ("adjoint_atol", adjoint_atol)):
            if value is not None:
                raise ValueError(f"{name} goes with adaptive steps (no num_steps); fixed steps run the adjoint on "
                                 "the reversed grid")
        return choice
    return choice._replace(rtol=check_tolerance("adjoint_rtol", adjoint_rtol, choice.rtol),
                           atol=check_tolerance("adjoint_atol", adjoint_atol, choice.atol), error_norm="batch")


def check_tolerance(name: str, value, default: float) -> float:
    """An adjoint tolerance: default to the forward solve's, else a finite number > 0."""
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
    return float(value)
