"""Score SDEs (Song et al. 2021) in float64 host math, and conversions between model parameterisations.

Each SDE dx = f(t) x dt + g(t) dw on t in [0, T] (T = 1) has a linear drift, so the fused kernels
take it as coefficient rows. Its marginal is x_t = m(t) x_0 + std(t) z. Methods accept a float or a
tensor t and compute in float64 on t's device (no host sync). Definitions as in score_sde:

- VPSDE: beta(t) = beta_min + t (beta_max - beta_min), f = -beta / 2, g = sqrt(beta),
  m = exp(-t^2 (beta_max - beta_min) / 4 - t beta_min / 2), std = sqrt(1 - m^2); prior N(0, I).
- SubVPSDE: the same f, g^2 = beta (1 - exp(-2 beta_min t - (beta_max - beta_min) t^2)),
  std = 1 - m^2; prior N(0, I).
- VESDE: sigma(t) = sigma_min (sigma_max / sigma_min)^t, f = 0, g = sigma(t) sqrt(2 log(sigma_max /
  sigma_min)), m = 1, std = sigma(t); prior N(0, sigma_max^2 I).
"""
from __future__ import annotations

import math
import numbers
from typing import Callable, Optional, Union

import torch

from ._graph import PlanArgument, plan
from ._validate import check_positive_int
from .noise import randn

TimeLike = Union[float, torch.Tensor]
PARAMETERIZATIONS = ("score", "epsilon")


def _t64(t: TimeLike) -> torch.Tensor:
    return t.to(torch.float64) if isinstance(t, torch.Tensor) else torch.tensor(float(t), dtype=torch.float64)


class SDE(PlanArgument):
    """Base class: subclasses define drift_coef, diffusion, mean_coef, marginal_std and prior_std."""

    T = 1.0

    def __init__(self):
        # (here so that the class's signature is this one, not PlanArgument.__new__'s catch-all)
        super().__init__()

    def drift_coef(self, t: TimeLike) -> torch.Tensor:
        """f(t) with drift f(x, t) = f(t) x."""
        raise NotImplementedError

    def diffusion(self, t: TimeLike) -> torch.Tensor:
        """g(t)."""
        raise NotImplementedError

    def mean_coef(self, t: TimeLike) -> torch.Tensor:
        """m(t): E[x_t | x_0] = m(t) x_0."""
        raise NotImplementedError

    def marginal_std(self, t: TimeLike) -> torch.Tensor:
        """std(t): x_t | x_0 ~ N(m(t) x_0, std(t)^2 I)."""
        raise NotImplementedError

    prior_std = 1.0

    def drift(self, x: torch.Tensor, t: TimeLike) -> torch.Tensor:
        return _per_sample(self.drift_coef(t), x) * x

    def marginal(self, x0: torch.Tensor, t: TimeLike):
        """(mean, std) of x_t given x_0."""
        return _per_sample(self.mean_coef(t), x0) * x0, self.marginal_std(t)

    def prior_sample(self, shape, seed: int = 0, step: int = 0, sample_offset: int = 0, device=None,
                     dtype=torch.float32) -> torch.Tensor:
        """x_T ~ N(0, prior_std^2 I) from the noise stream (seed, step, sample_offset)."""
        return randn(shape, seed=seed, step=step, sample_offset=sample_offset, device=device,
                     dtype=dtype) * self.prior_std

    def prior_logp(self, z: torch.Tensor) -> torch.Tensor:
        """log N(z; 0, prior_std^2 I) per sample (sum over all but dim 0), in float64."""
        z = z.flatten(1).double() if z.dim() > 1 else z.reshape(-1, 1).double()
        d = z.shape[1]
        return -0.5 * d * math.log(2 * math.pi * self.prior_std ** 2) - (z ** 2).sum(1) / (2 * self.prior_std ** 2)

    def score_scale(self, t: TimeLike, parameterization: str = "score"):
        """The factor that turns a model's output into the score at t: 1 for a score model
        (``parameterization="score"``), -1 / std(t) for a noise prediction ("epsilon"). A float for a
        float t and a score model, else a float64 tensor of t's shape."""
        if parameterization == "score":
            return torch.ones_like(t, dtype=torch.float64) if isinstance(t, torch.Tensor) else 1.0
        if parameterization == "epsilon":
            return -1.0 / self.marginal_std(t)
        raise ValueError(f"parameterization must be one of {PARAMETERIZATIONS}, got {parameterization!r}")

    def velocity_terms(self, parameterization: str = "score"):
        """The probability-flow ODE dx/dt = a(t) x + b(t) m(x, t) of a model with output m: the function
        t -> (a, b) with a = f(t), b = -g(t)^2 scale(t) / 2 (``score_scale``). It returns floats for a
        float t, lists for a tuple of floats, and float64 tensors for a tensor t (per-sample times)."""
        self.score_scale(0.5, parameterization)  # checks parameterization

        def terms(t):
            if not isinstance(t, torch.Tensor):  # a float, or a tuple of floats (a step's stage times)
                return _velocity_terms_at(self, parameterization, t)
            t64 = t.to(torch.float64)
            return self.drift_coef(t64), -0.5 * self.diffusion(t64) ** 2 * self.score_scale(t64, parameterization)
        return terms

    def time_grid(self, num_steps: int, eps: float) -> torch.Tensor:
        """num_steps + 1 equal steps from T down to eps (float64): the samplers' grid."""
        check_positive_int("num_steps", num_steps)
        if isinstance(eps, bool) or not isinstance(eps, numbers.Real) or not 0 < eps < self.T:
            raise ValueError(f"eps must lie in (0, {self.T}), got {eps!r}")
        return torch.linspace(self.T, eps, num_steps + 1, dtype=torch.float64)

    def check_time(self, t: TimeLike, name: str = "t") -> None:
        if isinstance(t, torch.Tensor):
            if t.device.type == "cpu" and t.numel() and not bool(((t > 0) & (t <= self.T)).all()):
                raise ValueError(f"{name} must lie in (0, {self.T}], got values in [{float(t.min())}, "
                                 f"{float(t.max())}]")
        elif not 0 < float(t) <= self.T:
            raise ValueError(f"{name} must lie in (0, {self.T}], got {t}")


def _per_sample(coef: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """A coefficient of shape [] or [B] broadcast against x [B, ...], in x's dtype and device."""
    coef = coef.to(device=x.device, dtype=x.dtype)
    return coef.reshape(-1, *([1] * (x.dim() - 1))) if coef.dim() else coef


@plan
def _velocity_terms_at(sde: SDE, parameterization: str, t) -> tuple:
    """velocity_terms at a float time (floats) or at a tuple of them (two lists, computed at once), as a
    plan: constants of a compiled graph."""
    t64 = torch.tensor(t, dtype=torch.float64)
    a, b = sde.drift_coef(t64), -0.5 * sde.diffusion(t64) ** 2 * sde.score_scale(t64, parameterization)
    return a.tolist(), b.tolist()


class VPSDE(SDE):
    def __init__(self, beta_min: float = 0.1, beta_max: float = 20.0, N: int = 1000):
        if not 0 < beta_min < beta_max:
            raise ValueError(f"need 0 < beta_min < beta_max, got {beta_min}, {beta_max}")
        self.beta_min, self.beta_max, self.N = float(beta_min), float(beta_max), int(N)

    def __repr__(self):
        return f"{type(self).__name__}(beta_min={self.beta_min}, beta_max={self.beta_max})"

    def beta(self, t: TimeLike) -> torch.Tensor:
        return self.beta_min + _t64(t) * (self.beta_max - self.beta_min)

    def drift_coef(self, t):
        return -0.5 * self.beta(t)

    def diffusion(self, t):
        return self.beta(t).sqrt()

    def _log_mean_coef(self, t):
        t = _t64(t)
        return -0.25 * t ** 2 * (self.beta_max - self.beta_min) - 0.5 * t * self.beta_min

    def mean_coef(self, t):
        return self._log_mean_coef(t).exp()

    def marginal_std(self, t):
        return (-torch.expm1(2 * self._log_mean_coef(t))).sqrt()

    def discrete_beta(self, t: TimeLike, N: Optional[int] = None) -> torch.Tensor:
        """beta_i of the N-step DDPM chain (default N: self.N) at the step of t (score_sde's
        discretisation, with which its predictor-corrector sampler takes N steps)."""
        N = self.N if N is None else int(N)
        index = (_t64(t) * (N - 1) / self.T).long()
        return (self.beta_min + index.double() * (self.beta_max - self.beta_min) / (N - 1)) / N


class SubVPSDE(VPSDE):
    def diffusion(self, t):
        t = _t64(t)
        return (self.beta(t) * -torch.expm1(-2 * self.beta_min * t - (self.beta_max - self.beta_min) * t ** 2)).sqrt()

    def marginal_std(self, t):
        return -torch.expm1(2 * self._log_mean_coef(t))


class VESDE(SDE):
    def __init__(self, sigma_min: float = 0.01, sigma_max: float = 50.0):
        if not 0 < sigma_min < sigma_max:
            raise ValueError(f"need 0 < sigma_min < sigma_max, got {sigma_min}, {sigma_max}")
        self.sigma_min, self.sigma_max = float(sigma_min), float(sigma_max)
        self.prior_std = self.sigma_max

    def __repr__(self):
        return f"VESDE(sigma_min={self.sigma_min}, sigma_max={self.sigma_max})"

    def sigma(self, t: TimeLike) -> torch.Tensor:
        return self.sigma_min * (self.sigma_max / self.sigma_min) ** _t64(t)

    def drift_coef(self, t):
        return torch.zeros_like(_t64(t))

    def diffusion(self, t):
        return self.sigma(t) * math.sqrt(2 * math.log(self.sigma_max / self.sigma_min))

    def mean_coef(self, t):
        return torch.ones_like(_t64(t))

    def marginal_std(self, t):
        return self.sigma(t)


def karras_sigmas(n: int, sigma_min: float, sigma_max: float, rho: float = 7.0) -> torch.Tensor:
    """The noise levels of Karras et al. (2022), eq. 5: n levels from sigma_max down to sigma_min,
    evenly spaced in sigma^(1/rho), then a final 0 (as k-diffusion's get_sigmas_karras); float64."""
    check_positive_int("n", n)
    if not 0 < sigma_min < sigma_max:
        raise ValueError(f"need 0 < sigma_min < sigma_max, got {sigma_min}, {sigma_max}")
    ramp = torch.linspace(0, 1, n, dtype=torch.float64)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return torch.cat([(hi + ramp * (lo - hi)) ** rho, torch.zeros(1, dtype=torch.float64)])


def check_sigmas(sigmas) -> torch.Tensor:
    """A float64 CPU tensor of noise levels, non-negative and strictly decreasing (a final 0 allowed)."""
    sigmas = torch.as_tensor(sigmas, dtype=torch.float64).flatten().cpu()
    if sigmas.numel() < 2:
        raise ValueError("sigmas needs at least two levels (a start and an end)")
    if bool((sigmas < 0).any()) or not bool(torch.isfinite(sigmas).all()):
        raise ValueError(f"sigmas must be finite and non-negative, got {sigmas.tolist()[:8]}")
    if not bool((sigmas[1:] < sigmas[:-1]).all()):
        raise ValueError("sigmas must be strictly decreasing (from the noisiest level down)")
    return sigmas


# ---- model parameterisations ----

def score_from_epsilon(eps_fn: Callable, sde: SDE) -> Callable:
    """score(x, t) = -eps(x, t) / std(t) for a noise-prediction model."""
    def score(x, t):
        return -eps_fn(x, t) / _per_sample(sde.marginal_std(t), x)
    return score


def epsilon_from_score(score_fn: Callable, sde: SDE) -> Callable:
    """eps(x, t) = -std(t) score(x, t)."""
    def eps(x, t):
        return -_per_sample(sde.marginal_std(t), x) * score_fn(x, t)
    return eps


def score_from_denoiser(denoiser: Callable) -> Callable:
    """score(x, sigma) = (D(x, sigma) - x) / sigma^2 for a denoiser of x = x0 + sigma z (EDM, VE)."""
    def score(x, sigma):
        s = _per_sample(torch.as_tensor(sigma, dtype=torch.float64), x)
        return (denoiser(x, sigma) - x) / s ** 2
    return score


def denoiser_from_score(score_fn: Callable) -> Callable:
    """D(x, sigma) = x + sigma^2 score(x, sigma) (Tweedie's formula)."""
    def denoiser(x, sigma):
        s = _per_sample(torch.as_tensor(sigma, dtype=torch.float64), x)
        return x + s ** 2 * score_fn(x, sigma)
    return denoiser
