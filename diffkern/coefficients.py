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

import math
from typing import Sequence, Tuple

import torch

from . import ops  # noqa: F401  (loads the library)

FIELDS = tuple(torch.ops.diffkern.step_row_fields().split(","))
INDEX = {name: i for i, name in enumerate(FIELDS)}

PREDICTION_TYPES = ("epsilon", "sample", "v_prediction")
DDPM_VARIANCE_TYPES = ("fixed_small", "fixed_small_log", "fixed_large", "learned_range")
_TINY_VARIANCE = 1e-20  # diffusers clamps the posterior variance here before taking its log


def rows(shape: Tuple[int, ...] = (), device=None, **columns) -> torch.Tensor:
    """A float64 tensor [*shape, len(FIELDS)] of coefficient rows; unnamed columns are 0."""
    if not shape and not any(isinstance(v, torch.Tensor) for v in columns.values()):
        values = [0.0] * len(FIELDS)
        for name, value in columns.items():
            values[INDEX[name]] = float(value)
        return torch.tensor(values, dtype=torch.float64, device=device)
    out = torch.zeros(*shape, len(FIELDS), dtype=torch.float64, device=device)
    for name, value in columns.items():
        out[..., INDEX[name]] = value
    return out


def _f64(x):
    """A float64 tensor, or a Python float: with scalar arguments every row function computes in
    Python floats (as exact as float64, and ~50x cheaper than 0-d tensors for one-off steps)."""
    if isinstance(x, torch.Tensor):
        return x.to(torch.float64)
    return float(x)


# The few functions the row formulas use, for a float64 tensor or a Python float alike.
def _sqrt(x):
    return x.sqrt() if isinstance(x, torch.Tensor) else math.sqrt(x)


def _log(x):
    return x.log() if isinstance(x, torch.Tensor) else math.log(x)


def _clamp_min(x, lo):
    return x.clamp(min=lo) if isinstance(x, torch.Tensor) else max(x, lo)


def _minimum(a, b):
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return torch.minimum(torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64))
    return min(a, b)


def _where(condition, a, b):
    if isinstance(condition, torch.Tensor):
        return torch.where(condition, a, b)
    return a if condition else b


def _zeros_like(x):
    return torch.zeros_like(x) if isinstance(x, torch.Tensor) else 0.0


def _ones_like(x):
    return torch.ones_like(x) if isinstance(x, torch.Tensor) else 1.0


def _shape(*values) -> Tuple[int, ...]:
    shapes = [v.shape for v in values if isinstance(v, torch.Tensor)]
    if len(shapes) <= 1:
        return tuple(shapes[0]) if shapes else ()
    return torch.broadcast_shapes(*shapes)


def _device(x):
    return x.device if isinstance(x, torch.Tensor) else None


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
    s, q = _sqrt(abar), _sqrt(1 - abar)
    if prediction_type == "epsilon":
        a, b = 1 / s, -q / s
    elif prediction_type == "sample":
        a, b = _zeros_like(s), _ones_like(s)
    else:
        a, b = s, -q
    return a, b, classifier_scale * (1 - abar) / s


def epsilon_prediction(abar, prediction_type: str, classifier_scale=0.0):
    """(p, r, u) with eps = p x + r m + u g: the model's noise prediction (from its unclipped output)."""
    check_prediction_type(prediction_type)
    abar = _f64(abar)
    s, q = _sqrt(abar), _sqrt(1 - abar)
    if prediction_type == "epsilon":
        p, r = _zeros_like(s), _ones_like(s)
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
    c = _sqrt(abar_prev) * beta_step / (1 - abar)
    d = _sqrt(abar / abar_prev) * (1 - abar_prev) / (1 - abar)
    last = abar_prev >= 1
    posterior_variance = _clamp_min(((1 - abar_prev) / (1 - abar) * beta_step), _TINY_VARIANCE)
    columns = dict(a=a, b=b, e=e, c=c, d=d, **_guidance_columns(guidance_scale, clip_range))
    if variance_type in ("fixed_small", "fixed_small_log"):
        sigma = _sqrt(posterior_variance)
    elif variance_type == "fixed_large":
        sigma = _sqrt(beta_step)
    else:
        min_log, max_log = _log(posterior_variance), _log(_clamp_min(beta_step, _TINY_VARIANCE))
        sigma = _ones_like(abar)  # a flag: the kernel computes sigma from v
        columns.update(var_alpha=0.25 * (max_log + min_log), var_beta=0.25 * (max_log - min_log))
    columns["sigma"] = _where(last, _zeros_like(sigma), sigma)
    return rows(_shape(abar, abar_prev), device=_device(abar), **columns)


def ddim_rows(abar, abar_prev, *, eta=0.0, prediction_type="epsilon", clip_range=None, guidance_scale=None,
              classifier_scale=0.0, use_clipped_model_output=False) -> torch.Tensor:
    """DDIM step (Song et al. 2021): x_prev = sqrt(abar_prev) x0 + sqrt(1 - abar_prev - sigma^2) eps
    + sigma z with sigma = eta sqrt((1 - abar_prev) / (1 - abar)) sqrt(beta'). eta = 0 is
    deterministic; eta = 1 has DDPM's posterior variance. eps is the model's noise prediction (as
    diffusers does, not re-derived from a clipped x0 unless use_clipped_model_output)."""
    abar, abar_prev = _f64(abar), _f64(abar_prev)
    a, b, e = x0_prediction(abar, prediction_type, classifier_scale)
    sigma = eta * _sqrt(_clamp_min(((1 - abar_prev) / (1 - abar) * (1 - abar / abar_prev)), 0))
    direction = _sqrt(_clamp_min((1 - abar_prev - sigma ** 2), 0))
    c = _sqrt(abar_prev)
    if use_clipped_model_output:  # eps = (x - sqrt(abar) x0) / sqrt(1 - abar), x0 after clipping
        q = _sqrt(1 - abar)
        c = c - direction * _sqrt(abar) / q
        p, r, u = 1 / q, _zeros_like(q), _zeros_like(q)
    else:
        p, r, u = epsilon_prediction(abar, prediction_type, classifier_scale)
    columns = dict(a=a, b=b, e=e, c=c, d=direction * p, f=direction * r, h=direction * u, sigma=sigma,
                   **_guidance_columns(guidance_scale, clip_range))
    return rows(_shape(abar, abar_prev), device=_device(abar), **columns)


def q_sample_rows(abar) -> torch.Tensor:
    """The forward process x_t = sqrt(abar) x0 + sqrt(1 - abar) eps: the kernel's x is x0 (a = 1)."""
    abar = _f64(abar)
    return rows(_shape(abar), device=_device(abar), a=1.0, c=_sqrt(abar), sigma=_sqrt(1 - abar))


# ---- score SDEs and EDM (Karras et al. 2022) ----
# m is the model output; score_scale turns it into a score (1 for a score model, -1 / std(t) for a
# noise prediction). f is the SDE's linear drift coefficient f(t), g its diffusion g(t), dt < 0 in
# reverse time. Heun's corrector takes the first model output as the kernel's third input (g):
# being linear in x and both model outputs, it reads each once and needs no stored slope.

def euler_maruyama_rows(f, g, dt, score_scale=1.0, noise=True) -> torch.Tensor:
    """Reverse-SDE Euler-Maruyama: x + [f x - g^2 s] dt + g sqrt(|dt|) z (noise=False: no z term)."""
    f, g, dt = _f64(f), _f64(g), _f64(dt)
    sigma = g * _sqrt(abs(dt)) if noise else _zeros_like(g)
    return rows(_shape(f, g, dt), device=_device(f),
                d=1 + f * dt, f=-(g ** 2) * dt * score_scale, sigma=sigma)


def ode_euler_rows(f, g, dt, score_scale=1.0) -> torch.Tensor:
    """Probability-flow ODE Euler step: x + [f x - g^2 s / 2] dt."""
    f, g, dt = _f64(f), _f64(g), _f64(dt)
    return rows(_shape(f, g, dt), device=_device(f),
                d=1 + f * dt, f=-0.5 * g ** 2 * dt * score_scale)


def ode_heun_corrector_rows(f, g, f_next, g_next, dt, score_scale=1.0, score_scale_next=1.0) -> torch.Tensor:
    """Heun's method on the probability-flow ODE, as one launch after the Euler predictor (the
    ode_euler_rows step to x_pred): x + dt (k1 + k2) / 2 with k1 = f x + b m1, x_pred = x + dt k1,
    k2 = f' x_pred + b' m2, b = -g^2 / 2 (times the score scale). In x, the first model output m1 (the
    kernel's g input) and the second m2, each read once:
    x (1 + dt (f + f' (1 + dt f)) / 2) + m1 dt b (1 + dt f') / 2 + m2 dt b' / 2."""
    f, g, f2, g2, dt = (_f64(v) for v in (f, g, f_next, g_next, dt))
    b, b2 = -0.5 * g ** 2 * score_scale, -0.5 * g2 ** 2 * score_scale_next
    return rows(_shape(f, f2, dt), device=_device(f),
                d=1 + 0.5 * dt * (f + f2 * (1 + dt * f)), h=0.5 * dt * b * (1 + dt * f2), f=0.5 * dt * b2)


def edm_euler_rows(sigma, sigma_next) -> torch.Tensor:
    """EDM Euler step on the denoiser D = m: slope d = (x - D) / sigma (the x0 output),
    x_next = x + (sigma_next - sigma) d."""
    sigma, sigma_next = _f64(sigma), _f64(sigma_next)
    return rows(_shape(sigma, sigma_next), device=_device(sigma),
                a=1 / sigma, b=-1 / sigma, c=sigma_next - sigma, d=_ones_like(sigma))


def edm_heun_corrector_rows(sigma, sigma_next) -> torch.Tensor:
    """EDM Heun step (Karras et al. Alg. 2, lines 5-8) as one launch after the Euler predictor:
    x + h (d + d') / 2 with h = sigma_next - sigma, d = (x - D) / sigma, x_pred = x + h d and
    d' = (x_pred - D') / sigma_next. In x, the first denoiser output D (the kernel's g input) and the
    second D' = m, each read once: with u = h / (2 sigma), v = h / (2 sigma_next),
    x (1 + u + v + 2 u v) - D (u + 2 u v) - D' v. sigma_next > 0."""
    sigma, sigma_next = _f64(sigma), _f64(sigma_next)
    h = sigma_next - sigma
    u, v = h / (2 * sigma), h / (2 * sigma_next)
    return rows(_shape(sigma, sigma_next), device=_device(sigma),
                d=1 + u + v + 2 * u * v, h=-(u + 2 * u * v), f=-v)


def churn_rows(sigma, sigma_hat, s_noise=1.0) -> torch.Tensor:
    """EDM's stochastic churn: x_hat = x + s_noise sqrt(sigma_hat^2 - sigma^2) z."""
    sigma, sigma_hat = _f64(sigma), _f64(sigma_hat)
    return rows(_shape(sigma, sigma_hat), device=_device(sigma),
                d=_ones_like(sigma), sigma=s_noise * _sqrt(_clamp_min((sigma_hat ** 2 - sigma ** 2), 0)))


def ancestral_step(sigma, sigma_next, eta=1.0):
    """(sigma_down, sigma_up) of an ancestral step (k-diffusion's get_ancestral_step):
    sigma_up = min(sigma_next, eta sqrt(sigma_next^2 (sigma^2 - sigma_next^2) / sigma^2)),
    sigma_down = sqrt(sigma_next^2 - sigma_up^2)."""
    sigma, sigma_next = _f64(sigma), _f64(sigma_next)
    sigma_up = _minimum(sigma_next,
                        eta * _sqrt(_clamp_min((sigma_next ** 2 * (sigma ** 2 - sigma_next ** 2) / sigma ** 2), 0)))
    return _sqrt(_clamp_min((sigma_next ** 2 - sigma_up ** 2), 0)), sigma_up


def euler_ancestral_rows(sigma, sigma_next, eta=1.0, s_noise=1.0) -> torch.Tensor:
    """Euler-ancestral: x + (sigma_down - sigma) (x - D) / sigma + s_noise sigma_up z."""
    sigma, sigma_next = _f64(sigma), _f64(sigma_next)
    sigma_down, sigma_up = ancestral_step(sigma, sigma_next, eta)
    return rows(_shape(sigma, sigma_next), device=_device(sigma),
                d=sigma_down / sigma, f=(sigma - sigma_down) / sigma, sigma=s_noise * sigma_up)


def langevin_rows(step_size, score_scale=1.0, noise=True) -> torch.Tensor:
    """Langevin dynamics x + (eta / 2) s + sqrt(eta) z with step size eta."""
    step_size = _f64(step_size)
    return rows(_shape(step_size), device=_device(step_size), d=_ones_like(step_size),
                f=0.5 * step_size * score_scale, sigma=_sqrt(step_size) if noise else _zeros_like(step_size))


def reverse_diffusion_rows(f_discrete, g_discrete, score_scale=1.0, noise=True) -> torch.Tensor:
    """score_sde's reverse-diffusion predictor on a discretised SDE x_{i+1} = x_i + f_i x_i + G_i z:
    x - f_i x + G_i^2 s + G_i z."""
    f, g = _f64(f_discrete), _f64(g_discrete)
    return rows(_shape(f, g), device=_device(f), d=1 - f, f=g ** 2 * score_scale,
                sigma=g if noise else _zeros_like(g))


# ---- rows of the widened step (ops.linear_step) ----

def linear_row(x0: Sequence[float], outputs: Sequence[tuple], *, x0_noise: float = 0.0,
               clip: tuple = (-math.inf, math.inf)) -> list[float]:
    """One row of ops.linear_step for n = len(x0) inputs:

        x0 = clip(x0_noise z + sum_i x0[i] u_i);  out_j = c_j x0 + sum_i d_j[i] u_i + s_j z
    where outputs[j] = (c_j, d_j, s_j) and d_j has n entries. Layout (csrc/include/diffkern/linear_step.h):
    [a_0 .. a_{n-1}, a_z, clip_lo, clip_hi, then c_j, d_j0 .. d_j(n-1), s_j for each output].
    """
    n = len(x0)
    row = [float(a) for a in x0] + [float(x0_noise), float(clip[0]), float(clip[1])]
    for c, d, s in outputs:
        if len(d) != n:
            raise ValueError(f"each output needs {n} input coefficients, got {len(d)}")
        row += [float(c)] + [float(v) for v in d] + [float(s)]
    return row


# ---- DPM-Solver++ (multistep, data prediction) ----

def dpmpp_update(order: int, alpha_s: float, sigma_s: float, alpha_t: float, sigma_t: float,
                 h_prev: Sequence[float] = (), *, eta: float = 0.0, s_noise: float = 1.0,
                 solver_type: str = "midpoint") -> Tuple[float, list, float]:
    """One multistep DPM-Solver++ step from (alpha_s, sigma_s) to (alpha_t, sigma_t), in float64.

    With lambda = log(alpha / sigma), h = lambda_t - lambda_s, h_eta = (1 + eta) h and x0 predictions
    m0 (now), m1, m2 (the two steps before, whose steps had sizes h_prev[0], h_prev[1] in lambda):

        x_t = (sigma_t / sigma_s) e^{-eta h} x_s + alpha_t [phi_1 D0 + w_1 D1 - 2 phi_3 D2]
              + s_noise sigma_t sqrt(1 - e^{-2 eta h}) z
    with phi_1 = 1 - e^{-h_eta}, phi_2 = 1 - phi_1 / h_eta, phi_3 = phi_2 / h_eta - 1/2, D0 = m0,
    and the divided differences (r_k = h_prev[k] / h)
      order 2: D1 = (m0 - m1) / r0, w_1 = phi_1 / 2 (midpoint) or phi_2 (heun);
      order 3: d0 = (m0 - m1) / r0, d1 = (m1 - m2) / r1, D1 = d0 + r0 (d0 - d1) / (r0 + r1),
               D2 = (d0 - d1) / (r0 + r1), w_1 = phi_2.
    eta = 0 is the probability-flow ODE (Lu et al. 2022, DPM-Solver++(2M) and 3M); eta = 1 the SDE
    variant (sde-dpmsolver++). Orders 1 and 2 are k-diffusion's sample_dpmpp_2m and
    sample_dpmpp_2m_sde written for a general (alpha, sigma) and eta.

    The factor 2 on D2: the x0 prediction along the step is m0 + D1 u/h + D2 u^2/h^2 + O(h^3) (D2 is
    about h^2 x0''/2), and the integral of its quadratic term against the exponential kernel is
    -2 phi_3(h_eta) D2. The third-order multistep update of the DPM-Solver reference code, copied by
    diffusers (deterministic) and k-diffusion's sample_dpmpp_3m_sde, weights D2 by -phi_3, which
    leaves a local error -x0'' h^3 / 12 (at eta = 0) and makes "3M" second order;
    diffusers' third-order sde-dpmsolver++ weights it by -(phi_3(2h) + 1), which is O(1) and makes
    it first order. tests/test_solvers.py measures both.

    sigma_t = 0 (the last step of a schedule ending at the data) is the first-order step x_t = m0.
    Returns (coefficient of x_s, [coefficients of m0 .. m_{order-1}], coefficient of z).
    """
    if order not in (1, 2, 3):
        raise ValueError(f"order must be 1, 2 or 3, got {order!r}")
    if solver_type not in ("midpoint", "heun"):
        raise ValueError(f"solver_type must be 'midpoint' or 'heun', got {solver_type!r}")
    if sigma_t == 0.0:
        return 0.0, [float(alpha_t)] + [0.0] * (order - 1), 0.0
    lam_s = math.log(alpha_s) - math.log(sigma_s)
    h = math.log(alpha_t) - math.log(sigma_t) - lam_s
    h_eta = (1.0 + eta) * h
    phi_1 = -math.expm1(-h_eta)
    phi_2 = 1.0 - phi_1 / h_eta
    phi_3 = phi_2 / h_eta - 0.5
    c_x = sigma_t / sigma_s * math.exp(-eta * h)
    noise = s_noise * sigma_t * math.sqrt(-math.expm1(-2.0 * eta * h)) if eta > 0 else 0.0
    m = [0.0] * order
    m[0] = alpha_t * phi_1
    if order == 2:
        w1 = alpha_t * (0.5 * phi_1 if solver_type == "midpoint" else phi_2) / (h_prev[0] / h)
        m[0] += w1
        m[1] -= w1
    elif order == 3:
        r0, r1 = h_prev[0] / h, h_prev[1] / h
        # d0 = (m0 - m1) / r0 and d1 = (m1 - m2) / r1 as coefficient vectors over (m0, m1, m2)
        d0 = [1.0 / r0, -1.0 / r0, 0.0]
        d1 = [0.0, 1.0 / r1, -1.0 / r1]
        D1 = [a + r0 / (r0 + r1) * (a - b) for a, b in zip(d0, d1)]
        D2 = [(a - b) / (r0 + r1) for a, b in zip(d0, d1)]
        for k in range(3):
            m[k] += alpha_t * (phi_2 * D1[k] - 2.0 * phi_3 * D2[k])
    return c_x, m, noise


# ---- training objectives: rows of ops.training_loss ----
# Every objective here trains a model whose output m, at a noised x_t = alpha x0 + sigma z, should
# match a target that is linear in x0 and z. Its loss row holds the residual m - target as
# p_m m + p_x0 x0 + p_z z and the per-sample weight (1 / features for a mean over features). The
# functions return float64 tensors of the levels' shape (per-sample [B]).

LOSS_FIELDS = tuple(torch.ops.diffkern.loss_row_fields().split(","))
LOSS_INDEX = {name: i for i, name in enumerate(LOSS_FIELDS)}


def loss_rows(model_output, x0, noise, weight) -> torch.Tensor:
    """[B, len(LOSS_FIELDS)] float64 rows from per-sample (or scalar) coefficients."""
    values = [v if isinstance(v, torch.Tensor) else torch.tensor(float(v), dtype=torch.float64)
              for v in (model_output, x0, noise, weight)]
    device = next((v.device for v in values if v.dim()), values[0].device)
    shape = torch.broadcast_shapes(*(v.shape for v in values))
    return torch.stack([v.to(device=device, dtype=torch.float64).expand(shape) for v in values], -1).reshape(-1, 4)


def ddpm_residual(abar, prediction_type: str):
    """(p_m, p_x0, p_z) of DDPM's targets (diffusers' conventions), x_t = sqrt(abar) x0 + sqrt(1 - abar) z:
    epsilon: m - z; sample: m - x0; v_prediction: m - v with v = sqrt(abar) z - sqrt(1 - abar) x0."""
    check_prediction_type(prediction_type)
    abar = _f64(abar)
    alpha, sigma = _sqrt(abar), _sqrt(1 - abar)
    one, zero = _ones_like(abar), _zeros_like(abar)
    if prediction_type == "epsilon":
        return one, zero, -one
    if prediction_type == "sample":
        return one, -one, zero
    return one, sigma, -alpha


def min_snr_weight(snr, gamma: float, prediction_type: str):
    """Min-SNR-gamma weighting (Hang et al. 2023, as diffusers' training scripts apply it) for a loss on
    the model's own output: min(SNR, gamma) / SNR for epsilon, / (SNR + 1) for v, itself for sample."""
    snr = _f64(snr)
    clipped = _minimum(snr, gamma)
    if prediction_type == "epsilon":
        return clipped / snr
    if prediction_type == "v_prediction":
        return clipped / (snr + 1)
    return clipped


def score_matching_residual(std, likelihood_weighting: bool):
    """Denoising score matching on a score model s at x_t = mean x0 + std z (score_sde's
    get_sde_loss_fn): without likelihood weighting the residual std s + z, with it s + z / std (whose
    weight is g(t)^2)."""
    std = _f64(std)
    one, zero = _ones_like(std), _zeros_like(std)
    if likelihood_weighting:
        return one, zero, 1 / std
    return std, zero, one


def edm_preconditioning(sigma, sigma_data: float):
    """(c_skip, c_out, c_in, c_noise) of EDM (Karras et al. 2022, Table 1):
    D(x, sigma) = c_skip x + c_out F(c_in x, c_noise)."""
    sigma = _f64(sigma)
    total = sigma ** 2 + sigma_data ** 2
    return sigma_data ** 2 / total, sigma * sigma_data / _sqrt(total), 1 / _sqrt(total), _log(sigma) / 4


def edm_residual(sigma, sigma_data: float):
    """EDM's D(x0 + sigma z) - x0 in the raw network's output F: c_out F + (c_skip - 1) x0 + c_skip sigma z."""
    c_skip, c_out, _, _ = edm_preconditioning(sigma, sigma_data)
    return c_out, c_skip - 1, c_skip * _f64(sigma)


def edm_weight(sigma, sigma_data: float, weighting: str = "edm"):
    """The weight of the denoiser's squared error |D - x0|^2 at sigma: EDM's lambda(sigma) =
    (sigma^2 + sigma_data^2) / (sigma sigma_data)^2 ("edm", which is k-diffusion's "karras"), or
    k-diffusion's "soft-min-snr" and "snr" weightings of its F-space loss, moved to D-space (divided by
    c_out^2): 1 / (sigma^2 + sigma_data^2) and 1 / sigma^2."""
    sigma = _f64(sigma)
    if weighting == "edm":
        return (sigma ** 2 + sigma_data ** 2) / (sigma * sigma_data) ** 2
    if weighting == "soft_min_snr":
        return 1 / (sigma ** 2 + sigma_data ** 2)
    if weighting == "snr":
        return 1 / sigma ** 2
    raise ValueError(f"weighting must be 'edm', 'soft_min_snr' or 'snr', got {weighting!r}")


def flow_residual(t):
    """Flow matching / rectified flow at x_t = (1 - t) x0 + t z: the velocity's residual m - (z - x0)."""
    t = _f64(t)
    one = _ones_like(t)
    return one, one, -one


def flow_weight(t, weighting: str = "none"):
    """diffusers' compute_loss_weighting_for_sd3 at sigma = t: "sigma_sqrt" t^-2, "cosmap"
    2 / (pi (1 - 2 t + 2 t^2)), "none" 1."""
    t = _f64(t)
    if weighting == "sigma_sqrt":
        return t ** -2.0
    if weighting == "cosmap":
        return 2 / (math.pi * (1 - 2 * t + 2 * t ** 2))
    if weighting == "none":
        return _ones_like(t)
    raise ValueError(f"weighting must be 'none', 'sigma_sqrt' or 'cosmap', got {weighting!r}")
