"""Drop-in diffusers schedulers whose ``step`` is one launch of diffkern's widened fused step.

    from diffkern.diffusers import DPMSolverMultistepScheduler
    pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)

Each class subclasses the diffusers class of the same name, so configuration, ``from_config`` /
``from_pretrained`` / ``save_pretrained``, ``set_timesteps``, ``scale_model_input``, ``add_noise`` and
the other helpers are diffusers' own. What changes is the arithmetic of ``step``:

* ``set_timesteps`` builds the coefficient row of every step of the schedule (with diffusers' own
  float32 scalar arithmetic, so results agree with diffusers to float32 rounding; with
  ``exact_coefficients=True`` the training schedule and the rows are float64);
* ``step`` looks up its row by the step index (a host integer) and makes one call of
  ``diffkern.ops.linear_step``, which reads the sample, the model output and any kept history and
  writes the new sample, the x0 prediction and whatever history the solver keeps. It does not
  synchronise with the device, copy to it, or write into its arguments.

Noise: with a ``generator`` (or ``variance_noise``), noise is drawn exactly as diffusers draws it
(``randn_tensor``, same shapes, dtypes, call order and skip rules), so results equal diffusers'.
Without one, it comes from diffkern's stream, keyed by (seed, step index, sample index): the same
on CPU and CUDA and for any split of the batch. Set the seed with ``seed=`` or ``set_seed``.

This is the only module of diffkern that imports diffusers.
"""
from __future__ import annotations

import inspect
import math
import numbers
from typing import Optional

import numpy as np
import torch

try:
    from diffusers import schedulers as _schedulers
    from diffusers.utils.torch_utils import randn_tensor
except ImportError as error:  # pragma: no cover - exercised only without diffusers
    raise ImportError("diffkern.diffusers needs diffusers: pip install diffusers") from error

from . import ops
from .coefficients import linear_row

__all__ = ["DDPMScheduler", "DDIMScheduler", "EulerDiscreteScheduler", "EulerAncestralDiscreteScheduler",
           "HeunDiscreteScheduler", "DPMSolverMultistepScheduler", "UniPCMultistepScheduler",
           "FlowMatchEulerDiscreteScheduler", "LCMScheduler"]

# The tensors a step can read, in the order they are passed to the kernel.
_SLOTS = ("sample", "model_output", "last_sample", "h1", "h2", "h3", "orig_sample", "derivative", "thresholded")


class _Lin(dict):
    """A linear form over the step's tensors (slot name -> coefficient), plus "x0" and "z" (noise)."""

    def __add__(self, other):
        out = _Lin(self)
        for k, v in other.items():
            out[k] = out.get(k, 0.0) + v
        return out

    def __sub__(self, other):
        return self + (-1.0) * other

    def __rmul__(self, scale):
        scale = float(scale)
        return _Lin({k: scale * v for k, v in self.items()})

    __mul__ = __rmul__


def _term(name: str, scale=1.0) -> _Lin:
    return _Lin({name: float(scale)})


def _div(a, b) -> float:
    """a / b with IEEE semantics (inf or nan where diffusers' tensor arithmetic gives them)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        return float(np.float64(a) / np.float64(b))


def _f(value) -> float:
    """A 0-d tensor (or number) of diffusers' scalar arithmetic as a Python float."""
    return float(value.item()) if isinstance(value, torch.Tensor) else float(value)


class _Plan:
    """One compiled step: the tensors it reads, its row, its outputs."""
    __slots__ = ("slots", "key", "row", "outputs", "x0", "clip", "noisy", "pre")


class _Rows:
    """The coefficient rows of a scheduler, one table per row width, uploaded once per device."""

    def __init__(self, dtype: torch.dtype, threshold: bool = False):
        self.dtype = dtype
        self.threshold = threshold  # diffusers' dynamic thresholding of x0 (config.thresholding)
        self.rows: dict = {}
        self.tables: dict = {}

    def add(self, key, row) -> int:
        rows = self.rows.setdefault(key, [])
        rows.append(row)
        for cached in [k for k in self.tables if k[0] == key]:
            del self.tables[cached]
        return len(rows) - 1

    def table(self, key, device: torch.device, double: bool) -> torch.Tensor:
        cached = self.tables.get((key, device, double))
        if cached is None:
            cached = torch.tensor(self.rows[key], dtype=torch.float64)
            cached = cached.to(device=device, dtype=torch.float64 if double else torch.float32)
            self.tables[(key, device, double)] = cached
        return cached


def _compile(rows: _Rows, x0: _Lin, outputs: list, clip=None, want_x0: bool = False) -> _Plan:
    """A step x0 = clip(x0), out_j = outputs[j] as a row of ops.linear_step.

    With dynamic thresholding (a per-sample quantile of |x0|, which no linear row can express) the
    step is two launches around diffusers' own _threshold_sample: ``plan.pre`` writes x0, and the
    plan reads the thresholded x0 as an input where the row would have used x0 (thresholding
    replaces clipping, as in diffusers)."""
    if rows.threshold and x0:
        if "z" in x0:
            raise NotImplementedError("thresholding of an x0 prediction that contains noise")
        pre = _compile_row(rows, _Lin(), [x0], None, False)
        plan = _compile_row(rows, _term("thresholded"), outputs, None, want_x0)
        plan.pre = pre
        return plan
    return _compile_row(rows, x0, outputs, clip, want_x0)


def _compile_row(rows: _Rows, x0: _Lin, outputs: list, clip, want_x0: bool) -> _Plan:
    used = set(k for k in x0 if k != "z")
    for out in outputs:
        used |= set(k for k in out if k not in ("z", "x0"))
    plan = _Plan()
    plan.slots = tuple(s for s in _SLOTS if s in used)
    n = len(plan.slots)
    row = linear_row([x0.get(s, 0.0) for s in plan.slots],
                     [(out.get("x0", 0.0), [out.get(s, 0.0) for s in plan.slots], out.get("z", 0.0)) for out in outputs],
                     x0_noise=x0.get("z", 0.0), clip=clip if clip is not None else (-math.inf, math.inf))
    plan.key = (n, len(outputs))
    plan.row = rows.add(plan.key, row)
    plan.outputs = len(outputs)
    plan.x0 = want_x0
    plan.clip = clip is not None
    plan.noisy = x0.get("z", 0.0) != 0.0 or any(out.get("z", 0.0) != 0.0 for out in outputs)
    plan.pre = None
    return plan


def _float64_betas(config) -> torch.Tensor:
    """The training betas of a config in float64 (diffusers computes them in float32)."""
    n = config.num_train_timesteps
    if config.get("trained_betas") is not None:
        betas = torch.tensor(config.trained_betas, dtype=torch.float64)
    elif config.beta_schedule == "linear":
        betas = torch.linspace(config.beta_start, config.beta_end, n, dtype=torch.float64)
    elif config.beta_schedule == "scaled_linear":
        betas = torch.linspace(config.beta_start ** 0.5, config.beta_end ** 0.5, n, dtype=torch.float64) ** 2
    elif config.beta_schedule == "squaredcos_cap_v2":
        t = torch.arange(n + 1, dtype=torch.float64) / n
        alpha_bar = torch.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2
        betas = torch.clamp(1 - alpha_bar[1:] / alpha_bar[:-1], max=0.999)
    else:
        raise NotImplementedError(f"exact_coefficients=True does not support beta_schedule={config.beta_schedule!r}")
    if config.get("rescale_betas_zero_snr", False):
        from diffusers.schedulers.scheduling_ddpm import rescale_zero_terminal_snr
        betas = rescale_zero_terminal_snr(betas)
    return betas


class _Fused:
    """What every drop-in shares: construction options, the step index without host syncs, noise,
    and the call of the fused step. Comes before the diffusers class in the MRO."""

    # config options this class refuses: name -> predicate on its value
    _dk_refuse: dict = {}
    ignore_for_config = ["seed", "exact_coefficients"]

    def _dk_setup(self, seed: int, exact_coefficients: bool) -> None:
        for name, refused in self._dk_refuse.items():
            value = self.config.get(name)
            if value is not None and refused(value):
                raise NotImplementedError(
                    f"diffkern.diffusers.{type(self).__name__} does not support {name}={value!r}; use "
                    f"diffusers.{type(self).__name__} for it")
        self.set_seed(seed)
        if not isinstance(exact_coefficients, bool):
            raise TypeError(f"exact_coefficients must be a bool, got {exact_coefficients!r}")
        self.exact_coefficients = exact_coefficients
        if exact_coefficients and hasattr(self, "alphas_cumprod"):
            self.betas = _float64_betas(self.config)
            self.alphas = 1.0 - self.betas
            self.alphas_cumprod = torch.cumprod(self.alphas, dim=0)
            if self.config.get("rescale_betas_zero_snr", False):
                self.alphas_cumprod[-1] = 2 ** -24
            for name in ("alpha_t", "sigma_t", "lambda_t"):
                if hasattr(self, name):
                    self.alpha_t = torch.sqrt(self.alphas_cumprod)
                    self.sigma_t = torch.sqrt(1 - self.alphas_cumprod)
                    self.lambda_t = torch.log(self.alpha_t) - torch.log(self.sigma_t)
            if hasattr(self, "final_alpha_cumprod"):
                self.final_alpha_cumprod = (torch.tensor(1.0, dtype=torch.float64)
                                            if self.config.get("set_alpha_to_one", True) else self.alphas_cumprod[0])
            if hasattr(self, "one"):
                self.one = torch.tensor(1.0, dtype=torch.float64)
        self._dk_reset()

    @classmethod
    def from_config(cls, config=None, return_unused_kwargs=False, **kwargs):
        """diffusers' from_config; also takes diffkern's seed= and exact_coefficients=."""
        seed, exact = kwargs.pop("seed", 0), kwargs.pop("exact_coefficients", False)
        result = super().from_config(config, return_unused_kwargs=return_unused_kwargs, **kwargs)
        scheduler = result[0] if return_unused_kwargs else result
        if seed != 0 or exact:
            scheduler._dk_setup(seed, exact)
        return result

    def set_seed(self, seed: int) -> None:
        """The seed of the in-kernel noise used when ``step`` gets no generator (an int in [0, 2^64))."""
        if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or not 0 <= seed < 1 << 64:
            raise ValueError(f"seed must be an int in [0, 2^64), got {seed!r}")
        self.seed = int(seed)

    def _dk_reset(self) -> None:
        if getattr(self, "exact_coefficients", False) and isinstance(getattr(self, "sigmas", None), torch.Tensor):
            # the grid keeps the values diffusers chose; the arithmetic on it becomes float64
            self.sigmas = self.sigmas.to(torch.float64)
        self._dk_rows = _Rows(torch.float64, threshold=bool(self.config.get("thresholding", False)))
        self._dk_plans: dict = {}
        self._dk_host_timesteps = self.timesteps.detach().to("cpu") if isinstance(self.timesteps, torch.Tensor) \
            else torch.as_tensor(self.timesteps)
        self._dk_timestep_list = self._dk_host_timesteps.tolist()

    def _dk_plan(self, key):
        plan = self._dk_plans.get(key)
        if plan is None:
            plan = self._dk_plans[key] = self._dk_build(key)
        return plan

    def _dk_prebuild(self, keys) -> None:
        for key in keys:
            self._dk_plan(key)

    # -- the step index: diffusers' rule, on a host copy of the schedule --
    def _dk_timestep_value(self, timestep):
        if isinstance(timestep, torch.Tensor):
            schedule = self.timesteps
            if (timestep.numel() == 1 and isinstance(schedule, torch.Tensor) and timestep.device == schedule.device
                    and schedule.dim() == 1 and schedule.numel() > 0 and timestep.dtype == schedule.dtype
                    and timestep.untyped_storage().data_ptr() == schedule.untyped_storage().data_ptr()):
                # an element of scheduler.timesteps (as a pipeline's `for t in timesteps` yields): its
                # position gives its value without reading the device
                offset = timestep.storage_offset() - schedule.storage_offset()
                if offset >= 0 and offset % schedule.stride(0) == 0 and offset // schedule.stride(0) < schedule.numel():
                    return self._dk_timestep_list[offset // schedule.stride(0)]
            return timestep.item()  # a CPU tensor, or (once per run) a device tensor from elsewhere
        return timestep

    def _init_step_index(self, timestep) -> None:
        if self.begin_index is None:
            value = self._dk_timestep_value(timestep)
            self._step_index = self.index_for_timestep(
                torch.tensor(value, dtype=self._dk_host_timesteps.dtype), self._dk_host_timesteps)
        else:
            self._step_index = self._begin_index

    # -- one fused step --
    def _dk_noise_like(self, generator, shape, dtype, device):
        return randn_tensor(shape, generator=generator, device=device, dtype=dtype)

    def _dk_run(self, plan: _Plan, tensors: dict, noise: Optional[torch.Tensor], noise_step: int):
        if plan.pre is not None:
            (x0,) = self._dk_run(plan.pre, tensors, None, noise_step)
            tensors = dict(tensors, thresholded=self._threshold_sample(x0))
        inputs = [tensors[s] for s in plan.slots]
        dtype = inputs[0].dtype
        if any(t.dtype != dtype for t in inputs) or (noise is not None and noise.dtype != dtype):
            dtype = torch.promote_types(torch.float32, dtype)
            inputs = [t.to(dtype) for t in inputs]
        device = inputs[0].device
        if noise is not None:
            noise = noise.to(device=device, dtype=dtype)
        table = self._dk_rows.table(plan.key, device, dtype == torch.float64)
        return ops.linear_step(inputs, noise if plan.noisy else None, coefficients=table, row=plan.row,
                               outputs=plan.outputs, x0=plan.x0, clip=plan.clip,
                               stream_noise=plan.noisy and noise is None, seed=self.seed,
                               step=noise_step % (1 << 32))

    def _dk_sigma_step(self, plan, model_output, sample, generator, return_dict, output_class, always_draw=False):
        """The step of Euler and Euler-ancestral: noise as diffusers draws it (in the model dtype; Euler
        when the row is noisy, Euler-ancestral at every step, so the generator advances as in diffusers),
        the prev sample in the model dtype, and x0."""
        noise = None
        if generator is not None and (plan.noisy or always_draw):
            noise = randn_tensor(model_output.shape, dtype=model_output.dtype, device=model_output.device,
                                 generator=generator)
        prev_sample, pred_original_sample = self._dk_run(
            plan, {"sample": sample, "model_output": model_output}, noise, noise_step=self.step_index)
        self._step_index += 1
        prev_sample = prev_sample.to(model_output.dtype)
        if not return_dict:
            return (prev_sample, pred_original_sample)
        return output_class(prev_sample=prev_sample, pred_original_sample=pred_original_sample)


def _with_diffkern_options(cls):
    """Gives cls.__init__ diffusers' signature plus the keyword-only seed and exact_coefficients
    (ConfigMixin.from_config reads the signature to pick config keys)."""
    base = cls.__mro__[2]  # the diffusers class: cls -> _Fused -> diffusers' class
    signature = inspect.signature(base.__init__)
    extra = [inspect.Parameter("seed", inspect.Parameter.KEYWORD_ONLY, default=0),
             inspect.Parameter("exact_coefficients", inspect.Parameter.KEYWORD_ONLY, default=False)]
    parameters = [p for p in signature.parameters.values() if p.kind != inspect.Parameter.VAR_KEYWORD]
    positional = [p for p in parameters if p.kind != inspect.Parameter.KEYWORD_ONLY]
    keyword = [p for p in parameters if p.kind == inspect.Parameter.KEYWORD_ONLY]

    def __init__(self, *args, seed: int = 0, exact_coefficients: bool = False, **kwargs):
        base.__init__(self, *args, **kwargs)
        self._dk_setup(seed, exact_coefficients)

    __init__.__signature__ = signature.replace(parameters=positional + keyword + extra)
    __init__.__doc__ = base.__init__.__doc__
    cls.__init__ = __init__
    cls.__module__ = __name__
    # switching between diffkern's and diffusers' classes through from_config
    cls._compatibles = list(dict.fromkeys(list(getattr(base, "_compatibles", [])) + [base.__name__]))
    return cls


def _set_timesteps_then_rows(cls):
    """Wraps diffusers' set_timesteps: afterwards the rows of the whole schedule are built."""
    base_set_timesteps = cls.__mro__[2].set_timesteps

    def set_timesteps(self, *args, **kwargs):
        base_set_timesteps(self, *args, **kwargs)
        self._dk_reset()
        self._dk_prebuild(self._dk_schedule_keys())

    set_timesteps.__signature__ = inspect.signature(base_set_timesteps)
    set_timesteps.__doc__ = base_set_timesteps.__doc__
    cls.set_timesteps = set_timesteps
    return cls


def _drop_in(cls):
    return _set_timesteps_then_rows(_with_diffkern_options(cls))


def _refuse_integer_timestep(name: str, timestep) -> None:
    if isinstance(timestep, (int, torch.IntTensor, torch.LongTensor)):
        raise ValueError(
            "Passing integer indices (e.g. from `enumerate(timesteps)`) as timesteps to"
            f" `{name}.step()` is not supported. Make sure to pass one of the `scheduler.timesteps` as a timestep.")


def _x0_from(prediction_type: str, a_sample, a_model) -> _Lin:
    return _term("sample", a_sample) + _term("model_output", a_model)


# ---------------------------------------------------------------------------------------------
# DDPM and DDIM: rows per timestep value


@_drop_in
class DDPMScheduler(_Fused, _schedulers.DDPMScheduler):
    __doc__ = _schedulers.DDPMScheduler.__doc__
    # diffusers treats any other variance_type as fixed_small, and so does this class
    _dk_refuse = {"variance_type": lambda v: v in ("learned", "learned_range", "fixed_large_log")}

    def _dk_schedule_keys(self):
        return self._dk_timestep_list

    def _dk_previous(self, t: int) -> int:
        if self.custom_timesteps or self.num_inference_steps:
            schedule = self._dk_timestep_list
            if t not in schedule:
                raise IndexError(f"timestep {t} is not in the schedule {schedule}")
            index = schedule.index(t)
            return -1 if index == len(schedule) - 1 else schedule[index + 1]
        return t - 1

    def _dk_build(self, t):
        if not 0 <= t < len(self.alphas_cumprod):
            raise IndexError(f"timestep {t} outside [0, {len(self.alphas_cumprod)})")
        prev_t = self._dk_previous(t)
        alpha_prod_t = self.alphas_cumprod[t]
        alpha_prod_t_prev = self.alphas_cumprod[prev_t] if prev_t >= 0 else self.one
        beta_prod_t = 1 - alpha_prod_t
        beta_prod_t_prev = 1 - alpha_prod_t_prev
        current_alpha_t = alpha_prod_t / alpha_prod_t_prev
        current_beta_t = 1 - current_alpha_t
        kind = self.config.prediction_type
        if kind == "epsilon":
            x0 = _term("sample", _f(1 / alpha_prod_t ** 0.5)) + _term("model_output", _f(-beta_prod_t ** 0.5 / alpha_prod_t ** 0.5))
        elif kind == "sample":
            x0 = _term("model_output")
        elif kind == "v_prediction":
            x0 = _term("sample", _f(alpha_prod_t ** 0.5)) + _term("model_output", _f(-beta_prod_t ** 0.5))
        else:
            raise ValueError(f"prediction_type given as {kind} must be one of `epsilon`, `sample` or"
                             " `v_prediction`  for the DDPMScheduler.")
        clip = None
        if self.config.clip_sample:
            clip = (-self.config.clip_sample_range, self.config.clip_sample_range)
        prev = _term("x0", _f((alpha_prod_t_prev ** 0.5 * current_beta_t) / beta_prod_t)) + \
            _term("sample", _f(current_alpha_t ** 0.5 * beta_prod_t_prev / beta_prod_t))
        if t > 0:
            variance = self._get_variance(t)
            std = variance if self.variance_type == "fixed_small_log" else variance ** 0.5
            prev = prev + _term("z", _f(std))
        return _compile(self._dk_rows, x0, [prev], clip, want_x0=True)

    def step(self, model_output: torch.Tensor, timestep: int, sample: torch.Tensor,
             generator: Optional[torch.Generator] = None, return_dict: bool = True):
        t = int(self._dk_timestep_value(timestep))
        plan = self._dk_plan(t)
        noise = None
        if t > 0 and generator is not None:
            noise = randn_tensor(model_output.shape, generator=generator, device=model_output.device,
                                 dtype=model_output.dtype)
        prev_sample, pred_original_sample = self._dk_run(
            plan, {"sample": sample, "model_output": model_output}, noise, noise_step=t)
        if not return_dict:
            return (prev_sample, pred_original_sample)
        return _schedulers.scheduling_ddpm.DDPMSchedulerOutput(prev_sample=prev_sample,
                                                               pred_original_sample=pred_original_sample)


@_drop_in
class DDIMScheduler(_Fused, _schedulers.DDIMScheduler):
    __doc__ = _schedulers.DDIMScheduler.__doc__

    def _dk_schedule_keys(self):
        return [(t, 0.0, False) for t in self._dk_timestep_list]

    def _dk_build(self, key):
        timestep, eta, use_clipped_model_output = key
        if not 0 <= timestep < len(self.alphas_cumprod):
            raise IndexError(f"timestep {timestep} outside [0, {len(self.alphas_cumprod)})")
        prev_timestep = timestep - self.config.num_train_timesteps // self.num_inference_steps
        alpha_prod_t = self.alphas_cumprod[timestep]
        alpha_prod_t_prev = self.alphas_cumprod[prev_timestep] if prev_timestep >= 0 else self.final_alpha_cumprod
        beta_prod_t = 1 - alpha_prod_t
        kind = self.config.prediction_type
        sqrt_a, sqrt_b = _f(alpha_prod_t ** 0.5), _f(beta_prod_t ** 0.5)
        if kind == "epsilon":
            x0 = _term("sample", _f(1 / alpha_prod_t ** 0.5)) + _term("model_output", _f(-beta_prod_t ** 0.5 / alpha_prod_t ** 0.5))
            eps = _term("model_output")
        elif kind == "sample":
            x0 = _term("model_output")
            eps = _term("sample", 1 / sqrt_b) + _term("model_output", -sqrt_a / sqrt_b)  # before clipping
        elif kind == "v_prediction":
            x0 = _term("sample", sqrt_a) + _term("model_output", -sqrt_b)
            eps = _term("model_output", sqrt_a) + _term("sample", sqrt_b)
        else:
            raise ValueError(f"prediction_type given as {kind} must be one of `epsilon`, `sample`, or"
                             " `v_prediction`")
        clip = None
        if self.config.clip_sample:
            clip = (-self.config.clip_sample_range, self.config.clip_sample_range)
        variance = self._get_variance(timestep, prev_timestep)
        std_dev_t = eta * variance ** 0.5
        if use_clipped_model_output:
            eps = _term("sample", 1 / sqrt_b) + _term("x0", -sqrt_a / sqrt_b)
        direction = _f((1 - alpha_prod_t_prev - std_dev_t ** 2) ** 0.5) * eps
        prev = _term("x0", _f(alpha_prod_t_prev ** 0.5)) + direction
        if eta > 0:
            prev = prev + _term("z", _f(std_dev_t))
        return _compile(self._dk_rows, x0, [prev], clip, want_x0=True)

    def step(self, model_output: torch.Tensor, timestep: int, sample: torch.Tensor, eta: float = 0.0,
             use_clipped_model_output: bool = False, generator=None, variance_noise: Optional[torch.Tensor] = None,
             return_dict: bool = True):
        if self.num_inference_steps is None:
            raise ValueError(
                "Number of inference steps is 'None', you need to run 'set_timesteps' after creating the scheduler")
        t = int(self._dk_timestep_value(timestep))
        plan = self._dk_plan((t, float(eta), bool(use_clipped_model_output)))
        noise = None
        if eta > 0:
            if variance_noise is not None and generator is not None:
                raise ValueError(
                    "Cannot pass both generator and variance_noise. Please make sure that either `generator` or"
                    " `variance_noise` stays `None`.")
            noise = variance_noise
            if noise is None and generator is not None:
                noise = randn_tensor(model_output.shape, generator=generator, device=model_output.device,
                                     dtype=model_output.dtype)
        prev_sample, pred_original_sample = self._dk_run(
            plan, {"sample": sample, "model_output": model_output}, noise, noise_step=t)
        if not return_dict:
            return (prev_sample, pred_original_sample)
        return _schedulers.scheduling_ddim.DDIMSchedulerOutput(prev_sample=prev_sample,
                                                               pred_original_sample=pred_original_sample)


# ---------------------------------------------------------------------------------------------
# sigma schedulers: rows per step index


def _sigma_x0(kind: str, sigma: float, noise_scale: float = 0.0, allow_sample: bool = True,
              sigma_hat: Optional[float] = None) -> _Lin:
    """x0 of Euler-type schedulers from the (possibly churned, to sigma_hat) sample x + noise_scale z."""
    sample = _term("sample") + _term("z", noise_scale)
    if kind in ("original_sample", "sample") and allow_sample:
        return _term("model_output")
    if kind == "epsilon":
        return sample + _term("model_output", -(sigma if sigma_hat is None else sigma_hat))
    if kind == "v_prediction":
        return _term("model_output", -sigma / (sigma ** 2 + 1) ** 0.5) + (1 / (sigma ** 2 + 1)) * sample
    raise ValueError(f"prediction_type given as {kind} must be one of `epsilon`, or `v_prediction`")


@_drop_in
class EulerDiscreteScheduler(_Fused, _schedulers.EulerDiscreteScheduler):
    __doc__ = _schedulers.EulerDiscreteScheduler.__doc__
    _dk_refuse = {}

    def _dk_schedule_keys(self):
        return [(i, 0.0, 0.0, math.inf, 1.0) for i in range(len(self._dk_timestep_list))]

    def _dk_build(self, key):
        index, s_churn, s_tmin, s_tmax, s_noise = key
        sigma = self.sigmas[index]
        gamma = min(s_churn / (len(self.sigmas) - 1), 2 ** 0.5 - 1) if s_tmin <= sigma <= s_tmax else 0.0
        sigma_hat = sigma * (gamma + 1)
        noise_scale = _f(s_noise * (sigma_hat ** 2 - sigma ** 2) ** 0.5) if gamma > 0 else 0.0
        sample_hat = _term("sample") + _term("z", noise_scale)
        x0 = _sigma_x0(self.config.prediction_type, _f(sigma), noise_scale, sigma_hat=_f(sigma_hat))
        dt = _f(self.sigmas[index + 1] - sigma_hat)
        prev = sample_hat + (dt / _f(sigma_hat)) * (sample_hat - _term("x0"))
        return _compile(self._dk_rows, x0, [prev], want_x0=True)

    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor, s_churn: float = 0.0,
             s_tmin: float = 0.0, s_tmax: float = float("inf"), s_noise: float = 1.0, generator=None,
             return_dict: bool = True):
        _refuse_integer_timestep("EulerDiscreteScheduler", timestep)
        if self.step_index is None:
            self._init_step_index(timestep)
        plan = self._dk_plan((self.step_index, float(s_churn), float(s_tmin), float(s_tmax), float(s_noise)))
        return self._dk_sigma_step(plan, model_output, sample, generator, return_dict,
                                   _schedulers.scheduling_euler_discrete.EulerDiscreteSchedulerOutput)


@_drop_in
class EulerAncestralDiscreteScheduler(_Fused, _schedulers.EulerAncestralDiscreteScheduler):
    __doc__ = _schedulers.EulerAncestralDiscreteScheduler.__doc__
    _dk_refuse = {}

    def _dk_schedule_keys(self):
        return range(len(self._dk_timestep_list))

    def _dk_build(self, index):
        sigma_from, sigma_to = self.sigmas[index], self.sigmas[index + 1]
        kind = self.config.prediction_type
        if kind == "sample":
            raise NotImplementedError("prediction_type not implemented yet: sample")
        x0 = _sigma_x0(kind, _f(sigma_from), allow_sample=False)
        sigma_up = (sigma_to ** 2 * (sigma_from ** 2 - sigma_to ** 2) / sigma_from ** 2) ** 0.5
        sigma_down = (sigma_to ** 2 - sigma_up ** 2) ** 0.5
        dt = _f(sigma_down - sigma_from)
        prev = _term("sample") + (dt / _f(sigma_from)) * (_term("sample") - _term("x0")) + _term("z", _f(sigma_up))
        return _compile(self._dk_rows, x0, [prev], want_x0=True)

    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor, generator=None,
             return_dict: bool = True):
        _refuse_integer_timestep("EulerDiscreteScheduler", timestep)
        if self.step_index is None:
            self._init_step_index(timestep)
        return self._dk_sigma_step(self._dk_plan(self.step_index), model_output, sample, generator, return_dict,
                                   _schedulers.scheduling_euler_ancestral_discrete.EulerAncestralDiscreteSchedulerOutput,
                                   always_draw=True)


@_drop_in
class HeunDiscreteScheduler(_Fused, _schedulers.HeunDiscreteScheduler):
    __doc__ = _schedulers.HeunDiscreteScheduler.__doc__
    _dk_refuse = {}

    def _dk_schedule_keys(self):
        start = self.begin_index or 0  # the stages alternate from the first step on
        return [(index, (index - start) % 2 == 0) for index in range(start, len(self._dk_timestep_list))]

    def _dk_build(self, key):
        index, first = key
        if first:
            sigma, sigma_next = _f(self.sigmas[index]), _f(self.sigmas[index + 1])
        else:
            sigma, sigma_next = _f(self.sigmas[index - 1]), _f(self.sigmas[index])
        sigma_input = sigma if first else sigma_next
        x0 = _sigma_x0(self.config.prediction_type, sigma_input)
        clip = None
        if self.config.clip_sample:
            clip = (-self.config.clip_sample_range, self.config.clip_sample_range)
        if first:
            derivative = _div(1.0, sigma) * (_term("sample") - _term("x0"))
            dt = sigma_next - sigma
            return _compile(self._dk_rows, x0, [_term("sample") + dt * derivative, derivative], clip, want_x0=True)
        # sigma_next = 0 happens only out of order (diffusers then returns inf / nan, and so does this)
        derivative = 0.5 * (_term("derivative") + _div(1.0, sigma_next) * (_term("sample") - _term("x0")))
        dt = _f(self.sigmas[index]) - sigma  # the first stage's dt, sigma_next - sigma of that stage
        return _compile(self._dk_rows, x0, [_term("orig_sample") + dt * derivative], clip, want_x0=True)

    def step(self, model_output, timestep, sample, return_dict: bool = True):
        if self.step_index is None:
            self._init_step_index(timestep)
        first = self.state_in_first_order
        plan = self._dk_plan((self.step_index, first))
        if first:
            prev_sample, derivative, pred_original_sample = self._dk_run(
                plan, {"sample": sample, "model_output": model_output}, None, noise_step=self.step_index)
            self.prev_derivative = derivative
            self.dt = self.sigmas[self.step_index + 1] - self.sigmas[self.step_index]
            self.sample = sample
        else:
            prev_sample, pred_original_sample = self._dk_run(
                plan, {"sample": sample, "model_output": model_output, "orig_sample": self.sample,
                       "derivative": self.prev_derivative}, None, noise_step=self.step_index)
            self.prev_derivative = None
            self.dt = None
            self.sample = None
        self._step_index += 1
        if not return_dict:
            return (prev_sample, pred_original_sample)
        return _schedulers.scheduling_heun_discrete.HeunDiscreteSchedulerOutput(
            prev_sample=prev_sample, pred_original_sample=pred_original_sample)


@_drop_in
class FlowMatchEulerDiscreteScheduler(_Fused, _schedulers.FlowMatchEulerDiscreteScheduler):
    __doc__ = _schedulers.FlowMatchEulerDiscreteScheduler.__doc__
    _dk_refuse = {}

    def _dk_reset(self):
        super()._dk_reset()
        self._dk_host_sigmas = self.sigmas.detach().to("cpu")

    def _dk_schedule_keys(self):
        return range(len(self._dk_timestep_list))

    def _dk_build(self, index):
        sigma, sigma_next = self._dk_host_sigmas[index], self._dk_host_sigmas[index + 1]
        if self.config.stochastic_sampling:
            x0 = _term("sample") + _term("model_output", -_f(sigma))
            prev = _term("x0", _f(1.0 - sigma_next)) + _term("z", _f(sigma_next))
            return _compile(self._dk_rows, x0, [prev])
        dt = _f(sigma_next - sigma)
        return _compile(self._dk_rows, _Lin(), [_term("sample") + _term("model_output", dt)])

    def step(self, model_output, timestep, sample, s_churn: float = 0.0, s_tmin: float = 0.0,
             s_tmax: float = float("inf"), s_noise: float = 1.0, generator=None, per_token_timesteps=None,
             return_dict: bool = True):
        if isinstance(timestep, int) or isinstance(timestep, (torch.IntTensor, torch.LongTensor)):
            _refuse_integer_timestep("FlowMatchEulerDiscreteScheduler", timestep)
        if per_token_timesteps is not None:
            raise NotImplementedError("diffkern.diffusers.FlowMatchEulerDiscreteScheduler does not support "
                                      "per_token_timesteps; use diffusers' class for it")
        if self.step_index is None:
            self._init_step_index(timestep)
        plan = self._dk_plan(self.step_index)
        noise = None
        if self.config.stochastic_sampling and generator is not None:
            noise = randn_tensor(sample.shape, generator=generator, device=sample.device, dtype=torch.float32)
        (prev_sample,) = self._dk_run(plan, {"sample": sample, "model_output": model_output}, noise,
                                      noise_step=self.step_index)
        self._step_index += 1
        prev_sample = prev_sample.to(model_output.dtype)
        if not return_dict:
            return (prev_sample,)
        return _schedulers.scheduling_flow_match_euler_discrete.FlowMatchEulerDiscreteSchedulerOutput(
            prev_sample=prev_sample)


@_drop_in
class LCMScheduler(_Fused, _schedulers.LCMScheduler):
    __doc__ = _schedulers.LCMScheduler.__doc__

    def _dk_schedule_keys(self):
        return range(len(self._dk_timestep_list)) if self.num_inference_steps else []

    def _dk_build(self, index):
        schedule = self._dk_timestep_list
        timestep = schedule[index]
        prev_timestep = schedule[index + 1] if index + 1 < len(schedule) else timestep
        alpha_prod_t = self.alphas_cumprod[timestep]
        alpha_prod_t_prev = self.alphas_cumprod[prev_timestep] if prev_timestep >= 0 else self.final_alpha_cumprod
        beta_prod_t = 1 - alpha_prod_t
        beta_prod_t_prev = 1 - alpha_prod_t_prev
        c_skip, c_out = self.get_scalings_for_boundary_condition_discrete(torch.tensor(timestep))
        kind = self.config.prediction_type
        if kind == "epsilon":
            x0 = _term("sample", _f(1 / alpha_prod_t.sqrt())) + _term("model_output", _f(-beta_prod_t.sqrt() / alpha_prod_t.sqrt()))
        elif kind == "sample":
            x0 = _term("model_output")
        elif kind == "v_prediction":
            x0 = _term("sample", _f(alpha_prod_t.sqrt())) + _term("model_output", _f(-beta_prod_t.sqrt()))
        else:
            raise ValueError(f"prediction_type given as {kind} must be one of `epsilon`, `sample` or"
                             " `v_prediction` for LCMScheduler.")
        clip = None
        if self.config.clip_sample:
            clip = (-self.config.clip_sample_range, self.config.clip_sample_range)
        denoised = _term("x0", _f(c_out)) + _term("sample", _f(c_skip))
        prev = denoised
        if index != self.num_inference_steps - 1:
            prev = _f(alpha_prod_t_prev.sqrt()) * denoised + _term("z", _f(beta_prod_t_prev.sqrt()))
        return _compile(self._dk_rows, x0, [prev, denoised], clip)

    def step(self, model_output, timestep, sample, generator=None, return_dict: bool = True):
        if self.num_inference_steps is None:
            raise ValueError(
                "Number of inference steps is 'None', you need to run 'set_timesteps' after creating the scheduler")
        if self.step_index is None:
            self._init_step_index(timestep)
        plan = self._dk_plan(self.step_index)
        noise = None
        if plan.noisy and generator is not None:
            noise = randn_tensor(model_output.shape, generator=generator, device=model_output.device,
                                 dtype=torch.promote_types(model_output.dtype, sample.dtype))
        prev_sample, denoised = self._dk_run(plan, {"sample": sample, "model_output": model_output}, noise,
                                             noise_step=self.step_index)
        self._step_index += 1
        if not return_dict:
            return (prev_sample, denoised)
        return _schedulers.scheduling_lcm.LCMSchedulerOutput(prev_sample=prev_sample, denoised=denoised)


# ---------------------------------------------------------------------------------------------
# multistep solvers: rows per (step index, order); kept x0 predictions are kernel inputs


def _lambda(alpha_sigma):
    alpha, sigma = alpha_sigma
    return torch.log(alpha) - torch.log(sigma)


@_drop_in
class DPMSolverMultistepScheduler(_Fused, _schedulers.DPMSolverMultistepScheduler):
    __doc__ = _schedulers.DPMSolverMultistepScheduler.__doc__

    def _dk_setup(self, seed, exact_coefficients):
        if self.config.thresholding and self.config.algorithm_type in ("dpmsolver", "sde-dpmsolver"):
            raise NotImplementedError(
                "diffkern.diffusers.DPMSolverMultistepScheduler supports thresholding only with the dpmsolver++ "
                f"algorithms, not algorithm_type={self.config.algorithm_type!r}; use diffusers' class for it")
        super()._dk_setup(seed, exact_coefficients)

    def _dk_orders(self, index: int, lower_order_nums: int) -> int:
        n = len(self._dk_timestep_list)
        lower_order_final = (index == n - 1) and (
            self.config.euler_at_final or (self.config.lower_order_final and n < 15)
            or self.config.final_sigmas_type == "zero")
        lower_order_second = (index == n - 2) and self.config.lower_order_final and n < 15
        if self.config.solver_order == 1 or lower_order_nums < 1 or lower_order_final:
            return 1
        if self.config.solver_order == 2 or lower_order_nums < 2 or lower_order_second:
            return 2
        return 3

    def _dk_schedule_keys(self):
        start = self.begin_index or 0
        return [(i, self._dk_orders(i, min(i - start, self.config.solver_order)))
                for i in range(start, len(self._dk_timestep_list))]

    def _dk_build(self, key):
        index, order = key
        sigmas = self.sigmas
        alpha_s0, sigma_s0 = self._sigma_to_alpha_sigma_t(sigmas[index])
        # x0 (or epsilon for the dpmsolver / sde-dpmsolver algorithms) from the model output
        kind, algorithm = self.config.prediction_type, self.config.algorithm_type
        a, s = _f(alpha_s0), _f(sigma_s0)
        if algorithm in ("dpmsolver++", "sde-dpmsolver++"):
            if kind == "epsilon":
                x0 = _term("sample", _f(1 / alpha_s0)) + _term("model_output", _f(-sigma_s0 / alpha_s0))
            elif kind == "sample":
                x0 = _term("model_output")
            elif kind == "v_prediction":
                x0 = _term("sample", a) + _term("model_output", -s)
            elif kind == "flow_prediction":
                x0 = _term("sample") + _term("model_output", -_f(sigmas[index]))
            else:
                raise ValueError(f"prediction_type given as {kind} must be one of `epsilon`, `sample`, "
                                 "`v_prediction`, or `flow_prediction` for the DPMSolverMultistepScheduler.")
        else:
            if kind == "epsilon":
                x0 = _term("model_output")
            elif kind == "sample":
                x0 = _term("sample", 1 / s) + _term("model_output", -a / s)
            elif kind == "v_prediction":
                x0 = _term("model_output", a) + _term("sample", s)
            else:
                raise ValueError(f"prediction_type given as {kind} must be one of `epsilon`, `sample`, or"
                                 " `v_prediction` for the DPMSolverMultistepScheduler.")
        alpha_t, sigma_t = self._sigma_to_alpha_sigma_t(sigmas[index + 1])
        h = _lambda((alpha_t, sigma_t)) - _lambda((alpha_s0, sigma_s0))
        m0, m1, m2 = _term("x0"), _term("h1"), _term("h2")
        plus, sde = algorithm in ("dpmsolver++", "sde-dpmsolver++"), algorithm.startswith("sde")
        sample_coefficient = (sigma_t / sigma_s0 * torch.exp(-h) if sde else sigma_t / sigma_s0) if plus \
            else alpha_t / alpha_s0
        noise = 0.0
        if sde:
            noise = sigma_t * torch.sqrt(1.0 - torch.exp(-2 * h)) if plus else sigma_t * torch.sqrt(torch.exp(2 * h) - 1.0)
        if order == 1:
            D = [m0]
        else:
            alpha_s1, sigma_s1 = self._sigma_to_alpha_sigma_t(sigmas[index - 1])
            r0 = (_lambda((alpha_s0, sigma_s0)) - _lambda((alpha_s1, sigma_s1))) / h
            if order == 2:
                D = [m0, _div(1.0, _f(r0)) * (m0 - m1)]
            else:
                alpha_s2, sigma_s2 = self._sigma_to_alpha_sigma_t(sigmas[index - 2])
                r1 = (_lambda((alpha_s1, sigma_s1)) - _lambda((alpha_s2, sigma_s2))) / h
                d1_0, d1_1 = _div(1.0, _f(r0)) * (m0 - m1), _div(1.0, _f(r1)) * (m1 - m2)
                D = [m0, d1_0 + _f(r0 / (r0 + r1)) * (d1_0 - d1_1), _f(1.0 / (r0 + r1)) * (d1_0 - d1_1)]
        weights = self._dk_weights(order, h, alpha_t, sigma_t, plus, sde)
        prev = _term("sample", _f(sample_coefficient)) + _term("z", _f(noise))
        for w, d in zip(weights, D):
            prev = prev + _f(w) * d
        return _compile(self._dk_rows, x0, [prev], want_x0=True)

    def _dk_weights(self, order, h, alpha_t, sigma_t, plus, sde):
        """The coefficients of D0, D1, D2 in diffusers' update formulas (its scalar arithmetic)."""
        e = torch.exp
        heun = self.config.solver_type == "heun"
        if plus and not sde:
            w0 = -(alpha_t * (e(-h) - 1.0))
            w1 = (alpha_t * ((e(-h) - 1.0) / h + 1.0)) if (heun or order == 3) else -0.5 * (alpha_t * (e(-h) - 1.0))
            w2 = -(alpha_t * ((e(-h) - 1.0 + h) / h ** 2 - 0.5))
        elif plus:
            w0 = alpha_t * (1 - e(-2.0 * h))
            w1 = (alpha_t * ((1.0 - e(-2.0 * h)) / (-2.0 * h) + 1.0)) if (heun or order == 3) \
                else 0.5 * (alpha_t * (1 - e(-2.0 * h)))
            w2 = alpha_t * ((1.0 - e(-2.0 * h) - 2.0 * h) / (2.0 * h) ** 2 - 0.5)
        elif not sde:
            w0 = -(sigma_t * (e(h) - 1.0))
            w1 = -(sigma_t * ((e(h) - 1.0) / h - 1.0)) if (heun or order == 3) else -0.5 * (sigma_t * (e(h) - 1.0))
            w2 = -(sigma_t * ((e(h) - 1.0 - h) / h ** 2 - 0.5))
        else:
            if order == 3:
                raise NotImplementedError("diffusers has no third-order sde-dpmsolver update")
            w0 = -2.0 * (sigma_t * (e(h) - 1.0))
            w1 = -2.0 * (sigma_t * ((e(h) - 1.0) / h - 1.0)) if heun else -(sigma_t * (e(h) - 1.0))
            w2 = 0.0
        return [w0, w1, w2][:order]

    def step(self, model_output, timestep, sample, generator=None, variance_noise=None, return_dict: bool = True):
        if self.num_inference_steps is None:
            raise ValueError(
                "Number of inference steps is 'None', you need to run 'set_timesteps' after creating the scheduler")
        if self.step_index is None:
            self._init_step_index(timestep)
        if self.config.variance_type in ("learned", "learned_range") and self.config.prediction_type == "epsilon":
            model_output = model_output[:, :3]
        plan = self._dk_plan((self.step_index, self._dk_orders(self.step_index, self.lower_order_nums)))
        noise = None
        if self.config.algorithm_type in ("sde-dpmsolver", "sde-dpmsolver++"):
            if variance_noise is not None:
                noise = variance_noise.to(device=model_output.device, dtype=torch.float32)
            elif generator is not None:
                noise = randn_tensor(model_output.shape, generator=generator, device=model_output.device,
                                     dtype=torch.float32)
        tensors = {"sample": sample, "model_output": model_output,
                   "h1": self.model_outputs[-1], "h2": self.model_outputs[-2] if self.config.solver_order > 1 else None}
        prev_sample, converted = self._dk_run(plan, tensors, noise, noise_step=self.step_index)
        for i in range(self.config.solver_order - 1):
            self.model_outputs[i] = self.model_outputs[i + 1]
        self.model_outputs[-1] = converted
        if self.lower_order_nums < self.config.solver_order:
            self.lower_order_nums += 1
        prev_sample = prev_sample.to(model_output.dtype)
        self._step_index += 1
        if not return_dict:
            return (prev_sample,)
        return _schedulers.scheduling_utils.SchedulerOutput(prev_sample=prev_sample)


@_drop_in
class UniPCMultistepScheduler(_Fused, _schedulers.UniPCMultistepScheduler):
    __doc__ = _schedulers.UniPCMultistepScheduler.__doc__
    _dk_refuse = {"solver_p": lambda v: v is not None}

    def _dk_setup(self, seed, exact_coefficients):
        if getattr(self, "solver_p", None) is not None:
            raise NotImplementedError("diffkern.diffusers.UniPCMultistepScheduler does not support solver_p; "
                                      "use diffusers.UniPCMultistepScheduler for it")
        if self.config.thresholding and not self.predict_x0:
            raise NotImplementedError("diffkern.diffusers.UniPCMultistepScheduler supports thresholding only with "
                                      "predict_x0=True; use diffusers.UniPCMultistepScheduler for it")
        super()._dk_setup(seed, exact_coefficients)

    def _dk_this_order(self, index: int, lower_order_nums: int) -> int:
        order = self.config.solver_order
        if self.config.lower_order_final:
            order = min(order, len(self._dk_timestep_list) - index)
        return min(order, lower_order_nums + 1)

    def _dk_schedule_keys(self):
        start = self.begin_index or 0
        keys, previous_order = [], None
        for i in range(start, len(self._dk_timestep_list)):
            done = min(i - start, self.config.solver_order)
            corrector = previous_order if (i > start and (i - 1) not in self.disable_corrector) else 0
            order = self._dk_this_order(i, done)
            keys.append((i, corrector, order))
            previous_order = order
        return keys

    def _dk_solve(self, index: int, order: int, history_offset: int, h, predictor: bool):
        """rks, rhos and the scalars of diffusers' UniPC bh update (its float32 arithmetic)."""
        lambda_s0 = _lambda(self._sigma_to_alpha_sigma_t(self.sigmas[index - history_offset]))
        rks = []
        for i in range(1, order):
            lambda_si = _lambda(self._sigma_to_alpha_sigma_t(self.sigmas[index - history_offset - i]))
            rks.append((lambda_si - lambda_s0) / h)
        rks.append(torch.ones(()))
        rks = torch.stack(rks)
        hh = -h if self.predict_x0 else h
        h_phi_1 = torch.expm1(hh)
        h_phi_k = h_phi_1 / hh - 1
        factorial_i = 1
        B_h = hh if self.config.solver_type == "bh1" else torch.expm1(hh)
        R, b = [], []
        for i in range(1, order + 1):
            R.append(torch.pow(rks, i - 1))
            b.append(h_phi_k * factorial_i / B_h)
            factorial_i *= i + 1
            h_phi_k = h_phi_k / hh - 1 / factorial_i
        R, b = torch.stack(R), torch.stack(b)
        if predictor:
            rhos = [] if order == 1 else ([0.5] if order == 2 else torch.linalg.solve(R[:-1, :-1], b[:-1]).tolist())
        else:
            rhos = [0.5] if order == 1 else torch.linalg.solve(R, b).tolist()
        return [_f(r) for r in rks[:-1]], rhos, h_phi_1, B_h

    def _dk_build(self, key):
        index, corrector_order, order = key
        kind = self.config.prediction_type
        alpha, sigma = self._sigma_to_alpha_sigma_t(self.sigmas[index])
        if self.predict_x0:
            if kind == "epsilon":
                x0 = _term("sample", _f(1 / alpha)) + _term("model_output", _f(-sigma / alpha))
            elif kind == "sample":
                x0 = _term("model_output")
            elif kind == "v_prediction":
                x0 = _term("sample", _f(alpha)) + _term("model_output", -_f(sigma))
            elif kind == "flow_prediction":
                x0 = _term("sample") + _term("model_output", -_f(self.sigmas[index]))
            else:
                raise ValueError(f"prediction_type given as {kind} must be one of `epsilon`, `sample`, "
                                 "`v_prediction`, or `flow_prediction` for the UniPCMultistepScheduler.")
        else:
            if kind == "epsilon":
                x0 = _term("model_output")
            elif kind == "sample":
                x0 = _term("sample", _f(1 / sigma)) + _term("model_output", _f(-alpha / sigma))
            elif kind == "v_prediction":
                x0 = _term("model_output", _f(alpha)) + _term("sample", _f(sigma))
            else:
                raise ValueError(f"prediction_type given as {kind} must be one of `epsilon`, `sample`, or"
                                 " `v_prediction` for the UniPCMultistepScheduler.")
        history = [_term("h1"), _term("h2"), _term("h3")]  # model_outputs[-1], [-2], [-3] before this step
        corrected = _term("sample")
        if corrector_order:  # corrector: from last_sample at sigma[index - 1] to sigma[index]
            alpha_t, sigma_t = self._sigma_to_alpha_sigma_t(self.sigmas[index])
            alpha_s0, sigma_s0 = self._sigma_to_alpha_sigma_t(self.sigmas[index - 1])
            h = _lambda((alpha_t, sigma_t)) - _lambda((alpha_s0, sigma_s0))
            rks, rhos, h_phi_1, B_h = self._dk_solve(index, corrector_order, 1, h, predictor=False)
            scale, outer = (alpha_t, sigma_t / sigma_s0) if self.predict_x0 else (sigma_t, alpha_t / alpha_s0)
            m0 = history[0]
            corr = _Lin()
            for rk, rho, mi in zip(rks, rhos[:-1], history[1:]):
                corr = corr + _div(rho, rk) * (mi - m0)
            corrected = (_f(outer) * _term("last_sample") - _f(scale * h_phi_1) * m0
                         - _f(scale * B_h) * (corr + rhos[-1] * (_term("x0") - m0)))
        alpha_t, sigma_t = self._sigma_to_alpha_sigma_t(self.sigmas[index + 1])
        alpha_s0, sigma_s0 = self._sigma_to_alpha_sigma_t(self.sigmas[index])
        h = _lambda((alpha_t, sigma_t)) - _lambda((alpha_s0, sigma_s0))
        rks, rhos, h_phi_1, B_h = self._dk_solve(index, order, 0, h, predictor=True)
        scale, outer = (alpha_t, sigma_t / sigma_s0) if self.predict_x0 else (sigma_t, alpha_t / alpha_s0)
        m0 = _term("x0")
        pred = _Lin()
        for rk, rho, mi in zip(rks, rhos, history):
            pred = pred + _div(rho, rk) * (mi - m0)
        prev = _f(outer) * corrected - _f(scale * h_phi_1) * m0 - _f(scale * B_h) * pred
        outputs = [prev, corrected] if corrector_order else [prev]
        return _compile(self._dk_rows, x0, outputs, want_x0=True)

    def step(self, model_output, timestep, sample, return_dict: bool = True):
        if self.num_inference_steps is None:
            raise ValueError(
                "Number of inference steps is 'None', you need to run 'set_timesteps' after creating the scheduler")
        if self.step_index is None:
            self._init_step_index(timestep)
        use_corrector = (self.step_index > 0 and self.step_index - 1 not in self.disable_corrector
                         and self.last_sample is not None)
        corrector_order = self.this_order if use_corrector else 0
        if self.config.lower_order_final:
            this_order = min(self.config.solver_order, len(self.timesteps) - self.step_index)
        else:
            this_order = self.config.solver_order
        this_order = min(this_order, self.lower_order_nums + 1)
        plan = self._dk_plan((self.step_index, corrector_order, this_order))
        history = self.model_outputs
        tensors = {"sample": sample, "model_output": model_output, "last_sample": self.last_sample,
                   "h1": history[-1], "h2": history[-2] if len(history) > 1 else None,
                   "h3": history[-3] if len(history) > 2 else None}
        results = self._dk_run(plan, tensors, None, noise_step=self.step_index)
        prev_sample, converted = results[0], results[-1]
        for i in range(self.config.solver_order - 1):
            self.model_outputs[i] = self.model_outputs[i + 1]
            self.timestep_list[i] = self.timestep_list[i + 1]
        self.model_outputs[-1] = converted
        self.timestep_list[-1] = timestep
        self.this_order = this_order
        self.last_sample = results[1] if use_corrector else sample
        if self.lower_order_nums < self.config.solver_order:
            self.lower_order_nums += 1
        self._step_index += 1
        if not return_dict:
            return (prev_sample,)
        return _schedulers.scheduling_utils.SchedulerOutput(prev_sample=prev_sample)
