"""Closed-form diffusion "models" for Gaussian data, written from the math (not from diffkern):
with x0 ~ N(mu, diag(s^2)) and x_t = sqrt(abar) x0 + sqrt(1 - abar) eps, x_t ~ N(sqrt(abar) mu,
abar s^2 + 1 - abar), so E[eps | x_t] = sqrt(1 - abar) (x_t - sqrt(abar) mu) / (abar s^2 + 1 - abar)."""
import math

import torch


class GaussianModel:
    """The exact epsilon / sample / v prediction of N(mu, diag(s^2)) data under a DDPM schedule."""

    def __init__(self, mu, s, alphas_cumprod, prediction_type="epsilon"):
        self.mu = torch.as_tensor(mu, dtype=torch.float64)
        self.s = torch.as_tensor(s, dtype=torch.float64)
        self.alphas_cumprod = torch.as_tensor(alphas_cumprod, dtype=torch.float64)
        self.prediction_type = prediction_type
        self.calls = 0

    def abar(self, t, x):
        return self.alphas_cumprod.to(x.device)[t.long()].reshape(-1, *([1] * (x.dim() - 1)))

    def eps(self, x, t):
        ab = self.abar(t, x)
        x64 = x.double()
        return (1 - ab).sqrt() * (x64 - ab.sqrt() * self.mu.to(x.device)) / (ab * self.s.to(x.device) ** 2 + 1 - ab)

    def __call__(self, x, t, *unused):
        self.calls += 1
        ab = self.abar(t, x)
        eps = self.eps(x, t)
        x0 = (x.double() - (1 - ab).sqrt() * eps) / ab.sqrt()
        out = {"epsilon": eps, "sample": x0, "v_prediction": ab.sqrt() * eps - (1 - ab).sqrt() * x0}
        return out[self.prediction_type].to(x.dtype)


def ddpm_chain_moments(mu, s, alphas_cumprod, timesteps, variance="fixed_small"):
    """Exact mean and variance of x_0 produced by ancestral DDPM sampling with the exact model from
    x_T ~ N(0, 1): every step is affine-Gaussian, x_prev = A x + B + sigma z, so the moments propagate
    in closed form. Written out from Ho et al. (2020), eqs. 6-7, with strided steps."""
    mean = torch.zeros_like(torch.as_tensor(mu, dtype=torch.float64))
    var = torch.ones_like(torch.as_tensor(s, dtype=torch.float64))
    mu, s = torch.as_tensor(mu, dtype=torch.float64), torch.as_tensor(s, dtype=torch.float64)
    for i, t in enumerate(timesteps):
        ab = float(alphas_cumprod[t])
        ab_prev = float(alphas_cumprod[timesteps[i + 1]]) if i + 1 < len(timesteps) else 1.0
        beta = 1 - ab / ab_prev
        # E[x0 | x_t] = mu + k (x_t - sqrt(ab) mu), k = sqrt(ab) s^2 / (ab s^2 + 1 - ab)
        k = math.sqrt(ab) * s ** 2 / (ab * s ** 2 + 1 - ab)
        c0 = math.sqrt(ab_prev) * beta / (1 - ab)
        ct = math.sqrt(ab / ab_prev) * (1 - ab_prev) / (1 - ab)
        A = c0 * k + ct
        B = c0 * (mu - k * math.sqrt(ab) * mu)
        sigma2 = 0.0 if ab_prev >= 1 else ((1 - ab_prev) / (1 - ab) * beta if variance == "fixed_small" else beta)
        mean, var = A * mean + B, A ** 2 * var + sigma2
    return mean, var.sqrt()


class GaussianMixture1d:
    """A 1-d mixture sum_k w_k N(mu_k, s_k^2) diffused by an SDE with x_t = m(t) x_0 + std(t) z: its
    marginal is sum_k w_k N(m mu_k, m^2 s_k^2 + std^2), so the exact score is the responsibility-
    weighted sum of the components' scores. Also for noise levels (VE / EDM: m = 1, std = sigma)."""

    def __init__(self, weights, means, stds):
        self.w = torch.tensor(weights, dtype=torch.float64)
        self.mu = torch.tensor(means, dtype=torch.float64)
        self.s = torch.tensor(stds, dtype=torch.float64)

    def _score(self, x, mean_coef, std):
        x64 = x.double()
        w, mu, s = (v.to(x.device) for v in (self.w, self.mu, self.s))  # the model follows x onto its device
        m, sd = mean_coef.reshape(-1, 1, 1), std.reshape(-1, 1, 1)
        var = m ** 2 * s ** 2 + sd ** 2
        log_comp = torch.log(w) - 0.5 * torch.log(2 * math.pi * var) - (x64[..., None] - m * mu) ** 2 / (2 * var)
        resp = torch.softmax(log_comp, dim=-1)
        return (resp * -(x64[..., None] - m * mu) / var).sum(-1).to(x.dtype)

    def sde_score(self, sde):
        def score(x, t):
            return self._score(x, sde.mean_coef(t.double()), sde.marginal_std(t.double()))
        return score

    def sigma_score(self, x, sigma):
        return self._score(x, torch.ones_like(sigma, dtype=torch.float64), sigma.double())

    def denoiser(self, x, sigma):
        return (x.double() + sigma.double().reshape(-1, 1) ** 2 * self.sigma_score(x, sigma).double()).to(x.dtype)

    def assign(self, samples):
        """Each sample's most likely component (the split point between well-separated modes)."""
        log_comp = torch.log(self.w) - torch.log(self.s) - (samples.double()[...,
                                                                             None] - self.mu) ** 2 / (2 * self.s ** 2)
        return log_comp.argmax(-1)
