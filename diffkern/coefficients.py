"""Coefficient rows of the fused step, in float64: the sampler formulas of diffkern live here.

Every step the kernel runs has the form (csrc/include/diffkern/step_math.h)

    m   = m_uncond + w (m_cond - m_uncond)        classifier-free guidance
    x0  = clip(a x + b m + e g)                   prediction of the clean sample
    out = c x0 + d x + f m + h g + sigma z        the update

and a sampler is a choice of the per-sample row (a, b, e, c, d, f, h, sigma, ...). The functions
below compute those rows from alphas_cumprod with torch float64 ops, so they work on Python
scalars, on tables over all timesteps, and on per-sample [B] tensors on any device (no host sync).
The layout of a row comes from the compiled library (torch.ops.diffkern.step_row_fields).

Notation: abar = alphas_cumprod at t, abar_prev at the previous (cleaner) timestep, 1 after the last
step; beta' = 1 - abar / abar_prev and alpha' = abar / abar_prev are the one-step beta and alpha of a
strided schedule.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from . import ops  # noqa: F401  (loads the library)

FIELDS = tuple(torch.ops.diffkern.step_row_fields().split(","))
INDEX = {name: i for i, name in enumerate(FIELDS)}

PREDICTION_TYPES = ("epsilon", "sample", "v_prediction")
DDPM_VARIANCE_TYPES = ("fixed_small", "fixed_small_log", "fixed_large", "learned_range")
_TINY_VARIANCE = 1e-20  # diffusers clamps the posterior variance here before taking its log


def rows(shape: Tuple[int, ...] = (), device=None, **columns) -> torch.Tensor:
    """A float64 tensor [*shape, len(FIELDS)] of coefficient rows; unnamed columns are 0."""
    out = torch.zeros(*shape, len(FIELDS), dtype=torch.float64, device=device)
    for name, value in columns.items():
        out[..., INDEX[name]] = value
    return out


def _f64(x, like: Optional[torch.Tensor] = None) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        return x.to(torch.float64)
    return torch.tensor(float(x), dtype=torch.float64, device=None if like is None else like.device)


def check_prediction_type(prediction_type: str) -> None:
    if prediction_type not in PREDICTION_TYPES:
        raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES}, got {prediction_type!r}")


def x0_prediction(abar, prediction_type: str, classifier_scale=0.0):
    """(a, b, e) with x0 = a x + b m + e g for the model output m and classifier gradient g.

    epsilon: x0 = (x - sqrt(1 - abar) eps) / sqrt(abar); sample: x0 = m;
    v_prediction: x0 = sqrt(abar) x - sqrt(1 - abar) v. Classifier guidance (seeds 000, 001) shifts
    the predicted noise, eps_hat = eps - gamma sqrt(1 - abar) g, which moves x0 by
    gamma (1 - abar) / sqrt(abar) g whatever the parameterisation.
    """
    check_prediction_type(prediction_type)
    abar = _f64(abar)
    s, q = abar.sqrt(), (1 - abar).sqrt()
    if prediction_type == "epsilon":
        a, b = 1 / s, -q / s
    elif prediction_type == "sample":
        a, b = torch.zeros_like(s), torch.ones_like(s)
    else:
        a, b = s, -q
    return a, b, classifier_scale * (1 - abar) / s


def epsilon_prediction(abar, prediction_type: str, classifier_scale=0.0):
    """(p, r, u) with eps = p x + r m + u g: the model's noise prediction (from its unclipped output)."""
    check_prediction_type(prediction_type)
    abar = _f64(abar)
    s, q = abar.sqrt(), (1 - abar).sqrt()
    if prediction_type == "epsilon":
        p, r = torch.zeros_like(s), torch.ones_like(s)
    elif prediction_type == "sample":
        p, r = 1 / q, -s / q
    else:
        p, r = q, s
    return p, r, -classifier_scale * q


def _guidance_columns(guidance_scale, clip_range):
    columns = {"w": 1.0 if guidance_scale is None else float(guidance_scale)}
    if clip_range is not None:
        columns["clip_lo"], columns["clip_hi"] = clip_range
    return columns


def ddpm_rows(abar, abar_prev, *, prediction_type="epsilon", variance_type="fixed_small", clip_range=None,
              guidance_scale=None, classifier_scale=0.0) -> torch.Tensor:
    """Ancestral DDPM step x_t -> x_prev: the posterior q(x_prev | x_t, x0) at the predicted x0,
        mean = sqrt(abar_prev) beta' / (1 - abar) x0 + sqrt(alpha') (1 - abar_prev) / (1 - abar) x_t,
    variance fixed_small: beta~ = (1 - abar_prev) / (1 - abar) beta' (fixed_small_log is the same
    value), fixed_large: beta', learned_range: exp of the interpolation frac log beta' + (1 - frac)
    log beta~ with frac = (v + 1) / 2 from the model's variance output v. No noise at the last step
    (abar_prev == 1). abar, abar_prev: floats or float64 tensors of one shape."""
    if variance_type not in DDPM_VARIANCE_TYPES:
        raise ValueError(f"variance_type must be one of {DDPM_VARIANCE_TYPES}, got {variance_type!r}")
    abar, abar_prev = _f64(abar), _f64(abar_prev)
    a, b, e = x0_prediction(abar, prediction_type, classifier_scale)
    beta_step = 1 - abar / abar_prev
    c = abar_prev.sqrt() * beta_step / (1 - abar)
    d = (abar / abar_prev).sqrt() * (1 - abar_prev) / (1 - abar)
    last = abar_prev >= 1
    posterior_variance = ((1 - abar_prev) / (1 - abar) * beta_step).clamp(min=_TINY_VARIANCE)
    columns = dict(a=a, b=b, e=e, c=c, d=d, **_guidance_columns(guidance_scale, clip_range))
    if variance_type in ("fixed_small", "fixed_small_log"):
        sigma = posterior_variance.sqrt()
    elif variance_type == "fixed_large":
        sigma = beta_step.sqrt()
    else:
        min_log, max_log = posterior_variance.log(), beta_step.clamp(min=_TINY_VARIANCE).log()
        sigma = torch.ones_like(abar)  # a flag: the kernel computes sigma from v
        columns.update(var_alpha=0.25 * (max_log + min_log), var_beta=0.25 * (max_log - min_log))
    columns["sigma"] = torch.where(last, torch.zeros_like(sigma), sigma)
    return rows(torch.broadcast_shapes(abar.shape, abar_prev.shape), device=abar.device, **columns)


def ddim_rows(abar, abar_prev, *, eta=0.0, prediction_type="epsilon", clip_range=None, guidance_scale=None,
              classifier_scale=0.0, use_clipped_model_output=False) -> torch.Tensor:
    """DDIM step (Song et al. 2021): x_prev = sqrt(abar_prev) x0 + sqrt(1 - abar_prev - sigma^2) eps
    + sigma z with sigma = eta sqrt((1 - abar_prev) / (1 - abar)) sqrt(beta'). eta = 0 is
    deterministic; eta = 1 has DDPM's posterior variance. eps is the model's noise prediction (as
    diffusers does, not re-derived from a clipped x0 unless use_clipped_model_output)."""
    abar, abar_prev = _f64(abar), _f64(abar_prev)
    a, b, e = x0_prediction(abar, prediction_type, classifier_scale)
    sigma = eta * ((1 - abar_prev) / (1 - abar) * (1 - abar / abar_prev)).clamp(min=0).sqrt()
    direction = (1 - abar_prev - sigma ** 2).clamp(min=0).sqrt()
    c = abar_prev.sqrt()
    if use_clipped_model_output:  # eps = (x - sqrt(abar) x0) / sqrt(1 - abar), x0 after clipping
        q = (1 - abar).sqrt()
        c = c - direction * abar.sqrt() / q
        p, r, u = 1 / q, torch.zeros_like(q), torch.zeros_like(q)
    else:
        p, r, u = epsilon_prediction(abar, prediction_type, classifier_scale)
    columns = dict(a=a, b=b, e=e, c=c, d=direction * p, f=direction * r, h=direction * u, sigma=sigma,
                   **_guidance_columns(guidance_scale, clip_range))
    return rows(torch.broadcast_shapes(abar.shape, abar_prev.shape), device=abar.device, **columns)


def q_sample_rows(abar) -> torch.Tensor:
    """The forward process x_t = sqrt(abar) x0 + sqrt(1 - abar) eps: the kernel's x is x0 (a = 1)."""
    abar = _f64(abar)
    return rows(abar.shape, device=abar.device, a=1.0, c=abar.sqrt(), sigma=(1 - abar).sqrt())
