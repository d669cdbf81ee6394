"""Deprecated module path: DPM-Solver++ and flow matching live in diffkern.sampling."""
import warnings

from .sampling import sample_dpmpp, sample_flow  # noqa: F401

warnings.warn("diffkern.solvers is deprecated: import from diffkern (or diffkern.sampling)", DeprecationWarning,
              stacklevel=2)
