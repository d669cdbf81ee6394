"""A small compiler of linear forms: a scheduler's step written as diffusers writes it (sums of
its tensors times scalars) becomes one row of ops.linear_step, plus the list of tensors it reads.

diffusers' arithmetic of each coefficient is kept (its float32 scalars, or float64 with
exact_coefficients), so the fused step equals its step to the rounding of the final combination.
"""
from __future__ import annotations

import math

import numpy as np
import torch

from ..coefficients import linear_row

SLOTS = ("sample", "model_output", "last_sample", "h1", "h2", "h3", "orig_sample", "derivative", "thresholded")


class Lin(dict):
    """A linear form over the step's tensors (slot name -> coefficient), plus "x0" and "z" (noise)."""

    def __add__(self, other):
        out = Lin(self)
        for k, v in other.items():
            out[k] = out.get(k, 0.0) + v
        return out

    def __sub__(self, other):
        return self + (-1.0) * other

    def __rmul__(self, scale):
        scale = float(scale)
        return Lin({k: scale * v for k, v in self.items()})

    __mul__ = __rmul__


def term(name: str, scale=1.0) -> Lin:
    return Lin({name: float(scale)})


def div(a, b) -> float:
    """a / b with IEEE semantics (inf or nan where diffusers' tensor arithmetic gives them)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        return float(np.float64(a) / np.float64(b))


def as_float(value) -> float:
    """A 0-d tensor (or number) of diffusers' scalar arithmetic as a Python float."""
    return float(value.item()) if isinstance(value, torch.Tensor) else float(value)


class Plan:
    """One compiled step: the tensors it reads, its row, its outputs."""
    __slots__ = ("slots", "key", "row", "outputs", "x0", "clip", "noisy", "pre")


class Rows:
    """The coefficient rows of a scheduler, one table per row width, uploaded once per device."""

    def __init__(self, dtype: torch.dtype, threshold: bool = False):
        self.dtype = dtype
        self.threshold = threshold  # diffusers' dynamic thresholding of x0 (config.thresholding)
        self.rows: dict = {}
        self.tables: dict = {}

    def add(self, key, row) -> int:
        rows = self.rows.setdefault(key, [])
        rows.append(row)
        for cached in [k for k in self.tables if k[0] == key]:
            del self.tables[cached]
        return len(rows) - 1

    def table(self, key, device: torch.device, double: bool) -> torch.Tensor:
        cached = self.tables.get((key, device, double))
        if cached is None:
            cached = torch.tensor(self.rows[key], dtype=torch.float64)
            cached = cached.to(device=device, dtype=torch.float64 if double else torch.float32)
            self.tables[(key, device, double)] = cached
        return cached


def compile_step(rows: Rows, x0: Lin, outputs: list, clip=None, want_x0: bool = False) -> Plan:
    """A step x0 = clip(x0), out_j = outputs[j] as a row of ops.linear_step.

    With dynamic thresholding (a per-sample quantile of |x0|, which no linear row can express) the
    step is two launches around diffusers' own _threshold_sample: ``plan.pre`` writes x0, and the
    plan reads the thresholded x0 as an input where the row would have used x0 (thresholding
    replaces clipping, as in diffusers)."""
    if rows.threshold and x0:
        if "z" in x0:
            raise NotImplementedError("thresholding of an x0 prediction that contains noise")
        pre = _compile_row(rows, Lin(), [x0], None, False)
        plan = _compile_row(rows, term("thresholded"), outputs, None, want_x0)
        plan.pre = pre
        return plan
    return _compile_row(rows, x0, outputs, clip, want_x0)


def _compile_row(rows: Rows, x0: Lin, outputs: list, clip, want_x0: bool) -> Plan:
    used = set(k for k in x0 if k != "z")
    for out in outputs:
        used |= set(k for k in out if k not in ("z", "x0"))
    plan = Plan()
    plan.slots = tuple(s for s in SLOTS if s in used)
    n = len(plan.slots)
    row = linear_row([x0.get(s, 0.0) for s in plan.slots],
                     [(out.get("x0", 0.0), [out.get(s, 0.0) for s in plan.slots], out.get("z",
                                                                                          0.0)) for out in outputs],
                     x0_noise=x0.get("z", 0.0), clip=clip if clip is not None else (-math.inf, math.inf))
    plan.key = (n, len(outputs))
    plan.row = rows.add(plan.key, row)
    plan.outputs = len(outputs)
    plan.x0 = want_x0
    plan.clip = clip is not None
    plan.noisy = x0.get("z", 0.0) != 0.0 or any(out.get("z", 0.0) != 0.0 for out in outputs)
    plan.pre = None
    return plan
