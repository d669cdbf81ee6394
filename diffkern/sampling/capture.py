"""A whole sampling run, model and steps, compiled once as one graph and replayed for any seed.

    from diffkern.sampling.registry import make_sampler
    sample = dk.capture(make_sampler("ddim", steps=50), unet, (16, 3, 32, 32), device="cuda")
    x = sample(seed=7)             # compiles (and on CUDA records a CUDA graph) on the first call
    x = sample(seed=8)             # replays: same graph, new noise

The seed lives in a one-element device tensor that the kernels read (diffkern's noise is a function
of (seed, step, sample), drawn inside the fused steps), so a new seed is a new value in that tensor:
no retrace, no recompile, no re-record. On CUDA the graph is compiled with
``mode="reduce-overhead"`` (CUDA graphs: one replay launches every step of the run); on the CPU with
the default mode. The samples equal ``sampler(model, shape, seed=seed, ...)`` run eagerly (bitwise
for the steps; the model within its own compile tolerance).

What cannot be one graph is refused on the first call with the cause: a model that reads a tensor on
the host (a Python branch on a value; ``.item()`` where dynamo cannot keep the number in the graph) or,
on CUDA, copies one there (``.cpu()``: no CUDA graph can hold it), a progress bar or a callback, an
adaptive ODE solver (its steps are chosen on the host). The k-diffusion drop-ins compile, but take
their seed as an int: each new seed recompiles.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch

from .. import ops
from .._validate import check_choice, check_dtype, check_shape, check_uint
from ..noise import resolve_device

MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")  # torch.compile's


class CapturedSampler:
    """``sample(seed)`` for one (sampler, model, shape, device, dtype, sample_offset): see ``capture``."""

    def __init__(self, sampler: Callable, model, shape, *, device=None, dtype: torch.dtype = torch.float32,
                 sample_offset: int = 0, mode: Optional[str] = None, backend=None, **run):
        if not callable(sampler):
            raise ValueError(f"sampler must be callable (a registry sampler or a dk.sample_* function with its "
                             f"options bound), got {type(sampler).__name__}")
        for name in ("progress", "callback", "seed"):
            if name in run and (name == "seed" or run[name]):
                raise ValueError(f"{name}= does not go with capture: " + (
                    "pass the seed to each call of the captured sampler" if name == "seed" else
                    "a progress bar or a callback runs Python between the steps, which a graph cannot hold"))
        if not callable(model):
            raise ValueError(f"model must be callable, got {type(model).__name__}")
        self.shape, self.dtype = tuple(check_shape(shape)), check_dtype(dtype)
        self.device = resolve_device(device)
        self.sample_offset = check_uint("sample_offset", sample_offset, 1 << 32)
        if mode is None:
            mode = "reduce-overhead" if self.device.type == "cuda" else "default"
        self.mode = check_choice("mode", mode, MODES)
        self.seed = torch.zeros((), dtype=torch.int64, device=self.device)

        def sample(seed):
            return sampler(model, self.shape, seed=seed, device=self.device, dtype=dtype,
                           sample_offset=sample_offset, **run)

        options = {"fullgraph": True, "mode": mode} if backend is None else {"fullgraph": True, "backend": backend}
        self._compiled = torch.compile(sample, **options)
        self._traced = False

    def __call__(self, seed: int = 0) -> torch.Tensor:
        """The samples of ``seed`` (a new tensor: a CUDA graph's output buffer is reused by the next
        replay, so it is copied out)."""
        self.seed.fill_(ops.seed_to_int64(seed))
        if self.device.type == "cuda":
            torch.compiler.cudagraph_mark_step_begin()
        if self._traced:
            return self._compiled(self.seed).clone()
        counters = torch._dynamo.utils.counters["inductor"]
        skips = counters["cudagraph_skips"]
        try:
            # a CUDA graph that cannot be recorded (a copy to the host inside the run) is an error, not
            # a silent fallback to launching every step
            with torch._inductor.config.patch({"triton.cudagraph_or_error": True}):
                out = self._compiled(self.seed)
            if self.device.type == "cuda" and self.mode == "reduce-overhead" and counters["cudagraph_skips"] > skips:
                raise RuntimeError("inductor skipped the cudagraph of this run (its log says why)")
        except (torch._dynamo.exc.Unsupported, torch._dynamo.exc.BackendCompilerFailed, RuntimeError) as error:
            cause = str(error).strip().splitlines()[0]
            if not isinstance(error, torch._dynamo.exc.Unsupported) and "cudagraph" not in str(error):
                raise
            raise ValueError(f"this sampling run cannot be captured as one graph: {cause}. A model that reads a "
                             "tensor on the host (.item(), float(t), a branch on a value), a callback or a progress "
                             "bar, or an adaptive ODE solver prevents it (the chained error says where)") from error
        self._traced = True
        return out.clone()


def capture(sampler: Callable, model, shape, *, device=None, dtype: torch.dtype = torch.float32,
            sample_offset: int = 0, mode: Optional[str] = None, backend=None, **run) -> CapturedSampler:
    """Compiles the run ``sampler(model, shape, seed=..., device=device, dtype=dtype, sample_offset=...,
    **run)`` once as one graph (``torch.compile(fullgraph=True)``; on CUDA ``mode="reduce-overhead"``:
    a CUDA graph) and returns ``sample(seed)``, which replays it for any seed without recompiling.

    ``sampler``: a registry sampler (``diffkern.sampling.registry.make_sampler(...)``) or any
    function with the samplers' run keywords, e.g. ``functools.partial(dk.sample_dpmpp,
    sigmas=levels)``; schedules, SDEs and levels (lists, not tensors) are made before the call.
    ``mode`` overrides the compile mode, ``backend`` the compiler (a torch.compile backend; then
    ``mode`` is not used). The first call compiles: the steps are unrolled, so that takes seconds
    for tens of steps and minutes for a thousand (measured on the CPU: 2 to 4 s at 50 steps, 271 s
    for 1000 DDPM steps). See the module docstring for what
    cannot be captured."""
    return CapturedSampler(sampler, model, shape, device=device, dtype=dtype, sample_offset=sample_offset, mode=mode,
                           backend=backend, **run)
