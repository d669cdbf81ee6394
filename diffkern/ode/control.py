"""Step-size control of the adaptive solvers, as torchdiffeq's and scipy's: a step is accepted when
its error norm is <= 1, and h <- h min(10, max(0.2, 0.9 norm^(-1 / order))) (at most 1 after a
rejection); the first step is Hairer's estimate. All of it is host arithmetic outside autograd."""
from __future__ import annotations

import math

import torch

SAFETY, MIN_FACTOR, MAX_FACTOR = 0.9, 0.2, 10.0


def rms(values: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Per sample: the root mean square over features of values / scale."""
    return (values / scale).flatten(1).pow(2).mean(1).sqrt()


def factor(norm: torch.Tensor, order: int) -> torch.Tensor:
    """The step-size factor after an error norm: 0.9 norm^(-1/order) within [0.2, 10]; a norm of 0
    grows the step 10x, a non-finite one shrinks it 5x."""
    safe = torch.where(torch.isfinite(norm), norm, torch.full_like(norm, math.inf))
    grown = SAFETY * safe.clamp(min=1e-30) ** (-1.0 / order)
    return torch.where(safe == 0, torch.full_like(safe, MAX_FACTOR), grown.clamp(MIN_FACTOR, MAX_FACTOR))


def initial_step_sizes(x: torch.Tensor, k0: torch.Tensor, atol: float, rtol: float) -> tuple:
    """(h0, d1, scale) of Hairer, Norsett & Wanner (1993), II.4: h0 from the sizes of x and its
    velocity k0 (per sample), before the refinement by one Euler step."""
    scale = atol + rtol * x.abs()
    d0, d1 = rms(x, scale), rms(k0, scale)
    h0 = torch.where((d0 < 1e-5) | (d1 < 1e-5), torch.full_like(d0, 1e-6), 0.01 * d0 / d1)
    return h0, d1, scale


def refined_step_size(h0: torch.Tensor, d1: torch.Tensor, d2: torch.Tensor, order: int) -> torch.Tensor:
    """Hairer's h1 from the velocity's change d2 over the probing Euler step, at most 100 h0."""
    big = torch.maximum(d1, d2)
    h1 = torch.where(big <= 1e-15, torch.clamp(h0 * 1e-3, min=1e-6), (0.01 / big) ** (1.0 / order))
    return torch.minimum(100 * h0, h1)
