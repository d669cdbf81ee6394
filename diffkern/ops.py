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
        dims = list(shape)
    except TypeError:
        raise TypeError(f"shape must be an int or a sequence of ints, got {shape!r}") from None
    # int() would silently truncate 2.7 to 2: only integers (or integer 0-d tensors) are sizes
    if not all(isinstance(d, numbers.Integral) and not isinstance(d, bool)
               or isinstance(d, torch.Tensor) and d.dim() == 0 and not d.is_floating_point()
               and not d.is_complex() and d.dtype != torch.bool for d in dims):
        raise TypeError(f"shape must be an int or a sequence of ints, got {shape!r}")
    dims = [int(d) for d in dims]
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
    recording = torch.is_grad_enabled() and _any_requires_grad(
        x, model_output, model_output_uncond, guidance_grad, predicted_variance, noise)
    if given_out and recording:
        raise ValueError("fused_step with out= cannot record gradients (it writes in place): call it without out= "
                         "when an input requires grad")
    if not given_out and aux_code and not recording and isinstance(x, torch.Tensor):
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


def _any_requires_grad(*tensors) -> bool:
    for t in tensors:  # a plain loop: this runs on every step of every sampler
        if getattr(t, "requires_grad", False):
            return True
    return False


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
        if torch.is_grad_enabled() and _any_requires_grad(noise, *inputs):  # the functional op has autograd
            results = list(torch.ops.diffkern.linear_step(list(inputs), noise, coefficients, row, outputs, x0, clip,
                                                          stream_noise, seed, step, sample_offset, stream, seed_step))
        else:
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
        x.contiguous(), model_output.contiguous(), None if model_output_prev is None else model_output_prev.contiguous(),
        _features_contiguous(probes), _features_contiguous(products), delta_logp.contiguous(),
        None if trace_prev is None else trace_prev.contiguous(), float(c_x), float(c_model), float(c_prev), float(l0),
        float(l_prev), float(l_trace), float(trace_scale))


RK_MAX_INPUTS, RK_MAX_OUTPUTS, RK_MAX_TRACES = 10, 2, 8


def rk_row_width(inputs: int, outputs: int, traces: int, error: bool) -> int:
    """Width of a coefficient row of rk_stage: [c0, c1, C_0 .. C_{outputs-1} (inputs each), E (inputs),
    beta (traces + 1), eps (traces + 1)], the last three with error only (csrc/include/diffkern/rk_stage.h)."""
    return 2 + outputs * inputs + (inputs + 2 * (traces + 1) if error else 0)


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


# ---- fake kernels: what the real kernels check (shapes, dtypes, devices, the table's width), with
# torch._check, for torch.compile / FakeTensor / meta tensors ----


@torch.library.register_fake("diffkern::_noise_cpu_isa")
def _noise_cpu_isa_fake(size, seed, step, sample_offset, stream, dtype, isa, rademacher):
    return torch.empty(size, dtype=dtype, device="cpu")


def _check_fused_step_fake(x, inputs, coefficients, rows, aux, seed_step=None):
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
                 lambda: f"diffkern::fused_step: rows must be int64 on {x.device}, got {rows.dtype} on {rows.device}")
    torch._check(aux in (0, 1, 2), lambda: "diffkern::fused_step: aux must be 0 (none), 1 (x0) or 2 (noise)")
    torch._check(x.dtype in NOISE_DTYPES, lambda: f"diffkern::fused_step: x must be float16, bfloat16, float32 or "
                                                  f"float64, got {x.dtype}")
    _check_seed_step_fake("fused_step", seed_step, x.device)


def _step_row_fields():
    return torch.ops.diffkern.step_row_fields().split(",")


def _fused_step_fake(x, model_output, model_output_uncond, guidance_grad, predicted_variance, noise, coefficients,
                     rows, row, clip, aux, stream_noise, seed, step, sample_offset, stream, seed_step, *isa):
    _check_fused_step_fake(x, (model_output, model_output_uncond, guidance_grad, predicted_variance, noise),
                           coefficients, rows, aux, seed_step)
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    return out, torch.empty(x.shape if aux else (0,), dtype=x.dtype, device=x.device)


torch.library.register_fake("diffkern::fused_step")(_fused_step_fake)


@torch.library.register_fake("diffkern::fused_step.out")
def _fused_step_out_fake(x, model_output, model_output_uncond, guidance_grad, predicted_variance, noise, coefficients,
                         rows, row, clip, aux, stream_noise, seed, step, sample_offset, stream, seed_step, *, out,
                         aux_out):
    _check_fused_step_fake(x, (model_output, model_output_uncond, guidance_grad, predicted_variance, noise),
                           coefficients, rows, aux, seed_step)
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
    _check_seed_step_fake("linear_step", seed_step, inputs[0].device)
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


# ---- more fake-kernel checks: every tensor on the op's device, so that one meta tensor among real
# ones is an error instead of an uninitialised real output ----

def _check_devices(op: str, device, **tensors) -> None:
    for name, t in tensors.items():
        if t is not None:
            torch._check(t.device == device,
                         lambda: f"diffkern::{op}: {name} is on {t.device} but the op runs on {device}")


def _check_seed_step_fake(op: str, seed_step, device) -> None:
    if seed_step is not None:
        torch._check(seed_step.device == device and seed_step.dtype == torch.int64 and seed_step.numel() == 2,
                     lambda: f"diffkern::{op}: seed_step must be an int64 tensor of 2 elements on {device}, got "
                             f"{seed_step.dtype} {tuple(seed_step.shape)} on {seed_step.device}")


def _noise_fake(op, size, seed_step, dtype, device):
    torch._check(all(s >= 0 for s in size), lambda: f"diffkern::{op}: negative size in {list(size)}")
    _check_seed_step_fake(op, seed_step, torch.device(device))
    return torch.empty(size, dtype=dtype, device=device)


torch.library.register_fake("diffkern::randn", lambda size, seed, step, sample_offset, stream, seed_step, dtype,
                            device: _noise_fake("randn", size, seed_step, dtype, device))
torch.library.register_fake("diffkern::rademacher", lambda size, seed, step, sample_offset, stream, seed_step, dtype,
                            device: _noise_fake("rademacher", size, seed_step, dtype, device))
torch.library.register_fake("diffkern::random_bits", lambda size, seed, step, sample_offset, stream, seed_step,
                            device: _noise_fake("random_bits", size, seed_step, torch.int32, device))


def _philox_fake_checked(counter, key):
    torch._check(counter.dtype == torch.int64 and key.dtype == torch.int64,
                 lambda: "diffkern::philox4x32_10: counter and key must be int64")
    torch._check(counter.dim() >= 1 and counter.shape[-1] == 4 and key.dim() >= 1 and key.shape[-1] == 2
                 and counter.numel() // 4 == key.numel() // 2,
                 lambda: f"diffkern::philox4x32_10: counter must be [..., 4] and key [..., 2] with as many rows, got "
                         f"{tuple(counter.shape)} and {tuple(key.shape)}")
    _check_devices("philox4x32_10", counter.device, key=key)
    return torch.empty_like(counter, memory_format=torch.contiguous_format)


torch.library.register_fake("diffkern::philox4x32_10", _philox_fake_checked)


def _probe_trace_fake_checked(probes, products, scale):
    torch._check(probes.dim() >= 2 and probes.shape == products.shape and probes.dtype == products.dtype
                 and probes.dtype in NOISE_DTYPES,
                 lambda: f"diffkern::probe_trace: probes and products must be floating-point tensors [num_probes, "
                         f"batch, ...] of one shape and dtype, got {probes.dtype} {tuple(probes.shape)} and "
                         f"{products.dtype} {tuple(products.shape)}")
    _check_devices("probe_trace", probes.device, products=products)
    return probes.new_empty((probes.shape[1],), dtype=torch.float64)


torch.library.register_fake("diffkern::probe_trace", _probe_trace_fake_checked)


def _likelihood_step_fake_checked(x, model_output, model_output_prev, probes, products, delta_logp, trace_prev, c_x,
                                  c_model, c_prev, l0, l_prev, l_trace, trace_scale):
    trace = _probe_trace_fake_checked(probes, products, trace_scale)
    _check_devices("likelihood_step", probes.device, x=x, model_output=model_output,
                   model_output_prev=model_output_prev, delta_logp=delta_logp, trace_prev=trace_prev)
    for name, t in (("x", x), ("model_output", model_output), ("model_output_prev", model_output_prev)):
        if t is not None:
            torch._check(t.shape == x.shape and t.dtype == probes.dtype and x.dim() >= 1
                         and x.shape[0] == probes.shape[1] and x.numel() * probes.shape[0] == probes.numel(),
                         lambda: f"diffkern::likelihood_step: {name} must be a {probes.dtype} tensor of x's shape "
                                 f"matching probes {tuple(probes.shape)}, got {t.dtype} {tuple(t.shape)}")
    for name, t in (("delta_logp", delta_logp), ("trace_prev", trace_prev)):
        if t is not None:
            torch._check(t.dtype == torch.float64 and t.dim() == 1 and t.shape[0] == probes.shape[1],
                         lambda: f"diffkern::likelihood_step: {name} must be a float64 tensor [batch], got "
                                 f"{t.dtype} {tuple(t.shape)}")
    return (torch.empty_like(x, memory_format=torch.contiguous_format), torch.empty_like(delta_logp), trace)


torch.library.register_fake("diffkern::likelihood_step", _likelihood_step_fake_checked)


@torch.library.register_fake("diffkern::rk_stage")
def _rk_stage_fake(inputs, probes, products, coefficients, traces, log_density, outputs, error, trace_scale, atol,
                   rtol):
    torch._check(1 <= len(inputs) <= RK_MAX_INPUTS and 0 <= outputs <= RK_MAX_OUTPUTS and len(traces) <= RK_MAX_TRACES,
                 lambda: f"diffkern::rk_stage: takes 1 to {RK_MAX_INPUTS} inputs, 0 to {RK_MAX_OUTPUTS} outputs and at "
                         f"most {RK_MAX_TRACES} traces, got {len(inputs)}, {outputs} and {len(traces)}")
    x = inputs[0]
    torch._check(x.dtype in NOISE_DTYPES and x.dim() >= 1,
                 lambda: f"diffkern::rk_stage: inputs must be floating-point [batch, ...], got {x.dtype} {tuple(x.shape)}")
    for i, t in enumerate(inputs):
        torch._check(t.shape == x.shape and t.dtype == x.dtype,
                     lambda: f"diffkern::rk_stage: inputs[{i}] must be a {x.dtype} tensor of shape {tuple(x.shape)}")
    _check_devices("rk_stage", x.device, probes=probes, products=products, coefficients=coefficients,
                   log_density=log_density, **{f"inputs[{i}]": t for i, t in enumerate(inputs)},
                   **{f"traces[{j}]": t for j, t in enumerate(traces)})
    torch._check((probes is None) == (products is None),
                 lambda: "diffkern::rk_stage: give both probes and products or neither")
    if probes is not None:
        torch._check(probes.shape == products.shape and tuple(probes.shape[1:]) == tuple(x.shape)
                     and probes.dtype == x.dtype and products.dtype == x.dtype,
                     lambda: f"diffkern::rk_stage: probes and products must be {x.dtype} [num_probes, "
                             f"{', '.join(map(str, x.shape))}], got {tuple(probes.shape)} and {tuple(products.shape)}")
    torch._check(not error or (len(inputs) >= 3 and math.isfinite(atol) and atol > 0 and math.isfinite(rtol)
                               and rtol >= 0),
                 lambda: "diffkern::rk_stage: the error stage needs 3 or more inputs, atol > 0 and rtol >= 0")
    torch._check(error or (not traces and log_density is None),
                 lambda: "diffkern::rk_stage: traces and log_density are read by the error stage only (error=True)")
    for j, t in enumerate(list(traces) + ([log_density] if log_density is not None else [])):
        torch._check(t.dtype == torch.float64 and t.dim() == 1 and t.shape[0] == x.shape[0],
                     lambda: f"diffkern::rk_stage: traces and log_density must be float64 [batch], got {t.dtype} "
                             f"{tuple(t.shape)}")
    width = rk_row_width(len(inputs), outputs, len(traces), error)
    torch._check(coefficients.dtype == torch.float64 and coefficients.dim() == 2 and coefficients.shape[1] == width
                 and (coefficients.shape[0] == 1 or (coefficients.shape[0] == x.shape[0] and x.shape[0] > 0)),
                 lambda: f"diffkern::rk_stage: coefficients must be float64 [1 or batch, {width}], got "
                         f"{coefficients.dtype} {tuple(coefficients.shape)}")
    vector = (x.shape[0],)
    return ([torch.empty_like(x, memory_format=torch.contiguous_format) for _ in range(outputs)],
            x.new_empty(vector, dtype=torch.float64),
            x.new_empty(vector if error and log_density is not None else (0,), dtype=torch.float64),
            x.new_empty(vector if error else (0,), dtype=torch.float64))


@torch.library.register_fake("diffkern::fused_step_backward")
def _fused_step_backward_fake(grad_out, grad_aux, x, model_output, model_output_uncond, guidance_grad,
                              predicted_variance, noise, coefficients, rows, row, clip, aux, stream_noise, seed, step,
                              sample_offset, stream, seed_step, output_mask):
    inputs = (model_output, model_output_uncond, guidance_grad, predicted_variance, noise)
    _check_fused_step_fake(x, inputs, coefficients, rows, aux, seed_step)
    for name, t in (("grad_out", grad_out), ("grad_aux", grad_aux)):
        if t is not None:
            torch._check(t.shape == x.shape and t.dtype == x.dtype and t.device == x.device,
                         lambda: f"diffkern::fused_step_backward: {name} must match x")
    present = (True,) + tuple(t is not None for t in inputs)
    return [torch.empty(x.shape if want and here else (0,), dtype=x.dtype, device=x.device)
            for want, here in zip(output_mask, present)]


# ---- autograd: every fused op is linear in its tensor inputs (clipping makes x0 piecewise linear),
# so each backward is one more fused pass with the same coefficients ----

_NO_TABLE_GRAD = ("gradients with respect to the coefficient table are not supported: the table is a float64 "
                  "function of the schedule, computed once per run; pass it without requires_grad")


def _fused_step_setup_context(ctx, inputs, output):
    (x, model_output, model_output_uncond, guidance_grad, predicted_variance, noise, coefficients, rows, row, clip,
     aux, stream_noise, seed, step, sample_offset, stream, seed_step) = inputs
    if coefficients.requires_grad:
        raise ValueError(f"diffkern::fused_step: {_NO_TABLE_GRAD}")
    ctx.save_for_backward(x, model_output, model_output_uncond, guidance_grad, predicted_variance, noise,
                          coefficients, rows, seed_step)
    ctx.options = (row, clip, aux, stream_noise, seed, step, sample_offset, stream)


def _fused_step_backward(ctx, grad_out, grad_aux):
    x, model_output, model_output_uncond, guidance_grad, predicted_variance, noise, coefficients, rows, seed_step = (
        ctx.saved_tensors)
    row, clip, aux, stream_noise, seed, step, sample_offset, stream = ctx.options
    if grad_out is None:
        grad_out = torch.zeros_like(x)
    if aux == 0 or grad_aux is None or grad_aux.shape != x.shape:
        grad_aux = None
    grads = torch.ops.diffkern.fused_step_backward(
        grad_out, grad_aux, x, model_output, model_output_uncond, guidance_grad, predicted_variance, noise,
        coefficients, rows, row, clip, aux, stream_noise, seed, step, sample_offset, stream, seed_step,
        list(ctx.needs_input_grad[:6]))
    grads = [g if wanted and g.numel() == x.numel() and g.shape == x.shape else None
             for g, wanted in zip(grads, ctx.needs_input_grad[:6])]
    return (*grads, None, None, None, None, None, None, None, None, None, None, None)


torch.library.register_autograd("diffkern::fused_step", _fused_step_backward, setup_context=_fused_step_setup_context)


def _linear_step_setup_context(ctx, inputs, output):
    (tensors, noise, coefficients, row, outputs, x0, clip, stream_noise, seed, step, sample_offset, stream,
     seed_step) = inputs
    if coefficients.requires_grad:
        raise ValueError(f"diffkern::linear_step: {_NO_TABLE_GRAD}")
    ctx.save_for_backward(*tensors, noise if noise is not None else tensors[0], coefficients,
                          seed_step if seed_step is not None else coefficients)
    ctx.layout = (len(tensors), noise is not None, seed_step is not None)
    ctx.options = (row, outputs, x0, clip, stream_noise, seed, step, sample_offset, stream)


def _linear_step_backward(ctx, grads):
    n, has_noise, has_seed_step = ctx.layout
    saved = ctx.saved_tensors
    tensors, noise, coefficients, seed_step = list(saved[:n]), saved[n], saved[n + 1], saved[n + 2]
    noise, seed_step = (noise if has_noise else None), (seed_step if has_seed_step else None)
    row, outputs, x0, clip, stream_noise, seed, step, sample_offset, stream = ctx.options
    x = tensors[0]
    acc = coefficients.dtype
    r = coefficients[row]
    zero = torch.zeros((), dtype=acc, device=x.device)
    grads = [None if g is None else g.to(acc) for g in grads]
    output_grads = [grads[j] if grads[j] is not None else zero for j in range(outputs)]
    x0_grad = grads[outputs] if x0 and grads[outputs] is not None else zero
    c = [r[n + 3 + j * (n + 2)] for j in range(outputs)]
    d = [[r[n + 3 + j * (n + 2) + 1 + i] for i in range(n)] for j in range(outputs)]
    s = [r[n + 3 + j * (n + 2) + n + 1] for j in range(outputs)]
    through_x0 = x0_grad + sum(c[j] * output_grads[j] for j in range(outputs))
    if clip:
        if noise is None and stream_noise:  # the forward drew it in the kernel: the same stream again
            noise = torch.ops.diffkern.randn(list(x.shape), seed, step, sample_offset, stream, seed_step, x.dtype,
                                             x.device)
        pre = sum(r[i] * tensors[i].to(acc) for i in range(n))
        if noise is not None:
            pre = pre + r[n] * noise.to(acc)
        through_x0 = torch.where((pre >= r[n + 1]) & (pre <= r[n + 2]), through_x0, zero)
    input_grads = []
    for i in range(n):
        if not ctx.needs_input_grad[0]:
            input_grads.append(None)
            continue
        g = r[i] * through_x0 + sum(d[j][i] * output_grads[j] for j in range(outputs))
        input_grads.append(torch.broadcast_to(g, x.shape).to(x.dtype))
    noise_grad = None
    if has_noise and ctx.needs_input_grad[1]:
        noise_grad = torch.broadcast_to(r[n] * through_x0 + sum(s[j] * output_grads[j] for j in range(outputs)),
                                        x.shape).to(x.dtype)
    return (input_grads, noise_grad, None, None, None, None, None, None, None, None, None, None, None)


torch.library.register_autograd("diffkern::linear_step", _linear_step_backward,
                                setup_context=_linear_step_setup_context)


def _probe_trace_setup_context(ctx, inputs, output):
    probes, products, scale = inputs
    ctx.save_for_backward(probes, products)
    ctx.scale = scale


def _probe_trace_backward(ctx, grad_trace):
    probes, products = ctx.saved_tensors
    weight = (ctx.scale * grad_trace).reshape(1, -1, *([1] * (probes.dim() - 2)))
    grad_probes = (products.double() * weight).to(probes.dtype) if ctx.needs_input_grad[0] else None
    grad_products = (probes.double() * weight).to(products.dtype) if ctx.needs_input_grad[1] else None
    return grad_probes, grad_products, None


torch.library.register_autograd("diffkern::probe_trace", _probe_trace_backward,
                                setup_context=_probe_trace_setup_context)


def _likelihood_step_setup_context(ctx, inputs, output):
    x, model_output, model_output_prev, probes, products, delta_logp, trace_prev = inputs[:7]
    ctx.save_for_backward(probes, products)
    ctx.coefficients = inputs[7:]
    ctx.has_prev = (model_output_prev is not None, trace_prev is not None)


def _likelihood_step_backward(ctx, grad_x, grad_delta, grad_trace):
    probes, products = ctx.saved_tensors
    c_x, c_model, c_prev, l0, l_prev, l_trace, trace_scale = ctx.coefficients
    need = ctx.needs_input_grad
    grad_x = grad_x if grad_x is not None else None
    batch = probes.shape[1]
    zero = torch.zeros(batch, dtype=torch.float64, device=probes.device)
    grad_delta = grad_delta if grad_delta is not None else zero
    grad_trace = (grad_trace if grad_trace is not None else zero) + l_trace * grad_delta
    weight = (trace_scale * grad_trace).reshape(1, -1, *([1] * (probes.dim() - 2)))

    def scaled(c):
        return None if grad_x is None else c * grad_x
    return (scaled(c_x) if need[0] else None, scaled(c_model) if need[1] else None,
            scaled(c_prev) if need[2] and ctx.has_prev[0] else None,
            (products.double() * weight).to(probes.dtype) if need[3] else None,
            (probes.double() * weight).to(products.dtype) if need[4] else None,
            grad_delta if need[5] else None,
            l_prev * grad_delta if need[6] and ctx.has_prev[1] else None,
            None, None, None, None, None, None, None)


torch.library.register_autograd("diffkern::likelihood_step", _likelihood_step_backward,
                                setup_context=_likelihood_step_setup_context)
