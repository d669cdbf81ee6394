"""Hutchinson traces (``traces``) and log-likelihoods through the probability-flow ODE and CNFs
(``log_likelihood``)."""
from ..noise import PROBE_STREAM
from ..ode import ADAPTIVE_SOLVERS, ERROR_NORMS, FIXED_GRID_SOLVERS, SOLVERS
from .log_likelihood import (
                             TIME_GRIDS,
                             TRACES,
                             LogLikelihood,
                             cnf_log_likelihood,
                             likelihood_time_grid,
                             log_likelihood,
                             standard_normal_logp,
)
from .traces import DISTRIBUTIONS, MODES, basis_probes, exact_trace, hutchinson_trace, jacobian_products, probes

__all__ = ["ADAPTIVE_SOLVERS", "DISTRIBUTIONS", "ERROR_NORMS", "FIXED_GRID_SOLVERS", "MODES", "PROBE_STREAM",
           "SOLVERS", "TIME_GRIDS", "TRACES", "LogLikelihood", "basis_probes", "cnf_log_likelihood", "exact_trace",
           "hutchinson_trace", "jacobian_products", "likelihood_time_grid", "log_likelihood", "probes",
           "standard_normal_logp"]
