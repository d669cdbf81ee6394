"""Deprecated module path: Poisson flow sampling lives in diffkern.sampling.pfgm."""
import warnings

from .sampling.pfgm import SOLVERS, TIMES, pfgm_forward, pfgm_prior, sample_pfgm  # noqa: F401

warnings.warn("diffkern.pfgm is deprecated: import from diffkern (or diffkern.sampling)", DeprecationWarning,
              stacklevel=2)
