"""One typed Python function per compiled op: argument checks with clear messages, the call into
torch.ops.diffkern, and the op's fake (meta) kernel for torch.compile and FakeTensor tracing.

Most users want the public functions (diffkern.randn, ...); these are the thin layer below them.
"""
from __future__ import annotations

import math
import numbers
from typing import Optional, Sequence

import torch

from . import _extension

BUILD = _extension.load()

_UINT32 = 1 << 32
_UINT64 = 1 << 64
NOISE_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def cuda_kernels_available() -> bool:
    """True when the library was compiled with its CUDA kernels."""
    return BUILD["cuda_kernels"]


def _check_uint(name: str, value, bound: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    value = int(value)
    if not 0 <= value < bound:
        raise ValueError(f"{name} must lie in [0, 2^{bound.bit_length() - 1}), got {value}")
    return value


def seed_to_int64(seed) -> int:
    """A seed in [0, 2^64) as the int64 with the same bits (what the op schemas carry)."""
    seed = _check_uint("seed", seed, _UINT64)
    return seed - _UINT64 if seed >= 1 << 63 else seed


def check_shape(shape) -> list[int]:
    if isinstance(shape, numbers.Integral) and not isinstance(shape, bool):
        shape = (shape,)
    if isinstance(shape, (str, bytes)) or isinstance(shape, torch.Tensor) and shape.dim() > 1:
        raise TypeError(f"shape must be an int or a sequence of ints, got {shape!r}")
    try:
        dims = [int(d) for d in shape]
    except (TypeError, ValueError):
        raise TypeError(f"shape must be an int or a sequence of ints, got {shape!r}") from None
    if any(d < 0 for d in dims):
        raise ValueError(f"shape must not have negative sizes, got {tuple(dims)}")
    return dims


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


def _noise_args(shape, seed, step, sample_offset, stream, seed_step, device) -> tuple:
    shape = check_shape(shape)
    seed = seed_to_int64(seed)
    step = _check_uint("step", step, _UINT32)
    stream = _check_uint("stream", stream, _UINT32)
    sample_offset = _check_uint("sample_offset", sample_offset, _UINT32 + 1)
    check_noise_layout(shape, sample_offset)
    check_device(device)
    check_seed_step(seed_step, device)
    return shape, seed, step, sample_offset, stream, seed_step


def _float_noise(op, shape, seed, step, sample_offset, stream, seed_step, dtype, device) -> torch.Tensor:
    if dtype not in NOISE_DTYPES:
        raise ValueError(f"dtype must be one of {NOISE_DTYPES}, got {dtype}")
    return op(*_noise_args(shape, seed, step, sample_offset, stream, seed_step, device), dtype, device)


def randn(shape: Sequence[int], *, seed: int, step: int, sample_offset: int, stream: int,
          seed_step: Optional[torch.Tensor], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Standard normals of the noise stream; see diffkern.randn for the contract."""
    return _float_noise(torch.ops.diffkern.randn, shape, seed, step, sample_offset, stream, seed_step, dtype, device)


def rademacher(shape: Sequence[int], *, seed: int, step: int, sample_offset: int, stream: int,
               seed_step: Optional[torch.Tensor], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Rademacher signs (-1 or +1) of the noise stream: the sign bit of each word."""
    return _float_noise(torch.ops.diffkern.rademacher, shape, seed, step, sample_offset, stream, seed_step, dtype,
                        device)


def random_bits(shape: Sequence[int], *, seed: int, step: int, sample_offset: int, stream: int,
                seed_step: Optional[torch.Tensor], device: torch.device) -> torch.Tensor:
    """The raw 32-bit Philox words of the noise stream, as int32."""
    args = _noise_args(shape, seed, step, sample_offset, stream, seed_step, device)
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


_AUX = {"none": 0, "x0": 1, "noise": 2}


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
    aux_code = _AUX.get(aux) if isinstance(aux, str) else None
    if aux_code is None or type(seed) is not int or not 0 <= seed < _UINT64:
        _check_fused_step(x, model_output, model_output_uncond, guidance_grad, predicted_variance, noise, coefficients,
                          rows, aux, seed, step, sample_offset, stream, seed_step, out, aux_out)
    if seed >= _INT64_SIGN:
        seed -= _UINT64
    given_out = out is not None
    if not given_out and aux_code and isinstance(x, torch.Tensor):
        # One allocation for both outputs: two large buffers freed together can make glibc return
        # the heap top to the system, so that every call page-faults both in again (measured: 6x
        # the time of the step without aux). One buffer behaves as the single-output step.
        both = torch.empty((2, *x.shape), dtype=x.dtype, device=x.device)
        out, aux_out = both[0], both[1]
    try:
        if out is not None:
            if aux_code and aux_out is None:
                raise ValueError(f"aux={aux!r} with out= needs aux_out=")
            aux_out = aux_out if aux_code else None
            _fused_step_out_op(x, model_output, model_output_uncond, guidance_grad, predicted_variance, noise,
                               coefficients, rows, row, clip, aux_code, stream_noise, seed, step, sample_offset, stream,
                               seed_step, out=out, aux_out=aux_out)
        else:
            out, aux_out = _fused_step_op(x, model_output, model_output_uncond, guidance_grad, predicted_variance,
                                          noise, coefficients, rows, row, clip, aux_code, stream_noise, seed, step,
                                          sample_offset, stream, seed_step)
    except (RuntimeError, TypeError, NotImplementedError):
        _check_fused_step(x, model_output, model_output_uncond, guidance_grad, predicted_variance, noise, coefficients,
                          rows, aux, seed, step, sample_offset, stream, seed_step, out, aux_out)
        raise
    if given_out:
        return out, aux_out
    if not x.is_contiguous() and x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last):
        out = out.contiguous(memory_format=torch.channels_last)
        aux_out = aux_out.contiguous(memory_format=torch.channels_last) if aux_code else aux_out
    return out, (aux_out if aux_code else None)


def _check_fused_step(x, model_output, model_output_uncond, guidance_grad, predicted_variance, noise, coefficients,
                      rows, aux, seed, step, sample_offset, stream, seed_step, out, aux_out) -> None:
    """The arguments of fused_step, checked one by one: raises an error that names the first bad one."""
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        raise ValueError(f"x must be a floating-point tensor, got {type(x).__name__}")
    if x.dtype not in NOISE_DTYPES:
        raise ValueError(f"x must be float16, bfloat16, float32 or float64, got {x.dtype}")
    check_device(x.device)
    named = {"model_output": model_output, "model_output_uncond": model_output_uncond,
             "guidance_grad": guidance_grad, "predicted_variance": predicted_variance, "noise": noise}
    for name, t in named.items():
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
    if model_output_uncond is not None and model_output is None:
        raise ValueError("model_output_uncond (classifier-free guidance) needs model_output")
    if not isinstance(aux, str) or aux not in _AUX:
        raise ValueError(f"aux must be one of {tuple(_AUX)}, got {aux!r}")
    table_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    if not isinstance(coefficients, torch.Tensor) or coefficients.dtype != table_dtype or coefficients.dim() != 2:
        raise ValueError(f"coefficients must be a 2-d {table_dtype} tensor for {x.dtype} inputs, got "
                         f"{getattr(coefficients, 'dtype', type(coefficients).__name__)} "
                         f"{tuple(getattr(coefficients, 'shape', ()))}")
    if coefficients.device != x.device or (rows is not None and rows.device != x.device):
        raise ValueError(f"coefficients and rows must be on x's device ({x.device})")
    _noise_args(check_shape(x.shape), seed, step, sample_offset, stream, seed_step, x.device)
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
        _check_linear_step(inputs, noise, coefficients, row, outputs, seed, step, sample_offset, stream, seed_step)
    if seed >= _INT64_SIGN:
        seed -= _UINT64
    x = inputs[0]
    count = outputs + (1 if x0 else 0)
    try:
        buffer = torch.empty((count, *x.shape), dtype=x.dtype, device=x.device)
        results = list(buffer.unbind(0))
        _linear_step_out_op(list(inputs), noise, coefficients, row, outputs, x0, clip, stream_noise, seed, step,
                            sample_offset, stream, seed_step, out=results)
    except (RuntimeError, TypeError, NotImplementedError, AttributeError):
        _check_linear_step(inputs, noise, coefficients, row, outputs, seed, step, sample_offset, stream, seed_step)
        raise
    if x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        results = [r.contiguous(memory_format=torch.channels_last) for r in results]
    return results


def _check_linear_step(inputs, noise, coefficients, row, outputs, seed, step, sample_offset, stream, seed_step):
    """The arguments of linear_step, one by one: raises an error that names the first bad one."""
    if not isinstance(inputs, (list, tuple)) or not 1 <= len(inputs) <= 8:
        raise ValueError(f"inputs must be a list of 1 to 8 tensors, got {type(inputs).__name__}")
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
    width = len(inputs) + 3 + outputs * (len(inputs) + 2)
    if (not isinstance(coefficients, torch.Tensor) or coefficients.dtype != table_dtype or coefficients.dim() != 2
            or coefficients.shape[1] != width or coefficients.device != x.device):
        raise ValueError(f"coefficients must be a {table_dtype} table [rows, {width}] on {x.device}, got "
                         f"{getattr(coefficients, 'dtype', type(coefficients).__name__)} "
                         f"{tuple(getattr(coefficients, 'shape', ()))}")
    if isinstance(row, bool) or not isinstance(row, int) or not 0 <= row < coefficients.shape[0]:
        raise ValueError(f"row must be an int in [0, {coefficients.shape[0]}), got {row!r}")
    _noise_args(check_shape(x.shape), seed, step, sample_offset, stream, seed_step, x.device)


def _check_probe_tensors(probes: torch.Tensor, products: torch.Tensor) -> None:
    for name, t in (("probes", probes), ("products", products)):
        if not isinstance(t, torch.Tensor) or t.dim() < 2 or t.dtype not in NOISE_DTYPES:
            raise ValueError(f"{name} must be a floating-point tensor [num_probes, batch, ...]")
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
        if t is not None and (t.shape != x.shape or t.dtype != probes.dtype or t.device != probes.device):
            raise ValueError(f"{name} must have x's shape and the probes' dtype and device")
    return torch.ops.diffkern.likelihood_step(
        x.contiguous(), model_output.contiguous(), None if model_output_prev is None else model_output_prev.contiguous(),
        _features_contiguous(probes), _features_contiguous(products), delta_logp.contiguous(),
        None if trace_prev is None else trace_prev.contiguous(), float(c_x), float(c_model), float(c_prev), float(l0),
        float(l_prev), float(l_trace), float(trace_scale))


# ---- fake kernels: shapes and dtypes only, for torch.compile / FakeTensor / meta tensors ----

@torch.library.register_fake("diffkern::randn")
def _randn_fake(size, seed, step, sample_offset, stream, seed_step, dtype, device):
    return torch.empty(size, dtype=dtype, device=device)


@torch.library.register_fake("diffkern::rademacher")
def _rademacher_fake(size, seed, step, sample_offset, stream, seed_step, dtype, device):
    return torch.empty(size, dtype=dtype, device=device)


@torch.library.register_fake("diffkern::_noise_cpu_isa")
def _noise_cpu_isa_fake(size, seed, step, sample_offset, stream, dtype, isa, rademacher):
    return torch.empty(size, dtype=dtype, device="cpu")


@torch.library.register_fake("diffkern::probe_trace")
def _probe_trace_fake(probes, products, scale):
    return probes.new_empty((probes.shape[1],), dtype=torch.float64)


@torch.library.register_fake("diffkern::likelihood_step")
def _likelihood_step_fake(x, model_output, model_output_prev, probes, products, delta_logp, trace_prev, c_x, c_model,
                          c_prev, l0, l_prev, l_trace, trace_scale):
    return (torch.empty_like(x, memory_format=torch.contiguous_format), torch.empty_like(delta_logp),
            delta_logp.new_empty(delta_logp.shape))


@torch.library.register_fake("diffkern::random_bits")
def _random_bits_fake(size, seed, step, sample_offset, stream, seed_step, device):
    return torch.empty(size, dtype=torch.int32, device=device)


@torch.library.register_fake("diffkern::philox4x32_10")
def _philox_fake(counter, key):
    return torch.empty_like(counter, memory_format=torch.contiguous_format)


def _check_fused_step_fake(x, inputs, coefficients, rows, aux):
    """What the kernels check, for FakeTensor / meta tracing: a meta tensor among real ones is refused
    here instead of producing meta outputs."""
    names = ("model_output", "model_output_uncond", "guidance_grad", "predicted_variance", "noise")
    for name, t in zip(names, inputs):
        if t is None:
            continue
        torch._check(t.device == x.device, lambda: f"diffkern::fused_step: {name} is on {t.device} but x is on {x.device}")
        torch._check(t.shape == x.shape, lambda: f"diffkern::fused_step: {name} has shape {tuple(t.shape)} but x has "
                                                 f"{tuple(x.shape)}")
        torch._check(t.dtype == x.dtype, lambda: f"diffkern::fused_step: {name} is {t.dtype} but x is {x.dtype}")
    table_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    torch._check(coefficients.device == x.device and coefficients.dtype == table_dtype and coefficients.dim() == 2
                 and coefficients.shape[1] == len(_step_row_fields()),
                 lambda: f"diffkern::fused_step: coefficients must be a {table_dtype} table [rows, "
                         f"{len(_step_row_fields())}] on {x.device}, got {coefficients.dtype} "
                         f"{tuple(coefficients.shape)} on {coefficients.device}")
    torch._check(rows is None or (rows.device == x.device and rows.dtype == torch.int64),
                 lambda: f"diffkern::fused_step: rows must be int64 on {x.device}")
    torch._check(aux in (0, 1, 2), lambda: "diffkern::fused_step: aux must be 0 (none), 1 (x0) or 2 (noise)")


def _step_row_fields():
    return torch.ops.diffkern.step_row_fields().split(",")


def _fused_step_fake(x, model_output, model_output_uncond, guidance_grad, predicted_variance, noise, coefficients,
                     rows, row, clip, aux, stream_noise, seed, step, sample_offset, stream, seed_step, *isa):
    _check_fused_step_fake(x, (model_output, model_output_uncond, guidance_grad, predicted_variance, noise),
                           coefficients, rows, aux)
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    return out, torch.empty(x.shape if aux else (0,), dtype=x.dtype, device=x.device)


torch.library.register_fake("diffkern::fused_step")(_fused_step_fake)


@torch.library.register_fake("diffkern::fused_step.out")
def _fused_step_out_fake(x, model_output, model_output_uncond, guidance_grad, predicted_variance, noise, coefficients,
                         rows, row, clip, aux, stream_noise, seed, step, sample_offset, stream, seed_step, *, out,
                         aux_out):
    _check_fused_step_fake(x, (model_output, model_output_uncond, guidance_grad, predicted_variance, noise),
                           coefficients, rows, aux)
    for name, buffer in (("out", out), ("aux_out", aux_out)):
        torch._check(buffer is None or (buffer.device == x.device and buffer.shape == x.shape),
                     lambda: f"diffkern::fused_step: {name} must have x's shape and device")
    return None
torch.library.register_fake("diffkern::_fused_step_cpu_isa")(_fused_step_fake)


def _check_linear_step_fake(inputs, noise, coefficients, outputs):
    torch._check(1 <= len(inputs) <= 8, lambda: f"diffkern::linear_step: takes 1 to 8 inputs, got {len(inputs)}")
    torch._check(outputs in (1, 2), lambda: f"diffkern::linear_step: outputs must be 1 or 2, got {outputs}")
    x = inputs[0]
    for i, t in enumerate(list(inputs[1:]) + ([noise] if noise is not None else [])):
        torch._check(t.device == x.device and t.shape == x.shape and t.dtype == x.dtype,
                     lambda: f"diffkern::linear_step: input {i + 1} is {t.dtype} {tuple(t.shape)} on {t.device} but "
                             f"inputs[0] is {x.dtype} {tuple(x.shape)} on {x.device}")
    width = len(inputs) + 3 + outputs * (len(inputs) + 2)
    table_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    torch._check(coefficients.device == x.device and coefficients.dtype == table_dtype and coefficients.dim() == 2
                 and coefficients.shape[1] == width,
                 lambda: f"diffkern::linear_step: coefficients must be a {table_dtype} table [rows, {width}] on "
                         f"{x.device}, got {coefficients.dtype} {tuple(coefficients.shape)} on {coefficients.device}")


def _linear_step_fake(inputs, noise, coefficients, row, outputs, x0, clip, stream_noise, seed, step, sample_offset,
                      stream, seed_step, *isa):
    _check_linear_step_fake(inputs, noise, coefficients, outputs)
    x = inputs[0]
    return [torch.empty(x.shape, dtype=x.dtype, device=x.device) for _ in range(outputs + (1 if x0 else 0))]


torch.library.register_fake("diffkern::linear_step")(_linear_step_fake)
torch.library.register_fake("diffkern::_linear_step_cpu_isa")(_linear_step_fake)


@torch.library.register_fake("diffkern::linear_step.out")
def _linear_step_out_fake(inputs, noise, coefficients, row, outputs, x0, clip, stream_noise, seed, step,
                          sample_offset, stream, seed_step, *, out):
    _check_linear_step_fake(inputs, noise, coefficients, outputs)
    torch._check(len(out) == outputs + (1 if x0 else 0), lambda: "diffkern::linear_step.out: wrong number of outputs")
    return None
