"""Samplers on EDM / k-diffusion noise levels (Karras et al. 2022): ``denoiser(x, sigma)`` takes sigma
as a float tensor [batch] and returns D(x, sigma), the estimate of x0 from x = x0 + sigma z. Each
starts from sigmas[0] * N(0, I) and every noisy launch draws the run's next stream step."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch

from .. import coefficients
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


def _edm_sampler(denoiser, sigmas, spec: RunSpec, churn: Churn, heun: bool) -> torch.Tensor:
    sigmas = check_sigmas(sigmas)
    churn = churn.check()
    steps = len(sigmas) - 1
    run = Run(spec, "sigma")
    # EDM Alg. 2: raise sigma_i to sigma_hat = sigma_i (1 + gamma_i) by adding noise, then step.
    gamma = torch.where((sigmas[:-1] >= churn.s_tmin) & (sigmas[:-1] <= churn.s_tmax),
                        torch.full((steps,), min(churn.s_churn / steps, 2 ** 0.5 - 1), dtype=torch.float64),
                        torch.zeros(steps, dtype=torch.float64))
    sigma_hat = sigmas[:-1] * (1 + gamma)
    churn_table = run.fused_table(coefficients.churn_rows(sigmas[:-1], sigma_hat, churn.s_noise))
    euler = run.fused_table(coefficients.edm_euler_rows(sigma_hat, sigmas[1:]))
    nonzero_next = sigmas[1:].clamp(min=1e-30)  # rows of the last step are unused when sigma_next = 0
    corrector = run.fused_table(coefficients.edm_heun_corrector_rows(sigma_hat, nonzero_next))
    sigma_hat_batch, sigma_batch = run.per_step(sigma_hat), run.per_step(sigmas)
    churned, next_positive = (gamma > 0).tolist(), (sigmas[1:] > 0).tolist()
    levels = sigmas.tolist()
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
    sigmas = check_sigmas(sigmas)
    eta, s_noise = check_real("eta", eta), check_real("s_noise", s_noise)
    run = Run(RunSpec(shape, seed, device, dtype, sample_offset, x_T, progress, callback), "sigma")
    table = run.fused_table(coefficients.euler_ancestral_rows(sigmas[:-1], sigmas[1:], eta, s_noise))
    sigma_batch, next_positive = run.per_step(sigmas), (sigmas[1:] > 0).tolist()
    levels = sigmas.tolist()
    x = run.initial(levels[0])
    for i in run.steps(len(levels) - 1, "Euler-ancestral"):
        denoised = model_output_of(denoiser(x, sigma_batch[i]))
        x = run.step(x, table, i, denoised, noisy=next_positive[i] and eta > 0)
        if run.callback is not None:
            run.report(i, (levels[i], levels[i + 1]), x, denoised)
    return x
