"""Deprecated module path: the Runge-Kutta solvers live in diffkern.ode (tableaus, control, rk)."""
import warnings

from .ode.rk import solve  # noqa: F401
from .ode.tableaus import TABLEAUS, Tableau  # noqa: F401

warnings.warn("diffkern.rk is deprecated: import from diffkern.ode", DeprecationWarning, stacklevel=2)
