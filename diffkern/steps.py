"""Single fused steps: dk.ddpm_step, dk.ddim_step, dk.q_sample, dk.q_sample_with_noise.

Each call is one kernel launch. The coefficients come from a float64 table over all timesteps,
computed once per (schedule, options, device) and kept on the device, so a loop of steps does no
host-to-device copy and no host sync; a per-sample t (an int64 tensor [B]) indexes that table
inside the kernel.
"""
from __future__ import annotations

import numbers
from typing import NamedTuple, Optional, Union

import torch

from . import coefficients, ops
from ._validate import check_choice, check_real, clip_range, warn_caller
from .noise import make_seed_step
from .schedules import DDPMSchedule
from .sde import PARAMETERIZATIONS

Timestep = Union[int, torch.Tensor]


def _table_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _check_int_timestep(name: str, t, T: int, allow_negative: bool = False) -> int:
    if isinstance(t, bool) or not isinstance(t, numbers.Integral):
        raise TypeError(f"{name} must be an int or an int64 tensor, got {type(t).__name__}")
    t = int(t)
    if t >= T or (t < 0 and not allow_negative):
        raise ValueError(f"{name}={t} is outside the schedule's timesteps [0, {T})")
    return t


def _check_tensor_timestep(name: str, t: torch.Tensor, batch: int, T: int, device: torch.device,
                           low: int = 0) -> torch.Tensor:
    """t as a contiguous int64 [1 or batch] tensor on device, its values checked to lie in [low, T):
    here for CPU tensors, and by an asynchronous device assertion for others (no host sync)."""
    if t.dtype not in (torch.int64, torch.int32) or t.dim() > 1 or t.numel() not in (1, batch):
        raise ValueError(f"{name} as a tensor must be int64 of shape [batch] ({batch}) or one element, got "
                         f"{t.dtype} {tuple(t.shape)}")
    if t.device.type == "cpu" and t.numel() and (int(t.min()) < low or int(t.max()) >= T):
        raise ValueError(f"{name} has values outside the schedule's timesteps [{low}, {T}): "
                         f"min {int(t.min())}, max {int(t.max())}")
    t = t.to(device=device, dtype=torch.int64).reshape(-1).contiguous()
    if t.device.type not in ("cpu", "meta") and t.numel():
        torch._assert_async(((t >= low) & (t < T)).all(), f"diffkern: {name} outside the schedule's timesteps")
    return t


def _check_prev_timestep(t: torch.Tensor, prev, name: str, batch: int, T: int, device: torch.device) -> torch.Tensor:
    """The previous timestep (an int or a tensor, argument ``name``) for a per-sample t: in [-1, T) (-1:
    the final step to x0) and below t."""
    if isinstance(prev, torch.Tensor):
        prev = _check_tensor_timestep(name, prev, batch, T, device, low=-1)
    else:
        prev = torch.full((1,), _check_int_timestep(name, prev, T, allow_negative=True), dtype=torch.int64,
                          device=device).clamp_min(-1)
    if prev.device.type == "cpu" and t.device.type == "cpu":
        if bool((prev >= t).any()):
            raise ValueError(f"{name} must be smaller than t for every sample, got {name} {prev.tolist()[:8]} for t "
                             f"{t.tolist()[:8]}")
    elif prev.device.type != "meta":
        torch._assert_async((prev < t).all(), f"diffkern: {name} must be smaller than t for every sample")
    return prev


def _as_x_dtype(name: str, t: Optional[torch.Tensor], x: torch.Tensor) -> Optional[torch.Tensor]:
    if t is None:
        return None
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name} must be a tensor, got {type(t).__name__}")
    if t.device != x.device:
        raise ValueError(f"{name} is on {t.device} but x_t is on {x.device}")
    if not t.is_floating_point():  # a complex tensor would lose its imaginary part in the cast
        raise ValueError(f"{name} must be a real floating-point tensor, got {t.dtype}")
    return t if t.dtype == x.dtype else t.to(x.dtype)


class _Noise(NamedTuple):
    """Where a single step's noise comes from: the tensor ``noise``, or the stream keyed by seed, step
    (for an int t it defaults to t), sample_offset and stream. (A NamedTuple: one is made per call.)"""

    noise: Optional[torch.Tensor] = None
    seed: object = None
    step: object = None
    sample_offset: int = 0
    stream: int = 0

    def kernel_args(self, t, needs_noise: bool, x: torch.Tensor) -> dict:
        """The fused step's noise keywords; errors when noise is needed but not given."""
        off = dict(stream_noise=False, seed=0, step=0, sample_offset=self.sample_offset, stream=self.stream,
                   seed_step=None)
        if self.noise is not None:
            if self.seed is not None:
                raise ValueError("give either noise= or seed=, not both")
            return off
        if self.seed is None:
            if needs_noise:
                raise ValueError("this step adds noise: pass seed= (the in-kernel noise stream) or noise=")
            return off
        step = self.step
        if step is None:
            if t is None:
                raise ValueError("with seed=, pass step= too (a different step for every call draws new noise)")
            if isinstance(t, torch.Tensor):
                raise ValueError("with a per-sample t tensor, pass step= to choose the noise of this call")
            step = t
        if isinstance(self.seed, torch.Tensor) or isinstance(step, torch.Tensor):
            return dict(off, stream_noise=True, seed_step=make_seed_step(self.seed, step, x.device))
        return dict(off, stream_noise=True, seed=self.seed, step=step)


class _Rule(NamedTuple):
    """A posterior step's rows: ``build(abar, abar_prev)``, cached per schedule under (kind, stride,
    *options); ``deterministic`` when no row adds noise."""

    kind: str
    build: object
    options: tuple
    deterministic: bool = False


def _previous(prev_t, t_prev):
    """The one previous-timestep argument, from ``t_prev`` or the deprecated ``prev_t``: (value, name)."""
    if prev_t is None:
        return t_prev, "t_prev"
    if t_prev is not None:
        raise ValueError("give t_prev (prev_t is its deprecated name), not both")
    warn_caller("ddpm_step's prev_t= is deprecated: call it t_prev=, as ddim_step does")
    return prev_t, "prev_t"


def _posterior_step(rule: _Rule, tensors: dict, t, prev, x_t, sched, noise: _Noise, *, clip, aux: str):
    """One DDPM / DDIM step. tensors: model_output, model_output_uncond, classifier_grad and
    predicted_variance (None where absent); prev = (previous timestep or None, its argument name)."""
    prev_t, prev_name = prev
    if not isinstance(sched, DDPMSchedule):
        raise TypeError(f"sched must be a diffkern.DDPMSchedule, got {type(sched).__name__}")
    if not isinstance(x_t, torch.Tensor) or not x_t.is_floating_point():
        raise ValueError("x_t must be a floating-point tensor")
    T = sched.num_train_timesteps
    batch = x_t.shape[0] if x_t.dim() else 1
    tensors = {name: _as_x_dtype(name, value, x_t) for name, value in tensors.items()}
    table_dtype = _table_dtype(x_t)

    rows, row = None, 0
    if isinstance(t, torch.Tensor):
        t = _check_tensor_timestep("t", t, batch, T, x_t.device)
        if prev_t is None:
            table = sched.device_table((rule.kind, 1) + rule.options, rule.build, x_t.device, table_dtype)
            rows = t
        else:
            prev = _check_prev_timestep(t, prev_t, prev_name, batch, T, x_t.device)
            abar, abar_prev = sched.alphas_cumprod_at(t), sched.alphas_cumprod_at(prev)
            table = rule.build(abar, abar_prev).to(table_dtype).reshape(-1, len(coefficients.FIELDS))
            row = 0 if table.shape[0] == 1 else -1  # one row for all samples, or row n for sample n
        needs_noise = not rule.deterministic
    else:
        t = _check_int_timestep("t", t, T)
        prev = t - 1 if prev_t is None else _check_int_timestep(prev_name, prev_t, T, allow_negative=True)
        if prev >= t:
            raise ValueError(f"{prev_name}={prev} must be smaller than t={t}")
        table = sched.device_table((rule.kind, t - prev) + rule.options, rule.build, x_t.device, table_dtype)
        row = t
        needs_noise = not rule.deterministic and prev >= 0
    noise_kwargs = noise.kernel_args(t, needs_noise, x_t)
    out, aux_out = ops.fused_step(
        x_t, tensors.get("model_output"), tensors.get("model_output_uncond"), tensors.get("classifier_grad"),
        tensors.get("predicted_variance"), _as_x_dtype("noise", noise.noise, x_t), coefficients=table, rows=rows,
        row=row, clip=clip is not None, aux=aux, **noise_kwargs)
    return out if aux == "none" else (out, aux_out)


def ddpm_step(model_output: torch.Tensor, t: Timestep, x_t: torch.Tensor, sched: DDPMSchedule,
              prediction_type: str = "epsilon", variance_type: str = "fixed_small", clip_sample=None,
              noise: Optional[torch.Tensor] = None, seed=None, *, t_prev: Optional[Timestep] = None, step=None,
              sample_offset: int = 0, stream: int = 0, model_output_uncond: Optional[torch.Tensor] = None,
              guidance_scale: Optional[float] = None, classifier_grad: Optional[torch.Tensor] = None,
              classifier_scale: float = 1.0, return_x0: bool = False, prev_t: Optional[Timestep] = None):
    """One ancestral DDPM step x_t -> x_prev in one kernel launch (argument order as diffusers'
    ``DDPMScheduler.step(model_output, timestep, sample)``).

    - ``prediction_type``: the model predicts ``epsilon``, the clean ``sample`` or ``v_prediction``.
    - ``variance_type``: ``fixed_small`` (posterior variance; ``fixed_small_log`` is the same),
      ``fixed_large`` (beta), or ``learned_range`` (model_output has 2C channels: the prediction, then
      the variance interpolation v in [-1, 1]).
    - ``clip_sample``: clamp the predicted x0 to [-r, r] (r = 1 for True) or a (lo, hi) range.
    - ``t``: an int, or an int64 tensor [B] (samples at different timesteps). ``t_prev`` is the
      timestep stepped to (default t - 1; strided schedules pass the next inference timestep; < 0
      after the last step, which adds no noise). ``prev_t`` is its deprecated name.
    - noise: ``noise=`` a tensor, or ``seed=`` (and ``step=``, default t) for the in-kernel stream:
      element (n, j) uses ``dk.randn(x_t.shape, seed, step, sample_offset, stream)[n, j]``.
    - classifier-free guidance: ``model_output`` is the conditional output and
      ``model_output_uncond`` the unconditional one; eps = eps_u + guidance_scale (eps_c - eps_u).
    - classifier guidance: ``classifier_grad`` = grad_x log p(y | x_t) and ``classifier_scale`` gamma:
      eps_hat = eps - gamma sqrt(1 - abar_t) grad.
    Model outputs of another dtype are cast to x_t's. Returns x_prev, or (x_prev, x0) with ``return_x0``.
    """
    prev = _previous(prev_t, t_prev)
    clip = clip_range(clip_sample)
    coefficients.check_prediction_type(prediction_type)
    if variance_type not in coefficients.DDPM_VARIANCE_TYPES:
        raise ValueError(f"variance_type must be one of {coefficients.DDPM_VARIANCE_TYPES}, got {variance_type!r}")
    predicted_variance = None
    if variance_type == "learned_range":
        channels = x_t.shape[1] if x_t.dim() > 1 else None
        if channels is None or model_output.dim() < 2 or model_output.shape[1] != 2 * channels:
            raise ValueError("variance_type='learned_range' needs model_output with twice x_t's channels (dim 1)")
        model_output, predicted_variance = model_output[:, :channels], model_output[:, channels:]
    scale = 0.0 if classifier_grad is None else float(classifier_scale)
    options = (prediction_type, variance_type, clip, guidance_scale, scale)

    def build(abar, abar_prev):
        return coefficients.ddpm_rows(abar, abar_prev, prediction_type=prediction_type, variance_type=variance_type,
                                      clip_range=clip, guidance_scale=guidance_scale, classifier_scale=scale)

    tensors = dict(model_output=model_output, model_output_uncond=model_output_uncond,
                   classifier_grad=classifier_grad, predicted_variance=predicted_variance)
    _check_guidance(model_output_uncond, guidance_scale)
    return _posterior_step(_Rule("ddpm", build, options), tensors, t, prev, x_t, sched,
                           _Noise(noise, seed, step, sample_offset, stream), clip=clip,
                           aux="x0" if return_x0 else "none")


def ddim_step(model_output: torch.Tensor, t: Timestep, t_prev: Timestep, x_t: torch.Tensor, sched: DDPMSchedule,
              eta: float = 0.0, prediction_type: str = "epsilon", clip_sample=None,
              noise: Optional[torch.Tensor] = None, seed=None, *, step=None, sample_offset: int = 0, stream: int = 0,
              model_output_uncond: Optional[torch.Tensor] = None, guidance_scale: Optional[float] = None,
              classifier_grad: Optional[torch.Tensor] = None, classifier_scale: float = 1.0,
              use_clipped_model_output: bool = False, return_x0: bool = False):
    """One DDIM step x_t -> x_{t_prev} in one kernel launch (t_prev < 0: the final step to x0).

    eta = 0 is deterministic (no noise argument needed); eta = 1 has DDPM's posterior variance.
    The other arguments are those of ddpm_step.
    """
    clip = clip_range(clip_sample)
    coefficients.check_prediction_type(prediction_type)
    eta = check_real("eta", eta)
    scale = 0.0 if classifier_grad is None else float(classifier_scale)
    options = (prediction_type, float(eta), clip, guidance_scale, scale, bool(use_clipped_model_output))

    def build(abar, abar_prev):
        return coefficients.ddim_rows(abar, abar_prev, eta=eta, prediction_type=prediction_type, clip_range=clip,
                                      guidance_scale=guidance_scale, classifier_scale=scale,
                                      use_clipped_model_output=use_clipped_model_output)

    tensors = dict(model_output=model_output, model_output_uncond=model_output_uncond,
                   classifier_grad=classifier_grad)
    _check_guidance(model_output_uncond, guidance_scale)
    return _posterior_step(_Rule("ddim", build, options, deterministic=eta == 0), tensors, t, (t_prev, "t_prev"),
                           x_t, sched, _Noise(noise, seed, step, sample_offset, stream), clip=clip,
                           aux="x0" if return_x0 else "none")


def _check_guidance(model_output_uncond, guidance_scale) -> None:
    if (model_output_uncond is None) != (guidance_scale is None):
        raise ValueError("classifier-free guidance needs both model_output_uncond and guidance_scale")


def _q_sample(x0, t, sched, noise: _Noise, aux: str):
    if not isinstance(sched, DDPMSchedule):
        raise TypeError(f"sched must be a diffkern.DDPMSchedule, got {type(sched).__name__}")
    if not isinstance(x0, torch.Tensor) or not x0.is_floating_point():
        raise ValueError("x0 must be a floating-point tensor")
    T = sched.num_train_timesteps
    table = sched.device_table(("q_sample", 0), lambda abar, _: coefficients.q_sample_rows(abar), x0.device,
                               _table_dtype(x0))
    if isinstance(t, torch.Tensor):
        rows, row = _check_tensor_timestep("t", t, x0.shape[0] if x0.dim() else 1, T, x0.device), 0
    else:
        rows, row = None, _check_int_timestep("t", t, T)
    noise_kwargs = noise.kernel_args(t, True, x0)
    return ops.fused_step(x0, noise=_as_x_dtype("noise", noise.noise, x0), coefficients=table, rows=rows, row=row,
                          aux=aux, **noise_kwargs)


def q_sample(x0: torch.Tensor, t: Timestep, sched: DDPMSchedule, noise: Optional[torch.Tensor] = None, seed=None, *,
             step=None, sample_offset: int = 0, stream: int = 0) -> torch.Tensor:
    """The forward process x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps, t an int or an int64 tensor [B];
    eps is ``noise`` or the noise stream (``seed`` and ``step``; step defaults to t for an int t and
    must be given for a tensor t: a training loop passes its iteration number)."""
    return _q_sample(x0, t, sched, _Noise(noise, seed, step, sample_offset, stream), "none")[0]


def q_sample_with_noise(x0: torch.Tensor, t: Timestep, sched: DDPMSchedule, *, seed, step,
                        sample_offset: int = 0, stream: int = 0):
    """(x_t, eps) in one pass, for the DDPM training loss L_simple = ||eps - eps_theta(x_t, t)||^2.
    seed and step are required: a training loop passes its iteration number as step, so every
    iteration draws new noise."""
    return _q_sample(x0, t, sched, _Noise(None, seed, step, sample_offset, stream), "noise")


# ---- score-SDE and EDM single steps ----
# Their coefficients are per-call scalars (or per-sample tensors of t / sigma, computed on the
# device). Scalar rows are kept on the device in a small cache so a loop of identical calls does no
# copy; the samplers in diffkern.samplers precompute the rows of a whole run instead.

_row_cache: dict = {}
_MAX_CACHED_ROWS = 4096


def _device_rows(table: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    table = table.reshape(-1, len(coefficients.FIELDS))
    return table.to(device=x.device, dtype=_table_dtype(x))


def _rows_for(spec: tuple, x: torch.Tensor) -> torch.Tensor:
    """The device table of ``spec`` = (row function, *arguments). Tables of scalar arguments are
    cached (a loop that repeats its steps, or a step on CUDA, then does no host work and no copy);
    tensor arguments (per-sample times) are computed on the device."""
    if any(isinstance(arg, torch.Tensor) for arg in spec):
        return _device_rows(spec[0](*spec[1:]), x)
    key = (spec, x.device, x.dtype)
    table = _row_cache.get(key)
    if table is None:
        if len(_row_cache) >= _MAX_CACHED_ROWS:
            _row_cache.pop(next(iter(_row_cache)))
        table = _row_cache[key] = _device_rows(spec[0](*spec[1:]), x)
    return table


_NO_NOISE = _Noise()


def _apply_rows(spec, x, model_output=None, slope=None, *, noise: _Noise = _NO_NOISE, needs_noise=True, aux="none"):
    """One fused step with the rows of ``spec`` (see _rows_for; rows [K] or [B, K]): the shared path
    of the single steps below."""
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        raise ValueError("x must be a floating-point tensor")
    table = _rows_for(spec, x)
    noise_kwargs = noise.kernel_args(None, needs_noise, x)
    if model_output is not None and model_output.dtype != x.dtype:
        model_output = _as_x_dtype("model_output", model_output, x)
    if slope is not None and slope.dtype != x.dtype:
        slope = _as_x_dtype("slope", slope, x)
    z = noise.noise
    if z is not None and z.dtype != x.dtype:
        z = _as_x_dtype("noise", z, x)
    out, aux_out = ops.fused_step(x, model_output, None, slope, None, z, coefficients=table,
                                  row=0 if table.shape[0] == 1 else -1, aux=aux, **noise_kwargs)
    return out if aux == "none" else (out, aux_out)


def _check_positive_values(name: str, value) -> None:
    """A float or a tensor of per-sample values that must all be finite and > 0: checked here for
    CPU tensors, by an asynchronous device assertion otherwise (no host sync)."""
    if not isinstance(value, torch.Tensor):
        check_real(name, value, strict=True)
        return
    if value.is_complex() or not (value.is_floating_point() or value.dtype in (torch.int32, torch.int64)):
        raise ValueError(f"{name} must be a real tensor, got {value.dtype}")
    ok = ((value > 0) & torch.isfinite(value)).all()
    if value.device.type == "cpu":
        if not bool(ok):
            raise ValueError(f"{name} must be finite and > 0 for every sample, got {value.tolist()[:8]}")
    elif value.device.type != "meta":
        torch._assert_async(ok, f"diffkern: {name} must be finite and > 0 for every sample")


def _time_on(t, x, name="t"):
    """A time or noise level as a float, or a per-sample tensor [1 or batch] in float64 on x's device."""
    if not isinstance(t, torch.Tensor):
        return float(t)
    batch = x.shape[0] if x.dim() else 1
    if t.dim() > 1 or t.numel() not in (1, batch) or t.is_complex():
        raise ValueError(f"{name} as a tensor must be real with 1 or batch ({batch}) elements, got {t.dtype} "
                         f"{tuple(t.shape)}")
    return t.to(device=x.device, dtype=torch.float64).reshape(-1)


def _euler_maruyama_rows(sde, t, dt, parameterization, ode):
    scale = sde.score_scale(t, parameterization)
    f, g = sde.drift_coef(t), sde.diffusion(t)
    return coefficients.ode_euler_rows(f, g, dt, scale) if ode else coefficients.euler_maruyama_rows(f, g, dt, scale)


def euler_maruyama_step(model_output: torch.Tensor, x: torch.Tensor, t, dt: float, sde, *,
                        parameterization: str = "score", noise=None, seed=None, step=None, sample_offset: int = 0,
                        stream: int = 0, ode: bool = False) -> torch.Tensor:
    """One reverse-SDE Euler-Maruyama step x + [f(x, t) - g(t)^2 s] dt + g(t) sqrt(|dt|) z (dt < 0 runs
    backwards in time), or with ``ode=True`` the probability-flow ODE Euler step
    x + [f(x, t) - g(t)^2 s / 2] dt. ``model_output`` is the score s(x, t), or the noise prediction
    with ``parameterization="epsilon"`` (s = -eps / std(t)). t is a float or a tensor [B]."""
    sde.check_time(t)
    check_choice("parameterization", parameterization, PARAMETERIZATIONS)
    spec = (_euler_maruyama_rows, sde, _time_on(t, x), float(dt), parameterization, bool(ode))
    return _apply_rows(spec, x, model_output, noise=_Noise(noise, seed, step, sample_offset, stream),
                       needs_noise=not ode)


def euler_step(denoised: torch.Tensor, x: torch.Tensor, sigma, sigma_next, *, return_slope: bool = False):
    """The EDM / k-diffusion Euler step x + (sigma_next - sigma) (x - D) / sigma for the denoiser output
    D = ``denoised``; with ``return_slope`` also the slope (x - D) / sigma."""
    _check_positive_values("sigma", sigma)  # the slope divides by it
    spec = (coefficients.edm_euler_rows, _time_on(sigma, x, "sigma"), _time_on(sigma_next, x, "sigma_next"))
    return _apply_rows(spec, x, denoised, needs_noise=False, aux="x0" if return_slope else "none")


def heun_correct(denoised_next: torch.Tensor, x: torch.Tensor, denoised: torch.Tensor, sigma,
                 sigma_next) -> torch.Tensor:
    """Heun's step of the EDM ODE (Karras et al. 2022, Alg. 1-2) after the Euler predictor went to
    x_pred = euler_step(denoised, x, sigma, sigma_next): x + (sigma_next - sigma) (d + d') / 2 from x,
    the denoiser's output at x (``denoised``) and at x_pred (``denoised_next``), each read once.
    sigma_next must be > 0 (the last step to 0 is a plain Euler step)."""
    if not isinstance(sigma_next, torch.Tensor) and float(sigma_next) <= 0:
        raise ValueError("the Heun corrector needs sigma_next > 0 (the last step to 0 is a plain Euler step)")
    _check_positive_values("sigma", sigma)
    _check_positive_values("sigma_next", sigma_next)
    spec = (coefficients.edm_heun_corrector_rows, _time_on(sigma, x, "sigma"), _time_on(sigma_next, x, "sigma_next"))
    return _apply_rows(spec, x, denoised_next, slope=denoised, needs_noise=False)


def heun_step(denoiser, x: torch.Tensor, sigma: float, sigma_next: float) -> torch.Tensor:
    """A whole Heun step of the EDM ODE: two denoiser calls (one if sigma_next == 0, Euler to 0)."""
    batch = x.shape[0]
    s = torch.full((batch,), float(sigma), dtype=x.dtype if x.dtype == torch.float64 else torch.float32,
                   device=x.device)
    denoised = denoiser(x, s)
    x_pred = euler_step(denoised, x, sigma, sigma_next)
    if float(sigma_next) == 0:
        return x_pred
    return heun_correct(denoiser(x_pred, torch.full_like(s, float(sigma_next))), x, denoised, sigma, sigma_next)


def euler_ancestral_step(denoised: torch.Tensor, x: torch.Tensor, sigma, sigma_next, *, eta: float = 1.0,
                         s_noise: float = 1.0, noise=None, seed=None, step=None, sample_offset: int = 0,
                         stream: int = 0) -> torch.Tensor:
    """Euler-ancestral (k-diffusion): step deterministically to sigma_down, then add s_noise sigma_up z."""
    _check_positive_values("sigma", sigma)
    eta, s_noise = check_real("eta", eta), check_real("s_noise", s_noise)
    spec = (coefficients.euler_ancestral_rows, _time_on(sigma, x, "sigma"), _time_on(sigma_next, x, "sigma_next"),
            float(eta), float(s_noise))
    needs_noise = isinstance(sigma_next, torch.Tensor) or (float(sigma_next) > 0 and eta > 0)
    return _apply_rows(spec, x, denoised, noise=_Noise(noise, seed, step, sample_offset, stream),
                       needs_noise=needs_noise)


def langevin_step(score: torch.Tensor, x: torch.Tensor, step_size, *, noise=None, seed=None, step=None,
                  sample_offset: int = 0, stream: int = 0) -> torch.Tensor:
    """One Langevin step x + (step_size / 2) score + sqrt(step_size) z (step_size a float or a tensor [B])."""
    _check_positive_values("step_size", step_size)
    step_size = _time_on(step_size, x, "step_size")
    return _apply_rows((coefficients.langevin_rows, step_size), x, score,
                       noise=_Noise(noise, seed, step, sample_offset, stream))
