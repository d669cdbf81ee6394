"""Facts about the compiled ops' schemas that the wrappers and the fake kernels share."""
from __future__ import annotations

import torch

NOISE_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
AUX = {"none": 0, "x0": 1, "noise": 2}  # fused_step's auxiliary output
RK_MAX_INPUTS, RK_MAX_OUTPUTS, RK_MAX_TRACES = 10, 2, 8
LINEAR_MAX_INPUTS = 8


def rk_row_width(inputs: int, outputs: int, traces: int, error: bool) -> int:
    """Width of a coefficient row of rk_stage: [c0, c1, C_0 .. C_{outputs-1} (inputs each), E (inputs),
    beta (traces + 1), eps (traces + 1)], the last three with error only (csrc/include/diffkern/rk_stage.h)."""
    return 2 + outputs * inputs + (inputs + 2 * (traces + 1) if error else 0)


def linear_row_width(inputs: int, outputs: int) -> int:
    """Width of a coefficient row of linear_step (csrc/include/diffkern/linear_step.h)."""
    return inputs + 3 + outputs * (inputs + 2)


def loss_row_fields() -> list:
    """The named columns of a training_loss coefficient row (csrc/include/diffkern/loss_math.h)."""
    return torch.ops.diffkern.loss_row_fields().split(",")


def step_row_fields() -> list:
    """The named columns of a fused_step coefficient row, as the compiled library lays them out."""
    return torch.ops.diffkern.step_row_fields().split(",")
