"""Exact "pretrained models": Gaussian mixtures, whose scores are closed-form at every noise level.

For x_0 ~ sum_k w_k N(mu_k, Sigma_k) and x_t = m x_0 + s z (m, s: a schedule's or SDE's mean
coefficient and std at t; m = 1, s = sigma for VE / EDM noise levels), x_t ~ sum_k w_k N(m mu_k,
m^2 Sigma_k + s^2 I). With Sigma_k = U_k diag(lambda_k) U_k^T that covariance is
U_k diag(m^2 lambda_k + s^2) U_k^T, so densities and scores cost one rotation per component and no
per-t factorisation. Scores are computed in float64 for float64 inputs and in float32 otherwise (the
samplers' states; enough for sampling and four times cheaper in 64 dimensions), densities in float64.
"""
from __future__ import annotations

import math
from typing import Tuple

import torch

from . import ops
from ._validate import check_finite, check_positive_int
from .schedules import DDPMSchedule


class GaussianMixture:
    """sum_k weights[k] N(means[k], covariances[k]); give ``stds`` (per component, scalar or per
    dimension) or full ``covariances`` [K, d, d]."""

    def __init__(self, means, stds=None, weights=None, covariances=None):
        means = torch.as_tensor(means, dtype=torch.float64)
        if means.dim() != 2:
            raise ValueError("means must be [components, dim]")
        k, d = means.shape
        if (stds is None) == (covariances is None):
            raise ValueError("give either stds or covariances")
        if covariances is not None:
            cov = torch.as_tensor(covariances, dtype=torch.float64)
            if cov.shape != (k, d, d):
                raise ValueError(f"covariances must be [{k}, {d}, {d}], got {tuple(cov.shape)}")
            cov = (cov + cov.transpose(1, 2)) / 2
            eigenvalues, rotations = torch.linalg.eigh(cov)
        else:
            stds = torch.as_tensor(stds, dtype=torch.float64)
            stds = stds.reshape(k, -1).expand(k, d) if stds.numel() in (k, k * d) else stds.expand(k, d)
            eigenvalues, rotations = stds ** 2, torch.eye(d, dtype=torch.float64).expand(k, d, d)
        if not bool((eigenvalues > 0).all()):
            raise ValueError("covariances must be positive definite (stds positive)")
        weights = torch.full((k,), 1.0 / k, dtype=torch.float64) if weights is None else \
            torch.as_tensor(weights, dtype=torch.float64)
        if weights.shape != (k,) or bool((weights <= 0).any()):
            raise ValueError("weights must be k positive numbers")
        self.means, self.weights = means, weights / weights.sum()
        self.eigenvalues, self.rotations = eigenvalues.contiguous(), rotations.contiguous()
        self.dim, self.num_components = d, k

    # ---- built-in mixtures ----

    @classmethod
    def ring(cls, modes: int = 8, radius: float = 4.0, std: float = 0.35) -> "GaussianMixture":
        """The 2-d demo: ``modes`` equal Gaussians on a circle."""
        angle = torch.arange(modes, dtype=torch.float64) * (2 * math.pi / modes)
        return cls(torch.stack([radius * angle.cos(), radius * angle.sin()], 1), stds=std)

    @classmethod
    def high_dimensional(cls, dim: int = 64, modes: int = 8, seed: int = 0) -> "GaussianMixture":
        """The 64-d timing mixture: random separated means, random full covariances (eigenvalues in
        [0.2, 1]) and unequal weights, all from a fixed seed."""
        gen = torch.Generator().manual_seed(seed)
        means = 4.0 * torch.randn(modes, dim, generator=gen, dtype=torch.float64) / math.sqrt(dim) * math.sqrt(2)
        rotations = torch.linalg.qr(torch.randn(modes, dim, dim, generator=gen, dtype=torch.float64))[0]
        eigenvalues = 0.2 + 0.8 * torch.rand(modes, dim, generator=gen, dtype=torch.float64)
        covariances = rotations @ torch.diag_embed(eigenvalues) @ rotations.transpose(1, 2)
        weights = 1 + torch.rand(modes, generator=gen, dtype=torch.float64)
        return cls(means, covariances=covariances, weights=weights)

    # ---- the diffused mixture ----

    def _components(self, x: torch.Tensor, mean_coef, std, dtype=torch.float64, rotated_out: bool = False):
        """log N(x; m mu_k, m^2 Sigma_k + s^2 I) [B, K] and the precision times residual [B, K, d] (or,
        with rotated_out, that in the eigenbases: U_k^T (m^2 Sigma_k + s^2 I)^-1 (x - m mu_k))."""
        xd = x.reshape(x.shape[0], -1).to(dtype)
        device = xd.device
        m = torch.as_tensor(mean_coef, dtype=torch.float64, device=device).reshape(-1, 1, 1).to(dtype)
        s = torch.as_tensor(std, dtype=torch.float64, device=device).reshape(-1, 1, 1).to(dtype)
        residual = xd[:, None, :] - m * self.means.to(device=device, dtype=dtype)                # [B, K, d]
        rotated = torch.einsum("bkd,kde->bke", residual, self.rotations.to(device=device, dtype=dtype))  # U_k^T r
        variance = m ** 2 * self.eigenvalues.to(device=device, dtype=dtype) + s ** 2             # [B, K, d]
        log_density = -0.5 * ((rotated ** 2 / variance).sum(-1) + variance.log().sum(-1)
                              + self.dim * math.log(2 * math.pi))
        if rotated_out:
            return log_density + self.weights.to(device=device, dtype=dtype).log(), rotated / variance
        precision_residual = torch.einsum("bke,kde->bkd", rotated / variance,
                                          self.rotations.to(device=device, dtype=dtype))
        return log_density + self.weights.to(device=device, dtype=dtype).log(), precision_residual

    def log_prob_at(self, x: torch.Tensor, mean_coef, std) -> torch.Tensor:
        """log density of the diffused mixture at x (float64 [B])."""
        log_joint, _ = self._components(x, mean_coef, std)
        return torch.logsumexp(log_joint, dim=1)

    def score_at(self, x: torch.Tensor, mean_coef, std) -> torch.Tensor:
        """grad_x log p of the diffused mixture: -sum_k r_k(x) (m^2 Sigma_k + s^2 I)^-1 (x - m mu_k)."""
        dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
        log_joint, precision_residual = self._components(x, mean_coef, std, dtype)
        responsibility = torch.softmax(log_joint, dim=1)
        return (-(responsibility[..., None] * precision_residual).sum(1)).reshape(x.shape).to(x.dtype)

    def posterior_mean(self, x: torch.Tensor, mean_coef, std) -> torch.Tensor:
        """E[x0 | x_t = x] for x_t = m x0 + s z: sum_k r_k(x) (mu_k + m Sigma_k (m^2 Sigma_k + s^2 I)^-1
        (x - m mu_k)); finite at m = 0 (the mixture's mean) and at s = 0 (x itself)."""
        dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
        log_joint, scaled = self._components(x, mean_coef, std, dtype, rotated_out=True)
        device = scaled.device
        m = torch.as_tensor(mean_coef, dtype=torch.float64, device=device).reshape(-1, 1, 1).to(dtype)
        rotations = self.rotations.to(device=device, dtype=dtype)
        shift = torch.einsum("bke,kde->bkd", scaled * self.eigenvalues.to(device=device, dtype=dtype), rotations)
        means = self.means.to(device=device, dtype=dtype) + m * shift
        responsibility = torch.softmax(log_joint, dim=1)
        return (responsibility[..., None] * means).sum(1).reshape(x.shape).to(x.dtype)

    def log_prob(self, x: torch.Tensor) -> torch.Tensor:
        """The exact log density of the data (float64 [B])."""
        return self.log_prob_at(x, 1.0, 0.0)

    def assign(self, x: torch.Tensor) -> torch.Tensor:
        """The most probable component of each sample."""
        return self._components(x, 1.0, 0.0)[0].argmax(1)

    def sample(self, n: int, seed: int = 0, dtype=torch.float32, device=None) -> torch.Tensor:
        """n exact samples (float64 math, a torch.Generator seeded with ``seed``)."""
        gen = torch.Generator().manual_seed(seed)
        component = torch.multinomial(self.weights, n, replacement=True, generator=gen)
        z = torch.randn(n, self.dim, generator=gen, dtype=torch.float64)
        x = self.means[component] + torch.einsum(
            "nde,ne->nd", self.rotations[component], z * self.eigenvalues[component].sqrt())
        return x.to(device=device, dtype=dtype)

    # ---- as the models diffkern's samplers call ----

    def epsilon_model(self, sched: DDPMSchedule):
        """model(x, t) for DDPM / DDIM: t int64 [B], eps = -sqrt(1 - abar_t) score."""
        def eps(x, t):
            abar = sched.alphas_cumprod.to(x.device)[t.long()]
            return (-(1 - abar).sqrt().reshape(-1, *([1] * (x.dim() - 1))).to(x.dtype)
                    * self.score_at(x, abar.sqrt(), (1 - abar).sqrt()))
        return eps

    def score_model(self, sde):
        """score_fn(x, t) for an SDE: t float [B]."""
        def score(x, t):
            t64 = t.double()
            return self.score_at(x, sde.mean_coef(t64), sde.marginal_std(t64))
        return score

    def denoiser(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """D(x, sigma) = E[x0 | x0 + sigma z = x] = x + sigma^2 score (EDM, k-diffusion)."""
        s = torch.as_tensor(sigma, dtype=torch.float64, device=x.device).reshape(-1, *([1] * (x.dim() - 1)))
        return (x.double() + s ** 2 * self.score_at(x, 1.0, s.flatten()).double()).to(x.dtype)

    def noise_level_score(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """score(x, sigma) of x0 + sigma z, for annealed Langevin."""
        return self.score_at(x, 1.0, torch.as_tensor(sigma, dtype=torch.float64, device=x.device))

    def velocity(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The flow-matching velocity E[z - x0 | x_t = x] for x_t = (1 - t) x0 + t z (dk.sample_flow):
        (x - E[x0 | x_t]) / t, t a float tensor [batch] in (0, 1]."""
        t64 = torch.as_tensor(t, dtype=torch.float64, device=x.device).reshape(-1)
        x0 = self.posterior_mean(x, 1 - t64, t64)
        return ((x.double() - x0.double()) / t64.reshape(-1, *([1] * (x.dim() - 1)))).to(x.dtype)


# Up to this many features the fused field kernel (ops.poisson_field) is faster than matrix products
# here (2 cores, 4096 points x 4096 charges, float64: 26 ms against 130 at N = 2, 110 against 164 at
# N = 32, 202 against 173 at N = 64).
DIRECT_FIELD_FEATURES = 32


class EmpiricalPoissonField:
    """The electric field of a finite data set (seed 002, eq. 98): charges x~_i = (x_i, z_data) in
    R^{N+1}, E(x~) = sum_i (x~ - x~_i) / |x~ - x~_i|^(N+1), usable as ``field_fn`` of
    ``dk.sample_pfgm`` / ``dk.pfgm_forward``.

    |x~ - x~_i|^-(N+1) under- or overflows in float32 (and float64) once N is in the hundreds, but
    the ODE needs only the field's direction. So the weights are handled as logarithms,
    log w_i = -(N+1)/2 log d_i^2, normalised by their log-sum-exp L, and

        E = e^L (x~ - sum_i wbar_i x~_i),   wbar_i = w_i / sum_j w_j,

    computed in float64: up to DIRECT_FIELD_FEATURES features by the fused kernel (ops.poisson_field:
    one pass over the data per point, the weights relative to the nearest point so far, no exp or log
    per pair), above that over chunks of ``chunk`` data points at a time with matrix products (an
    online log-sum-exp). Memory stays at batch x chunk (or batch) whatever the data set's size.
    Calling the object returns E / e^L = (x - xbar, z - z_data), the field at a positive per-sample
    scale (all the ODE reads); ``field`` returns E itself (which may under- or overflow, as the formula
    does) and ``normalized`` v = -sqrt(N) E / |E| (eq. 99).
    """

    def __init__(self, data: torch.Tensor, z_data: float = 0.0, chunk: int = 2048):
        if not isinstance(data, torch.Tensor) or data.dim() < 2 or data.shape[0] < 1 or data[0].numel() < 1:
            raise ValueError("data must be a tensor [points, ...] with at least one point and one feature")
        if not data.is_floating_point() or not bool(torch.isfinite(data).all()):
            raise ValueError("data must be a floating-point tensor of finite values")
        check_finite("z_data", z_data)
        check_positive_int("chunk", chunk)
        self.shape = tuple(data.shape[1:])
        self.features = data[0].numel()
        self.points = data.detach().reshape(data.shape[0], -1).to(torch.float64)
        self.z_data, self.chunk = float(z_data), chunk
        self._on = {self.points.device: (self.points, (self.points ** 2).sum(1))}

    def _data_on(self, device):
        if device not in self._on:
            points = self.points.to(device)
            self._on[device] = (points, (points ** 2).sum(1))
        return self._on[device]

    def _check(self, x: torch.Tensor, z: torch.Tensor):
        if not isinstance(x, torch.Tensor) or x.dim() < 1 or tuple(x.shape[1:]) != self.shape:
            raise ValueError(f"x must be [batch, {', '.join(map(str, self.shape))}] like the data, got "
                             f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}")
        z = torch.as_tensor(z, dtype=torch.float64, device=x.device).reshape(-1)
        if z.numel() == 1:
            z = z.expand(x.shape[0])
        if z.numel() != x.shape[0]:
            raise ValueError(f"z must be a number or a tensor [{x.shape[0]}], got {z.numel()} values")
        return x.reshape(x.shape[0], -1).to(torch.float64), z

    def _log_weighted_mean(self, x64: torch.Tensor, dz: torch.Tensor):
        """(xbar [batch, N], L [batch]): the weights' mean of the data and log sum_i w_i."""
        points, norms = self._data_on(x64.device)
        if self.features <= DIRECT_FIELD_FEATURES:  # the fused kernel: one pass, no matrix of pairs
            return ops.poisson_field(x64.contiguous(), dz.contiguous(), points)
        return _chunked_field(x64, dz, points, norms, self.chunk)

    def __call__(self, x: torch.Tensor, z) -> Tuple[torch.Tensor, torch.Tensor]:
        """(E_x, E_z) / sum_i w_i = (x - xbar, z - z_data): the field's direction at a positive scale."""
        x64, z64 = self._check(x, z)
        dz = z64 - self.z_data
        mean, _ = self._log_weighted_mean(x64, dz)
        return (x64 - mean).reshape(x.shape).to(x.dtype), dz.to(torch.float64 if x.dtype == torch.float64
                                                                  else torch.float32)

    def field(self, x: torch.Tensor, z) -> Tuple[torch.Tensor, torch.Tensor]:
        """E of eq. 98 itself, in float64 (inf or 0 where |x~ - x~_i|^-(N+1) leaves float64's range)."""
        x64, z64 = self._check(x, z)
        dz = z64 - self.z_data
        mean, log_total = self._log_weighted_mean(x64, dz)
        scale = log_total.exp()
        return ((x64 - mean) * scale[:, None]).reshape(x.shape), dz * scale

    def normalized(self, x: torch.Tensor, z) -> Tuple[torch.Tensor, torch.Tensor]:
        """v = -sqrt(N) E / |E| (eq. 99), from the scale-free form (finite in any dimension)."""
        x64, z64 = self._check(x, z)
        dz = z64 - self.z_data
        mean, _ = self._log_weighted_mean(x64, dz)
        direction = torch.cat([x64 - mean, dz[:, None]], dim=1)
        v = -math.sqrt(self.features) * direction / direction.norm(dim=1, keepdim=True)
        return v[:, :-1].reshape(x.shape).to(x.dtype), v[:, -1]


def poisson_field_mean(points: torch.Tensor, dz: torch.Tensor, charges: torch.Tensor, chunk: int = 2048):
    """(the charges' mean weighted by |y~ - x~_j|^-(N+1) [batch, N], log of the weights' sum [batch]) for
    points [batch, N] a height dz [batch] above charges [M, N] on a plane, in float64: the fused kernel up
    to DIRECT_FIELD_FEATURES features, matrix products over chunks of charges above (as
    EmpiricalPoissonField, without its checks)."""
    points, dz, charges = points.double().contiguous(), dz.double().contiguous(), charges.double().contiguous()
    if points.shape[1] <= DIRECT_FIELD_FEATURES:
        return ops.poisson_field(points, dz, charges)
    return _chunked_field(points, dz, charges, (charges ** 2).sum(1), chunk)


def _chunked_field(x64: torch.Tensor, dz: torch.Tensor, points: torch.Tensor, norms: torch.Tensor, chunk: int):
    """The weighted mean and log-sum of the weights by matrix products over chunks of the charges, with an
    online log-sum-exp (for many features, where the products are faster than the fused kernel)."""
    x_norms = (x64 ** 2).sum(1, keepdim=True)
    exponent = -(x64.shape[1] + 1) / 2
    running_max = torch.full((x64.shape[0], 1), -math.inf, dtype=torch.float64, device=x64.device)
    total = torch.zeros_like(running_max)
    weighted = torch.zeros_like(x64)
    dz2 = dz[:, None] ** 2
    for start in range(0, points.shape[0], chunk):
        p, n = points[start:start + chunk], norms[start:start + chunk]
        # |x - x_i|^2 by the expansion (one matrix product) is >= 0 up to rounding; dz^2 > 0 keeps
        # the log finite above the charges.
        # in place on one [batch, chunk] buffer: the field is memory-bound on large sets
        log_w = torch.addmm(x_norms + n, x64, p.T, alpha=-2).clamp_min_(0).add_(dz2).log_().mul_(exponent)
        new_max = torch.maximum(running_max, log_w.max(1, keepdim=True).values)
        rescale = (running_max - new_max).exp()
        w = log_w.sub_(new_max).exp_()
        total = total * rescale + w.sum(1, keepdim=True)
        weighted = weighted * rescale + w @ p
        running_max = new_max
    return weighted / total, (running_max + total.log()).reshape(-1)


MIXTURE_OUTPUTS = ("epsilon", "score", "denoiser", "noise_level_score", "velocity", "field")
FIELD_REFERENCE_POINTS, FIELD_REFERENCE_SEED = 2048, 101


def mixture_model(kind: str = "ring", output: str = "epsilon", sde: str = "vp"):
    """A built-in exact model for ``python -m diffkern generate / evaluate`` (``--model
    diffkern.models:mixture_model --model-kwargs '{"output": "score", "sde": "vp"}'``): the ring or
    the 64-d mixture as an ``epsilon`` model of the default DDPMSchedule (ddpm, ddim), a ``score``
    model of the VP / sub-VP / VE SDE with default parameters (euler_maruyama, ode, pc, likelihoods),
    a ``denoiser`` (euler, heun, euler_ancestral, dpmpp), a ``noise_level_score`` (langevin), a flow
    ``velocity`` (flow) or a Poisson ``field`` (pfgm: the exact field of 2048 exact samples drawn with
    seed 101, an EmpiricalPoissonField). The registry of diffkern.sampling names which sampler takes
    which output."""
    from .sde import VESDE, VPSDE, SubVPSDE

    mixtures = {"ring": GaussianMixture.ring, "high_dimensional": GaussianMixture.high_dimensional}
    if kind not in mixtures:
        raise ValueError(f"kind must be one of {tuple(mixtures)}, got {kind!r}")
    if output not in MIXTURE_OUTPUTS:
        raise ValueError(f"output must be one of {MIXTURE_OUTPUTS}, got {output!r}")
    sdes = {"vp": VPSDE, "subvp": SubVPSDE, "ve": VESDE}
    if sde not in sdes:
        raise ValueError(f"sde must be one of {tuple(sdes)}, got {sde!r}")
    mixture = mixtures[kind]()
    if output == "epsilon":
        return mixture.epsilon_model(DDPMSchedule())
    if output == "score":
        return mixture.score_model(sdes[sde]())
    if output == "field":
        return EmpiricalPoissonField(mixture.sample(FIELD_REFERENCE_POINTS, seed=FIELD_REFERENCE_SEED,
                                                    dtype=torch.float64))
    return {"denoiser": mixture.denoiser, "noise_level_score": mixture.noise_level_score,
            "velocity": mixture.velocity}[output]
