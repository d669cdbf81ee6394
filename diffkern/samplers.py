"""Deprecated module path: the samplers live in diffkern.sampling (one module per family)."""
import warnings

from .sampling import (  # noqa: F401
                       classifier_grad,
                       sample_ddim,
                       sample_ddpm,
                       sample_euler,
                       sample_euler_ancestral,
                       sample_euler_maruyama,
                       sample_heun,
                       sample_langevin,
                       sample_ode,
                       sample_pc,
)

warnings.warn("diffkern.samplers is deprecated: import from diffkern (or diffkern.sampling)", DeprecationWarning,
              stacklevel=2)
