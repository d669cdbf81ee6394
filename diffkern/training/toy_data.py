"""FFJORD's 2-d toy densities (Grathwohl et al. 2019), written from their definitions: 8 Gaussians,
pinwheel, checkerboard, two spirals and rings. Each is a function of (n, generator) returning float64
[n, 2]; ``sample_toy`` draws one by name from a seed. Where the density is known in closed form
(8gaussians, checkerboard) ``toy_log_density`` evaluates it, so a model's test NLL can be set beside
the data's own entropy."""
from __future__ import annotations

import math

import torch

from .._validate import check_choice, check_positive_int

_SQRT2 = math.sqrt(2.0)


def _eight_gaussians(n, g):
    # centres on a circle of radius 4 at multiples of 45 degrees, std 0.5, all scaled by 1 / sqrt 2
    angles = torch.arange(8, dtype=torch.float64) * (math.pi / 4)
    centres = 4.0 * torch.stack([torch.cos(angles), torch.sin(angles)], 1)
    which = torch.randint(0, 8, (n,), generator=g)
    return (centres[which] + 0.5 * torch.randn(n, 2, generator=g, dtype=torch.float64)) / _SQRT2


def _pinwheel(n, g, arms=5, radial_std=0.3, tangential_std=0.1, rate=0.25):
    # each arm a Gaussian blob at radius 1 whose angle grows with exp(radial coordinate): a swirl
    features = torch.randn(n, 2, generator=g, dtype=torch.float64) * torch.tensor([radial_std, tangential_std],
                                                                                     dtype=torch.float64)
    features[:, 0] += 1.0
    arm = torch.randint(0, arms, (n,), generator=g)
    angle = arm.double() * (2 * math.pi / arms) + rate * torch.exp(features[:, 0])
    cos, sin = torch.cos(angle), torch.sin(angle)
    x = features[:, 0] * cos - features[:, 1] * sin
    y = features[:, 0] * sin + features[:, 1] * cos
    return 2.0 * torch.stack([x, y], 1)


def _checkerboard(n, g):
    # uniform on the 8 dark squares of a 4 x 4 board of side-2 squares covering [-4, 4]^2
    x1 = torch.rand(n, generator=g, dtype=torch.float64) * 4 - 2
    x2 = torch.rand(n, generator=g, dtype=torch.float64) - 2.0 * torch.randint(0, 2, (n,), generator=g).double()
    x2 = x2 + torch.floor(x1).remainder(2)
    return 2.0 * torch.stack([x1, x2], 1)


def _two_spirals(n, g):
    # two opposite Archimedean spirals of 1.5 turns, jittered, scaled by 1 / 3
    half = n // 2
    radius = torch.sqrt(torch.rand(n - half, generator=g, dtype=torch.float64)) * (540 * 2 * math.pi / 360)
    d1x = -torch.cos(radius) * radius + torch.rand(n - half, generator=g, dtype=torch.float64) * 0.5
    d1y = torch.sin(radius) * radius + torch.rand(n - half, generator=g, dtype=torch.float64) * 0.5
    arm = torch.stack([d1x, d1y], 1)
    x = torch.cat([arm, -arm[:half]], 0) / 3.0
    x = x + 0.1 * torch.randn(x.shape, generator=g, dtype=torch.float64)
    return x[torch.randperm(n, generator=g)]


def _rings(n, g):
    # four concentric circles of radii 3, 2.25, 1.5 and 0.75 (3 x (1, 0.75, 0.5, 0.25)), evenly
    # sampled in angle, the points shuffled and jittered by N(0, 0.08^2)
    counts = [n // 4] * 3
    counts.insert(0, n - sum(counts))
    points = []
    for count, radius in zip(counts, (1.0, 0.75, 0.5, 0.25)):
        angle = torch.arange(count, dtype=torch.float64) * (2 * math.pi / max(count, 1))
        points.append(3.0 * radius * torch.stack([torch.cos(angle), torch.sin(angle)], 1))
    x = torch.cat(points, 0)[torch.randperm(n, generator=g)]
    return x + 0.08 * torch.randn(x.shape, generator=g, dtype=torch.float64)


TOY_DATASETS = {"8gaussians": _eight_gaussians, "pinwheel": _pinwheel, "checkerboard": _checkerboard,
                "2spirals": _two_spirals, "rings": _rings}


def sample_toy(name: str, n: int, seed: int = 0) -> torch.Tensor:
    """n samples (float64 [n, 2]) of the toy density ``name`` (a key of TOY_DATASETS), a function of
    (name, n, seed) alone."""
    check_choice("name", name, tuple(TOY_DATASETS))
    check_positive_int("n", n)
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be an integer >= 0, got {seed!r}")
    return TOY_DATASETS[name](n, torch.Generator().manual_seed(seed))


def toy_log_density(name: str, x: torch.Tensor) -> torch.Tensor:
    """The exact log density (float64 [B]) of 8gaussians (a mixture of 8 isotropic Gaussians of std
    0.5 / sqrt 2) or checkerboard (1 / 32 on its squares, -inf off them)."""
    x = x.double()
    if name == "8gaussians":
        angles = torch.arange(8, dtype=torch.float64) * (math.pi / 4)
        centres = 4.0 * torch.stack([torch.cos(angles), torch.sin(angles)], 1) / _SQRT2
        var = 0.25 / 2.0
        squared = ((x[:, None, :] - centres[None]) ** 2).sum(-1)
        return torch.logsumexp(-squared / (2 * var), 1) - math.log(8) - math.log(2 * math.pi * var)
    if name == "checkerboard":
        u = x / 2.0  # back to the board of unit squares on [-2, 2]^2: dark where floor(u1) + floor(u2) is even
        inside = (u.abs() <= 2).all(1)
        dark = (torch.floor(u[:, 0]) + torch.floor(u[:, 1])).remainder(2) == 0
        return torch.where(inside & dark, torch.full_like(u[:, 0], -math.log(32.0)),
                           torch.full_like(u[:, 0], -math.inf))
    raise ValueError(f"toy_log_density knows 8gaussians and checkerboard, not {name!r}")
