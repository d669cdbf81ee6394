"""k-diffusion's wrapper of a discrete-time epsilon model as a denoiser (its ``external.py``), so that a
DDPM model (``model(x, t)`` with timesteps of a DDPMSchedule) runs under every sampler that takes a
denoiser D(x, sigma): diffkern's EDM family and DPM-Solver++, and these k-diffusion drop-ins.

A DDPM state x_t = sqrt(alphas_cumprod) (x0 + sigma z) is the variance-exploding x = x0 + sigma z
scaled, with sigma_t = ((1 - alphas_cumprod_t) / alphas_cumprod_t)^(1/2). So D(x, sigma) = x - sigma
eps(x / (sigma^2 + 1)^(1/2), t(sigma)), where t(sigma) interpolates the timestep linearly in log sigma
between its two discrete neighbours (or, ``quantize``, takes the nearest).
"""
from __future__ import annotations

import torch

from .._model import model_output_of


class DiscreteSchedule(torch.nn.Module):
    """The map between noise levels sigma and the fractional timesteps of a discrete list of sigmas
    (increasing with the timestep)."""

    def __init__(self, sigmas: torch.Tensor, quantize: bool):
        super().__init__()
        sigmas = torch.as_tensor(sigmas)
        if sigmas.dim() != 1 or sigmas.numel() < 2 or not bool((sigmas[1:] > sigmas[:-1]).all()) \
                or not bool(sigmas[0] > 0):
            raise ValueError("sigmas must be a positive, increasing 1-d tensor of at least two levels")
        self.register_buffer("sigmas", sigmas)
        self.register_buffer("log_sigmas", sigmas.log())
        self.quantize = bool(quantize)

    @property
    def sigma_min(self) -> torch.Tensor:
        return self.sigmas[0]

    @property
    def sigma_max(self) -> torch.Tensor:
        return self.sigmas[-1]

    def get_sigmas(self, n=None) -> torch.Tensor:
        """n levels at timesteps evenly spaced from the last to 0, then 0 (all levels when n is None)."""
        zero = self.sigmas.new_zeros(1)
        if n is None:
            return torch.cat([self.sigmas.flip(0), zero])
        last = self.sigmas.shape[0] - 1
        return torch.cat([self.t_to_sigma(torch.linspace(last, 0, n, device=self.sigmas.device)), zero])

    def sigma_to_t(self, sigma: torch.Tensor, quantize=None) -> torch.Tensor:
        quantize = self.quantize if quantize is None else quantize
        log_sigma = torch.as_tensor(sigma, device=self.log_sigmas.device).to(self.log_sigmas.dtype).log()
        flat = log_sigma.reshape(-1)
        # the last level at or below sigma (searchsorted: no host sync, unlike a data-dependent index)
        low = (torch.searchsorted(self.log_sigmas, flat, right=True) - 1).clamp(0, self.log_sigmas.shape[0] - 2)
        below, above = self.log_sigmas[low], self.log_sigmas[low + 1]
        w = ((below - flat) / (below - above)).clamp(0, 1)
        t = torch.where(w > 0.5, low + 1, low) if quantize else low + w
        return t.reshape(log_sigma.shape)

    def t_to_sigma(self, t: torch.Tensor) -> torch.Tensor:
        t = torch.as_tensor(t, device=self.log_sigmas.device).to(self.log_sigmas.dtype)
        low, high = t.floor().long(), t.ceil().long()
        w = t - low
        return ((1 - w) * self.log_sigmas[low] + w * self.log_sigmas[high]).exp()


class DiscreteEpsDDPMDenoiser(DiscreteSchedule):
    """A denoiser D(x, sigma) from an epsilon model of a discrete DDPM schedule (``alphas_cumprod``, e.g.
    ``dk.DDPMSchedule().alphas_cumprod``): model(x, t, **kwargs) is called with the timesteps t as a float
    tensor [B] (fractional unless ``quantize``, when they are the nearest integers, as int64)."""

    def __init__(self, model, alphas_cumprod, quantize: bool):
        alphas_cumprod = torch.as_tensor(alphas_cumprod)
        super().__init__(((1 - alphas_cumprod) / alphas_cumprod).sqrt(), quantize)
        self.inner_model = model
        self.sigma_data = 1.0

    def get_scalings(self, sigma: torch.Tensor):
        """(c_out, c_in): D = x + c_out eps(c_in x)."""
        return -sigma, (sigma.square() + self.sigma_data ** 2).rsqrt()

    def get_eps(self, *args, **kwargs) -> torch.Tensor:
        return model_output_of(self.inner_model(*args, **kwargs))

    def forward(self, x: torch.Tensor, sigma, **kwargs) -> torch.Tensor:
        sigma = torch.as_tensor(sigma, device=x.device, dtype=x.dtype).reshape(-1).expand(x.shape[0])
        shape = (-1,) + (1,) * (x.dim() - 1)
        c_out, c_in = (c.reshape(shape) for c in self.get_scalings(sigma))
        eps = self.get_eps(x * c_in, self.sigma_to_t(sigma).to(x.device), **kwargs)
        return x + eps * c_out
