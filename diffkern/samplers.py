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

from typing import Callable, Optional

import torch

from . import coefficients, ops
from .noise import randn, resolve_device
from .schedules import DDPMSchedule
from .steps import _clip_range


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
                      learned_variance=False, noisy=True):
    sched = sched if sched is not None else DDPMSchedule()
    if not isinstance(sched, DDPMSchedule):
        raise TypeError(f"sched must be a diffkern.DDPMSchedule, got {type(sched).__name__}")
    coefficients.check_prediction_type(prediction_type)
    device = resolve_device(device)
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
    t_prev = torch.tensor(timesteps[1:] + [-1], dtype=torch.int64)
    table_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    table = table_fn(sched.alphas_cumprod_at(t_steps), sched.alphas_cumprod_at(t_prev), scale)
    table = table.to(device=device, dtype=table_dtype)  # one copy per run
    t_device = t_steps.to(device)

    shape = tuple(ops.check_shape(shape))
    batch = shape[0] if shape else 1
    if x_T is None:
        x = randn(shape, seed=seed, step=0, sample_offset=sample_offset, device=device, dtype=dtype)
    else:
        if tuple(x_T.shape) != shape:
            raise ValueError(f"x_T has shape {tuple(x_T.shape)}, expected {shape}")
        x = x_T.to(device=device, dtype=dtype)
    doubled_cond = None if guidance_scale is None else torch.cat([null_cond, cond])
    for i in _progress(range(len(timesteps)), progress, kind):
        if guidance_scale is None:
            t = t_device[i].expand(batch)
            out = call_model(model, x, t, cond, cond_key)
            m, m_uncond = out, None
        else:
            t = t_device[i].expand(2 * batch)
            out = call_model(model, torch.cat([x, x]), t, doubled_cond, cond_key)
            m_uncond, m = out[:batch], out[batch:]
            t = t[:batch]
        v = None
        if learned_variance:
            channels = shape[1]
            if m.shape[1] != 2 * channels:
                raise ValueError("variance_type='learned_range' needs model outputs with 2 x channels")
            m, v = m[:, :channels], m[:, channels:]
            m_uncond = None if m_uncond is None else m_uncond[:, :channels]
        if m.shape != x.shape:
            raise ValueError(f"the model returned shape {tuple(m.shape)} for x of shape {tuple(x.shape)}")
        g = None
        if classifier is not None:
            g = classifier_grad(classifier, x, t, y)
        elif classifier_grad_fn is not None:
            g = classifier_grad_fn(x, t, y)
        cast = (lambda a: None if a is None else a.to(x.dtype))
        x, x0 = ops.fused_step(
            x, cast(m), cast(m_uncond), cast(g), cast(v), coefficients=table, row=i, clip=clip_range is not None,
            aux="x0" if callback is not None else "none", stream_noise=noisy, seed=seed, step=i + 1,
            sample_offset=sample_offset)
        if callback is not None:
            callback(i, timesteps[i], x, x0)
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
                use_clipped_model_output: bool = False, sample_offset: int = 0, x_T: Optional[torch.Tensor] = None,
                progress: bool = False, callback: Optional[Callable] = None) -> torch.Tensor:
    """DDIM sampling (eta = 0: deterministic given x_T) over ``num_inference_steps`` timesteps.
    Arguments as sample_ddpm."""
    clip_range = _clip_range(clip_sample)
    if not eta >= 0:
        raise ValueError(f"eta must be >= 0, got {eta}")

    def table_fn(abar, abar_prev, scale):
        return coefficients.ddim_rows(abar, abar_prev, eta=eta, prediction_type=prediction_type, clip_range=clip_range,
                                      guidance_scale=guidance_scale, classifier_scale=scale,
                                      use_clipped_model_output=use_clipped_model_output)

    return _sample_posterior("DDIM", table_fn, model, shape, sched, num_inference_steps, timestep_spacing, seed,
                             device, dtype, prediction_type, clip_range, guidance_scale, cond, null_cond, cond_key,
                             classifier, classifier_grad_fn, y, classifier_scale, sample_offset, x_T, progress,
                             callback, noisy=eta > 0)
