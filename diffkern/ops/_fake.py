"""The fake (meta) kernel of every op, registered with torch.library.register_fake: what the real
kernels check (shapes, dtypes, devices, the table's width), written with torch._check, so that
torch.compile, FakeTensor and meta tensors see the same errors, and one meta tensor among real ones
is refused instead of producing an uninitialised output. Each function's signature is its op's
schema (csrc/ops.cpp)."""
from __future__ import annotations

import math

import torch

from ._schema import (
    LINEAR_MAX_INPUTS,
    NOISE_DTYPES,
    RK_MAX_INPUTS,
    RK_MAX_OUTPUTS,
    RK_MAX_TRACES,
    linear_row_width,
    loss_row_fields,
    rk_row_width,
    step_row_fields,
)


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
        torch._check(t.device == x.device,
                     lambda: f"diffkern::fused_step: {name} is on {t.device} but x is on {x.device}")
        torch._check(t.shape == x.shape, lambda: f"diffkern::fused_step: {name} has shape {tuple(t.shape)} but x has "
                                                 f"{tuple(x.shape)}")
        torch._check(t.dtype == x.dtype, lambda: f"diffkern::fused_step: {name} is {t.dtype} but x is {x.dtype}")
    table_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    torch._check(coefficients.device == x.device and coefficients.dtype == table_dtype and coefficients.dim() == 2
                 and coefficients.shape[1] == len(step_row_fields()),
                 lambda: f"diffkern::fused_step: coefficients must be a {table_dtype} table [rows, "
                         f"{len(step_row_fields())}] on {x.device}, got {coefficients.dtype} "
                         f"{tuple(coefficients.shape)} on {coefficients.device}")
    torch._check(rows is None or (rows.device == x.device and rows.dtype == torch.int64),
                 lambda: f"diffkern::fused_step: rows must be int64 on {x.device}, got {rows.dtype} on {rows.device}")
    torch._check(aux in (0, 1, 2), lambda: "diffkern::fused_step: aux must be 0 (none), 1 (x0) or 2 (noise)")
    torch._check(x.dtype in NOISE_DTYPES, lambda: f"diffkern::fused_step: x must be float16, bfloat16, float32 or "
                                                  f"float64, got {x.dtype}")
    _check_seed_step_fake("fused_step", seed_step, x.device)


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
    torch._check(1 <= len(inputs) <= LINEAR_MAX_INPUTS,
                 lambda: f"diffkern::linear_step: takes 1 to {LINEAR_MAX_INPUTS} inputs, got {len(inputs)}")
    torch._check(outputs in (1, 2), lambda: f"diffkern::linear_step: outputs must be 1 or 2, got {outputs}")
    x = inputs[0]
    for i, t in enumerate(list(inputs[1:]) + ([noise] if noise is not None else [])):
        torch._check(t.device == x.device and t.shape == x.shape and t.dtype == x.dtype,
                     lambda: f"diffkern::linear_step: input {i + 1} is {t.dtype} {tuple(t.shape)} on {t.device} but "
                             f"inputs[0] is {x.dtype} {tuple(x.shape)} on {x.device}")
    width = linear_row_width(len(inputs), outputs)
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
                 lambda: f"diffkern::rk_stage: inputs must be floating-point [batch, ...], got {x.dtype} "
                         f"{tuple(x.shape)}")
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
    for t in list(traces) + ([log_density] if log_density is not None else []):
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




def _check_training_loss_fake(op, x0, model_output, noise, coefficients, seed_step):
    torch._check(x0.dtype in NOISE_DTYPES and x0.dim() >= 1,
                 lambda: f"diffkern::{op}: x0 must be floating-point [batch, ...], got {x0.dtype} {tuple(x0.shape)}")
    for name, t in (("model_output", model_output), ("noise", noise)):
        if t is not None:
            torch._check(t.shape == x0.shape and t.dtype == x0.dtype and t.device == x0.device,
                         lambda: f"diffkern::{op}: {name} must be a {x0.dtype} tensor of x0's shape {tuple(x0.shape)} "
                                 f"on {x0.device}, got {t.dtype} {tuple(t.shape)} on {t.device}")
    width = len(loss_row_fields())
    torch._check(coefficients.dtype == torch.float64 and coefficients.dim() == 2 and coefficients.shape[1] == width
                 and coefficients.shape[0] in (1, x0.shape[0]) and coefficients.device == x0.device,
                 lambda: f"diffkern::{op}: coefficients must be float64 [1 or batch, {width}] on {x0.device}, got "
                         f"{coefficients.dtype} {tuple(coefficients.shape)} on {coefficients.device}")
    _check_seed_step_fake(op, seed_step, x0.device)


@torch.library.register_fake("diffkern::training_loss")
def _training_loss_fake(x0, model_output, noise, coefficients, stream_noise, seed, step, sample_offset, stream,
                        seed_step):
    _check_training_loss_fake("training_loss", x0, model_output, noise, coefficients, seed_step)
    return x0.new_empty((x0.shape[0],), dtype=torch.float64)


@torch.library.register_fake("diffkern::training_loss_backward")
def _training_loss_backward_fake(grad_loss, x0, model_output, noise, coefficients, stream_noise, seed, step,
                                 sample_offset, stream, seed_step, output_mask):
    _check_training_loss_fake("training_loss_backward", x0, model_output, noise, coefficients, seed_step)
    torch._check(grad_loss.dtype == torch.float64 and grad_loss.shape == (x0.shape[0],),
                 lambda: f"diffkern::training_loss_backward: grad_loss must be float64 [{x0.shape[0]}]")
    present = (True, True, noise is not None)
    return [x0.new_empty(x0.shape if want and here else (0,)) for want, here in zip(output_mask, present)]


torch.library.register_fake("diffkern::_training_loss_cpu_isa")(
    lambda x0, model_output, noise, coefficients, stream_noise, seed, step, sample_offset, stream, seed_step, isa:
    _training_loss_fake(x0, model_output, noise, coefficients, stream_noise, seed, step, sample_offset, stream,
                        seed_step))


@torch.library.register_fake("diffkern::poisson_field")
def _poisson_field_fake(points, dz, charges):
    torch._check(points.dim() == 2 and points.dtype in (torch.float32, torch.float64),
                 lambda: "diffkern::poisson_field: points must be float32 or float64 [batch, features]")
    torch._check(charges.dim() == 2 and charges.shape[1] == points.shape[1] and charges.dtype == points.dtype,
                 lambda: "diffkern::poisson_field: charges must be [count, features] of the points' dtype")
    torch._check(dz.dim() == 1 and dz.shape[0] == points.shape[0] and dz.dtype == points.dtype,
                 lambda: "diffkern::poisson_field: dz must be [batch] of the points' dtype")
    return points.new_empty(points.shape), points.new_empty((points.shape[0],), dtype=torch.float64)


torch.library.register_fake("diffkern::_poisson_field_cpu_isa")(
    lambda points, dz, charges, isa: _poisson_field_fake(points, dz, charges))
