"""The one run engine of every sampler: a run's device, dtypes and noise counter; its tables, made
before the loop; its fused steps (ops.fused_step and the widened ops.linear_step); its callback.

Noise contract: x_T is ``dk.randn(shape, seed, step=0, sample_offset)`` times the prior scale, and
the k-th noisy launch of a run draws ``dk.randn(shape, seed, step=k, sample_offset)`` inside the kernel,
so 16 samples in one call equal two calls of 8 with sample_offset 0 and 8, on the CPU and on CUDA.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch

from .. import coefficients, ops
from .._graph import compiling, device_table, plan
from .._model import StepInfo, progress, step_callback
from .._validate import check_dtype, check_shape
from ..noise import SAMPLING_STREAM, make_seed_step, randn, resolve_device


@dataclass(frozen=True)
class RunSpec:
    """What every sampler's run is asked for besides its model and its schedule: the samples'
    shape, their noise key (seed, sample_offset), device and dtype, an optional given start x_T,
    and how the run reports (progress bar, callback)."""

    shape: tuple
    seed: int = 0
    device: object = None
    dtype: torch.dtype = torch.float32
    sample_offset: int = 0
    x_T: Optional[torch.Tensor] = None
    progress: bool = False
    callback: Optional[Callable] = None


class Run:
    """State shared by one sampling run. Unless a callback may keep references to the states, the
    loop writes into two buffers in turn (and one for Heun's predicted point) instead of allocating
    every step.

    ``level_name`` names the levels the callback reports ("timestep", "t", "sigma" or "z"), and
    ``legacy`` the StepInfo fields a positional 0.1-style callback of this sampler receives."""

    def __init__(self, spec: RunSpec, level_name: str, legacy: Sequence[str] = ("i", "level", "x")):
        self.shape = tuple(check_shape(spec.shape))
        check_dtype(spec.dtype)
        self.device = resolve_device(spec.device)
        # the noise key, checked once here rather than at the first launch. A seed given as a
        # one-element integer tensor on the device is read by the kernels from device memory: a
        # compiled run then takes new seeds without recompiling, and a captured one replays with them.
        self.seed_tensor = None
        if isinstance(spec.seed, torch.Tensor):
            make_seed_step(spec.seed, 0, self.device)  # refuses a bad seed tensor by name
            self.seed_tensor = spec.seed.reshape(()).to(torch.int64)
        ops.noise_args(list(self.shape), 0 if self.seed_tensor is not None else spec.seed, 0, spec.sample_offset,
                       SAMPLING_STREAM, None, self.device)
        self.batch = self.shape[0] if self.shape else 1
        self.seed, self.dtype, self.sample_offset = spec.seed, spec.dtype, spec.sample_offset
        # the int seed as the ops' wrappers take it (uint64) and as the schemas carry it (int64 bits);
        # with a seed tensor, unused placeholders
        self.seed_int = spec.seed if self.seed_tensor is None else 0
        self.seed64 = ops.seed_to_int64(self.seed_int)
        self.x_T, self.progress_enabled = spec.x_T, spec.progress
        self.table_dtype = torch.float64 if spec.dtype == torch.float64 else torch.float32
        self.time_dtype = self.table_dtype
        self.noise_step = 0
        self.level_name = level_name
        self.callback = step_callback(spec.callback, legacy)
        # compiled, the graph owns the buffers (and a buffer's address is nothing dynamo can read)
        self.reuse_buffers = self.callback is None and not compiling()
        self._buffers = {}

    # ---- before the loop ----

    def initial(self, scale: float) -> torch.Tensor:
        """x_T: the given one, or scale times the stream's step 0."""
        x_T = self.x_T
        if x_T is not None:
            if not isinstance(x_T, torch.Tensor) or tuple(x_T.shape) != self.shape:
                raise ValueError(f"x_T must be a tensor of shape {self.shape}, got "
                                 f"{tuple(x_T.shape) if isinstance(x_T, torch.Tensor) else type(x_T).__name__}")
            return x_T.to(device=self.device, dtype=self.dtype)
        return randn(self.shape, **self.noise_key(0), device=self.device, dtype=self.dtype) * scale

    def table(self, rows) -> torch.Tensor:
        """A plan's coefficient rows as the device table of this run's dtype (_graph.device_table)."""
        return device_table(rows, self.device, self.table_dtype)

    def fused_table(self, rows64: torch.Tensor) -> torch.Tensor:
        """A plan's rows of ops.fused_step (float64 [..., len(FIELDS)]) as this run's device table."""
        return self.table(rows64.reshape(-1, len(coefficients.FIELDS)))

    def runtime_table(self, rows64: torch.Tensor) -> torch.Tensor:
        """Rows computed in the loop from device values (not a plan's) as this run's device table."""
        return rows64.reshape(-1, len(coefficients.FIELDS)).to(device=self.device, dtype=self.table_dtype)

    def per_step(self, values, batch: Optional[int] = None, dtype: Optional[torch.dtype] = None) -> list:
        """A plan's values[i] as a [batch] tensor on the device for each i, made once before the loop
        (the loop then only indexes a list); compiled, constants of the graph on the device."""
        return list(_per_step_values(values, batch or self.batch, self.device, dtype or self.time_dtype).unbind(0))

    def steps(self, n: int, desc: str):
        """range(n), under a progress bar when asked for."""
        return progress(range(n), self.progress_enabled, desc)

    # ---- in the loop ----

    def next_noise_step(self) -> int:
        self.noise_step += 1
        return self.noise_step

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

    def model_output(self, out, x: torch.Tensor) -> torch.Tensor:
        """The model's output checked against x's shape, in x's dtype."""
        if not isinstance(out, torch.Tensor) or out.shape != x.shape:
            raise ValueError(f"the model returned shape {tuple(getattr(out, 'shape', ()))} for x of shape "
                             f"{tuple(x.shape)}")
        return out if out.dtype == x.dtype else out.to(x.dtype)

    def step(self, x, table, row, model_output=None, *, third=None, noisy=False, noise=None, into=None,
             model_output_uncond=None, predicted_variance=None, clip=False, return_x0=False):
        """One ops.fused_step from x with row ``row`` of ``table``; ``third`` is the kernel's third input
        (a classifier gradient, or Heun's first model output). A noisy step without ``noise`` draws
        the run's next stream step. Returns the new state (and x0 with return_x0)."""
        if model_output is not None and model_output.shape != x.shape:
            raise ValueError(f"the model returned shape {tuple(model_output.shape)} for x of shape {tuple(x.shape)}")
        dtype = x.dtype
        if model_output is not None and model_output.dtype != dtype:
            model_output = model_output.to(dtype)
        if model_output_uncond is not None or third is not None or predicted_variance is not None or noise is not None:
            model_output_uncond, third, predicted_variance, noise = (
                t.to(dtype) if t is not None and t.dtype != dtype else t
                for t in (model_output_uncond, third, predicted_variance, noise))
        out = self.output_for(x, into)
        inputs = (x, model_output, model_output_uncond, third, predicted_variance, noise)
        if out is not None and (torch.is_grad_enabled() and ops.any_requires_grad(*inputs)
                                or _shares_memory(out, inputs[1:])):
            # a differentiable run records every state; a model that returned (a view of) one of
            # the run's buffers must not have it overwritten while it is read: allocate this step
            out = None
        stream_noise = noisy and noise is None
        if out is not None and not (stream_noise and self.seed_tensor is not None):
            # the run's own buffer and a noise key checked when the run began: straight to the op
            step = self.next_noise_step() if stream_noise else 0
            aux_out = self.output_for(x, "x0") if return_x0 else None
            try:
                ops.fused_step_into(out, x, model_output, coefficients=table, row=row, seed64=self.seed64,
                                    step=step, sample_offset=self.sample_offset, stream_noise=stream_noise,
                                    inputs=inputs[2:], clip=clip, aux_code=ops.AUX["x0"] if return_x0 else 0,
                                    aux_out=aux_out)
            except (RuntimeError, TypeError):
                pass  # the checked call below names what was wrong
            else:
                return (out, aux_out) if return_x0 else out
            if stream_noise:
                self.noise_step -= 1
        step = self.next_noise_step() if stream_noise else 0
        new, x0 = ops.fused_step(
            x, model_output, model_output_uncond, third, predicted_variance, noise, coefficients=table, row=row,
            clip=clip, aux="x0" if return_x0 else "none", stream_noise=stream_noise, seed=self.seed_int, step=step,
            sample_offset=self.sample_offset, seed_step=self.seed_step(step) if stream_noise else None,
            out=out, aux_out=self.output_for(x, "x0") if return_x0 and out is not None else None)
        return (new, x0) if return_x0 else new

    def seed_step(self, step: int) -> Optional[torch.Tensor]:
        """The (seed, step) device tensor that a noisy launch reads when the seed is a tensor (the
        kernel then reads both from device memory), else None."""
        return None if self.seed_tensor is None else make_seed_step(self.seed_tensor, step, self.device)

    def noise_key(self, step: int) -> dict:
        """The keywords of dk.randn and the ops for stream step ``step`` of this run."""
        seed = self.seed if self.seed_tensor is None else self.seed_tensor
        return {"seed": seed, "step": step, "sample_offset": self.sample_offset}

    def linear(self, inputs, table, row, *, x0=False, noise_step=None) -> list:
        """One ops.linear_step of ``inputs`` (the state first) with row ``row`` of ``table``; with
        ``noise_step`` it draws that step of the run's stream."""
        seed_step = self.seed_step(noise_step) if noise_step is not None else None
        return ops.linear_step(inputs, coefficients=table, row=row, outputs=1, x0=x0,
                               stream_noise=noise_step is not None, seed=self.seed_int,
                               step=noise_step or 0, sample_offset=self.sample_offset, seed_step=seed_step)

    def report(self, i: int, levels: tuple, x: torch.Tensor, denoised: torch.Tensor) -> None:
        """Calls the callback with step i's StepInfo; levels = (before the step, after it)."""
        self.callback(StepInfo(i, self.level_name, levels[0], levels[1], x, denoised))


@plan
def _per_step_values(values, batch: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """[steps, batch]: row i is values[i] repeated (an expanded view)."""
    if not isinstance(values, torch.Tensor):  # a plan's list: Python floats are float64
        values = torch.as_tensor(values, dtype=torch.int64 if dtype == torch.int64 else torch.float64)
    return values.to(device=device, dtype=dtype).reshape(-1, 1).expand(-1, batch)


def _shares_memory(buffer: torch.Tensor, tensors) -> bool:
    """Whether a tensor among ``tensors`` starts inside the (contiguous) buffer: a view of it. Another
    allocation cannot start there, and the addresses cost a fraction of storage objects per step."""
    start = buffer.data_ptr()
    end = start + buffer.numel() * buffer.element_size()
    for t in tensors:
        if t is not None and start <= t.data_ptr() < end:
            return True
    return False


def per_sample(coef, x: torch.Tensor) -> torch.Tensor:
    """A float, or a tensor [] / [B], broadcast against x [B, ...] in x's dtype (callback paths)."""
    if not isinstance(coef, torch.Tensor):
        return torch.tensor(float(coef), dtype=x.dtype, device=x.device)
    coef = coef.to(device=x.device, dtype=x.dtype)
    return coef.reshape(-1, *([1] * (x.dim() - 1))) if coef.dim() else coef
