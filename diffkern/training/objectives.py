"""Training objectives: what a training batch draws, how it noises the data, what the model is given,
and the residual and weight of its loss (the formulas are in diffkern.coefficients).

Each objective trains the kind of model a sampler takes (``model``, a key of
diffkern.sampling.registry.MODELS, or "edm" for EDM's raw network, which dk.training.EDMPrecond turns
into a denoiser):

- ``DDPMObjective``: L_simple and its relatives on a DDPMSchedule (t ~ U{0, .., T - 1});
- ``ScoreMatchingObjective``: denoising score matching for a score SDE (score_sde's get_sde_loss_fn, t ~
  U(eps, T)), or with ``continuous=False`` score_sde's discrete DDPM (VP) and SMLD / NCSN (VE) losses;
- ``EDMObjective``: EDM's preconditioned denoiser loss, sigma log-normal;
- ``FlowMatchingObjective``: rectified flow, t uniform, logit-normal or "mode" (SD3's densities);
- ``PFGMObjective``: Poisson flow, a field model regressed on the batch's normalised field;
- ``CNFObjective``: a continuous normalizing flow by maximum likelihood (FFJORD), with RNODE's
  regularisers.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field
from typing import Optional

import torch

from .. import coefficients
from .._validate import check_choice, check_finite, check_positive, check_positive_int
from ..noise import PFGM_PERTURBATION_STREAM, TRAINING_NOISE_STREAM, randn
from ..ode import adjoint, resolve_solver
from ..schedules import DDPMSchedule
from ..sde import SDE, VESDE, VPSDE, SubVPSDE
from .draws import BatchKey, discrete, normal, uniform, uniform_pair

REDUCTIONS = ("mean", "sum")


@functools.lru_cache(maxsize=1)
def _default_schedule() -> DDPMSchedule:
    return DDPMSchedule()


@dataclass(frozen=True)
class Levels:
    """One batch's per-sample draws: the noising x_t = c_x0 x0 + c_z z, what the model is given as its
    time, and the loss row's residual (p_m, p_x0, p_z) and weight, all float64 [B] but the time."""

    c_x0: torch.Tensor
    c_z: torch.Tensor
    model_time: torch.Tensor
    residual: tuple
    weight: torch.Tensor
    draws: dict = field(default_factory=dict)  # the raw draws (t, sigma, ...), for tests and logging


class Objective:
    """Base: subclasses set ``name``, ``model`` and ``reduce`` and define ``levels``."""

    name = "objective"
    model = ""
    reduce = "mean"

    def levels(self, batch: int, key: BatchKey, device, time_dtype: torch.dtype) -> Levels:
        raise NotImplementedError

    def reduction(self, features: int) -> float:
        """The factor of a sample's sum of squares: 1 / features for the mean over features, else 1."""
        return 1.0 / features if self.reduce == "mean" else 1.0

    def rows(self, levels: Levels, dtype: torch.dtype, features: int):
        """The batch's coefficient rows: the fused q_sample's (x_t = c_x0 x0 + c_z z; float64 for float64
        data, else float32) and the fused loss's (residual and weight times the reduction, float64)."""
        noising = coefficients.rows((levels.c_x0.shape[0],), device=levels.c_x0.device, a=1.0, c=levels.c_x0,
                                    sigma=levels.c_z)
        loss = coefficients.loss_rows(*levels.residual, levels.weight * self.reduction(features))
        return noising.to(_rows_dtype(dtype)), loss

    def _check_reduce(self) -> None:
        check_choice("reduce", self.reduce, REDUCTIONS)


def _rows_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _time(t: torch.Tensor, time_dtype: torch.dtype) -> torch.Tensor:
    return t.to(time_dtype)


@dataclass(frozen=True)
class DDPMObjective(Objective):
    """DDPM's simple loss: t ~ U{0, .., T - 1}, x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) z, the model
    ``model(x_t, t)`` (t int64) predicting ``prediction_type`` (epsilon: |eps - z|^2, L_simple; sample;
    v_prediction), as diffusers' training scripts. ``weighting``: "none" or "min_snr" (min-SNR-gamma,
    ``gamma``). ``reduce``: the mean (default) or sum over features."""

    schedule: Optional[DDPMSchedule] = None
    prediction_type: str = "epsilon"
    weighting: str = "none"
    gamma: float = 5.0
    reduce: str = "mean"
    name = "ddpm"

    def __post_init__(self):
        if self.schedule is not None and not isinstance(self.schedule, DDPMSchedule):
            raise TypeError(f"schedule must be a diffkern.DDPMSchedule, got {type(self.schedule).__name__}")
        coefficients.check_prediction_type(self.prediction_type)
        check_choice("weighting", self.weighting, ("none", "min_snr"))
        check_positive("gamma", self.gamma)
        self._check_reduce()

    @property
    def model(self):
        return "epsilon"

    def _schedule(self) -> DDPMSchedule:
        return self.schedule if self.schedule is not None else _default_schedule()

    def _columns(self, abar, _abar_prev):
        """Per timestep: alphas_cumprod, the noising (sqrt(abar), sqrt(1 - abar)), the residual and the weight."""
        weight = torch.ones_like(abar)
        if self.weighting == "min_snr":
            weight = coefficients.min_snr_weight(abar / (1 - abar), self.gamma, self.prediction_type)
        residual = coefficients.ddpm_residual(abar, self.prediction_type)
        return torch.stack([abar, abar.sqrt(), (1 - abar).sqrt(), *residual, weight], 1)

    def _key(self, *more) -> tuple:
        return ("ddpm_training", 0, self.prediction_type, self.weighting, self.gamma, *more)

    def rows(self, levels, dtype, features):
        # gathered from per-timestep tables of both rows (built once per device, dtype and width), as
        # Objective.rows would compute them
        t, schedule = levels.draws["t"], self._schedule()
        device, reduction = t.device, self.reduction(features)

        def noising(abar, abar_prev):
            return coefficients.rows(abar.shape, a=1.0, c=abar.sqrt(), sigma=(1 - abar).sqrt())

        def loss(abar, abar_prev):
            columns = self._columns(abar, abar_prev)
            return coefficients.loss_rows(columns[:, 3], columns[:, 4], columns[:, 5], columns[:, 6] * reduction)

        return (schedule.device_table(self._key("noising"), noising, device, _rows_dtype(dtype))[t],
                schedule.device_table(self._key("loss", reduction), loss, device, torch.float64)[t])

    def levels(self, batch, key, device, time_dtype):
        schedule = self._schedule()
        t = discrete(batch, key, device, schedule.num_train_timesteps)
        # one gather from a table of every timestep's columns, built once per device (a training step
        # then does no per-sample arithmetic on the host side of the kernels)
        table = schedule.device_table(self._key(), self._columns, torch.device(device), torch.float64)
        row = table[t]
        return Levels(row[:, 1], row[:, 2], t, (row[:, 3], row[:, 4], row[:, 5]), row[:, 6],
                      {"t": t, "alphas_cumprod": row[:, 0]})


@dataclass(frozen=True)
class ScoreMatchingObjective(Objective):
    """Denoising score matching for the score SDE ``sde`` (score_sde's get_sde_loss_fn): t = eps + (T -
    eps) u, x_t = mean(t) x0 + std(t) z, the score model ``model(x_t, t)`` (t float), loss
    |std s + z|^2, or with ``likelihood_weighting`` g(t)^2 |s + z / std|^2 (Song et al. 2021, the
    weighting that bounds the negative log-likelihood).

    ``continuous=False`` is score_sde's discrete training (its get_ddpm_loss_fn for VP: labels
    U{0, .., N - 1} of the N-step chain with betas linspace(beta_min, beta_max, N) / N, the model an
    epsilon predictor given the labels; get_smld_loss_fn for VE: the N geometric sigmas from sigma_max
    down, NCSN's loss sigma^2 |s + z / sigma|^2 with the model given the labels). ``reduce_mean`` as
    score_sde's: the mean over features, or (False) half their sum."""

    sde: SDE = field(default_factory=VPSDE)
    likelihood_weighting: bool = False
    continuous: bool = True
    reduce_mean: bool = True
    eps: float = 1e-5
    num_scales: int = 1000
    name = "score_matching"

    def __post_init__(self):
        if not isinstance(self.sde, SDE):
            raise TypeError(f"sde must be a diffkern SDE (VPSDE, SubVPSDE, VESDE), got {type(self.sde).__name__}")
        for name in ("likelihood_weighting", "continuous", "reduce_mean"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be a bool, got {getattr(self, name)!r}")
        self.sde.time_grid(1, self.eps)  # checks eps
        check_positive_int("num_scales", self.num_scales)
        if not self.continuous:
            if self.likelihood_weighting:
                raise ValueError("likelihood_weighting goes with continuous=True (score_sde refuses it too)")
            if isinstance(self.sde, SubVPSDE) or not isinstance(self.sde, (VPSDE, VESDE)):
                raise ValueError("continuous=False is score_sde's discrete training of VP and VE SDEs, not "
                                 f"{type(self.sde).__name__}")

    def reduction(self, features: int) -> float:
        return 1.0 / features if self.reduce_mean else 0.5  # score_sde's reduce_op: mean, or 0.5 sum

    @property
    def model(self):
        return "epsilon" if not self.continuous and isinstance(self.sde, VPSDE) else "score"

    def levels(self, batch, key, device, time_dtype):
        sde = self.sde
        if not self.continuous:
            n = self.num_scales
            labels = discrete(batch, key, device, n)
            if isinstance(sde, VPSDE):  # score_sde's get_ddpm_loss_fn
                betas = torch.linspace(sde.beta_min / n, sde.beta_max / n, n, dtype=torch.float64, device=device)
                abar = torch.cumprod(1 - betas, 0)[labels]
                return Levels(abar.sqrt(), (1 - abar).sqrt(), labels, coefficients.ddpm_residual(abar, "epsilon"),
                              torch.ones_like(abar), {"t": labels})
            sigmas = torch.exp(torch.linspace(math.log(sde.sigma_min), math.log(sde.sigma_max), n,
                                              dtype=torch.float64, device=device)).flip(0)[labels]
            return Levels(torch.ones_like(sigmas), sigmas, labels,
                          coefficients.score_matching_residual(sigmas, likelihood_weighting=True), sigmas ** 2,
                          {"t": labels, "sigma": sigmas})
        t = self.eps + (sde.T - self.eps) * uniform(batch, key, device)
        mean, std = sde.mean_coef(t), sde.marginal_std(t)
        weight = sde.diffusion(t) ** 2 if self.likelihood_weighting else torch.ones_like(t)
        return Levels(mean, std, _time(t, time_dtype),
                      coefficients.score_matching_residual(std, self.likelihood_weighting), weight, {"t": t})


@dataclass(frozen=True)
class EDMObjective(Objective):
    """EDM (Karras et al. 2022): sigma = exp(p_mean + p_std n), n ~ N(0, 1); the raw network F is given
    (c_in (x0 + sigma z), c_noise) and D = c_skip x + c_out F is fitted to x0 with weight lambda(sigma)
    (``weighting="edm"``; "soft_min_snr" and "snr" are k-diffusion's). EDM's own EDMLoss sums over
    features (``reduce="sum"``); the default is the mean. dk.training.EDMPrecond(F, sigma_data) is the
    denoiser the samplers take."""

    sigma_data: float = 0.5
    p_mean: float = -1.2
    p_std: float = 1.2
    weighting: str = "edm"
    reduce: str = "mean"
    name = "edm"
    model = "edm"

    def __post_init__(self):
        check_positive("sigma_data", self.sigma_data)
        check_finite("p_mean", self.p_mean)
        check_positive("p_std", self.p_std)
        check_choice("weighting", self.weighting, ("edm", "soft_min_snr", "snr"))
        self._check_reduce()

    def levels(self, batch, key, device, time_dtype):
        sigma = torch.exp(self.p_mean + self.p_std * normal(batch, key, device))
        _, _, c_in, c_noise = coefficients.edm_preconditioning(sigma, self.sigma_data)
        return Levels(c_in, c_in * sigma, _time(c_noise, time_dtype),
                      coefficients.edm_residual(sigma, self.sigma_data),
                      coefficients.edm_weight(sigma, self.sigma_data, self.weighting), {"sigma": sigma})


@dataclass(frozen=True)
class FlowMatchingObjective(Objective):
    """Flow matching / rectified flow: x_t = (1 - t) x0 + t z, the model ``model(x_t, t)`` (t float in
    (0, 1), dk.sample_flow's convention) fitted to the velocity z - x0. t from ``timestep_sampling``:
    "uniform", "logit_normal" (sigmoid of N(logit_mean, logit_std)) or "mode" (``mode_scale``), the
    densities of diffusers' compute_density_for_timestep_sampling; ``weighting`` "none", "sigma_sqrt"
    or "cosmap" (compute_loss_weighting_for_sd3)."""

    timestep_sampling: str = "uniform"
    logit_mean: float = 0.0
    logit_std: float = 1.0
    mode_scale: float = 1.29
    weighting: str = "none"
    reduce: str = "mean"
    name = "flow_matching"
    model = "velocity"

    def __post_init__(self):
        check_choice("timestep_sampling", self.timestep_sampling, ("uniform", "logit_normal", "mode"))
        check_finite("logit_mean", self.logit_mean)
        check_positive("logit_std", self.logit_std)
        check_finite("mode_scale", self.mode_scale)
        check_choice("weighting", self.weighting, ("none", "sigma_sqrt", "cosmap"))
        self._check_reduce()

    def levels(self, batch, key, device, time_dtype):
        if self.timestep_sampling == "logit_normal":
            t = torch.sigmoid(self.logit_mean + self.logit_std * normal(batch, key, device))
        else:
            t = uniform(batch, key, device)
            if self.timestep_sampling == "mode":
                t = 1 - t - self.mode_scale * (torch.cos(math.pi * t / 2) ** 2 - 1 + t)
        return Levels(1 - t, t, _time(t, time_dtype), coefficients.flow_residual(t),
                      coefficients.flow_weight(t, self.weighting), {"t": t})


@dataclass(frozen=True)
class PFGMObjective(Objective):
    """Poisson flow (Xu et al. 2022; seed 002 eqs. 98-100), as PFGM's code trains it: each sample is moved
    off the data plane to (x + |n| (1 + tau)^m u, |e| sigma_end (1 + tau)^m), with m ~ U[0, M) (U[0,
    restrict_m) where the height |e| sigma_end falls below restrict_below), n ~ N(0, sigma_end^2 I_N), u
    uniform on the unit sphere and e ~ N(0, 1); the target is the normalised field of the batch's
    charges at that point, sqrt(N) E / (|E| + gamma) with E = (xbar - y, -z) (xbar the charges' mean
    weighted by |y~ - x~_j|^-(N+1), ops.poisson_field), and the loss |f(y, z) - target|^2, averaged over
    the N + 1 coordinates (``reduce_mean``, PFGM's reduce_mean=True) or half summed. The model is a
    field model f(x, z) -> (v_x, v_z) (dk.sample_pfgm's convention: any positive or negative scale)."""

    sigma_end: float = 0.01
    M: float = 291.0
    tau: float = 0.03
    gamma: float = 5.0
    restrict_m: Optional[float] = 200.0
    restrict_below: float = 0.005
    reduce_mean: bool = True
    name = "pfgm"
    model = "field"

    def __post_init__(self):
        for name in ("sigma_end", "M", "tau"):
            check_positive(name, getattr(self, name))
        check_finite("gamma", self.gamma)
        if self.gamma < 0:
            raise ValueError(f"gamma must be >= 0, got {self.gamma}")
        if self.restrict_m is not None:
            check_positive("restrict_m", self.restrict_m)
        check_positive("restrict_below", self.restrict_below)
        if not isinstance(self.reduce_mean, bool):
            raise ValueError(f"reduce_mean must be a bool, got {self.reduce_mean!r}")

    def reduction(self, features: int) -> float:
        return 1.0 / features if self.reduce_mean else 0.5

    def levels(self, batch, key, device, time_dtype):
        raise ValueError("PFGM has no noise levels: training_loss perturbs its samples with perturb()")

    def perturb(self, x0: torch.Tensor, key: BatchKey):
        """(y [batch, N], z [batch], draws) in float64 for the flattened samples x0 [batch, N], every draw
        from the stream: m (and its restricted redraw) on the training-time stream, e and n on PFGM's
        perturbation stream (one [batch, N + 1] draw: e first), u from the training-noise stream."""
        batch, features = x0.shape
        device = x0.device
        u_m, u_restrict = uniform_pair(batch, key, device)
        m = u_m * self.M
        gauss = randn((batch, features + 1), seed=key.seed, step=key.step, sample_offset=key.sample_offset,
                      stream=PFGM_PERTURBATION_STREAM, device=device).double()
        height = gauss[:, 0].abs() * self.sigma_end
        if self.restrict_m is not None:  # PFGM's restrict_M: bound the norms of samples near the plane
            m = torch.where(height < self.restrict_below, u_restrict * self.restrict_m, m)
        multiplier = (1 + self.tau) ** m
        radius = (gauss[:, 1:] * self.sigma_end).norm(dim=1) * multiplier
        direction = randn((batch, features), seed=key.seed, step=key.step, sample_offset=key.sample_offset,
                          stream=TRAINING_NOISE_STREAM, device=device).double()
        direction = direction / direction.norm(dim=1, keepdim=True)
        y = x0.double() + direction * radius[:, None]
        return y, height * multiplier, {"m": m, "z": height * multiplier, "radius": radius}


@dataclass(frozen=True)
class CNFObjective(Objective):
    """Maximum likelihood of a continuous normalizing flow dz/dt = f(z, t) (FFJORD; seed "continuous
    normalizing flows"): the per-sample loss is -log p(x) in nats from dk.cnf_log_likelihood over
    [0, t1] (FFJORD's toy default t1 = 0.5) with ``num_probes`` Hutchinson probes of ``distribution``
    drawn from the stream (seed, step, sample), plus RNODE's kinetic_weight int ||f||^2 dt and
    jacobian_weight int ||v^T df/dz||^2 dt (Finlay et al. 2020). ``solver`` with ``rtol`` / ``atol``
    (adaptive, stepping the batch on ``error_norm``) or ``num_steps`` (fixed grid; RNODE trains with
    rk4), gradients by ``gradient``
    ("backprop" or "adjoint", the adjoint to ``adjoint_rtol`` / ``adjoint_atol``). Quantized data
    (``dequantize`` = the bins' width, e.g. 2 / 17 for the digits' 17 levels scaled to [-1, 1] as bin
    centres) gets uniform dequantization noise, U(-w/2, w/2) per feature from the stream: the loss
    then bounds the discrete data's NLL (add log2(1 / w) bits/dim)."""

    t1: float = 0.5
    solver: str = "dopri5"
    rtol: Optional[float] = None  # adaptive steps: None is 1e-5
    atol: Optional[float] = None
    num_steps: Optional[int] = None
    error_norm: Optional[str] = None  # adaptive steps: "batch" (None), "rms" (torchdiffeq's kind) or "sample"
    gradient: str = "backprop"
    adjoint_rtol: Optional[float] = None
    adjoint_atol: Optional[float] = None
    num_probes: int = 1
    distribution: str = "gaussian"
    kinetic_weight: float = 0.0
    jacobian_weight: float = 0.0
    max_num_evals: int = 10000
    dequantize: float = 0.0  # the width of the data's quantization bins (0: continuous data)
    name = "cnf"
    model = "cnf"

    def __post_init__(self):
        check_positive("t1", self.t1)
        check_choice("gradient", self.gradient, ("backprop", "adjoint"))
        check_positive_int("num_probes", self.num_probes)
        check_positive_int("max_num_evals", self.max_num_evals)
        check_choice("distribution", self.distribution, ("rademacher", "gaussian"))
        for name in ("kinetic_weight", "jacobian_weight", "dequantize"):
            check_finite(name, getattr(self, name))
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        choice = resolve_solver(self.solver, self.num_steps, self.rtol, self.atol, self.error_norm,
                                max_num_evals=self.max_num_evals)
        if self.gradient == "adjoint":
            adjoint.backward_choice(choice, self.adjoint_rtol, self.adjoint_atol)  # checks the tolerances
        else:
            for name in ("adjoint_rtol", "adjoint_atol"):
                if getattr(self, name) is not None:
                    raise ValueError(f"{name} goes with gradient='adjoint', not gradient={self.gradient!r}")

    @property
    def regularise(self) -> bool:
        return self.kinetic_weight > 0 or self.jacobian_weight > 0

    def levels(self, batch, key, device, time_dtype):
        raise ValueError("a CNF has no noise levels: training_loss integrates its log-likelihood")


OBJECTIVES = {cls.name: cls for cls in (DDPMObjective, ScoreMatchingObjective, EDMObjective, FlowMatchingObjective,
                                        PFGMObjective, CNFObjective)}


def make_objective(objective, **options) -> Objective:
    """An Objective: given one (options refused), or the objective of that name with ``options``."""
    if isinstance(objective, Objective):
        if options:
            raise ValueError(f"options {sorted(options)} go with an objective's name, not an Objective instance")
        return objective
    if objective not in OBJECTIVES:
        raise ValueError(f"unknown objective {objective!r}; choose from {', '.join(OBJECTIVES)} or pass an Objective")
    try:
        return OBJECTIVES[objective](**options)
    except TypeError as error:
        raise ValueError(f"objective {objective!r}: {error}") from None
