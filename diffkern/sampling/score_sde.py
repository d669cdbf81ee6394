"""Samplers of score SDEs (Song et al. 2021) and of noise-conditional score models: Euler-Maruyama on
the reverse SDE, score_sde's predictor-corrector sampler, and annealed Langevin dynamics (NCSN).

score_fn(x, t) takes t as a float tensor [batch] (float32, or float64 for float64 states) and returns
the score, or the noise prediction with parameterization="epsilon"; Langevin's score_fn(x, sigma)
takes the noise level. Every noisy launch draws dk.randn(shape, seed, step=k, sample_offset) with its
own k (x_T is step 0), so runs are reproducible across devices and batch splits."""
from __future__ import annotations

import math
from typing import Callable, Optional

import torch

from .. import coefficients
from .._graph import constant_levels, plan
from .._model import model_output_of
from .._validate import check_choice, check_positive_int, check_real
from ..noise import randn
from ..sde import VESDE, VPSDE, check_sigmas
from ._engine import Run, RunSpec

PREDICTORS = ("reverse_diffusion", "euler_maruyama")
CORRECTORS = ("langevin", None)


def denoised_from_score(sde, t: float, x: torch.Tensor, score: torch.Tensor) -> torch.Tensor:
    """Tweedie's estimate of x0 at time t: (x + std(t)^2 score) / mean(t) (callback paths only)."""
    return (x + float(sde.marginal_std(t)) ** 2 * score) / float(sde.mean_coef(t))


def sample_euler_maruyama(score_fn, shape, sde, num_steps: int = 1000, *, eps: float = 1e-3,
                          parameterization: str = "score", seed: int = 0, device=None,
                          dtype: torch.dtype = torch.float32, sample_offset: int = 0, x_T=None, denoise: bool = True,
                          progress: bool = False, callback: Optional[Callable] = None) -> torch.Tensor:
    """Euler-Maruyama on the reverse SDE from t = T to t = eps over num_steps equal steps, starting
    from the prior. ``denoise`` drops the noise of the last step (score_sde's noise removal)."""
    levels, scale, noisy, rows = _euler_maruyama_plan(sde, num_steps, eps, parameterization,
                                                      denoise)
    run = Run(RunSpec(shape, seed, device, dtype, sample_offset, x_T, progress, callback), "t")
    table = run.fused_table(rows)
    times = run.per_step(levels)
    x = run.initial(sde.prior_std)
    for i in run.steps(num_steps, "Euler-Maruyama"):
        m = model_output_of(score_fn(x, times[i]))
        x_before, x = x, run.step(x, table, i, m, noisy=noisy[i])
        if run.callback is not None:
            score = run.model_output(m, x_before) * scale[i]
            run.report(i, (levels[i], levels[i + 1]), x, denoised_from_score(sde, levels[i], x_before, score))
    return x


@plan
def _euler_maruyama_plan(sde, num_steps, eps, parameterization, denoise):
    """The times, score scales and noisy steps (lists) and the rows of Euler-Maruyama."""
    t = sde.time_grid(num_steps, eps)
    dt = t[1:] - t[:-1]
    scale = sde.score_scale(t, parameterization)
    noisy = torch.ones(num_steps, dtype=torch.bool)
    noisy[-1] = not denoise
    rows = coefficients.euler_maruyama_rows(sde.drift_coef(t[:-1]), sde.diffusion(t[:-1]), dt, scale[:-1])
    rows[:, coefficients.INDEX["sigma"]] *= noisy.double()
    return t.tolist(), scale.tolist(), noisy.tolist(), rows


def _snr_langevin(run: Run, x, score, score_scale, snr_alpha):
    """score_sde's Langevin corrector: step size eps = 2 alpha (snr ||z|| / ||s||)^2 from the batch-mean
    norms of the score and the noise, x + eps s + sqrt(2 eps) z. The norms stay on the device."""
    snr, alpha = snr_alpha
    z = randn(run.shape, **run.noise_key(run.next_noise_step()), device=run.device, dtype=x.dtype)

    def flat(a):
        return a.reshape(run.batch, math.prod(run.shape[1:])).to(torch.float64)
    grad_norm = torch.linalg.vector_norm(flat(score), dim=1).mean() * abs(score_scale)
    noise_norm = torch.linalg.vector_norm(flat(z), dim=1).mean()
    step_size = 2 * alpha * (snr * noise_norm / grad_norm) ** 2
    table = run.runtime_table(coefficients.langevin_rows(2 * step_size, score_scale))
    return run.step(x, table, 0, score, noise=z)


def sample_langevin(score_fn, shape, sigmas, n_steps_each: int = 100, *, step_size: Optional[float] = 2e-5,
                    snr: Optional[float] = None, denoise: bool = True, seed: int = 0, device=None,
                    dtype: torch.dtype = torch.float32, sample_offset: int = 0, x_T=None, progress: bool = False,
                    callback: Optional[Callable] = None) -> torch.Tensor:
    """Annealed Langevin dynamics (NCSN, Song & Ermon 2019): for each noise level sigma_i of ``sigmas``
    (decreasing), n_steps_each steps x + (a_i / 2) s(x, sigma_i) + sqrt(a_i) z with a_i = step_size
    sigma_i^2 / sigma_L^2; or, with ``snr``, score_sde's signal-to-noise step size. Starts from
    sigmas[0] * N(0, I); ``denoise`` ends with Tweedie's step x + sigma_L^2 s(x, sigma_L). The callback
    sees each noise level after its n_steps_each steps (denoised: Tweedie's estimate from the last
    score at that level)."""
    levels, rows, tweedie = _langevin_plan(constant_levels("sigmas", sigmas), n_steps_each, step_size, snr)
    run = Run(RunSpec(shape, seed, device, dtype, sample_offset, x_T, progress, callback), "sigma")
    table = None if rows is None else run.fused_table(rows)
    sigma_batch = run.per_step(levels)
    x = run.initial(levels[0])
    for i in run.steps(len(levels), "annealed Langevin"):
        sigma = sigma_batch[i]
        for _ in range(n_steps_each):
            score = model_output_of(score_fn(x, sigma))
            x_before = x
            x = run.step(x, table, i, score, noisy=True) if snr is None else _snr_langevin(run, x, score, 1.0,
                                                                                           (snr, 1.0))
        if run.callback is not None:
            denoised = x_before + levels[i] ** 2 * run.model_output(score, x_before)
            run.report(i, (levels[i], levels[i + 1] if i + 1 < len(levels) else 0.0), x, denoised)
    if denoise:
        x = run.step(x, run.fused_table(tweedie), 0, model_output_of(score_fn(x, sigma_batch[-1])))
    return x


@plan
def _langevin_plan(sigmas, n_steps_each, step_size, snr):
    """The noise levels (a list), the Langevin rows (None with snr) and Tweedie's final row."""
    sigmas = check_sigmas(sigmas)
    if bool((sigmas == 0).any()):
        raise ValueError("annealed Langevin needs positive noise levels (no final 0)")
    check_positive_int("n_steps_each", n_steps_each)
    if snr is None and not (step_size and step_size > 0):
        raise ValueError("give a positive step_size or an snr")
    rows = None if snr is not None else coefficients.langevin_rows(step_size * sigmas ** 2 / sigmas[-1] ** 2)
    levels = sigmas.tolist()
    return levels, rows, coefficients.rows(d=1.0, f=levels[-1] ** 2)


def _pc_discretisation(sde, num_steps, eps):
    """score_sde's grid and discretisation for its PC sampler with sde.N = num_steps: the times
    linspace(T, eps, N); step i reads index k = floor(t_i (N - 1) / T) of the N-point tables
    (discrete_betas = linspace(beta_min, beta_max, N) / N for VP, discrete_sigmas = the geometric
    sigma_min .. sigma_max for VE, whose step from index k goes to index k - 1, and to sigma = 0 from
    k = 0); other SDEs use SDE.discretize's Euler form with dt = T / N. Returns (t, f_i, G_i, alpha_i)
    in float64, with x_mean = x - f_i x + G_i^2 score the reverse-diffusion step."""
    if isinstance(sde, VPSDE) and sde.beta_max / num_steps >= 1:
        raise ValueError(f"num_steps={num_steps} is too few for score_sde's VP discretisation: its largest beta is "
                         f"beta_max / num_steps = {sde.beta_max / num_steps:g} >= 1 (take num_steps > "
                         f"{sde.beta_max:g})")
    t = torch.linspace(sde.T, eps, num_steps, dtype=torch.float64)
    index = (t * (num_steps - 1) / sde.T).long()
    alpha = torch.ones_like(t)
    if isinstance(sde, VPSDE):  # and sub-VP: score_sde's Langevin corrector reads the VP alphas
        betas = torch.linspace(sde.beta_min / num_steps, sde.beta_max / num_steps, num_steps, dtype=torch.float64)
        alpha = 1 - betas[index]
    if isinstance(sde, VESDE):
        sigmas = torch.exp(torch.linspace(math.log(sde.sigma_min), math.log(sde.sigma_max), num_steps,
                                          dtype=torch.float64))
        adjacent = torch.where(index == 0, torch.zeros_like(t), sigmas[(index - 1).clamp_min(0)])
        return t, torch.zeros_like(t), (sigmas[index] ** 2 - adjacent ** 2).sqrt(), alpha
    if type(sde) is VPSDE:
        return t, alpha.sqrt() - 1, (1 - alpha).sqrt(), alpha
    dt = sde.T / num_steps
    return t, sde.drift_coef(t) * dt, sde.diffusion(t) * math.sqrt(dt), alpha


def sample_pc(score_fn, shape, sde, num_steps: int = 1000, *, predictor: str = "reverse_diffusion",
              corrector: Optional[str] = "langevin", snr: float = 0.16, n_corrector_steps: int = 1, eps: float = 1e-3,
              parameterization: str = "score", denoise: bool = True, seed: int = 0, device=None,
              dtype: torch.dtype = torch.float32, sample_offset: int = 0, x_T=None, progress: bool = False,
              callback: Optional[Callable] = None) -> torch.Tensor:
    """score_sde's predictor-corrector sampler (its ``pc_sampler`` with ``sde.N = num_steps``), step
    for step: at each of the num_steps times linspace(T, eps, num_steps) the corrector (Langevin with
    signal-to-noise ratio ``snr``, n_corrector_steps times; step size from the batch-mean norms of the
    score and the noise, as score_sde) and then the predictor: "reverse_diffusion" (the discretised
    reverse SDE: for VP the num_steps-step DDPM chain with betas linspace(beta_min, beta_max, N) / N,
    for VE the N-point geometric sigma table whose last step goes to sigma = 0, else the Euler
    discretisation with dt = T / N) or "euler_maruyama" (score_sde's, with dt = -T / N). ``denoise``
    returns the last predictor step's mean (no noise), as score_sde's ``x_mean``. The model is
    evaluated at the continuous times of the grid. Noise: x_T is stream step 0, then each corrector
    and predictor draw its own step in order."""
    check_choice("corrector", corrector, CORRECTORS)
    check_positive_int("n_corrector_steps", n_corrector_steps)
    snr = check_real("snr", snr, strict=True)
    levels, scales, alphas, noisy, rows = _pc_plan(sde, num_steps, eps, predictor,
                                                   parameterization, denoise)
    run = Run(RunSpec(shape, seed, device, dtype, sample_offset, x_T, progress, callback), "t")
    table = run.fused_table(rows)
    times = run.per_step(levels[:-1])
    x = run.initial(sde.prior_std)
    for i in run.steps(num_steps, "predictor-corrector"):
        t_batch = times[i]
        if corrector is not None:
            for _ in range(n_corrector_steps):
                score = model_output_of(score_fn(x, t_batch))
                x = _snr_langevin(run, x, score, scales[i], (snr, alphas[i]))
        m = model_output_of(score_fn(x, t_batch))
        x_before, x = x, run.step(x, table, i, m, noisy=noisy[i])
        if run.callback is not None:
            score = run.model_output(m, x_before) * scales[i]
            run.report(i, (levels[i], levels[i + 1]), x, denoised_from_score(sde, levels[i], x_before, score))
    return x


@plan
def _pc_plan(sde, num_steps, eps, predictor, parameterization, denoise):
    """The times (with a final 0), score scales, corrector alphas and noisy steps (lists) and the
    predictor's rows of score_sde's PC sampler."""
    check_choice("predictor", predictor, PREDICTORS)
    sde.time_grid(num_steps, eps)  # checks num_steps and eps
    t, f_discrete, g_discrete, alpha = _pc_discretisation(sde, num_steps, eps)
    scale = sde.score_scale(t, parameterization)
    if predictor == "euler_maruyama":
        dt = torch.full_like(t, -sde.T / num_steps)
        predictor_rows = coefficients.euler_maruyama_rows(sde.drift_coef(t), sde.diffusion(t), dt, scale)
    else:
        predictor_rows = coefficients.reverse_diffusion_rows(f_discrete, g_discrete, scale)
    sigma_col = coefficients.INDEX["sigma"]
    if denoise:
        predictor_rows[-1, sigma_col] = 0.0
    noisy = (predictor_rows[:, sigma_col] != 0).tolist()
    return t.tolist() + [0.0], scale.tolist(), alpha.tolist(), noisy, predictor_rows
