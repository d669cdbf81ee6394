"""k-diffusion's noise schedules and step helpers, under its names and with its dtypes (the schedules
are float32 tensors, as ``torch.linspace`` makes them, ending in 0)."""
from __future__ import annotations

import math

import torch

from .._validate import check_positive, check_positive_int, check_real


def append_zero(x: torch.Tensor) -> torch.Tensor:
    """x with a 0 appended (the last noise level of a schedule)."""
    return torch.cat([x, x.new_zeros([1])])


def _levels(n, sigma_min, sigma_max, zero_min: bool = False):
    n = check_positive_int("n", n)
    sigma_min = check_real("sigma_min", sigma_min) if zero_min else check_positive("sigma_min", sigma_min)
    sigma_max = check_positive("sigma_max", sigma_max)
    if sigma_min > sigma_max:
        raise ValueError(f"sigma_min must not exceed sigma_max, got {sigma_min} and {sigma_max}")
    return n, sigma_min, sigma_max


def get_sigmas_karras(n, sigma_min, sigma_max, rho=7., device="cpu") -> torch.Tensor:
    """Karras et al. (2022)'s schedule: sigma_i^(1/rho) evenly spaced from sigma_max down to sigma_min."""
    n, sigma_min, sigma_max = _levels(n, sigma_min, sigma_max, zero_min=True)
    rho = check_positive("rho", rho)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    ramp = torch.linspace(0, 1, n)
    return append_zero((hi + ramp * (lo - hi)) ** rho).to(device)


def get_sigmas_exponential(n, sigma_min, sigma_max, device="cpu") -> torch.Tensor:
    """log sigma evenly spaced from sigma_max down to sigma_min."""
    n, sigma_min, sigma_max = _levels(n, sigma_min, sigma_max)
    return append_zero(torch.linspace(math.log(sigma_max), math.log(sigma_min), n, device=device).exp())


def get_sigmas_polyexponential(n, sigma_min, sigma_max, rho=1., device="cpu") -> torch.Tensor:
    """log sigma = log sigma_min + ramp^rho (log sigma_max - log sigma_min), ramp from 1 down to 0."""
    n, sigma_min, sigma_max = _levels(n, sigma_min, sigma_max)
    rho = check_positive("rho", rho)
    ramp = torch.linspace(1, 0, n, device=device) ** rho
    return append_zero(torch.exp(ramp * (math.log(sigma_max) - math.log(sigma_min)) + math.log(sigma_min)))


def get_sigmas_vp(n, beta_d=19.9, beta_min=0.1, eps_s=1e-3, device="cpu") -> torch.Tensor:
    """The VP SDE's sigma(t) = sqrt(exp(beta_d t^2 / 2 + beta_min t) - 1) at t evenly spaced from 1 to eps_s."""
    n = check_positive_int("n", n)
    t = torch.linspace(1, check_positive("eps_s", eps_s), n, device=device)
    return append_zero(torch.sqrt(torch.exp(beta_d * t ** 2 / 2 + beta_min * t) - 1))


def to_d(x: torch.Tensor, sigma, denoised: torch.Tensor) -> torch.Tensor:
    """The probability-flow ODE's dx/dsigma = (x - D(x, sigma)) / sigma."""
    if isinstance(sigma, torch.Tensor):
        sigma = sigma.reshape(sigma.shape + (1,) * (x.dim() - sigma.dim()))
    return (x - denoised) / sigma


def get_ancestral_step(sigma_from, sigma_to, eta=1.):
    """(sigma_down, sigma_up) of an ancestral step from sigma_from to sigma_to: the deterministic step goes to
    sigma_down and noise of std sigma_up is added, with sigma_down^2 + sigma_up^2 = sigma_to^2 and
    sigma_up = min(sigma_to, eta sigma_to sqrt(1 - sigma_to^2 / sigma_from^2)). eta = 0: (sigma_to, 0)."""
    if not eta:
        return sigma_to, 0.
    sigma_up = min(sigma_to, eta * (sigma_to ** 2 * (sigma_from ** 2 - sigma_to ** 2) / sigma_from ** 2) ** 0.5)
    return (sigma_to ** 2 - sigma_up ** 2) ** 0.5, sigma_up


def default_noise_sampler(x: torch.Tensor):
    """k-diffusion's default noise: torch.randn_like(x) from torch's global generator, at every call."""
    return lambda sigma, sigma_next: torch.randn_like(x)
