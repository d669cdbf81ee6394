"""One typed Python function per compiled op: argument checks with clear messages and the call into
torch.ops.diffkern. The ops' schemas are in csrc/ops.cpp; their fake (meta) kernels, for
torch.compile and FakeTensor tracing, are in ``_fake.py``; their autograd formulas in ``_autograd.py``;
the loading of the compiled library in ``_loader.py``.

Most users want the public functions (diffkern.randn, ...); these are the thin layer below them.
"""
from __future__ import annotations

import importlib
import math
from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from .._graph import compiling
from .._validate import check_shape, check_uint
from . import _loader
from ._schema import (
    AUX,
    LINEAR_MAX_INPUTS,
    NOISE_DTYPES,
    RK_MAX_INPUTS,
    RK_MAX_OUTPUTS,
    RK_MAX_TRACES,
    linear_row_width,
    loss_row_fields,
    rk_row_width,
)

BUILD = _loader.load()

_UINT32 = 1 << 32
_UINT64 = 1 << 64

__all__ = ["BUILD", "NOISE_DTYPES", "RK_MAX_INPUTS", "RK_MAX_OUTPUTS", "RK_MAX_TRACES", "NoiseKey",
           "any_requires_grad", "check_device", "check_noise_layout", "check_seed_step", "check_shape",
           "cuda_kernels_available", "fused_step", "fused_step_into", "likelihood_step", "linear_step", "noise_args",
           "philox4x32_10",
           "probe_trace", "rademacher", "randn", "random_bits", "rk_row_width", "rk_stage", "seed_to_int64",
           "training_loss", "poisson_field", "FIELD_MAX_FEATURES"]


def cuda_kernels_available() -> bool:
    """True when the library was compiled with its CUDA kernels."""
    return BUILD["cuda_kernels"]


def seed_to_int64(seed) -> int:
    """A seed in [0, 2^64) as the int64 with the same bits (what the op schemas carry)."""
    seed = check_uint("seed", seed, _UINT64)
    return seed - _UINT64 if seed >= 1 << 63 else seed


def check_noise_layout(shape: Sequence[int], sample_offset: int) -> None:
    rows = shape[0] if len(shape) else 1
    features = math.prod(shape[1:])
    if features > 1 << 34:
        raise ValueError(f"at most 2^34 features per sample (dims after the first), got {features}")
    if sample_offset + rows > _UINT32:
        raise ValueError(
            f"sample_offset + batch size must be at most 2^32, got {sample_offset} + {rows}")


def check_seed_step(seed_step: Optional[torch.Tensor], device: torch.device) -> None:
    if seed_step is None:
        return
    if not isinstance(seed_step, torch.Tensor) or seed_step.dtype != torch.int64 or seed_step.numel() != 2:
        raise ValueError("seed_step must be an int64 tensor of two elements (seed, step)")
    if seed_step.device != device:
        raise ValueError(f"seed_step is on {seed_step.device} but the output is on {device}")


def check_device(device: torch.device) -> None:
    if device.type == "cuda" and not cuda_kernels_available():
        raise RuntimeError(
            "diffkern was built without its CUDA kernels, so it cannot run on "
            f"{device}. Rebuild with a CUDA toolkit and a CUDA build of torch: "
            "DIFFKERN_CUDA=1 pip install --no-build-isolation -e .")
    if device.type not in ("cpu", "cuda", "meta"):
        raise ValueError(f"diffkern has kernels for cpu and cuda, not {device.type}; "
                         "diffkern.reference has portable implementations")


@dataclass(frozen=True)
class NoiseKey:
    """What selects the noise of a call: element (n, j) is Philox word j % 4 of counter
    (j / 4, sample_offset + n, step, stream) with key seed, or (seed, step) read from the device tensor
    seed_step [2] when it is given."""

    seed: int = 0
    step: int = 0
    sample_offset: int = 0
    stream: int = 0
    seed_step: Optional[torch.Tensor] = None


def noise_args(shape, seed, step, sample_offset, stream, seed_step, device) -> tuple:
    """The checked noise arguments of an op, in its schema's order (the seed as an int64's bits)."""
    shape = check_shape(shape)
    seed = seed_to_int64(seed)
    step = check_uint("step", step, _UINT32)
    stream = check_uint("stream", stream, _UINT32)
    sample_offset = check_uint("sample_offset", sample_offset, _UINT32 + 1)
    check_noise_layout(shape, sample_offset)
    check_device(device)
    check_seed_step(seed_step, device)
    return shape, seed, step, sample_offset, stream, seed_step


def _noise_dtype(dtype) -> torch.dtype:
    if dtype not in NOISE_DTYPES:
        raise ValueError(f"dtype must be one of {NOISE_DTYPES}, got {dtype}")
    return dtype


def randn(shape: Sequence[int], *, seed: int, step: int, sample_offset: int, stream: int,
          seed_step: Optional[torch.Tensor], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Standard normals of the noise stream; see diffkern.randn for the contract."""
    args = noise_args(shape, seed, step, sample_offset, stream, seed_step, device)
    return torch.ops.diffkern.randn(*args, _noise_dtype(dtype), device)


def rademacher(shape: Sequence[int], *, seed: int, step: int, sample_offset: int, stream: int,
               seed_step: Optional[torch.Tensor], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Rademacher signs (-1 or +1) of the noise stream: the sign bit of each word."""
    args = noise_args(shape, seed, step, sample_offset, stream, seed_step, device)
    return torch.ops.diffkern.rademacher(*args, _noise_dtype(dtype), device)


def random_bits(shape: Sequence[int], *, seed: int, step: int, sample_offset: int, stream: int,
                seed_step: Optional[torch.Tensor], device: torch.device) -> torch.Tensor:
    """The raw 32-bit Philox words of the noise stream, as int32."""
    args = noise_args(shape, seed, step, sample_offset, stream, seed_step, device)
    return torch.ops.diffkern.random_bits(*args, device)


def philox4x32_10(counter: torch.Tensor, key: torch.Tensor) -> torch.Tensor:
    """Philox4x32-10 of counters [..., 4] and keys [..., 2] (int64, low 32 bits used) -> [..., 4]."""
    if counter.dtype != torch.int64 or key.dtype != torch.int64:
        raise ValueError("counter and key must be int64 tensors")
    if counter.dim() < 1 or counter.shape[-1] != 4 or key.dim() < 1 or key.shape[-1] != 2:
        raise ValueError(f"counter must be [..., 4] and key [..., 2], got {tuple(counter.shape)} and "
                         f"{tuple(key.shape)}")
    if counter.numel() // 4 != key.numel() // 2:
        raise ValueError("counter and key must have the same number of rows")
    if counter.device != key.device:
        raise ValueError(f"counter is on {counter.device} but key is on {key.device}")
    check_device(counter.device)
    return torch.ops.diffkern.philox4x32_10(counter, key)


_fused_step_op = torch.ops.diffkern.fused_step.default
_fused_step_out_op = torch.ops.diffkern.fused_step.out
_INT64_SIGN = 1 << 63


def fused_step(x: torch.Tensor, model_output: Optional[torch.Tensor] = None,
               model_output_uncond: Optional[torch.Tensor] = None, guidance_grad: Optional[torch.Tensor] = None,
               predicted_variance: Optional[torch.Tensor] = None, noise: Optional[torch.Tensor] = None, *,
               coefficients: torch.Tensor, rows: Optional[torch.Tensor] = None, row: int = 0, clip: bool = False,
               aux: str = "none", stream_noise: bool = False, seed: int = 0, step: int = 0, sample_offset: int = 0,
               stream: int = 0, seed_step: Optional[torch.Tensor] = None, out: Optional[torch.Tensor] = None,
               aux_out: Optional[torch.Tensor] = None):
    """The fused step of csrc/include/diffkern/step_math.h (see diffkern.coefficients for the rows).

    Inputs are [batch, ...] tensors of x's shape, dtype and device; any layout works (samples that are
    not contiguous runs, e.g. channels_last, are copied by the op) and the outputs keep x's memory
    format. Returns (out, aux_out) where aux_out is x0, the noise used, or None (aux = "x0" | "noise" |
    "none"); the two outputs are views of one allocation. With ``out`` (and ``aux_out``): writes
    there instead of allocating (contiguous buffers of x's shape and dtype that overlap no input) and
    returns them.

    This is the hot path of every sampler, so it checks only what the op cannot (the seed's range and
    ``aux``); when the op rejects its arguments, the full checks below run to name the bad one.
    """
    aux_code = AUX.get(aux) if isinstance(aux, str) else None
    if aux_code is None or type(seed) is not int or not 0 <= seed < _UINT64:
        _check_fused_step(x, dict(model_output=model_output, model_output_uncond=model_output_uncond,
                                  guidance_grad=guidance_grad, predicted_variance=predicted_variance, noise=noise),
                          coefficients=coefficients, rows=rows, aux=aux, out=out, aux_out=aux_out,
                          noise_key=NoiseKey(seed, step, sample_offset, stream, seed_step))
    if seed >= _INT64_SIGN:
        seed -= _UINT64
    given_out = out is not None
    # (compiled, a sampler's table is a constant of the graph, whose requires_grad dynamo cannot read)
    recording = torch.is_grad_enabled() and any_requires_grad(
        x, model_output, model_output_uncond, guidance_grad, predicted_variance, noise,
        None if compiling() else coefficients)
    if given_out and recording:
        raise ValueError("fused_step with out= cannot record gradients (it writes in place): call it without out= "
                         "when an input requires grad")
    if not given_out and not recording and isinstance(x, torch.Tensor) and not compiling():
        # (Compiled, the functional op: the graph owns its buffers.)
        # Without a gradient to record, the out= op: the functional op's autograd kernel costs
        # 4.5 us a call even when nothing requires grad, more than the step itself at small sizes.
        # One allocation for both outputs: two large buffers freed together can make glibc return
        # the heap top to the system, so that every call page-faults both in again (measured: 6x
        # the time of the step without aux). One buffer behaves as the single-output step.
        if aux_code:
            both = torch.empty((2, *x.shape), dtype=x.dtype, device=x.device)
            out, aux_out = both[0], both[1]
        else:
            out = torch.empty_like(x, memory_format=torch.contiguous_format)
    try:
        if out is not None:
            if aux_code and aux_out is None:
                raise ValueError(f"aux={aux!r} with out= needs aux_out=")
            aux_out = aux_out if aux_code else None
            if rows is None and stream == 0 and seed_step is None and not compiling() and _direct_ok(
                    x, model_output, model_output_uncond, guidance_grad, predicted_variance, noise, coefficients,
                    out, aux_out):
                _direct_fused_step_into(out, x, model_output, model_output_uncond, guidance_grad, predicted_variance,
                                        noise, coefficients, row, clip, aux_code, stream_noise, seed, step,
                                        sample_offset, aux_out)
            else:
                _fused_step_out_op(x, model_output, model_output_uncond, guidance_grad, predicted_variance, noise,
                                   coefficients, rows, row, clip, aux_code, stream_noise, seed, step, sample_offset,
                                   stream, seed_step, out=out, aux_out=aux_out)
        else:
            out, aux_out = _fused_step_op(x, model_output, model_output_uncond, guidance_grad, predicted_variance,
                                          noise, coefficients, rows, row, clip, aux_code, stream_noise, seed, step,
                                          sample_offset, stream, seed_step)
    except (RuntimeError, TypeError, NotImplementedError):
        _check_fused_step(x, dict(model_output=model_output, model_output_uncond=model_output_uncond,
                                  guidance_grad=guidance_grad, predicted_variance=predicted_variance, noise=noise),
                          coefficients=coefficients, rows=rows, aux=aux, out=out, aux_out=aux_out,
                          noise_key=NoiseKey(seed, step, sample_offset, stream, seed_step))
        raise
    if given_out:
        return out, aux_out
    if not x.is_contiguous() and x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last):
        out = out.contiguous(memory_format=torch.channels_last)
        aux_out = aux_out.contiguous(memory_format=torch.channels_last) if aux_code else aux_out
    return out, (aux_out if aux_code else None)


# fused_step.out and linear_step.out without torch's dispatcher (csrc/python_module.cpp): the same kernels
# and checks, the outputs' version counters bumped and the profiler told, as the ops do; for callers
# that record no gradient
_direct_fused_step_into = importlib.import_module("diffkern._C").fused_step_into
_direct_linear_step_into = importlib.import_module("diffkern._C").linear_step_into
_dispatch_modes = torch._C._len_torch_dispatch_stack


def _direct_ok(*tensors) -> bool:
    """Whether the dispatcher may be skipped: plain tensors only (no subclass, fake or meta tensor,
    whose ops the dispatcher routes elsewhere) and no dispatch mode active (a mode sees every op)."""
    if _dispatch_modes():
        return False
    for t in tensors:
        if t is not None and (type(t) is not torch.Tensor or t.is_meta):
            return False
    return True


def fused_step_into(out: torch.Tensor, x: torch.Tensor, model_output: Optional[torch.Tensor], *,
                    coefficients: torch.Tensor, row: int, seed64: int, step: int, sample_offset: int,
                    stream_noise: bool, inputs: tuple = (None, None, None, None), clip: bool = False,
                    aux_code: int = 0, aux_out: Optional[torch.Tensor] = None) -> None:
    """fused_step's out= kernel with nothing around it, for a caller that checked its noise key once
    and owns ``out`` (the run engine's buffers, no gradient recorded): ``seed64`` is the seed as an
    int64's bits (seed_to_int64), ``inputs`` the optional (model_output_uncond, guidance_grad,
    predicted_variance, noise). It calls the kernel directly, not through torch's dispatcher, whose
    boxing of 19 arguments cost ~3.5 us: not for a tracer (torch.compile, fake or meta tensors)."""
    uncond, third, variance, noise = inputs
    if _direct_ok(x, model_output, uncond, third, variance, noise):
        _direct_fused_step_into(out, x, model_output, uncond, third, variance, noise, coefficients, row, clip,
                                aux_code, stream_noise, seed64, step, sample_offset, aux_out)
    else:
        _fused_step_out_op(x, model_output, uncond, third, variance, noise, coefficients, None, row, clip, aux_code,
                           stream_noise, seed64, step, sample_offset, 0, None, out=out, aux_out=aux_out)


def any_requires_grad(*tensors) -> bool:
    """True when a tensor among ``tensors`` (None allowed) requires grad."""
    for t in tensors:  # a plain loop: this runs on every step of every sampler
        if isinstance(t, torch.Tensor) and t.requires_grad:
            return True
    return False


def _check_fused_step(x, inputs: dict, *, coefficients, rows, aux, noise_key: NoiseKey, out, aux_out) -> None:
    """The arguments of fused_step, checked one by one: raises an error that names the first bad one.
    ``inputs``: the optional input tensors by name."""
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        raise ValueError(f"x must be a floating-point tensor, got {type(x).__name__}")
    if x.dtype not in NOISE_DTYPES:
        raise ValueError(f"x must be float16, bfloat16, float32 or float64, got {x.dtype}")
    check_device(x.device)
    for name, t in inputs.items():
        if t is None:
            continue
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name} must be a tensor, got {type(t).__name__}")
        if t.device != x.device:
            raise ValueError(f"{name} is on {t.device} but x is on {x.device}")
        if t.shape != x.shape:
            raise ValueError(f"{name} has shape {tuple(t.shape)} but x has {tuple(x.shape)}")
        if t.dtype != x.dtype:
            raise ValueError(f"{name} is {t.dtype} but x is {x.dtype}")
    if inputs["model_output_uncond"] is not None and inputs["model_output"] is None:
        raise ValueError("model_output_uncond (classifier-free guidance) needs model_output")
    if not isinstance(aux, str) or aux not in AUX:
        raise ValueError(f"aux must be one of {tuple(AUX)}, got {aux!r}")
    table_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    if not isinstance(coefficients, torch.Tensor) or coefficients.dtype != table_dtype or coefficients.dim() != 2:
        raise ValueError(f"coefficients must be a 2-d {table_dtype} tensor for {x.dtype} inputs, got "
                         f"{getattr(coefficients, 'dtype', type(coefficients).__name__)} "
                         f"{tuple(getattr(coefficients, 'shape', ()))}")
    if coefficients.device != x.device or (rows is not None and rows.device != x.device):
        raise ValueError(f"coefficients and rows must be on x's device ({x.device})")
    key = noise_key
    noise_args(check_shape(x.shape), key.seed, key.step, key.sample_offset, key.stream, key.seed_step, x.device)
    for name, buffer in (("out", out), ("aux_out", aux_out if aux != "none" else None)):
        if buffer is not None and (buffer.shape != x.shape or buffer.dtype != x.dtype or buffer.device != x.device
                                   or not buffer.is_contiguous()):
            raise ValueError(f"{name} must be a contiguous {x.dtype} tensor of shape {tuple(x.shape)} on {x.device}")


_linear_step_out_op = torch.ops.diffkern.linear_step.out


def linear_step(inputs: Sequence[torch.Tensor], noise: Optional[torch.Tensor] = None, *, coefficients: torch.Tensor,
                row: int = 0, outputs: int = 1, x0: bool = False, clip: bool = False, stream_noise: bool = False,
                seed: int = 0, step: int = 0, sample_offset: int = 0, stream: int = 0,
                seed_step: Optional[torch.Tensor] = None) -> list[torch.Tensor]:
    """The widened fused step of csrc/include/diffkern/linear_step.h: returns [out_0, (out_1), (x0)].

    inputs (1 to 8 tensors of one shape, dtype and device; inputs[0] is the sample) are combined with
    row ``row`` of ``coefficients`` (see diffkern.coefficients.linear_row for the layout). The outputs
    are views of one allocation (so a step costs one allocation whatever it returns).
    """
    if type(seed) is not int or not 0 <= seed < _UINT64 or not isinstance(inputs, (list, tuple)) or not inputs:
        _check_linear_step(inputs, noise, coefficients, row=row, outputs=outputs,
                           noise_key=NoiseKey(seed, step, sample_offset, stream, seed_step))
    if seed >= _INT64_SIGN:
        seed -= _UINT64
    x = inputs[0]
    count = outputs + (1 if x0 else 0)
    try:
        if compiling() or torch.is_grad_enabled() and any_requires_grad(noise, *inputs):
            # the functional op: it has autograd, and a compiled graph owns its buffers
            results = list(torch.ops.diffkern.linear_step(list(inputs), noise, coefficients, row, outputs, x0, clip,
                                                          stream_noise, seed, step, sample_offset, stream, seed_step))
        else:
            if count == 1:  # the common step: one output, no view to cut
                results = [torch.empty_like(x, memory_format=torch.contiguous_format)]
            else:
                results = list(torch.empty((count, *x.shape), dtype=x.dtype, device=x.device).unbind(0))
            inputs = inputs if type(inputs) is list else list(inputs)
            if stream == 0 and seed_step is None and _direct_ok(noise, coefficients, *inputs):
                _direct_linear_step_into(inputs, noise, coefficients, row, outputs, x0, clip, stream_noise, seed, step,
                                         sample_offset, results)
            else:
                _linear_step_out_op(inputs, noise, coefficients, row, outputs, x0, clip, stream_noise, seed, step,
                                    sample_offset, stream, seed_step, out=results)
    except (RuntimeError, TypeError, NotImplementedError, AttributeError):
        _check_linear_step(inputs, noise, coefficients, row=row, outputs=outputs,
                           noise_key=NoiseKey(seed, step, sample_offset, stream, seed_step))
        raise
    if x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        results = [r.contiguous(memory_format=torch.channels_last) for r in results]
    return results


def _check_linear_step(inputs, noise, coefficients, *, row, outputs, noise_key: NoiseKey):
    """The arguments of linear_step, one by one: raises an error that names the first bad one."""
    if not isinstance(inputs, (list, tuple)) or not 1 <= len(inputs) <= LINEAR_MAX_INPUTS:
        raise ValueError(f"inputs must be a list of 1 to {LINEAR_MAX_INPUTS} tensors, got {type(inputs).__name__}")
    x = inputs[0]
    for i, t in enumerate(list(inputs) + ([noise] if noise is not None else [])):
        name = f"inputs[{i}]" if i < len(inputs) else "noise"
        if not isinstance(t, torch.Tensor) or t.dtype not in NOISE_DTYPES:
            raise ValueError(f"{name} must be a float16, bfloat16, float32 or float64 tensor, got "
                             f"{getattr(t, 'dtype', type(t).__name__)}")
        if t.device != x.device or t.shape != x.shape or t.dtype != x.dtype:
            raise ValueError(f"{name} is {t.dtype} {tuple(t.shape)} on {t.device} but inputs[0] is {x.dtype} "
                             f"{tuple(x.shape)} on {x.device}")
    check_device(x.device)
    if outputs not in (1, 2):
        raise ValueError(f"outputs must be 1 or 2, got {outputs!r}")
    table_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    width = linear_row_width(len(inputs), outputs)
    if (not isinstance(coefficients, torch.Tensor) or coefficients.dtype != table_dtype or coefficients.dim() != 2
            or coefficients.shape[1] != width or coefficients.device != x.device):
        raise ValueError(f"coefficients must be a {table_dtype} table [rows, {width}] on {x.device}, got "
                         f"{getattr(coefficients, 'dtype', type(coefficients).__name__)} "
                         f"{tuple(getattr(coefficients, 'shape', ()))}")
    if isinstance(row, bool) or not isinstance(row, int) or not 0 <= row < coefficients.shape[0]:
        raise ValueError(f"row must be an int in [0, {coefficients.shape[0]}), got {row!r}")
    key = noise_key
    noise_args(check_shape(x.shape), key.seed, key.step, key.sample_offset, key.stream, key.seed_step, x.device)


def _check_probe_tensors(probes: torch.Tensor, products: torch.Tensor) -> None:
    for name, t in (("probes", probes), ("products", products)):
        if not isinstance(t, torch.Tensor) or t.dim() < 2 or t.dtype not in NOISE_DTYPES:
            raise ValueError(f"{name} must be a floating-point tensor [num_probes, batch, ...], got "
                             f"{getattr(t, 'dtype', type(t).__name__)} {tuple(getattr(t, 'shape', ()))}")
    if probes.shape != products.shape:
        raise ValueError(f"probes {tuple(probes.shape)} and products {tuple(products.shape)} differ in shape")
    if probes.dtype != products.dtype or probes.device != products.device:
        raise ValueError("probes and products must share dtype and device")
    check_device(probes.device)


def _features_contiguous(t: torch.Tensor) -> torch.Tensor:
    """t with each [k, n] row contiguous (a copy only when it is not)."""
    expected = 1
    for size, stride in zip(reversed(t.shape[2:]), reversed(t.stride()[2:])):
        if size != 1 and stride != expected:
            return t.contiguous()
        expected *= size
    return t


def probe_trace(probes: torch.Tensor, products: torch.Tensor, scale: float) -> torch.Tensor:
    """scale * sum over probes and features of probes * products, per sample: float64 [batch]."""
    _check_probe_tensors(probes, products)
    return torch.ops.diffkern.probe_trace(_features_contiguous(probes), _features_contiguous(products), float(scale))


def likelihood_step(x: torch.Tensor, model_output: torch.Tensor, model_output_prev: Optional[torch.Tensor],
                    probes: torch.Tensor, products: torch.Tensor, delta_logp: torch.Tensor,
                    trace_prev: Optional[torch.Tensor], *, c_x: float, c_model: float, c_prev: float = 0.0,
                    l0: float = 0.0, l_prev: float = 0.0, l_trace: float = 0.0, trace_scale: float = 1.0):
    """(x_next, delta_next, trace): see csrc/include/diffkern/trace_math.h."""
    _check_probe_tensors(probes, products)
    for name, t in (("x", x), ("model_output", model_output), ("model_output_prev", model_output_prev)):
        if t is not None and (not isinstance(t, torch.Tensor) or t.shape != x.shape or t.dtype != probes.dtype
                              or t.device != probes.device):
            raise ValueError(f"{name} must be a tensor of x's shape and the probes' dtype and device")
    for name, t in (("delta_logp", delta_logp), ("trace_prev", trace_prev)):
        if t is not None and (not isinstance(t, torch.Tensor) or t.dtype != torch.float64 or t.dim() != 1
                              or t.shape[0] != probes.shape[1] or t.device != probes.device):
            raise ValueError(f"{name} must be a float64 tensor [batch] ({probes.shape[1]}) on {probes.device}, got "
                             f"{getattr(t, 'dtype', type(t).__name__)} {tuple(getattr(t, 'shape', ()))}")
    return torch.ops.diffkern.likelihood_step(
        x.contiguous(), model_output.contiguous(),
        None if model_output_prev is None else model_output_prev.contiguous(),
        _features_contiguous(probes), _features_contiguous(products), delta_logp.contiguous(),
        None if trace_prev is None else trace_prev.contiguous(), float(c_x), float(c_model), float(c_prev), float(l0),
        float(l_prev), float(l_trace), float(trace_scale))


def rk_stage(inputs: Sequence[torch.Tensor], coefficients: torch.Tensor, *, probes: Optional[torch.Tensor] = None,
             products: Optional[torch.Tensor] = None, traces: Sequence[torch.Tensor] = (),
             log_density: Optional[torch.Tensor] = None, outputs: int = 1, error: bool = False,
             trace_scale: float = 1.0, atol: float = 1e-5, rtol: float = 1e-5):
    """One fused stage of an embedded Runge-Kutta pair on the likelihood ODE: (outputs, trace,
    log_density_next, norm). See csrc/include/diffkern/rk_stage.h for the formulas; coefficients is a
    float64 tensor [1 or batch, rk_row_width(...)] on the inputs' device."""
    inputs = list(inputs)
    if probes is not None or products is not None:
        _check_probe_tensors(probes, products)
        probes, products = _features_contiguous(probes), _features_contiguous(products)
    return torch.ops.diffkern.rk_stage([t.contiguous() for t in inputs], probes, products, coefficients.contiguous(),
                                       list(traces), log_density, int(outputs), bool(error), float(trace_scale),
                                       float(atol), float(rtol))


def training_loss(x0: torch.Tensor, model_output: torch.Tensor, noise: Optional[torch.Tensor] = None, *,
                  coefficients: torch.Tensor, stream_noise: bool = False, seed: int = 0, step: int = 0,
                  sample_offset: int = 0, stream: int = 0, seed_step: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The fused training loss of csrc/include/diffkern/loss_math.h: per-sample losses, float64 [batch],
    loss_n = weight_n sum_j (p_m model_output + p_x0 x0 + p_z z)^2 with rows [1 or batch,
    len(coefficients.LOSS_FIELDS)] (float64, on x0's device). z is ``noise``, or with ``stream_noise``
    the stream (seed, step, sample_offset + n, stream), drawn again by the backward instead of stored.
    Differentiable in model_output, x0 and a given noise."""
    if type(seed) is not int or not 0 <= seed < _UINT64:
        _check_training_loss(x0, model_output, noise, coefficients,
                             NoiseKey(seed, step, sample_offset, stream, seed_step))
    if seed >= _INT64_SIGN:
        seed -= _UINT64
    try:
        return torch.ops.diffkern.training_loss(x0, model_output, noise, coefficients, stream_noise, seed, step,
                                                sample_offset, stream, seed_step)
    except (RuntimeError, TypeError, NotImplementedError):
        _check_training_loss(x0, model_output, noise, coefficients,
                             NoiseKey(seed, step, sample_offset, stream, seed_step))
        raise


def _check_training_loss(x0, model_output, noise, coefficients, noise_key: NoiseKey) -> None:
    """The arguments of training_loss, one by one: raises an error that names the first bad one."""
    if not isinstance(x0, torch.Tensor) or x0.dtype not in NOISE_DTYPES or x0.dim() < 1:
        raise ValueError(f"x0 must be a float16, bfloat16, float32 or float64 tensor [batch, ...], got "
                         f"{getattr(x0, 'dtype', type(x0).__name__)} {tuple(getattr(x0, 'shape', ()))}")
    check_device(x0.device)
    for name, t in (("model_output", model_output), ("noise", noise)):
        if t is None and name == "noise":
            continue
        if not isinstance(t, torch.Tensor) or t.shape != x0.shape or t.dtype != x0.dtype or t.device != x0.device:
            raise ValueError(f"{name} must be a {x0.dtype} tensor of x0's shape {tuple(x0.shape)} on {x0.device}, got "
                             f"{getattr(t, 'dtype', type(t).__name__)} {tuple(getattr(t, 'shape', ()))}")
    width = len(loss_row_fields())
    if (not isinstance(coefficients, torch.Tensor) or coefficients.dtype != torch.float64 or coefficients.dim() != 2
            or coefficients.shape[1] != width or coefficients.shape[0] not in (1, x0.shape[0])
            or coefficients.device != x0.device):
        raise ValueError(f"coefficients must be float64 [1 or batch ({x0.shape[0]}), {width}] on {x0.device}, got "
                         f"{getattr(coefficients, 'dtype', type(coefficients).__name__)} "
                         f"{tuple(getattr(coefficients, 'shape', ()))}")
    key = noise_key
    noise_args(check_shape(x0.shape), key.seed, key.step, key.sample_offset, key.stream, key.seed_step, x0.device)


FIELD_MAX_FEATURES = 64  # kFieldMaxFeatures of csrc/include/diffkern/poisson_field.h


def poisson_field(points: torch.Tensor, dz: torch.Tensor, charges: torch.Tensor) -> tuple:
    """The empirical Poisson field of csrc/include/diffkern/poisson_field.h at points [batch, N] a height
    dz [batch] (> 0) above charges [M, N] on the plane (N <= FIELD_MAX_FEATURES): (the charges' mean
    weighted by |y~ - x~_j|^-(N+1), [batch, N] in the points' dtype; log of the weights' sum, float64
    [batch]). One pass over the charges per point, nothing of size batch x M."""
    try:
        return torch.ops.diffkern.poisson_field(points, dz, charges)
    except (RuntimeError, TypeError, NotImplementedError):
        _check_poisson_field(points, dz, charges)
        raise


def _check_poisson_field(points, dz, charges) -> None:
    """The arguments of poisson_field, one by one: raises an error that names the first bad one."""
    if not isinstance(points, torch.Tensor) or points.dtype not in (torch.float32, torch.float64) or points.dim() != 2:
        raise ValueError(f"points must be a float32 or float64 tensor [batch, features], got "
                         f"{getattr(points, 'dtype', type(points).__name__)} {tuple(getattr(points, 'shape', ()))}")
    check_device(points.device)
    if not 1 <= points.shape[1] <= FIELD_MAX_FEATURES:
        raise ValueError(f"points must have 1 to {FIELD_MAX_FEATURES} features, got {points.shape[1]} (larger: "
                         "diffkern.models.EmpiricalPoissonField)")
    if (not isinstance(charges, torch.Tensor) or charges.dim() != 2 or charges.shape[1] != points.shape[1]
            or charges.shape[0] < 1):
        raise ValueError(f"charges must be a tensor [count >= 1, {points.shape[1]}] like the points, got "
                         f"{tuple(getattr(charges, 'shape', ())) or type(charges).__name__}")
    if not isinstance(dz, torch.Tensor) or dz.shape != (points.shape[0],):
        raise ValueError(f"dz must be a tensor [{points.shape[0]}], got {tuple(getattr(dz, 'shape', ()))}")
    for name, t in (("dz", dz), ("charges", charges)):
        if t.dtype != points.dtype or t.device != points.device:
            raise ValueError(f"{name} must be {points.dtype} on {points.device} like the points, got {t.dtype} on "
                             f"{t.device}")


# the fake kernels and autograd formulas register themselves with torch.library on import
from . import _autograd, _fake  # noqa: E402,F401
