"""One call for a training step's loss: draw the batch's times and noise from the stream, noise the data
with the fused q_sample, call the model, and apply the fused loss (ops.training_loss), whose backward
draws the noise again instead of keeping it."""
from __future__ import annotations

import math
from typing import Callable, NamedTuple, Optional

import torch

from .. import coefficients, ops
from .._model import call_model
from .._validate import check_real, check_tensor
from ..likelihood import cnf_log_likelihood
from ..models import poisson_field_mean
from ..noise import DEQUANTIZATION_STREAM, TRAINING_NOISE_STREAM
from ..sampling.pfgm import field_parts
from .draws import BatchKey, dropped, uniform_features
from .objectives import CNFObjective, Levels, PFGMObjective, make_objective


class TrainingBatch(NamedTuple):
    """What training_loss computed, with return_batch=True: the loss, per-sample losses (float64 [B]),
    the model's input x_t and output, the per-sample draws (t, sigma, ...) and dropout mask."""

    loss: torch.Tensor
    per_sample: torch.Tensor
    x_t: torch.Tensor
    model_output: torch.Tensor
    levels: Levels
    dropped: Optional[torch.Tensor]


def _conditions(cond, null_cond, mask):
    """cond with the rows of mask replaced by null_cond (broadcast to a row)."""
    if mask is None:
        return cond
    if not isinstance(cond, torch.Tensor) or not isinstance(null_cond, torch.Tensor):
        raise ValueError("classifier-free dropout (p_uncond > 0) needs cond and null_cond as tensors")
    if cond.shape[0] != mask.shape[0]:
        raise ValueError(f"cond has {cond.shape[0]} rows for a batch of {mask.shape[0]}")
    null = null_cond.to(device=cond.device, dtype=cond.dtype).expand_as(cond)
    return torch.where(mask.reshape(-1, *([1] * (cond.dim() - 1))).to(cond.device), null, cond)


def training_loss(model: Callable, x0: torch.Tensor, objective="ddpm", *, seed: int, step: int, sample_offset: int = 0,
                  cond=None, null_cond=None, p_uncond: float = 0.0, cond_key: Optional[str] = None,
                  weights: Optional[torch.Tensor] = None, charges: Optional[torch.Tensor] = None,
                  return_batch: bool = False, **objective_options):
    """The loss of one training step on the batch x0 [B, ...]: the mean over samples of the objective's
    per-sample loss (diffkern.training.objectives; ``objective`` is one, or its name with its options
    as keywords).

    The batch's random quantities are functions of (``seed``, ``step``, global sample index
    ``sample_offset + n``) on streams of their own: the times or noise levels, the noise (drawn in the
    fused q_sample and drawn again by the loss and its backward, never stored), and with
    ``p_uncond`` > 0 which samples' ``cond`` is replaced by ``null_cond`` (classifier-free guidance
    training). So a batch split over micro-batches or processes (each with its own sample_offset) has
    exactly the samples, noise and per-sample losses of the whole batch, on CPU and CUDA.

    The model is called as the samplers call it: ``model(x_t, time)``, ``model(x_t, time, cond)`` or
    ``model(x_t, time, **{cond_key: cond})``, returning a tensor, an object with ``.sample`` or a tuple
    (diffusers' UNet2DModel works unchanged); ``time`` is the objective's (int64 timesteps for DDPM,
    float times, EDM's c_noise). ``weights`` (a [B] tensor) multiplies the per-sample losses. Returns
    the loss (float32, float64 for float64 x0), or a TrainingBatch with ``return_batch``.

    ``objective="pfgm"`` (PFGMObjective) regresses a field model ``model(x, z) -> (v_x, v_z)`` on the
    normalised Poisson field of ``charges`` ([M, ...] data points; default x0 itself) at the batch's
    perturbed points: give a split batch the whole batch as charges, and its samples see the field the
    whole batch would."""
    objective = make_objective(objective, **objective_options)
    check_tensor("x0", x0, min_dim=2)
    p_uncond = check_real("p_uncond", p_uncond)
    if p_uncond > 1:
        raise ValueError(f"p_uncond must lie in [0, 1], got {p_uncond}")
    batch, device = x0.shape[0], x0.device
    key = BatchKey(seed, step, sample_offset)
    ops.noise_args(list(x0.shape), seed, step, sample_offset, TRAINING_NOISE_STREAM, None, device)  # checks the key
    time_dtype = torch.float64 if x0.dtype == torch.float64 else torch.float32
    if isinstance(objective, PFGMObjective):
        per_sample, batch_record = _pfgm_loss(model, x0, objective, key, charges, (cond, cond_key))
        return _finish(per_sample, weights, time_dtype, batch_record if return_batch else None)
    if charges is not None:
        raise ValueError("charges go with objective='pfgm' (the Poisson field's data points)")
    if isinstance(objective, CNFObjective):
        if cond is not None or p_uncond > 0:
            raise ValueError("objective='cnf' trains an unconditional flow: cond and p_uncond go with the "
                             "diffusion objectives")
        per_sample, batch_record = _cnf_loss(model, x0, objective, key)
        return _finish(per_sample, weights, time_dtype, batch_record if return_batch else None)
    levels = objective.levels(batch, key, device, time_dtype)
    noising, loss_rows = objective.rows(levels, x0.dtype, math.prod(x0.shape[1:]))
    x_t, _ = ops.fused_step(x0, coefficients=noising, row=-1, stream_noise=True, seed=seed,
                            step=step, sample_offset=sample_offset, stream=TRAINING_NOISE_STREAM)
    mask = dropped(batch, key, device, p_uncond)
    output = call_model(model, x_t, levels.model_time, _conditions(cond, null_cond, mask), cond_key)
    if not isinstance(output, torch.Tensor) or output.shape != x0.shape:
        raise ValueError(f"the model returned shape {tuple(getattr(output, 'shape', ()))} for x of shape "
                         f"{tuple(x0.shape)}")
    if output.dtype != x0.dtype:
        output = output.to(x0.dtype)
    per_sample = ops.training_loss(x0, output, coefficients=loss_rows, stream_noise=True, seed=seed, step=step,
                                   sample_offset=sample_offset, stream=TRAINING_NOISE_STREAM)
    return _finish(per_sample, weights, time_dtype, (x_t, output, levels, mask) if return_batch else None)


def _finish(per_sample: torch.Tensor, weights, time_dtype: torch.dtype, record: Optional[tuple]):
    """The mean of the (weighted) per-sample losses, or with a record the TrainingBatch."""
    batch = per_sample.shape[0]
    if weights is not None:
        if not isinstance(weights, torch.Tensor) or weights.shape != (batch,):
            raise ValueError(f"weights must be a tensor [{batch}] (one per sample), got "
                             f"{tuple(getattr(weights, 'shape', ())) or type(weights).__name__}")
        per_sample = per_sample * weights.to(device=per_sample.device, dtype=torch.float64)
    loss = per_sample.mean().to(time_dtype)
    if record is not None:
        return TrainingBatch(loss, per_sample, *record)
    return loss


def _pfgm_loss(model, x0: torch.Tensor, objective: PFGMObjective, key: BatchKey, charges, condition: tuple):
    """PFGM's loss (PFGMObjective): per-sample losses and the batch's record."""
    batch, features = x0.shape[0], math.prod(x0.shape[1:])
    flat = x0.reshape(batch, features)
    if charges is None:
        charges = flat
    elif not isinstance(charges, torch.Tensor) or charges.dim() < 2 or math.prod(charges.shape[1:]) != features \
            or charges.shape[0] < 1:
        raise ValueError(f"charges must be a tensor [M >= 1, ...] of samples like x0's ({tuple(x0.shape[1:])}), got "
                         f"{tuple(getattr(charges, 'shape', ())) or type(charges).__name__}")
    charges = charges.reshape(charges.shape[0], features).to(flat.device)
    if not bool(torch.isfinite(charges).all()):
        raise ValueError("charges hold non-finite values")
    y, z, draws = objective.perturb(flat, key)
    mean, _ = poisson_field_mean(y, z, charges)
    direction = torch.cat([mean - y, -z[:, None]], 1)
    target = math.sqrt(features) * direction / (direction.norm(dim=1, keepdim=True) + objective.gamma)
    x_in = y.reshape(x0.shape).to(x0.dtype)
    cond, cond_key = condition
    z_in = z.clamp_min(1e-10).to(torch.float64 if x0.dtype == torch.float64 else torch.float32)
    # a field model returns a pair (or one tensor [B, N + 1]): called directly, not through call_model,
    # which would take a pair's first element as the output
    if cond is None:
        raw = model(x_in, z_in)
    else:
        raw = model(x_in, z_in, **{cond_key: cond}) if cond_key else model(x_in, z_in, cond)
    output = field_parts(raw, x_in)
    dtype = torch.float64 if x0.dtype == torch.float64 else torch.float32
    prediction = torch.cat([output[0].reshape(batch, features), output[1].reshape(batch, 1)], 1).to(dtype)
    target = target.to(dtype)
    rows = coefficients.loss_rows(1.0, 0.0, -1.0, objective.reduction(features + 1)).to(flat.device)
    per_sample = ops.training_loss(target, prediction, target, coefficients=rows)
    ones = torch.ones(batch, dtype=torch.float64, device=flat.device)
    levels = Levels(ones, draws["radius"], z, (ones, ones * 0, -ones), ones * objective.reduction(features + 1),
                    dict(draws, target=target))
    return per_sample, (x_in, prediction, levels, None)


def _cnf_loss(model, x0: torch.Tensor, objective: CNFObjective, key: BatchKey):
    """A CNF's negative log-likelihood (nats) plus its weighted regularisers, per sample, and the record."""
    def f(z, t):
        return call_model(model, z, t, None, None)

    # f is a closure over the model: the adjoint differentiates the model's parameters, named here
    params = model.parameters() if objective.gradient == "adjoint" and isinstance(model, torch.nn.Module) else None
    if objective.dequantize > 0:
        batch, features = x0.shape[0], x0[0].numel()
        u = uniform_features(batch, features, key, x0.device, DEQUANTIZATION_STREAM).reshape(x0.shape)
        x0 = x0 + ((u - 0.5) * objective.dequantize).to(x0.dtype)
    result = cnf_log_likelihood(
        f, x0, 0.0, objective.t1, objective.num_steps, solver=objective.solver, rtol=objective.rtol,
        atol=objective.atol, error_norm=objective.error_norm, num_probes=objective.num_probes,
        distribution=objective.distribution, seed=key.seed, step=key.step, sample_offset=key.sample_offset,
        max_num_evals=objective.max_num_evals, gradient=objective.gradient, adjoint_rtol=objective.adjoint_rtol,
        adjoint_atol=objective.adjoint_atol, adjoint_params=params, regularise=objective.regularise)
    per_sample = -result.log_p
    if objective.regularise:
        per_sample = (per_sample + objective.kinetic_weight * result.kinetic_energy
                      + objective.jacobian_weight * result.jacobian_norm)
    ones = torch.ones(x0.shape[0], dtype=torch.float64, device=x0.device)
    draws = {"log_p": result.log_p.detach(), "num_evals": ones * result.num_evals}
    if objective.regularise:
        draws.update(kinetic_energy=result.kinetic_energy.detach(), jacobian_norm=result.jacobian_norm.detach())
    levels = Levels(ones, ones * 0, ones * objective.t1, (ones, ones * 0, ones * 0), ones, draws)
    return per_sample, (result.x_end, result.x_end, levels, None)
