"""DDPM and DDIM sampling: ancestral steps through a DDPMSchedule's timesteps, each one model call and
one fused launch, with classifier-free and classifier guidance.

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

from dataclasses import dataclass
from typing import Callable, Optional

import torch

from .. import coefficients
from .._graph import plan
from .._model import call_model
from .._validate import check_choice, check_real, clip_range
from ..schedules import DDPMSchedule
from ._engine import Run, RunSpec

PREV_TIMESTEPS = ("next", "stride")


def classifier_grad(classifier: Callable, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """grad_x log p(y | x_t) of a noisy classifier returning logits [batch, classes]."""
    with torch.enable_grad():
        x_in = x.detach().requires_grad_(True)
        logits = classifier(x_in, t)
        log_probs = torch.log_softmax(logits.to(torch.promote_types(logits.dtype, torch.float32)), dim=-1)
        selected = log_probs[torch.arange(x.shape[0], device=x.device), y].sum()
        return torch.autograd.grad(selected, x_in)[0]


@dataclass(frozen=True)
class Guidance:
    """Classifier-free guidance (guidance_scale, cond, null_cond) and classifier guidance (classifier
    or classifier_grad_fn, labels y, classifier_scale), and how the condition reaches the model."""

    guidance_scale: Optional[float] = None
    cond: object = None
    null_cond: object = None
    cond_key: Optional[str] = None
    classifier: Optional[Callable] = None
    classifier_grad_fn: Optional[Callable] = None
    y: object = None
    classifier_scale: float = 1.0

    def check(self) -> "Guidance":
        if self.guidance_scale is not None and (self.cond is None or self.null_cond is None):
            raise ValueError("guidance_scale needs cond and null_cond (the condition of the unconditional half)")
        if self.classifier is not None and self.classifier_grad_fn is not None:
            raise ValueError("give classifier or classifier_grad_fn, not both")
        if self.classifier is not None and self.y is None:
            raise ValueError("classifier guidance with a classifier needs the labels y")
        return self

    @property
    def scale(self) -> float:
        """gamma, or 0 without classifier guidance."""
        guided = self.classifier is not None or self.classifier_grad_fn is not None
        return float(self.classifier_scale) if guided else 0.0

    def gradient(self, x, t):
        if self.classifier is not None:
            return classifier_grad(self.classifier, x, t, self.y)
        if self.classifier_grad_fn is not None:
            return self.classifier_grad_fn(x, t, self.y)
        return None


@dataclass(frozen=True)
class _Posterior:
    """One DDPM-family sampler: its label, its rows (``rows``, a row function of
    diffkern.coefficients, with the keyword options ``row_options``), and the options the loop reads."""

    label: str
    rows: str
    row_options: tuple
    num_inference_steps: Optional[int]
    timestep_spacing: Optional[str]
    clip: bool
    learned_variance: bool = False
    noisy: bool = True
    prev_timestep: str = "next"


@plan
def _posterior_plan(sched, rows: str, row_options: tuple, classifier_scale: float, num_inference_steps,
                    timestep_spacing, prev_timestep: str):
    """The run's timesteps and where each step goes (two lists) and its rows (float64)."""
    sched = sched if sched is not None else DDPMSchedule()
    timesteps = sched.timesteps(num_inference_steps, timestep_spacing)
    t_steps = torch.tensor(timesteps, dtype=torch.int64)
    if prev_timestep == "next":
        t_prev = torch.tensor(timesteps[1:] + [-1], dtype=torch.int64)
    else:  # diffusers' DDIMScheduler: t - T // n, and the final alpha_cumprod (1) below 0
        stride = sched.num_train_timesteps // len(timesteps)
        t_prev = (t_steps - stride).clamp_min(-1)
    table = getattr(coefficients, rows)(sched.alphas_cumprod_at(t_steps), sched.alphas_cumprod_at(t_prev),
                                        classifier_scale=classifier_scale, **dict(row_options))
    return timesteps, t_prev.tolist(), table


def _sample_posterior(rule: _Posterior, model, sched, spec: RunSpec, guidance: Guidance) -> torch.Tensor:
    if sched is not None and not isinstance(sched, DDPMSchedule):
        raise TypeError(f"sched must be a diffkern.DDPMSchedule, got {type(sched).__name__}")
    guidance.check()
    timesteps, t_prev, rows = _posterior_plan(sched, rule.rows, rule.row_options, guidance.scale,
                                              rule.num_inference_steps, rule.timestep_spacing, rule.prev_timestep)
    run = Run(spec, "timestep", legacy=("i", "level", "x", "denoised"))
    table = run.fused_table(rows)
    batch, cfg = run.batch, guidance.guidance_scale is not None
    t_batches = run.per_step(timesteps, 2 * batch if cfg else batch, torch.int64)
    levels = list(zip(timesteps, t_prev))
    x = run.initial(1.0)
    doubled_cond = torch.cat([guidance.null_cond, guidance.cond]) if cfg else None
    callback, guided = run.callback, guidance.scale != 0.0
    noisy, clip, learned_variance = rule.noisy, rule.clip, rule.learned_variance
    for i in run.steps(len(timesteps), rule.label):
        t = t_batches[i]
        if cfg:
            out = call_model(model, torch.cat([x, x]), t, doubled_cond, guidance.cond_key)
            m_uncond, m = out[:batch], out[batch:]
            t = t[:batch]
        else:
            m, m_uncond = call_model(model, x, t, guidance.cond, guidance.cond_key), None
        v = None
        if learned_variance:
            channels = run.shape[1]
            if m.shape[1] != 2 * channels:
                raise ValueError("variance_type='learned_range' needs model outputs with 2 x channels")
            m, v = m[:, :channels], m[:, channels:]
            m_uncond = None if m_uncond is None else m_uncond[:, :channels]
        g = guidance.gradient(x, t) if guided else None
        # each noisy step advances the noise counter once: step i draws noise step i + 1
        result = run.step(x, table, i, m, third=g, noisy=noisy, model_output_uncond=m_uncond,
                          predicted_variance=v, clip=clip, return_x0=callback is not None)
        if callback is not None:
            x, x0 = result
            run.report(i, levels[i], x, x0)
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
    float64. ``callback(info)`` sees every step (a StepInfo: its level is the timestep). See the
    module docstring for the model, guidance and noise conventions. Returns x_0 of ``shape`` and
    ``dtype`` on ``device``.
    """
    clip = clip_range(clip_sample)
    coefficients.check_prediction_type(prediction_type)
    check_choice("variance_type", variance_type, coefficients.DDPM_VARIANCE_TYPES)

    row_options = (("prediction_type", prediction_type), ("variance_type", variance_type), ("clip_range", clip),
                   ("guidance_scale", guidance_scale))
    rule = _Posterior("DDPM", "ddpm_rows", row_options, num_inference_steps, timestep_spacing, clip is not None,
                      learned_variance=variance_type == "learned_range")
    guidance = Guidance(guidance_scale, cond, null_cond, cond_key, classifier, classifier_grad_fn, y, classifier_scale)
    spec = RunSpec(shape, seed, device, dtype, sample_offset, x_T, progress, callback)
    return _sample_posterior(rule, model, sched, spec, guidance)


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
    clip = clip_range(clip_sample)
    check_choice("prev_timestep", prev_timestep, PREV_TIMESTEPS)
    eta = check_real("eta", eta)
    coefficients.check_prediction_type(prediction_type)

    row_options = (("eta", eta), ("prediction_type", prediction_type), ("clip_range", clip),
                   ("guidance_scale", guidance_scale), ("use_clipped_model_output", use_clipped_model_output))
    rule = _Posterior("DDIM", "ddim_rows", row_options, num_inference_steps, timestep_spacing, clip is not None,
                      noisy=eta > 0,
                      prev_timestep=prev_timestep)
    guidance = Guidance(guidance_scale, cond, null_cond, cond_key, classifier, classifier_grad_fn, y, classifier_scale)
    spec = RunSpec(shape, seed, device, dtype, sample_offset, x_T, progress, callback)
    return _sample_posterior(rule, model, sched, spec, guidance)
