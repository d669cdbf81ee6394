"""A training batch's random quantities, each a function of (seed, step, global sample index) drawn from
diffkern's stream on a stream id of its own (diffkern.noise): the per-sample times or noise levels,
the classifier-free dropout decisions, and (through the fused q_sample and loss) the noise. So a batch
is the same for any split of it over micro-batches, processes or devices."""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch

from ..noise import CFG_DROPOUT_STREAM, TRAINING_TIME_STREAM, randn, random_bits


class BatchKey(NamedTuple):
    """What a training batch is a function of: the run's seed, the training step, and the global index of
    the batch's first sample (a micro-batch or a rank's share starts further on)."""

    seed: int
    step: int
    sample_offset: int = 0


def uniform(batch: int, key: BatchKey, device, stream: int = TRAINING_TIME_STREAM) -> torch.Tensor:
    """float64 [batch] in (0, 1): 53 bits from the two first words of each sample's block, (k + 1/2) / 2^53."""
    words = random_bits((batch, 2), seed=key.seed, step=key.step, sample_offset=key.sample_offset, stream=stream,
                        device=device).to(torch.int64) & 0xFFFFFFFF
    high, low = words[:, 0] >> 5, words[:, 1] >> 6  # 27 and 26 bits
    return ((high * (1 << 26) + low).to(torch.float64) + 0.5) / float(1 << 53)


def uniform_features(batch: int, features: int, key: BatchKey, device, stream: int) -> torch.Tensor:
    """float64 [batch, features] in (0, 1), 53 bits each (as ``uniform``), from two words per feature."""
    words = random_bits((batch, 2 * features), seed=key.seed, step=key.step, sample_offset=key.sample_offset,
                        stream=stream, device=device).to(torch.int64) & 0xFFFFFFFF
    words = words.reshape(batch, features, 2)
    high, low = words[..., 0] >> 5, words[..., 1] >> 6
    return ((high * (1 << 26) + low).to(torch.float64) + 0.5) / float(1 << 53)


def uniform_pair(batch: int, key: BatchKey, device, stream: int = TRAINING_TIME_STREAM):
    """Two float64 [batch] uniforms in (0, 1) from the four words of each sample's first block: the first
    equals uniform() (words 0, 1), the second comes from words 2, 3."""
    words = random_bits((batch, 4), seed=key.seed, step=key.step, sample_offset=key.sample_offset, stream=stream,
                        device=device).to(torch.int64) & 0xFFFFFFFF
    return [((words[:, 2 * i] >> 5) * (1 << 26) + (words[:, 2 * i + 1] >> 6)).to(torch.float64).add_(0.5)
            .div_(float(1 << 53)) for i in range(2)]


def normal(batch: int, key: BatchKey, device, stream: int = TRAINING_TIME_STREAM) -> torch.Tensor:
    """float64 [batch] standard normals (the stream's float32 normals of each sample's feature 0)."""
    return randn((batch, 1), seed=key.seed, step=key.step, sample_offset=key.sample_offset, stream=stream,
                 device=device, dtype=torch.float32).reshape(batch).to(torch.float64)


def discrete(batch: int, key: BatchKey, device, count: int) -> torch.Tensor:
    """int64 [batch] uniform on {0, .., count - 1}: floor(u count)."""
    return (uniform(batch, key, device) * count).floor().to(torch.int64).clamp_(max=count - 1)


def dropped(batch: int, key: BatchKey, device, p_uncond: float) -> Optional[torch.Tensor]:
    """bool [batch]: the samples whose condition is replaced by the null condition (u < p_uncond), or
    None when p_uncond is 0."""
    if p_uncond == 0.0:
        return None
    return uniform(batch, key, device, stream=CFG_DROPOUT_STREAM) < p_uncond
