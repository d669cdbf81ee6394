"""Samplers on EDM / k-diffusion noise levels (Karras et al. 2022): ``denoiser(x, sigma)`` takes sigma
as a float tensor [batch] and returns D(x, sigma), the estimate of x0 from x = x0 + sigma z. Each
starts from sigmas[0] * N(0, I) and every noisy launch draws the run's next stream step."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch

from .. import coefficients
from .._graph import constant_levels, plan
from .._model import model_output_of
from .._validate import check_real
from ..sde import check_sigmas
from ._engine import Run, RunSpec


@dataclass(frozen=True)
class Churn:
    """EDM's stochastic churn (Alg. 2): S_churn, S_tmin, S_tmax, S_noise."""

    s_churn: float = 0.0
    s_tmin: float = 0.0
    s_tmax: float = float("inf")
    s_noise: float = 1.0

    def check(self) -> "Churn":
        return Churn(check_real("s_churn", self.s_churn), check_real("s_tmin", self.s_tmin, allow_inf=True),
                     check_real("s_tmax", self.s_tmax, allow_inf=True), check_real("s_noise", self.s_noise))


@plan
def _edm_plan(sigmas, churn: tuple):
    """The levels, sigma_hat, which steps churn and which end above 0 (lists), and the churn, Euler and
    Heun-corrector rows (float64) of EDM's Alg. 2 over ``sigmas`` with ``churn`` (Churn's fields)."""
    sigmas = check_sigmas(sigmas)
    churn = Churn(*churn).check()
    steps = len(sigmas) - 1
    # EDM Alg. 2: raise sigma_i to sigma_hat = sigma_i (1 + gamma_i) by adding noise, then step.
    gamma = torch.where((sigmas[:-1] >= churn.s_tmin) & (sigmas[:-1] <= churn.s_tmax),
                        torch.full((steps,), min(churn.s_churn / steps, 2 ** 0.5 - 1), dtype=torch.float64),
                        torch.zeros(steps, dtype=torch.float64))
    sigma_hat = sigmas[:-1] * (1 + gamma)
    nonzero_next = sigmas[1:].clamp(min=1e-30)  # rows of the last step are unused when sigma_next = 0
    tables = (coefficients.churn_rows(sigmas[:-1], sigma_hat, churn.s_noise),
              coefficients.edm_euler_rows(sigma_hat, sigmas[1:]),
              coefficients.edm_heun_corrector_rows(sigma_hat, nonzero_next))
    return sigmas.tolist(), sigma_hat.tolist(), (gamma > 0).tolist(), (sigmas[1:] > 0).tolist(), tables


def _edm_sampler(denoiser, sigmas, spec: RunSpec, churn: Churn, heun: bool) -> torch.Tensor:
    levels, sigma_hat, churned, next_positive, tables = _edm_plan(
        constant_levels("sigmas", sigmas), (churn.s_churn, churn.s_tmin, churn.s_tmax, churn.s_noise))
    steps = len(levels) - 1
    run = Run(spec, "sigma")
    churn_table, euler, corrector = (run.fused_table(rows) for rows in tables)
    sigma_hat_batch, sigma_batch = run.per_step(sigma_hat), run.per_step(levels)
    x = run.initial(levels[0])
    for i in run.steps(steps, "Heun" if heun else "Euler"):
        if churned[i]:
            x = run.step(x, churn_table, i, noisy=True)
        denoised = model_output_of(denoiser(x, sigma_hat_batch[i]))
        if heun and next_positive[i]:
            x_pred = run.step(x, euler, i, denoised, into="predicted")
            denoised_next = model_output_of(denoiser(x_pred, sigma_batch[i + 1]))
            x = run.step(x, corrector, i, denoised_next, third=denoised)
        else:
            x = run.step(x, euler, i, denoised)
        if run.callback is not None:
            run.report(i, (levels[i], levels[i + 1]), x, denoised)
    return x


def sample_euler(denoiser, shape, sigmas, *, s_churn: float = 0.0, s_tmin: float = 0.0,
                 s_tmax: float = float("inf"), s_noise: float = 1.0, seed: int = 0, device=None,
                 dtype: torch.dtype = torch.float32, sample_offset: int = 0, x_T=None, progress: bool = False,
                 callback: Optional[Callable] = None) -> torch.Tensor:
    """Euler on the EDM ODE over ``sigmas`` (decreasing, e.g. dk.karras_sigmas(n, ...) ending in 0),
    with EDM's stochastic churn; k-diffusion's sample_euler. Starts from sigmas[0] * N(0, I)."""
    spec = RunSpec(shape, seed, device, dtype, sample_offset, x_T, progress, callback)
    return _edm_sampler(denoiser, sigmas, spec, Churn(s_churn, s_tmin, s_tmax, s_noise), heun=False)


def sample_heun(denoiser, shape, sigmas, *, s_churn: float = 0.0, s_tmin: float = 0.0,
                s_tmax: float = float("inf"), s_noise: float = 1.0, seed: int = 0, device=None,
                dtype: torch.dtype = torch.float32, sample_offset: int = 0, x_T=None, progress: bool = False,
                callback: Optional[Callable] = None) -> torch.Tensor:
    """EDM's second-order sampler (Karras et al. 2022, Alg. 2): Heun steps with stochastic churn
    (S_churn, S_tmin, S_tmax, S_noise), and a plain Euler step when the next sigma is 0. Two denoiser
    calls per step (one on the last)."""
    spec = RunSpec(shape, seed, device, dtype, sample_offset, x_T, progress, callback)
    return _edm_sampler(denoiser, sigmas, spec, Churn(s_churn, s_tmin, s_tmax, s_noise), heun=True)


def sample_euler_ancestral(denoiser, shape, sigmas, *, eta: float = 1.0, s_noise: float = 1.0, seed: int = 0,
                           device=None, dtype: torch.dtype = torch.float32, sample_offset: int = 0, x_T=None,
                           progress: bool = False, callback: Optional[Callable] = None) -> torch.Tensor:
    """Ancestral sampling with Euler steps (k-diffusion's sample_euler_ancestral): each step goes
    deterministically to sigma_down and adds s_noise sigma_up z (none when the next sigma is 0)."""
    levels, next_positive, rows = _ancestral_plan(constant_levels("sigmas", sigmas), eta, s_noise)
    run = Run(RunSpec(shape, seed, device, dtype, sample_offset, x_T, progress, callback), "sigma")
    table = run.fused_table(rows)
    sigma_batch = run.per_step(levels)
    x = run.initial(levels[0])
    for i in run.steps(len(levels) - 1, "Euler-ancestral"):
        denoised = model_output_of(denoiser(x, sigma_batch[i]))
        x = run.step(x, table, i, denoised, noisy=next_positive[i] and eta > 0)
        if run.callback is not None:
            run.report(i, (levels[i], levels[i + 1]), x, denoised)
    return x


@plan
def _ancestral_plan(sigmas, eta, s_noise):
    """The levels, which steps end above 0, and the rows of Euler-ancestral over ``sigmas``."""
    sigmas = check_sigmas(sigmas)
    eta, s_noise = check_real("eta", eta), check_real("s_noise", s_noise)
    rows = coefficients.euler_ancestral_rows(sigmas[:-1], sigmas[1:], eta, s_noise)
    return sigmas.tolist(), (sigmas[1:] > 0).tolist(), rows
