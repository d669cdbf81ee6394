"""What every drop-in scheduler shares: construction options (seed, exact_coefficients), the step
index without host syncs, the noise (diffusers' own with a generator, the stream without), and the
call of the fused step; the class decorator that gives each drop-in diffusers' signature."""
from __future__ import annotations

import inspect
import math
import numbers
from typing import Optional

import torch
from diffusers.utils.torch_utils import randn_tensor

from .. import ops
from .._graph import compiling
from ._linear_form import Lin, Plan, Rows, term


def float64_betas(config) -> torch.Tensor:
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


class FusedScheduler:
    """What every drop-in shares: construction options, the step index without host syncs, noise,
    and the call of the fused step. Comes before the diffusers class in the MRO."""

    # config options this class refuses: name -> predicate on its value
    _dk_refuse: dict = {}
    ignore_for_config = ["seed", "exact_coefficients", "sample_offset"]

    def _dk_setup(self, seed: int, exact_coefficients: bool, sample_offset: int = 0) -> None:
        for name, refused in self._dk_refuse.items():
            value = self.config.get(name)
            if value is not None and refused(value):
                raise NotImplementedError(
                    f"diffkern.diffusers.{type(self).__name__} does not support {name}={value!r}; use "
                    f"diffusers.{type(self).__name__} for it")
        self.set_seed(seed, sample_offset)
        if not isinstance(exact_coefficients, bool):
            raise TypeError(f"exact_coefficients must be a bool, got {exact_coefficients!r}")
        self.exact_coefficients = exact_coefficients
        if exact_coefficients and hasattr(self, "alphas_cumprod"):
            self.betas = float64_betas(self.config)
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
        """diffusers' from_config; also takes diffkern's seed=, sample_offset= and exact_coefficients=."""
        seed, exact = kwargs.pop("seed", 0), kwargs.pop("exact_coefficients", False)
        offset = kwargs.pop("sample_offset", 0)
        result = super().from_config(config, return_unused_kwargs=return_unused_kwargs, **kwargs)
        scheduler = result[0] if return_unused_kwargs else result
        if seed != 0 or exact or offset != 0:
            scheduler._dk_setup(seed, exact, offset)
        return result

    def set_seed(self, seed: int, sample_offset: int = 0) -> None:
        """The key of the in-kernel noise used when ``step`` gets no generator: the seed (an int in
        [0, 2^64)) and the global index of the batch's first row (``sample_offset``, in [0, 2^32)), so
        that a batch split over calls or processes draws the noise of the whole batch."""
        if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or not 0 <= seed < 1 << 64:
            raise ValueError(f"seed must be an int in [0, 2^64), got {seed!r}")
        if isinstance(sample_offset, bool) or not isinstance(sample_offset, numbers.Integral) \
                or not 0 <= sample_offset < 1 << 32:
            raise ValueError(f"sample_offset must be an int in [0, 2^32), got {sample_offset!r}")
        self.seed, self.sample_offset = int(seed), int(sample_offset)

    def _dk_reset(self) -> None:
        if getattr(self, "exact_coefficients", False) and isinstance(getattr(self, "sigmas", None), torch.Tensor):
            # the grid keeps the values diffusers chose; the arithmetic on it becomes float64
            self.sigmas = self.sigmas.to(torch.float64)
        self._dk_rows = Rows(torch.float64, threshold=bool(self.config.get("thresholding", False)))
        self._dk_plans: dict = {}
        self._dk_host_timesteps = self.timesteps.detach().to("cpu") if isinstance(self.timesteps, torch.Tensor) \
            else torch.as_tensor(self.timesteps)
        self._dk_timestep_list = self._dk_host_timesteps.tolist()
        self._dk_compiled_calls = 0

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
        if isinstance(timestep, torch.Tensor) and compiling():
            return self._dk_compiled_timestep_value(timestep)
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

    def _dk_compiled_timestep_value(self, timestep):
        """Compiled, nothing may read the timestep's value: each call that asks for it takes the
        schedule's next timestep (from set_begin_index's index, or the first), and the graph asserts,
        without a host synchronisation, that the given timestep is that one. So a compiled loop
        follows scheduler.timesteps in order from set_timesteps, as a pipeline's loop does."""
        index = (getattr(self, "begin_index", None) or 0) + self._dk_compiled_calls
        if index >= len(self._dk_timestep_list):
            raise IndexError(f"step() called past the end of the schedule's {len(self._dk_timestep_list)} timesteps: "
                             "call set_timesteps again to start a new run")
        self._dk_compiled_calls += 1
        value = self._dk_timestep_list[index]
        torch._assert_async((timestep == value).all(),
                            "a compiled drop-in step got a timestep other than the schedule's next one (compiled, "
                            "the steps follow scheduler.timesteps in order; use set_begin_index to start later)")
        return value

    def _init_step_index(self, timestep) -> None:
        if self.begin_index is None:
            value = self._dk_timestep_value(timestep)
            if value not in self._dk_timestep_list:
                more = " ..." if len(self._dk_timestep_list) > 8 else ""
                raise IndexError(f"timestep {value} is not in the schedule {self._dk_timestep_list[:8]}{more}: pass "
                                 "one of scheduler.timesteps")
            # diffusers' index_for_timestep rule (the second match when the timestep repeats, as after
            # img2img's truncation) on the host list: no tensor is read inside the loop
            matches = [i for i, v in enumerate(self._dk_timestep_list) if v == value]
            self._step_index = matches[1] if len(matches) > 1 else matches[0]
        else:
            self._step_index = self._begin_index

    def _dk_begin_step(self, timestep) -> None:
        """The step index of this call (diffusers' rule on the first call), refused past the schedule's
        end, where diffusers' arithmetic would return nan."""
        if self.step_index is None:
            self._init_step_index(timestep)
        if self.step_index >= len(self._dk_timestep_list):
            raise IndexError(f"step() called {self.step_index - len(self._dk_timestep_list) + 1} time(s) past the end "
                             f"of the schedule's {len(self._dk_timestep_list)} timesteps: call set_timesteps again "
                             "to start a new run")

    # -- one fused step --
    def _dk_noise_like(self, generator, shape, dtype, device):
        return randn_tensor(shape, generator=generator, device=device, dtype=dtype)

    def _dk_run(self, plan: Plan, tensors: dict, noise: Optional[torch.Tensor], noise_step: int):
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
                               sample_offset=self.sample_offset,
                               step=noise_step % (1 << 32))

    def _dk_output(self, plan, tensors: dict, noise, noise_step: int, return_dict: bool, output_class):
        """Run a plan whose outputs are (prev_sample, pred_original_sample) and return them as diffusers does."""
        prev_sample, pred_original_sample = self._dk_run(plan, tensors, noise, noise_step=noise_step)
        if not return_dict:
            return (prev_sample, pred_original_sample)
        return output_class(prev_sample=prev_sample, pred_original_sample=pred_original_sample)

    def _dk_sigma_step(self, plan, model_output, sample, generator, return_dict, output_class, always_draw=False):
        """The step of Euler and Euler-ancestral: noise as diffusers draws it (in the model dtype; Euler
        when the row is noisy, Euler-ancestral at every step, so the generator advances as in diffusers),
        the prev sample in the model dtype, and x0."""
        noise = None
        if generator is not None and (plan.noisy or always_draw):
            noise = self._dk_noise_like(generator, model_output.shape, model_output.dtype, model_output.device)
        prev_sample, pred_original_sample = self._dk_run(
            plan, {"sample": sample, "model_output": model_output}, noise, noise_step=self.step_index)
        self._step_index += 1
        if prev_sample.dtype != model_output.dtype:  # (.to costs ~0.7 us even when it returns its input)
            prev_sample = prev_sample.to(model_output.dtype)
        if not return_dict:
            return (prev_sample, pred_original_sample)
        return output_class(prev_sample=prev_sample, pred_original_sample=pred_original_sample)


def _diffusers_base(cls) -> type:
    """The diffusers scheduler class a drop-in subclasses (after FusedScheduler in its bases)."""
    return next(c for c in cls.__mro__ if c.__module__.startswith("diffusers."))


def _with_diffkern_options(cls, base: type):
    """Gives cls.__init__ diffusers' signature plus the keyword-only seed and exact_coefficients
    (ConfigMixin.from_config reads the signature to pick config keys)."""
    signature = inspect.signature(base.__init__)
    extra = [inspect.Parameter("seed", inspect.Parameter.KEYWORD_ONLY, default=0),
             inspect.Parameter("exact_coefficients", inspect.Parameter.KEYWORD_ONLY, default=False),
             inspect.Parameter("sample_offset", inspect.Parameter.KEYWORD_ONLY, default=0)]
    parameters = [p for p in signature.parameters.values() if p.kind != inspect.Parameter.VAR_KEYWORD]
    positional = [p for p in parameters if p.kind != inspect.Parameter.KEYWORD_ONLY]
    keyword = [p for p in parameters if p.kind == inspect.Parameter.KEYWORD_ONLY]

    def __init__(self, *args, seed: int = 0, exact_coefficients: bool = False, sample_offset: int = 0, **kwargs):
        base.__init__(self, *args, **kwargs)
        self._dk_setup(seed, exact_coefficients, sample_offset)

    __init__.__signature__ = signature.replace(parameters=positional + keyword + extra)
    __init__.__doc__ = base.__init__.__doc__
    cls.__init__ = __init__
    cls.__doc__ = base.__doc__
    cls.__module__ = "diffkern.diffusers"  # where users import it from
    # switching between diffkern's and diffusers' classes through from_config
    cls._compatibles = list(dict.fromkeys(list(getattr(base, "_compatibles", [])) + [base.__name__]))


def _set_timesteps_then_rows(cls, base: type):
    """Wraps diffusers' set_timesteps: afterwards the rows of the whole schedule are built."""
    base_set_timesteps = base.set_timesteps

    def set_timesteps(self, *args, **kwargs):
        steps = kwargs.get("num_inference_steps", args[0] if args else None)
        if steps is not None and (isinstance(steps, bool) or not isinstance(steps, numbers.Integral) or steps < 1):
            raise ValueError(f"num_inference_steps must be an int >= 1, got {steps!r}")
        base_set_timesteps(self, *args, **kwargs)
        self._dk_reset()
        # A pipeline calls set_timesteps at every run: the rows of a schedule this scheduler has seen
        # are kept (building 50 steps' rows costs 1-4 ms, more than the steps at small sizes).
        sigmas = getattr(self, "sigmas", None)
        signature = (tuple(self._dk_timestep_list), self.num_inference_steps,
                     tuple(sigmas.tolist()) if isinstance(sigmas, torch.Tensor) else None)
        built = self.__dict__.setdefault("_dk_built", {})
        if signature in built:
            self._dk_rows, self._dk_plans = built.pop(signature)
        self._dk_prebuild(self._dk_schedule_keys())
        built[signature] = (self._dk_rows, self._dk_plans)
        while len(built) > 8:  # the most recently used schedules
            built.pop(next(iter(built)))

    set_timesteps.__signature__ = inspect.signature(base_set_timesteps)
    set_timesteps.__doc__ = base_set_timesteps.__doc__
    cls.set_timesteps = set_timesteps


def drop_in(cls):
    """Class decorator of every drop-in ``class X(FusedScheduler, diffusers' X)``: diffusers' signature
    and docs with diffkern's options, and rows built at set_timesteps."""
    base = _diffusers_base(cls)
    _with_diffkern_options(cls, base)
    _set_timesteps_then_rows(cls, base)
    return cls


def refuse_integer_timestep(name: str, timestep) -> None:
    if isinstance(timestep, (int, torch.IntTensor, torch.LongTensor)):
        raise ValueError(
            "Passing integer indices (e.g. from `enumerate(timesteps)`) as timesteps to"
            f" `{name}.step()` is not supported. Make sure to pass one of the `scheduler.timesteps` as a timestep.")


def sigma_x0(kind: str, sigma: float, noise_scale: float = 0.0, allow_sample: bool = True,
              sigma_hat: Optional[float] = None) -> Lin:
    """x0 of Euler-type schedulers from the (possibly churned, to sigma_hat) sample x + noise_scale z."""
    sample = term("sample") + term("z", noise_scale)
    if kind in ("original_sample", "sample") and allow_sample:
        return term("model_output")
    if kind == "epsilon":
        return sample + term("model_output", -(sigma if sigma_hat is None else sigma_hat))
    if kind == "v_prediction":
        return term("model_output", -sigma / (sigma ** 2 + 1) ** 0.5) + (1 / (sigma ** 2 + 1)) * sample
    raise ValueError(f"prediction_type given as {kind} must be one of `epsilon`, or `v_prediction`")


def lambda_of(alpha_sigma):
    alpha, sigma = alpha_sigma
    return torch.log(alpha) - torch.log(sigma)
