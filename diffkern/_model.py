"""What every sampler shares about its model and its caller: the model-output conventions, the one
progress bar, and the one callback record.

Model outputs: a model returns its prediction as a tensor, an object with ``.sample`` (diffusers'
UNet2DModel), or a tuple whose first element is it.

Callbacks: every ``dk.sample_*`` calls ``callback(info)`` once per step with a ``StepInfo``:

    info.i           the step index (0-based)
    info.level       the noise level before the step, named by ``info.level_name``: "timestep"
                     (DDPM schedules), "t" (SDE time, flow time), "sigma" (EDM / k-diffusion noise
                     levels) or "z" (PFGM's augmented coordinate)
    info.level_next  the level the step went to
    info.x           the state after the step
    info.denoised    the estimate of the clean sample x0 made at the level before the step

It is also read as a mapping (``info["x"]``, ``info["denoised"]``, ``info["sigma"]`` for a sampler
whose level is sigma), the shape of k-diffusion's callback dictionary.

Callbacks written for diffkern 0.1 took positional arguments (``(i, t, x, x0)`` for DDPM, DDIM,
DPM-Solver++ and flow, ``(i, level, x)`` for the others, PFGM's level after its step). A callback
with two or more required positional parameters still gets those, with a FutureWarning; that form
will be removed.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch

from ._validate import warn_caller


def model_output_of(out) -> torch.Tensor:
    """The prediction tensor of a model call: the tensor itself, its ``.sample``, or its first element."""
    if isinstance(out, torch.Tensor):
        return out
    if hasattr(out, "sample"):
        return out.sample
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    raise TypeError(f"the model returned {type(out).__name__}; expected a tensor or an object with .sample")


def call_model(model, x: torch.Tensor, t: torch.Tensor, cond=None, cond_key: Optional[str] = None) -> torch.Tensor:
    """model(x, t), model(x, t, cond) or model(x, t, **{cond_key: cond}), as its prediction tensor."""
    if cond is None:
        return model_output_of(model(x, t))
    if cond_key is None:
        return model_output_of(model(x, t, cond))
    return model_output_of(model(x, t, **{cond_key: cond}))


def progress(iterable, enabled: bool, desc: str):
    """``iterable`` under a tqdm bar when enabled (tqdm is imported only then)."""
    if not enabled:
        return iterable
    from tqdm.auto import tqdm

    return tqdm(iterable, desc=desc)


def interval_bar(enabled: bool, desc: str, span: float):
    """A tqdm bar over an integration interval: update(covered) moves it, update(None) closes it."""
    if not enabled:
        return lambda covered: None
    from tqdm.auto import tqdm

    bar = tqdm(total=span, desc=desc, bar_format="{l_bar}{bar}| {n:.3g}/{total:.3g} [{elapsed}]")

    def update(covered):
        if covered is None:
            bar.close()
        else:
            bar.update(covered - bar.n)
    return update


LEVEL_NAMES = ("timestep", "t", "sigma", "z")


@dataclass(frozen=True)
class StepInfo:
    """One step of a sampler, as its callback sees it (see the module docstring)."""

    i: int
    level_name: str
    level: float
    level_next: float
    x: torch.Tensor
    denoised: torch.Tensor

    def __getitem__(self, key: str):
        if key == self.level_name:
            return self.level
        if key in ("i", "x", "denoised", "level", "level_next", "level_name"):
            return getattr(self, key)
        raise KeyError(key)

    def keys(self):
        return ("i", "x", "denoised", self.level_name, "level", "level_next", "level_name")


def _required_positionals(fn) -> int:
    try:
        parameters = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):  # a builtin without a signature: the one-argument form
        return 1
    if any(p.kind == p.VAR_POSITIONAL for p in parameters):
        return 1
    return sum(p.default is p.empty and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) for p in parameters)


def step_callback(callback: Optional[Callable], legacy: Sequence[str]) -> Optional[Callable[[StepInfo], None]]:
    """callback as a function of a StepInfo, or None. ``legacy`` names the StepInfo fields that a
    positional 0.1-style callback of this sampler received, in order."""
    if callback is None:
        return None
    if not callable(callback):
        raise ValueError(f"callback must be callable, got {type(callback).__name__}")
    if _required_positionals(callback) < 2:
        return callback
    warn_caller("callbacks with positional arguments (i, level, x, ...) are deprecated: take one argument, a "
                "diffkern StepInfo (info.i, info.level, info.x, info.denoised)")
    return lambda info: callback(*(getattr(info, name) for name in legacy))
