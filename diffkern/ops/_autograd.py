"""Autograd of the ops, registered with torch.library.register_autograd. Every fused op is linear in
its tensor inputs (clipping makes x0 piecewise linear), so each backward is one more fused pass with
the same coefficients (csrc/include/diffkern/step_backward.h) or a few tensor operations."""
from __future__ import annotations

import torch

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


class _NoDoubleBackward(torch.autograd.Function):
    """Passes fused_step's gradients through unchanged, with a backward that refuses: its backward
    kernel has no autograd, so the gradient of its gradient would otherwise be zero without a word."""

    @staticmethod
    def forward(ctx, count, *tensors):
        return tuple(t.view_as(t) for t in tensors[:count])

    @staticmethod
    def backward(ctx, *grads):
        raise RuntimeError("diffkern's fused steps (ddpm_step, ddim_step, q_sample, the SDE and EDM steps, the "
                           "samplers' steps) and its training loss have no double backward: the gradient of their "
                           "gradient is not computed. Differentiate them once, or use their diffkern.reference "
                           "twins for higher derivatives")


def _fused_step_backward(ctx, grad_out, grad_aux):
    x, model_output, model_output_uncond, guidance_grad, predicted_variance, noise, coefficients, rows, seed_step = (
        ctx.saved_tensors)
    row, clip, aux, stream_noise, seed, step, sample_offset, stream = ctx.options
    if grad_out is None:
        grad_out = torch.zeros_like(x)
    if aux == 0 or grad_aux is None or grad_aux.shape != x.shape:
        grad_aux = None
    with torch.no_grad():  # the backward kernel has no autograd of its own (see _NoDoubleBackward)
        grads = torch.ops.diffkern.fused_step_backward(
            grad_out, grad_aux, x, model_output, model_output_uncond, guidance_grad, predicted_variance, noise,
            coefficients, rows, row, clip, aux, stream_noise, seed, step, sample_offset, stream, seed_step,
            list(ctx.needs_input_grad[:6]))
    grads = [g if wanted and g.numel() == x.numel() and g.shape == x.shape else None
             for g, wanted in zip(grads, ctx.needs_input_grad[:6])]
    recorded = [t for t in (grad_out, grad_aux, x, model_output, model_output_uncond, guidance_grad,
                            predicted_variance, noise) if t is not None and t.requires_grad]
    if torch.is_grad_enabled() and recorded:  # create_graph=True: a second derivative must not be silently zero
        present = [g for g in grads if g is not None]
        wrapped = iter(_NoDoubleBackward.apply(len(present), *present, *recorded))
        grads = [next(wrapped) if g is not None else None for g in grads]
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


def _training_loss_setup_context(ctx, inputs, output):
    x0, model_output, noise, coefficients, stream_noise, seed, step, sample_offset, stream, seed_step = inputs
    if coefficients.requires_grad:
        raise ValueError(f"diffkern::training_loss: {_NO_TABLE_GRAD}")
    # x0, the model output and the rows: nothing of the noise's size is kept (the backward draws it again)
    ctx.save_for_backward(x0, model_output, noise, coefficients, seed_step)
    ctx.options = (stream_noise, seed, step, sample_offset, stream)


def _training_loss_backward(ctx, grad_loss):
    x0, model_output, noise, coefficients, seed_step = ctx.saved_tensors
    stream_noise, seed, step, sample_offset, stream = ctx.options
    want = [ctx.needs_input_grad[1], ctx.needs_input_grad[0], noise is not None and ctx.needs_input_grad[2]]
    with torch.no_grad():
        grad_m, grad_x0, grad_noise = torch.ops.diffkern.training_loss_backward(
            grad_loss.to(torch.float64).contiguous(), x0, model_output, noise, coefficients, stream_noise, seed, step,
            sample_offset, stream, seed_step, want)
    grads = [grad_x0 if want[1] else None, grad_m if want[0] else None, grad_noise if want[2] else None]
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (grad_loss, x0, model_output, noise)):
        # a second derivative (the loss is quadratic) is not computed by the backward kernel
        present = [g for g in grads if g is not None]
        wrapped = iter(_NoDoubleBackward.apply(len(present), *present, *[t for t in (grad_loss, x0, model_output, noise)
                                                                         if t is not None and t.requires_grad]))
        grads = [next(wrapped) if g is not None else None for g in grads]
    return (*grads, None, None, None, None, None, None, None)


torch.library.register_autograd("diffkern::training_loss", _training_loss_backward,
                                setup_context=_training_loss_setup_context)


def _rk_stage_setup_context(ctx, inputs, output):
    (tensors, probes, products, coefficients, traces, log_density, outputs, error, trace_scale, _, _) = inputs
    if coefficients.requires_grad:
        raise ValueError(f"diffkern::rk_stage: {_NO_TABLE_GRAD}")
    ctx.save_for_backward(coefficients, probes, products)
    ctx.layout = (len(tensors), len(traces), outputs, error, log_density is not None, trace_scale)
    ctx.like = tensors[0]


def _per_sample(column: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A coefficient column [1 or B] shaped to broadcast over a [B, ...] tensor."""
    return column.reshape(-1, *([1] * (like.dim() - 1)))


def _rk_stage_backward(ctx, grad_outputs, grad_trace, grad_log_density, grad_norm):
    """rk_stage is linear in its inputs, products, traces and log-density (the coefficient rows are
    constants: step-size control stays outside autograd); the error norm has no gradient. The
    gradient is a few tensor operations, themselves differentiable (double backward works)."""
    coefficients, probes, products = ctx.saved_tensors
    n, traces, outputs, error, has_log_density, trace_scale = ctx.layout
    like = ctx.like
    need = ctx.needs_input_grad
    batch = like.shape[0]
    zero = torch.zeros(batch, dtype=torch.float64, device=like.device)
    grad_q = grad_log_density if (error and has_log_density and grad_log_density is not None
                                  and grad_log_density.numel() == batch) else None
    beta = 2 + (outputs + 1) * n  # the log-density weights of the earlier traces and this stage's
    grad_tr = grad_trace if grad_trace is not None else zero
    if grad_q is not None:
        grad_tr = grad_tr + coefficients[:, beta + traces] * grad_q
    input_grads = []
    for i in range(n):
        if not need[0]:
            input_grads.append(None)
            continue
        g = None
        for j in range(outputs):
            if grad_outputs[j] is None:
                continue
            term = _per_sample(coefficients[:, 2 + j * n + i], like).to(like.dtype) * grad_outputs[j]
            g = term if g is None else g + term
        input_grads.append(torch.zeros_like(like) if g is None else g)
    grad_probes = grad_products = None
    if probes is not None:
        weight = _per_sample(trace_scale * coefficients[:, 1] * grad_tr, like)[None].to(like.dtype)
        grad_products = probes * weight if need[2] else None
        grad_probes = products * weight if need[1] else None
    trace_grads = [(coefficients[:, beta + j] * grad_q if grad_q is not None else torch.zeros_like(zero))
                   if need[4] else None for j in range(traces)]
    grad_ld = (grad_q if grad_q is not None else zero) if need[5] and has_log_density else None
    return (input_grads, grad_probes, grad_products, None, trace_grads, grad_ld, None, None, None, None, None)


torch.library.register_autograd("diffkern::rk_stage", _rk_stage_backward, setup_context=_rk_stage_setup_context)
