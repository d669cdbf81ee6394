"""The noise stream: reproducible standard normals that do not depend on device or batch split."""
from __future__ import annotations

import warnings
from typing import Optional, Sequence, Union

import torch

from . import ops, reference
from ._graph import default_device
from ._validate import check_uint

IntOrTensor = Union[int, torch.Tensor]

# Stream ids, in this one place: every random quantity of diffkern draws from its own stream of the
# same Philox key, so none of them can correlate with another, and each is a function of (seed, step,
# sample index). Users may take any other 32-bit value.
SAMPLING_STREAM = 0  # the samplers' noise (x_T is step 0, sampler step i draws step i + 1)
PROBE_STREAM = 1  # Hutchinson's probes of the likelihood solvers
TRAINING_NOISE_STREAM = 2  # the noise of a training batch (q_sample and the loss draw the same numbers)
TRAINING_TIME_STREAM = 3  # its per-sample times or noise levels
CFG_DROPOUT_STREAM = 4  # its classifier-free guidance dropout decisions
PFGM_PERTURBATION_STREAM = 5  # PFGM's perturbations of the data in the augmented space
DEQUANTIZATION_STREAM = 6  # the uniform dequantization noise of a likelihood model's training batch


def resolve_device(device) -> torch.device:
    if device is None:
        return default_device()
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return device


def make_seed_step(seed: IntOrTensor, step: IntOrTensor, device: torch.device) -> torch.Tensor:
    """The int64 [2] device tensor (seed, step) that noisy ops read when either is a tensor.

    Built with device-side ops only (no host sync), so it can be captured in a CUDA graph: update
    the seed or step tensor in place between replays and every replay draws new numbers.
    """
    parts = []
    for name, value in (("seed", seed), ("step", step)):
        if isinstance(value, torch.Tensor):
            if value.numel() != 1 or value.dtype.is_floating_point or value.dtype.is_complex:
                raise ValueError(f"{name} given as a tensor must be a one-element integer tensor")
            if value.device != device:
                raise ValueError(f"{name} tensor is on {value.device} but the output is on {device}")
            parts.append(value.reshape(()).to(torch.int64))
        else:
            as_int = ops.seed_to_int64(value) if name == "seed" else check_uint(name, value, 1 << 32)
            parts.append(torch.full((), as_int, dtype=torch.int64, device=device))
    return torch.stack(parts)


_warned_fallback: set = set()


def _fallback_warning(device: torch.device) -> None:
    if device.type not in _warned_fallback:
        _warned_fallback.add(device.type)
        warnings.warn(f"diffkern has no kernels for {device.type}; using the (slower) PyTorch reference",
                      stacklevel=3)


def randn(shape: Union[int, Sequence[int]], seed: IntOrTensor = 0, step: IntOrTensor = 0,
          sample_offset: int = 0, stream: int = 0, device=None,
          dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """Standard normal noise, a fixed function of (seed, stream, step, sample, feature).

    Dim 0 of ``shape`` is the batch: row n is sample ``sample_offset + n``, and its elements are its
    features in row-major order (``randn((N,))`` is N samples of one feature each). Element
    (n, j) is Box-Muller normal j % 4 of Philox4x32-10 with counter (j // 4, sample_offset + n, step,
    stream) and key seed (see csrc/include/diffkern/noise.h). Consequences:

    - the same numbers on CPU and CUDA (bitwise: the transform is float32 with fixed rounding) and
      for every dtype (a float32 normal cast to ``dtype``);
    - any split of a batch gives the same rows: ``randn((8, F), sample_offset=8)`` equals rows
      8..15 of ``randn((16, F))``;
    - the fused ops of diffkern draw exactly these numbers for the same (seed, step, stream), so
      ``randn`` reproduces a kernel's noise.

    ``seed`` is an int in [0, 2^64); ``step``, ``stream`` in [0, 2^32). Either may instead be a
    one-element integer tensor on ``device``: the kernel then reads it from device memory, so a
    captured CUDA graph draws new noise when that tensor is updated in place between replays.
    """
    dtype = dtype if dtype is not None else torch.get_default_dtype()
    return _draw("randn", shape, seed, step, sample_offset, stream, device, dtype)


def rademacher(shape: Union[int, Sequence[int]], seed: IntOrTensor = 0, step: IntOrTensor = 0,
               sample_offset: int = 0, stream: int = 0, device=None,
               dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """Rademacher signs (-1 or +1, each with probability 1/2) from the noise stream: element (n, j) is
    the sign bit of the word behind ``randn``'s element (n, j) (-1 when set). Same contract as
    ``randn``: device- and batch-split invariant."""
    dtype = dtype if dtype is not None else torch.get_default_dtype()
    return _draw("rademacher", shape, seed, step, sample_offset, stream, device, dtype)


def random_bits(shape: Union[int, Sequence[int]], seed: IntOrTensor = 0, step: IntOrTensor = 0,
                sample_offset: int = 0, stream: int = 0, device=None) -> torch.Tensor:
    """The raw 32-bit Philox words behind ``randn`` (element (n, j) is word j % 4 of its block), as
    int32 (reinterpret with ``& 0xffffffff`` in int64 for the unsigned value)."""
    return _draw("random_bits", shape, seed, step, sample_offset, stream, device, None)


def _draw(kind: str, shape, seed, step, sample_offset, stream, device, dtype) -> torch.Tensor:
    device = resolve_device(device)
    seed_step = None
    if isinstance(seed, torch.Tensor) or isinstance(step, torch.Tensor):
        seed_step = make_seed_step(seed, step, device)
        seed, step = 0, 0
    extra = {} if dtype is None else {"dtype": dtype}
    if device.type not in ("cpu", "cuda", "meta"):
        _fallback_warning(device)
        if seed_step is not None:
            seed, step = seed_step.tolist()
        return getattr(reference, kind)(ops.check_shape(shape), seed, step, sample_offset, stream,
                                        device=device, **extra)
    return getattr(ops, kind)(shape, seed=seed, step=step, sample_offset=sample_offset, stream=stream,
                              seed_step=seed_step, device=device, **extra)
