"""Samplers: each a short loop of one model call and one fused step.

Model conventions:
- ``model(x, t)`` returns the prediction (``prediction_type``: epsilon, sample or v_prediction) as a
  tensor, or an object with ``.sample`` (diffusers' UNet2DModel works unchanged), or a tuple whose
  first element is it. ``t`` is an int64 tensor [batch] on the model's device.
- With ``cond``, the model is called ``model(x, t, cond)`` (or ``model(x, t, **{cond_key: cond})``).
- Classifier-free guidance (``guidance_scale`` w): one call per step on the doubled batch
  ``[x, x]`` with conditions ``[null_cond, cond]`` (diffusers' order: unconditional half first);
  eps = eps_uncond + w (eps_cond - eps_uncond). w = 1 is the conditional model, w = 0 the
  unconditional one.
- Classifier guidance: ``classifier_grad_fn(x, t, y)`` returns grad_x log p(y | x_t); or pass a noisy
  ``classifier(x, t)`` returning logits and labels ``y``, and the sampler takes the gradient of
  log_softmax(logits)[y] with autograd. ``classifier_scale`` is gamma.
Noise: x_T is ``dk.randn(shape, seed, step=0, sample_offset)`` and step i (0-based) draws
``dk.randn(shape, seed, step=i + 1, sample_offset)``, so 16 samples in one call equal two calls of 8
with sample_offset 0 and 8. No host sync inside the loop.
"""
from __future__ import annotations

import math
import numbers
from typing import Callable, Optional

import torch

from . import coefficients, ops
from .noise import randn, resolve_device
from .schedules import DDPMSchedule
from .steps import _clip_range, check_real


def model_output_of(out) -> torch.Tensor:
    """The prediction tensor of a model call: the tensor itself, its ``.sample``, or its first element."""
    if isinstance(out, torch.Tensor):
        return out
    if hasattr(out, "sample"):
        return out.sample
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    raise TypeError(f"the model returned {type(out).__name__}; expected a tensor or an object with .sample")


def call_model(model, x: torch.Tensor, t: torch.Tensor, cond=None, cond_key: Optional[str] = None) -> torch.Tensor:
    if cond is None:
        return model_output_of(model(x, t))
    if cond_key is None:
        return model_output_of(model(x, t, cond))
    return model_output_of(model(x, t, **{cond_key: cond}))


def classifier_grad(classifier: Callable, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """grad_x log p(y | x_t) of a noisy classifier returning logits [batch, classes]."""
    with torch.enable_grad():
        x_in = x.detach().requires_grad_(True)
        logits = classifier(x_in, t)
        log_probs = torch.log_softmax(logits.to(torch.promote_types(logits.dtype, torch.float32)), dim=-1)
        selected = log_probs[torch.arange(x.shape[0], device=x.device), y].sum()
        return torch.autograd.grad(selected, x_in)[0]


def _progress(iterable, enabled: bool, desc: str):
    if not enabled:
        return iterable
    from tqdm.auto import tqdm

    return tqdm(iterable, desc=desc)


def _sample_posterior(kind: str, table_fn, model, shape, sched, num_inference_steps, timestep_spacing, seed,
                      device, dtype, prediction_type, clip_range, guidance_scale, cond, null_cond, cond_key,
                      classifier, classifier_grad_fn, y, classifier_scale, sample_offset, x_T, progress, callback,
                      learned_variance=False, noisy=True, prev_timestep="next"):
    sched = sched if sched is not None else DDPMSchedule()
    if not isinstance(sched, DDPMSchedule):
        raise TypeError(f"sched must be a diffkern.DDPMSchedule, got {type(sched).__name__}")
    coefficients.check_prediction_type(prediction_type)
    if guidance_scale is not None and (cond is None or null_cond is None):
        raise ValueError("guidance_scale needs cond and null_cond (the condition of the unconditional half)")
    if classifier is not None and classifier_grad_fn is not None:
        raise ValueError("give classifier or classifier_grad_fn, not both")
    if classifier is not None and y is None:
        raise ValueError("classifier guidance with a classifier needs the labels y")
    guided_by_classifier = classifier is not None or classifier_grad_fn is not None
    scale = float(classifier_scale) if guided_by_classifier else 0.0

    timesteps = sched.timesteps(num_inference_steps, timestep_spacing)
    t_steps = torch.tensor(timesteps, dtype=torch.int64)
    if prev_timestep == "next":
        t_prev = torch.tensor(timesteps[1:] + [-1], dtype=torch.int64)
    else:  # diffusers' DDIMScheduler: t - T // n, and the final alpha_cumprod (1) below 0
        stride = sched.num_train_timesteps // len(timesteps)
        t_prev = (torch.tensor(timesteps, dtype=torch.int64) - stride).clamp_min(-1)
    run = _Run(shape, seed, device, dtype, sample_offset, reuse_buffers=callback is None)
    table = run.table(table_fn(sched.alphas_cumprod_at(t_steps), sched.alphas_cumprod_at(t_prev), scale))
    batch = run.batch
    t_batches = run.per_step(t_steps, batch if guidance_scale is None else 2 * batch, torch.int64)
    x = run.initial(x_T, 1.0)
    doubled_cond = None if guidance_scale is None else torch.cat([null_cond, cond])
    for i in _progress(range(len(timesteps)), progress, kind):
        if guidance_scale is None:
            t = t_batches[i]
            m, m_uncond = call_model(model, x, t, cond, cond_key), None
        else:
            t = t_batches[i]
            out = call_model(model, torch.cat([x, x]), t, doubled_cond, cond_key)
            m_uncond, m = out[:batch], out[batch:]
            t = t[:batch]
        v = None
        if learned_variance:
            channels = run.shape[1]
            if m.shape[1] != 2 * channels:
                raise ValueError("variance_type='learned_range' needs model outputs with 2 x channels")
            m, v = m[:, :channels], m[:, channels:]
            m_uncond = None if m_uncond is None else m_uncond[:, :channels]
        g = None
        if classifier is not None:
            g = classifier_grad(classifier, x, t, y)
        elif classifier_grad_fn is not None:
            g = classifier_grad_fn(x, t, y)
        # each noisy step advances the noise counter once: step i draws noise step i + 1
        result = run.step(x, table, i, m, third=g, noisy=noisy, model_output_uncond=m_uncond, predicted_variance=v,
                          clip=clip_range is not None, return_x0=callback is not None)
        if callback is not None:
            x, x0 = result
            callback(i, timesteps[i], x, x0)
        else:
            x = result
    return x


def sample_ddpm(model, shape, sched: Optional[DDPMSchedule] = None, *, num_inference_steps: Optional[int] = None,
                seed: int = 0, device=None, dtype: torch.dtype = torch.float32, prediction_type: str = "epsilon",
                variance_type: str = "fixed_small", clip_sample=None, guidance_scale: Optional[float] = None,
                cond=None, null_cond=None, cond_key: Optional[str] = None, classifier=None,
                classifier_grad_fn=None, y=None, classifier_scale: float = 1.0, timestep_spacing: Optional[str] = None,
                sample_offset: int = 0, x_T: Optional[torch.Tensor] = None, progress: bool = False,
                callback: Optional[Callable] = None) -> torch.Tensor:
    """Ancestral sampling (DDPM): from x_T ~ N(0, I) through every inference timestep to x_0.

    ``num_inference_steps`` (default: all T) strides the schedule as ``timestep_spacing`` says; each
    step is dk.ddpm_step's fused kernel with the coefficients of the whole run computed once in
    float64. ``callback(i, t, x, x0)`` sees every step. See the module docstring for the model,
    guidance and noise conventions. Returns x_0 of ``shape`` and ``dtype`` on ``device``.
    """
    clip_range = _clip_range(clip_sample)

    def table_fn(abar, abar_prev, scale):
        return coefficients.ddpm_rows(abar, abar_prev, prediction_type=prediction_type, variance_type=variance_type,
                                      clip_range=clip_range, guidance_scale=guidance_scale, classifier_scale=scale)

    return _sample_posterior("DDPM", table_fn, model, shape, sched, num_inference_steps, timestep_spacing, seed,
                             device, dtype, prediction_type, clip_range, guidance_scale, cond, null_cond, cond_key,
                             classifier, classifier_grad_fn, y, classifier_scale, sample_offset, x_T, progress,
                             callback, learned_variance=variance_type == "learned_range")


def sample_ddim(model, shape, sched: Optional[DDPMSchedule] = None, *, num_inference_steps: int = 50,
                eta: float = 0.0, seed: int = 0, device=None, dtype: torch.dtype = torch.float32,
                prediction_type: str = "epsilon", clip_sample=None, guidance_scale: Optional[float] = None,
                cond=None, null_cond=None, cond_key: Optional[str] = None, classifier=None, classifier_grad_fn=None,
                y=None, classifier_scale: float = 1.0, timestep_spacing: Optional[str] = None,
                use_clipped_model_output: bool = False, prev_timestep: str = "next", sample_offset: int = 0,
                x_T: Optional[torch.Tensor] = None, progress: bool = False,
                callback: Optional[Callable] = None) -> torch.Tensor:
    """DDIM sampling (eta = 0: deterministic given x_T) over ``num_inference_steps`` timesteps.
    Arguments as sample_ddpm.

    ``prev_timestep``: where each step goes. "next" (default): the next listed timestep, so the run is
    DDIM on exactly the listed subsequence (every alpha_cumprod it uses is one of the listed
    timesteps'). "stride": t - T // n, as diffusers' DDIMScheduler.step computes it; that is the next
    listed timestep for "leading" spacing (and "trailing" when n divides T), but not in general for
    "linspace" (19 of 50 steps at T = 1000) or "trailing", where diffusers' steps land between the
    listed timesteps. Use "stride" to reproduce a diffusers DDIM pipeline exactly."""
    clip_range = _clip_range(clip_sample)
    if prev_timestep not in ("next", "stride"):
        raise ValueError(f"prev_timestep must be 'next' or 'stride', got {prev_timestep!r}")
    eta = check_real("eta", eta)

    def table_fn(abar, abar_prev, scale):
        return coefficients.ddim_rows(abar, abar_prev, eta=eta, prediction_type=prediction_type, clip_range=clip_range,
                                      guidance_scale=guidance_scale, classifier_scale=scale,
                                      use_clipped_model_output=use_clipped_model_output)

    return _sample_posterior("DDIM", table_fn, model, shape, sched, num_inference_steps, timestep_spacing, seed,
                             device, dtype, prediction_type, clip_range, guidance_scale, cond, null_cond, cond_key,
                             classifier, classifier_grad_fn, y, classifier_scale, sample_offset, x_T, progress,
                             callback, noisy=eta > 0, prev_timestep=prev_timestep)


# ---- score SDEs, EDM and Langevin samplers ----
# Conventions: score_fn(x, t) takes t as a float tensor [batch] (float32, or float64 for float64
# states) and returns the score, or the noise prediction with parameterization="epsilon";
# denoiser(x, sigma) takes sigma as a float tensor [batch] and returns D(x, sigma), the estimate of
# x0 from x = x0 + sigma z (k-diffusion / EDM); Langevin's score_fn(x, sigma) takes the noise level.
# Every noisy launch draws dk.randn(shape, seed, step=k, sample_offset) with its own k (x_T is
# step 0), so runs are reproducible across devices and batch splits.


class _Run:
    """State shared by one sampling run: device, dtypes, the noise counter, the fused step and its
    output buffers. Unless a callback may keep references to the states, the loop writes into two
    buffers in turn (and one for Heun's predicted point) instead of allocating every step."""

    def __init__(self, shape, seed, device, dtype, sample_offset, reuse_buffers=True):
        self.shape = tuple(ops.check_shape(shape))
        self.batch = self.shape[0] if self.shape else 1
        self.seed, self.device, self.dtype, self.sample_offset = seed, resolve_device(device), dtype, sample_offset
        self.table_dtype = torch.float64 if dtype == torch.float64 else torch.float32
        self.time_dtype = torch.float64 if dtype == torch.float64 else torch.float32
        self.noise_step = 0
        self.reuse_buffers = reuse_buffers
        self._buffers = {}

    def _buffer(self, name):
        buffer = self._buffers.get(name)
        if buffer is None:
            buffer = self._buffers[name] = torch.empty(self.shape, device=self.device, dtype=self.dtype)
        return buffer

    def output_for(self, x, name=None):
        """Where the step from x writes: a named buffer, or the state buffer x is not."""
        if not self.reuse_buffers:
            return None
        if name is not None:
            return self._buffer(name)
        first = self._buffer("state0")
        return self._buffer("state1") if x is first else first

    def initial(self, x_T, scale):
        if x_T is not None:
            if tuple(x_T.shape) != self.shape:
                raise ValueError(f"x_T has shape {tuple(x_T.shape)}, expected {self.shape}")
            return x_T.to(device=self.device, dtype=self.dtype)
        return randn(self.shape, seed=self.seed, step=0, sample_offset=self.sample_offset, device=self.device,
                     dtype=self.dtype) * scale

    def table(self, rows64):
        return rows64.reshape(-1, len(coefficients.FIELDS)).to(device=self.device, dtype=self.table_dtype)

    def per_step(self, values, batch=None, dtype=None):
        """values[i] as a [batch] tensor on the device for each i, made once before the loop (the
        loop then only indexes a list)."""
        values = torch.as_tensor(values).to(device=self.device, dtype=dtype or self.time_dtype)
        return list(values.reshape(-1, 1).expand(-1, batch or self.batch).unbind(0))

    def next_noise_step(self):
        self.noise_step += 1
        return self.noise_step

    def step(self, x, table, row, model_output=None, third=None, noisy=False, noise=None, into=None,
             model_output_uncond=None, predicted_variance=None, clip=False, return_x0=False):
        """One fused step from x; ``third`` is the kernel's third input (a classifier gradient, or
        Heun's first model output). Returns the new state (and x0 with return_x0)."""
        if model_output is not None and model_output.shape != x.shape:
            raise ValueError(f"the model returned shape {tuple(model_output.shape)} for x of shape {tuple(x.shape)}")
        dtype = x.dtype
        if model_output is not None and model_output.dtype != dtype:
            model_output = model_output.to(dtype)
        if model_output_uncond is not None and model_output_uncond.dtype != dtype:
            model_output_uncond = model_output_uncond.to(dtype)
        if third is not None and third.dtype != dtype:
            third = third.to(dtype)
        if predicted_variance is not None and predicted_variance.dtype != dtype:
            predicted_variance = predicted_variance.to(dtype)
        if noise is not None and noise.dtype != dtype:
            noise = noise.to(dtype)
        out = self.output_for(x, into)
        inputs = (x, model_output, model_output_uncond, third, predicted_variance, noise)
        if out is not None and (torch.is_grad_enabled() and ops._any_requires_grad(*inputs)
                                or _shares_memory(out, inputs[1:])):
            # a differentiable run records every state; a model that returned (a view of) one of
            # the run's buffers must not have it overwritten while it is read: allocate this step
            out = None
        stream_noise = noisy and noise is None
        new, x0 = ops.fused_step(
            x, model_output, model_output_uncond, third, predicted_variance, noise, coefficients=table, row=row,
            clip=clip, aux="x0" if return_x0 else "none", stream_noise=stream_noise, seed=self.seed,
            step=self.next_noise_step() if stream_noise else 0, sample_offset=self.sample_offset,
            out=out, aux_out=self.output_for(x, "x0") if return_x0 and out is not None else None)
        return (new, x0) if return_x0 else new


def _shares_memory(buffer: torch.Tensor, tensors) -> bool:
    storage = buffer.untyped_storage().data_ptr()
    return any(t is not None and t.untyped_storage().data_ptr() == storage for t in tensors)


def _time_grid(sde, num_steps, eps):
    if isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps < 1:
        raise ValueError(f"num_steps must be an int >= 1, got {num_steps!r}")
    if not 0 < eps < sde.T:
        raise ValueError(f"eps must lie in (0, {sde.T}), got {eps}")
    return torch.linspace(sde.T, eps, num_steps + 1, dtype=torch.float64)


def _check_positive_int(name, value):
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    return value


def _score_scales(parameterization, sde, t):
    if parameterization == "score":
        return torch.ones_like(t)
    if parameterization == "epsilon":
        return -1.0 / sde.marginal_std(t)
    raise ValueError(f"parameterization must be 'score' or 'epsilon', got {parameterization!r}")


def probability_flow_terms(sde, parameterization: str):
    """(a(t), b(t)) of the probability-flow ODE dx/dt = a(t) x + b(t) m(x, t), m the model output:
    a = f(t), b = -g(t)^2 scale(t) / 2 (scale turns m into the score). Floats for a float t, float64
    tensors for a tensor t (per-sample times)."""
    _score_scales(parameterization, sde, torch.zeros(1, dtype=torch.float64))  # checks parameterization

    def terms(t):
        t64 = t.to(torch.float64) if isinstance(t, torch.Tensor) else torch.tensor(t, dtype=torch.float64)
        a, b = sde.drift_coef(t64), -0.5 * sde.diffusion(t64) ** 2 * _score_scales(parameterization, sde, t64)
        return (a, b) if isinstance(t, torch.Tensor) else (float(a), float(b))
    return terms


def sample_euler_maruyama(score_fn, shape, sde, num_steps: int = 1000, *, eps: float = 1e-3,
                          parameterization: str = "score", seed: int = 0, device=None,
                          dtype: torch.dtype = torch.float32, sample_offset: int = 0, x_T=None, denoise: bool = True,
                          progress: bool = False, callback: Optional[Callable] = None) -> torch.Tensor:
    """Euler-Maruyama on the reverse SDE from t = T to t = eps over num_steps equal steps, starting
    from the prior. ``denoise`` drops the noise of the last step (score_sde's noise removal)."""
    run = _Run(shape, seed, device, dtype, sample_offset, reuse_buffers=callback is None)
    t = _time_grid(sde, num_steps, eps)
    dt = t[1:] - t[:-1]
    noisy = torch.ones(num_steps, dtype=torch.bool)
    noisy[-1] = not denoise
    table = run.table(coefficients.euler_maruyama_rows(sde.drift_coef(t[:-1]), sde.diffusion(t[:-1]), dt,
                                                       _score_scales(parameterization, sde, t[:-1])) *
                      torch.where(torch.arange(len(coefficients.FIELDS)) == coefficients.INDEX["sigma"],
                                  noisy[:, None].double(), torch.ones(1, dtype=torch.float64)))
    times, noisy = run.per_step(t), noisy.tolist()
    x = run.initial(x_T, sde.prior_std)
    for i in _progress(range(num_steps), progress, "Euler-Maruyama"):
        m = model_output_of(score_fn(x, times[i]))
        x = run.step(x, table, i, m, noisy=noisy[i])
        if callback is not None:
            callback(i, float(t[i]), x)
    return x


def sample_ode(score_fn, shape, sde, num_steps: Optional[int] = None, *, solver: str = "heun", eps: float = 1e-3,
               rtol: Optional[float] = None, atol: Optional[float] = None, error_norm: Optional[str] = None,
               max_num_evals: int = 10000, parameterization: str = "score", seed: int = 0, device=None,
               dtype: torch.dtype = torch.float32, sample_offset: int = 0, x_T=None, progress: bool = False,
               callback: Optional[Callable] = None):
    """The probability-flow ODE dx = [f(x, t) - g(t)^2 s(x, t) / 2] dt from T to eps. ``solver``:
    "euler" (one model call per step) or "heun" (two; second order) on num_steps (default 100) equal
    steps; or the embedded Runge-Kutta pairs "dopri5" / "bosh3" of log_likelihood, adaptive to
    ``rtol`` / ``atol`` (default 1e-5; ``error_norm`` "batch" or "sample", ``max_num_evals``) or, with
    num_steps, on the same fixed grid. ``callback(i, t, x)`` sees each fixed step (adaptive steps
    refuse it). Deterministic given x_T (drawn from the prior with ``seed``)."""
    from .likelihood import ADAPTIVE_SOLVERS, resolve_solver

    if solver not in ("euler", "heun") + ADAPTIVE_SOLVERS:
        raise ValueError(f"solver must be one of {('euler', 'heun') + ADAPTIVE_SOLVERS}, got {solver!r}")
    choice = resolve_solver(solver, num_steps, rtol, atol, error_norm, max_num_evals)
    run = _Run(shape, seed, device, dtype, sample_offset, reuse_buffers=callback is None)
    if choice.solver in ADAPTIVE_SOLVERS:
        if callback is not None and choice.num_steps is None:
            raise ValueError("callback goes with fixed steps (give num_steps); adaptive steps are not known ahead")
        return _sample_ode_rk(score_fn, sde, choice, eps, parameterization, run, x_T, max_num_evals, progress,
                              callback)
    num_steps = choice.num_steps
    t = _time_grid(sde, num_steps, eps)
    dt = t[1:] - t[:-1]
    scale = _score_scales(parameterization, sde, t)
    f, g = sde.drift_coef(t), sde.diffusion(t)
    euler = run.table(coefficients.ode_euler_rows(f[:-1], g[:-1], dt, scale[:-1]))
    heun = run.table(coefficients.ode_heun_corrector_rows(f[:-1], g[:-1], f[1:], g[1:], dt, scale[:-1], scale[1:]))
    times = run.per_step(t)
    x = run.initial(x_T, sde.prior_std)
    for i in _progress(range(num_steps), progress, f"ODE ({solver})"):
        m = model_output_of(score_fn(x, times[i]))
        if solver == "euler":
            x = run.step(x, euler, i, m)
        else:
            x_pred = run.step(x, euler, i, m, into="predicted")
            m_next = model_output_of(score_fn(x_pred, times[i + 1]))
            x = run.step(x, heun, i, m_next, third=m)
        if callback is not None:
            callback(i, float(t[i]), x)
    return x


def _sample_ode_rk(score_fn, sde, choice, eps, parameterization, run, x_T, max_num_evals, progress, callback):
    from . import rk

    if isinstance(eps, bool) or not isinstance(eps, numbers.Real) or not 0 < eps < sde.T:
        raise ValueError(f"eps must lie in (0, {sde.T}), got {eps!r}")
    x = run.initial(x_T, sde.prior_std)
    time_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32

    velocity_terms = probability_flow_terms(sde, parameterization)
    def evaluate(y, t, need_products):
        t_batch = (t.to(time_dtype) if isinstance(t, torch.Tensor)
                   else torch.full((y.shape[0],), t, dtype=time_dtype, device=y.device))
        output = model_output_of(score_fn(y, t_batch))
        if not isinstance(output, torch.Tensor) or output.shape != y.shape:
            raise ValueError(f"the model returned shape {tuple(getattr(output, 'shape', ()))} for x of shape "
                             f"{tuple(y.shape)}")
        return output.to(y.dtype), None

    grid = None if choice.num_steps is None else _time_grid(sde, choice.num_steps, eps).tolist()
    if callback is not None:  # fixed steps: one step at a time, seen by the callback
        for i in range(len(grid) - 1):
            x, _, _ = rk.solve(velocity_terms, evaluate, x, grid[i], grid[i + 1], tableau=rk.TABLEAUS[choice.solver],
                               rtol=0.0, atol=1.0, error_norm="batch", probes=None, trace_scale=1.0,
                               max_num_evals=max_num_evals, progress=False, desc="", grid=grid[i:i + 2])
            callback(i, grid[i], x)
        return x
    x, _, _ = rk.solve(velocity_terms, evaluate, x, float(sde.T), float(eps), tableau=rk.TABLEAUS[choice.solver],
                       rtol=choice.rtol, atol=choice.atol, error_norm=choice.error_norm, probes=None, trace_scale=1.0,
                       max_num_evals=max_num_evals, progress=progress, desc=f"ODE ({choice.solver})", grid=grid)
    return x


def _edm_sampler(kind, denoiser, shape, sigmas, s_churn, s_tmin, s_tmax, s_noise, seed, device, dtype,
                 sample_offset, x_T, progress, callback):
    from .sde import check_sigmas

    sigmas = check_sigmas(sigmas)
    s_churn, s_noise = check_real("s_churn", s_churn), check_real("s_noise", s_noise)
    s_tmin = check_real("s_tmin", s_tmin, allow_inf=True)
    s_tmax = check_real("s_tmax", s_tmax, allow_inf=True)
    steps = len(sigmas) - 1
    run = _Run(shape, seed, device, dtype, sample_offset, reuse_buffers=callback is None)
    # EDM Alg. 2: raise sigma_i to sigma_hat = sigma_i (1 + gamma_i) by adding noise, then step.
    gamma = torch.where((sigmas[:-1] >= s_tmin) & (sigmas[:-1] <= s_tmax),
                        torch.full((steps,), min(s_churn / steps, 2 ** 0.5 - 1), dtype=torch.float64),
                        torch.zeros(steps, dtype=torch.float64))
    sigma_hat = sigmas[:-1] * (1 + gamma)
    churn = run.table(coefficients.churn_rows(sigmas[:-1], sigma_hat, s_noise))
    euler = run.table(coefficients.edm_euler_rows(sigma_hat, sigmas[1:]))
    nonzero_next = sigmas[1:].clamp(min=1e-30)  # rows of the last step are unused when sigma_next = 0
    heun = run.table(coefficients.edm_heun_corrector_rows(sigma_hat, nonzero_next))
    sigma_hat_batch, sigma_batch = run.per_step(sigma_hat), run.per_step(sigmas)
    churned, next_positive = (gamma > 0).tolist(), (sigmas[1:] > 0).tolist()
    x = run.initial(x_T, float(sigmas[0]))
    for i in _progress(range(steps), progress, kind):
        if churned[i]:
            x = run.step(x, churn, i, noisy=True)
        denoised = model_output_of(denoiser(x, sigma_hat_batch[i]))
        if kind == "Heun" and next_positive[i]:
            x_pred = run.step(x, euler, i, denoised, into="predicted")
            denoised_next = model_output_of(denoiser(x_pred, sigma_batch[i + 1]))
            x = run.step(x, heun, i, denoised_next, third=denoised)
        else:
            x = run.step(x, euler, i, denoised)
        if callback is not None:
            callback(i, float(sigmas[i]), x)
    return x


def sample_euler(denoiser, shape, sigmas, *, s_churn: float = 0.0, s_tmin: float = 0.0,
                 s_tmax: float = float("inf"), s_noise: float = 1.0, seed: int = 0, device=None,
                 dtype: torch.dtype = torch.float32, sample_offset: int = 0, x_T=None, progress: bool = False,
                 callback: Optional[Callable] = None) -> torch.Tensor:
    """Euler on the EDM ODE over ``sigmas`` (decreasing, e.g. dk.karras_sigmas(n, ...) ending in 0),
    with EDM's stochastic churn; k-diffusion's sample_euler. Starts from sigmas[0] * N(0, I)."""
    return _edm_sampler("Euler", denoiser, shape, sigmas, s_churn, s_tmin, s_tmax, s_noise, seed, device, dtype,
                        sample_offset, x_T, progress, callback)


def sample_heun(denoiser, shape, sigmas, *, s_churn: float = 0.0, s_tmin: float = 0.0,
                s_tmax: float = float("inf"), s_noise: float = 1.0, seed: int = 0, device=None,
                dtype: torch.dtype = torch.float32, sample_offset: int = 0, x_T=None, progress: bool = False,
                callback: Optional[Callable] = None) -> torch.Tensor:
    """EDM's second-order sampler (Karras et al. 2022, Alg. 2): Heun steps with stochastic churn
    (S_churn, S_tmin, S_tmax, S_noise), and a plain Euler step when the next sigma is 0. Two denoiser
    calls per step (one on the last)."""
    return _edm_sampler("Heun", denoiser, shape, sigmas, s_churn, s_tmin, s_tmax, s_noise, seed, device, dtype,
                        sample_offset, x_T, progress, callback)


def sample_euler_ancestral(denoiser, shape, sigmas, *, eta: float = 1.0, s_noise: float = 1.0, seed: int = 0,
                           device=None, dtype: torch.dtype = torch.float32, sample_offset: int = 0, x_T=None,
                           progress: bool = False, callback: Optional[Callable] = None) -> torch.Tensor:
    """Ancestral sampling with Euler steps (k-diffusion's sample_euler_ancestral): each step goes
    deterministically to sigma_down and adds s_noise sigma_up z (none when the next sigma is 0)."""
    from .sde import check_sigmas

    sigmas = check_sigmas(sigmas)
    eta, s_noise = check_real("eta", eta), check_real("s_noise", s_noise)
    run = _Run(shape, seed, device, dtype, sample_offset, reuse_buffers=callback is None)
    table = run.table(coefficients.euler_ancestral_rows(sigmas[:-1], sigmas[1:], eta, s_noise))
    sigma_batch, next_positive = run.per_step(sigmas), (sigmas[1:] > 0).tolist()
    x = run.initial(x_T, float(sigmas[0]))
    for i in _progress(range(len(sigmas) - 1), progress, "Euler-ancestral"):
        denoised = model_output_of(denoiser(x, sigma_batch[i]))
        x = run.step(x, table, i, denoised, noisy=next_positive[i] and eta > 0)
        if callback is not None:
            callback(i, float(sigmas[i]), x)
    return x


def _snr_langevin(run, x, score, score_scale, snr, alpha):
    """score_sde's Langevin corrector: step size eps = 2 alpha (snr ||z|| / ||s||)^2 from the batch-mean
    norms of the score and the noise, x + eps s + sqrt(2 eps) z. The norms stay on the device."""
    z = randn(run.shape, seed=run.seed, step=run.next_noise_step(), sample_offset=run.sample_offset,
              device=run.device, dtype=x.dtype)
    flat = (lambda a: a.reshape(run.batch, math.prod(run.shape[1:])).to(torch.float64))
    grad_norm = torch.linalg.vector_norm(flat(score), dim=1).mean() * abs(score_scale)
    noise_norm = torch.linalg.vector_norm(flat(z), dim=1).mean()
    step_size = 2 * alpha * (snr * noise_norm / grad_norm) ** 2
    table = run.table(coefficients.langevin_rows(2 * step_size, score_scale))
    return run.step(x, table, 0, score, noise=z)


def sample_langevin(score_fn, shape, sigmas, n_steps_each: int = 100, *, step_size: Optional[float] = 2e-5,
                    snr: Optional[float] = None, denoise: bool = True, seed: int = 0, device=None,
                    dtype: torch.dtype = torch.float32, sample_offset: int = 0, x_T=None, progress: bool = False,
                    callback: Optional[Callable] = None) -> torch.Tensor:
    """Annealed Langevin dynamics (NCSN, Song & Ermon 2019): for each noise level sigma_i of ``sigmas``
    (decreasing), n_steps_each steps x + (a_i / 2) s(x, sigma_i) + sqrt(a_i) z with a_i = step_size
    sigma_i^2 / sigma_L^2; or, with ``snr``, score_sde's signal-to-noise step size. Starts from
    sigmas[0] * N(0, I); ``denoise`` ends with Tweedie's step x + sigma_L^2 s(x, sigma_L)."""
    from .sde import check_sigmas

    sigmas = check_sigmas(sigmas)
    if bool((sigmas == 0).any()):
        raise ValueError("annealed Langevin needs positive noise levels (no final 0)")
    if isinstance(n_steps_each, bool) or not isinstance(n_steps_each, int) or n_steps_each < 1:
        raise ValueError(f"n_steps_each must be an int >= 1, got {n_steps_each!r}")
    if snr is None and not (step_size and step_size > 0):
        raise ValueError("give a positive step_size or an snr")
    run = _Run(shape, seed, device, dtype, sample_offset, reuse_buffers=callback is None)
    table = run.table(coefficients.langevin_rows(step_size * sigmas ** 2 / sigmas[-1] ** 2)) if snr is None else None
    sigma_batch = run.per_step(sigmas)
    x = run.initial(x_T, float(sigmas[0]))
    for i in _progress(range(len(sigmas)), progress, "annealed Langevin"):
        sigma = sigma_batch[i]
        for _ in range(n_steps_each):
            score = model_output_of(score_fn(x, sigma))
            x = run.step(x, table, i, score, noisy=True) if snr is None else _snr_langevin(run, x, score, 1.0, snr, 1.0)
        if callback is not None:
            callback(i, float(sigmas[i]), x)
    if denoise:
        tweedie = run.table(coefficients.rows(d=1.0, f=float(sigmas[-1]) ** 2))
        x = run.step(x, tweedie, 0, model_output_of(score_fn(x, sigma_batch[-1])))
    return x


def _pc_discretisation(sde, num_steps, eps):
    """score_sde's grid and discretisation for its PC sampler with sde.N = num_steps: the times
    linspace(T, eps, N); step i reads index k = floor(t_i (N - 1) / T) of the N-point tables
    (discrete_betas = linspace(beta_min, beta_max, N) / N for VP, discrete_sigmas = the geometric
    sigma_min .. sigma_max for VE, whose step from index k goes to index k - 1, and to sigma = 0 from
    k = 0); other SDEs use SDE.discretize's Euler form with dt = T / N. Returns (t, f_i, G_i, alpha_i)
    in float64, with x_mean = x - f_i x + G_i^2 score the reverse-diffusion step."""
    from .sde import VESDE, VPSDE

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
    if predictor not in ("reverse_diffusion", "euler_maruyama"):
        raise ValueError(f"predictor must be 'reverse_diffusion' or 'euler_maruyama', got {predictor!r}")
    if corrector not in ("langevin", None):
        raise ValueError(f"corrector must be 'langevin' or None, got {corrector!r}")
    _check_positive_int("n_corrector_steps", n_corrector_steps)
    snr = check_real("snr", snr, strict=True)
    _time_grid(sde, num_steps, eps)  # checks num_steps and eps
    run = _Run(shape, seed, device, dtype, sample_offset, reuse_buffers=callback is None)
    t, f_discrete, g_discrete, alpha = _pc_discretisation(sde, num_steps, eps)
    scale = _score_scales(parameterization, sde, t)
    if predictor == "euler_maruyama":
        dt = torch.full_like(t, -sde.T / num_steps)
        predictor_rows = coefficients.euler_maruyama_rows(sde.drift_coef(t), sde.diffusion(t), dt, scale)
    else:
        predictor_rows = coefficients.reverse_diffusion_rows(f_discrete, g_discrete, scale)
    sigma_col = coefficients.INDEX["sigma"]
    if denoise:
        predictor_rows[-1, sigma_col] = 0.0
    table = run.table(predictor_rows)
    noisy = (predictor_rows[:, sigma_col] != 0).tolist()
    times = run.per_step(t)
    x = run.initial(x_T, sde.prior_std)
    for i in _progress(range(num_steps), progress, "predictor-corrector"):
        t_batch = times[i]
        if corrector is not None:
            for _ in range(n_corrector_steps):
                score = model_output_of(score_fn(x, t_batch))
                x = _snr_langevin(run, x, score, float(scale[i]), snr, float(alpha[i]))
        m = model_output_of(score_fn(x, t_batch))
        x = run.step(x, table, i, m, noisy=noisy[i])
        if callback is not None:
            callback(i, float(t[i]), x)
    return x
