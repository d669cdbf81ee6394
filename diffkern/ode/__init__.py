"""ODE solvers of the probability-flow ODE and CNFs: Butcher tableaus (``tableaus``), step-size
control (``control``), the embedded Runge-Kutta pairs (``rk``), fixed-grid Euler / Heun with the
trace (``fixed``), and the choice of solver (``system``)."""
from .system import (
                     ADAPTIVE_SOLVERS,
                     ERROR_NORMS,
                     FIXED_GRID_SOLVERS,
                     SOLVERS,
                     LinearODE,
                     SolverChoice,
                     fixed_grid_evaluations,
                     model_times,
                     resolve_solver,
)
from .tableaus import TABLEAUS, Tableau

__all__ = ["ADAPTIVE_SOLVERS", "ERROR_NORMS", "FIXED_GRID_SOLVERS", "SOLVERS", "TABLEAUS", "LinearODE",
           "SolverChoice", "Tableau", "fixed_grid_evaluations", "model_times", "resolve_solver"]
