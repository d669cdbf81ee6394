"""One call for a training step's loss: draw the batch's times and noise from the stream, noise the data
with the fused q_sample, call the model, and apply the fused loss (ops.training_loss), whose backward
draws the noise again instead of keeping it."""
from __future__ import annotations

import math
from typing import Callable, NamedTuple, Optional

import torch

from .. import ops
from .._model import call_model
from .._validate import check_real, check_tensor
from ..noise import TRAINING_NOISE_STREAM
from .draws import BatchKey, dropped
from .objectives import Levels, make_objective


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
                  weights: Optional[torch.Tensor] = None, return_batch: bool = False, **objective_options):
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
    the loss (float32, float64 for float64 x0), or a TrainingBatch with ``return_batch``."""
    objective = make_objective(objective, **objective_options)
    check_tensor("x0", x0, min_dim=2)
    p_uncond = check_real("p_uncond", p_uncond)
    if p_uncond > 1:
        raise ValueError(f"p_uncond must lie in [0, 1], got {p_uncond}")
    batch, device = x0.shape[0], x0.device
    key = BatchKey(seed, step, sample_offset)
    ops.noise_args(list(x0.shape), seed, step, sample_offset, TRAINING_NOISE_STREAM, None, device)  # checks the key
    time_dtype = torch.float64 if x0.dtype == torch.float64 else torch.float32
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
    if weights is not None:
        if not isinstance(weights, torch.Tensor) or weights.shape != (batch,):
            raise ValueError(f"weights must be a tensor [{batch}] (one per sample), got "
                             f"{tuple(getattr(weights, 'shape', ())) or type(weights).__name__}")
        per_sample = per_sample * weights.to(device=device, dtype=torch.float64)
    loss = per_sample.mean().to(time_dtype)
    if return_batch:
        return TrainingBatch(loss, per_sample, x_t, output, levels, mask)
    return loss
