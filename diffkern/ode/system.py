"""The ODE every solver of diffkern integrates, and the choice of solver.

Probability-flow ODEs and CNFs are both dx/dt = F(x, t) = a(t) x + b(t) m(x, t), m the network's
output: a(t) = f(t), b(t) = -g(t)^2 scale(t) / 2 for a score SDE (``SDE.velocity_terms``), a = 0,
b = 1 for a CNF. With Hutchinson probes the solvers also integrate the log-density change
q = int tr(dF/dx) dt = int (a(t) d + b(t) tr(dm/dx)) dt (d features per sample).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, NamedTuple, Optional

import torch

from .._validate import check_choice, check_positive_int, check_real
from .tableaus import EMBEDDED_PAIRS, TABLEAUS

FIXED_GRID_SOLVERS = ("euler", "heun", "rk4")
ADAPTIVE_SOLVERS = EMBEDDED_PAIRS  # dopri5, bosh3
SOLVERS = ("auto",) + FIXED_GRID_SOLVERS + ADAPTIVE_SOLVERS
# "batch": the worst sample's error decides the batch's step; "rms": the root mean square of the samples'
# errors does (torchdiffeq's RMS over the whole state, to within the max over x and log p each
# sample takes); "sample": every sample steps alone
ERROR_NORMS = ("batch", "rms", "sample")
DEFAULT_RTOL = DEFAULT_ATOL = 1e-5  # score_sde's likelihood tolerances
DEFAULT_NUM_STEPS = 100


@dataclass(frozen=True)
class LinearODE:
    """dx/dt = a(t) x + b(t) m(x, t).

    velocity_terms(t) -> (a, b): floats for a float t, lists for a tuple of floats (a step's stage
    times, at once), float64 tensors [B] for a tensor t (per-sample times). evaluate(x, t,
    need_products) -> (m, products): the model output at x (t a float or a float64 tensor [B]) and,
    when need_products, its Jacobian products with the probes [K, B, ...] (else None). With
    ``probes`` the solvers also integrate the trace, scaled by ``trace_scale``."""

    velocity_terms: Callable
    evaluate: Callable
    probes: Optional[torch.Tensor] = None
    trace_scale: float = 1.0
    # regulariser(x, m, products, a, b) -> float64 [B, R]: integrands integrated alongside (RNODE's
    # kinetic energy and Jacobian norm) with the solution's weights on the accepted steps
    regulariser: Optional[Callable] = None


class Solution(NamedTuple):
    """A solve's end: x(t1), the log-density integral [B] (None without probes), the model evaluations
    and the regularisers' integrals [B, R] (None without a regulariser)."""

    x: torch.Tensor
    log_density: Optional[torch.Tensor]
    num_evals: int
    regularisers: Optional[torch.Tensor] = None


def model_times(t, like: torch.Tensor) -> torch.Tensor:
    """The times a model is called with for the state ``like`` [B, ...]: a float t as a tensor [B], a
    tensor of per-sample times as it is; float64 for a float64 state, else float32."""
    dtype = torch.float64 if like.dtype == torch.float64 else torch.float32
    if isinstance(t, torch.Tensor):
        return t.to(dtype)
    return torch.full((like.shape[0],), t, dtype=dtype, device=like.device)


class SolverChoice(NamedTuple):
    """A checked choice of solver: fixed steps (num_steps given) or adaptive ones (rtol, atol,
    error_norm)."""

    solver: str
    num_steps: Optional[int]
    rtol: float
    atol: float
    error_norm: str


def resolve_solver(solver, num_steps, rtol, atol, error_norm, *, max_num_evals: int,
                   fixed_grid_options=()) -> SolverChoice:
    """Checks the solver arguments of log_likelihood / cnf_log_likelihood / sample_ode. "auto" is
    dopri5 unless num_steps is given (then Heun on that grid). A fixed grid that needs more than
    ``max_num_evals`` model evaluations is refused here, before any is made. fixed_grid_options:
    (name, value, default) of arguments only the fixed grids read."""
    check_choice("solver", solver, SOLVERS)
    check_positive_int("max_num_evals", max_num_evals)
    if solver == "auto":
        solver = "dopri5" if num_steps is None else "heun"
    if solver in FIXED_GRID_SOLVERS or num_steps is not None:
        for name, value in (("rtol", rtol), ("atol", atol), ("error_norm", error_norm)):
            if value is not None:
                raise ValueError(f"{name} goes with adaptive steps (solver in {ADAPTIVE_SOLVERS} without num_steps); "
                                 f"solver={solver!r} with num_steps takes fixed steps")
        num_steps = check_positive_int("num_steps", DEFAULT_NUM_STEPS if num_steps is None else num_steps)
        choice = SolverChoice(solver, num_steps, 0.0, 0.0, "batch")
        needed = fixed_grid_evaluations(choice)
        if needed > max_num_evals:
            raise ValueError(f"solver={solver!r} with num_steps={num_steps} makes {needed} model evaluations, more "
                             f"than max_num_evals={max_num_evals}: raise max_num_evals or take fewer steps")
        return choice
    for name, value, default in fixed_grid_options:
        if value != default:
            raise ValueError(f"{name} goes with the fixed-grid solvers {FIXED_GRID_SOLVERS}, not solver={solver!r}")
    rtol = DEFAULT_RTOL if rtol is None else check_real("rtol", rtol)
    atol = DEFAULT_ATOL if atol is None else check_real("atol", atol)
    if not 0 <= rtol < 1:
        raise ValueError(f"rtol must lie in [0, 1), got {rtol}")
    if not atol > 0:
        raise ValueError(f"atol must be > 0, got {atol}")
    error_norm = check_choice("error_norm", "batch" if error_norm is None else error_norm, ERROR_NORMS)
    return SolverChoice(solver, None, rtol, atol, error_norm)


def fixed_grid_evaluations(choice: SolverChoice) -> int:
    """Model evaluations of a fixed-grid solve: Euler one per step, Heun two; a Runge-Kutta pair one
    at the start and then one per stage after the first (first-same-as-last)."""
    if choice.solver in ("euler", "heun"):  # diffkern.ode.fixed: no evaluation carried between steps
        return choice.num_steps * (1 if choice.solver == "euler" else 2)
    return 1 + choice.num_steps * (len(TABLEAUS[choice.solver].c) - 1)
