"""diffusers' EulerAncestralDiscreteScheduler with a fused step: one launch of ops.linear_step per call."""
from __future__ import annotations

import torch
from diffusers import schedulers

from ._base import FusedScheduler, drop_in, refuse_integer_timestep, sigma_x0
from ._linear_form import as_float, compile_step, term


@drop_in
class EulerAncestralDiscreteScheduler(FusedScheduler, schedulers.EulerAncestralDiscreteScheduler):
    _dk_refuse = {}

    def _dk_schedule_keys(self):
        return range(len(self._dk_timestep_list))

    def _dk_build(self, index):
        sigma_from, sigma_to = self.sigmas[index], self.sigmas[index + 1]
        kind = self.config.prediction_type
        if kind == "sample":
            raise NotImplementedError("prediction_type not implemented yet: sample")
        x0 = sigma_x0(kind, as_float(sigma_from), allow_sample=False)
        sigma_up = (sigma_to ** 2 * (sigma_from ** 2 - sigma_to ** 2) / sigma_from ** 2) ** 0.5
        sigma_down = (sigma_to ** 2 - sigma_up ** 2) ** 0.5
        dt = as_float(sigma_down - sigma_from)
        prev = term("sample") + (dt / as_float(sigma_from)) * (term("sample") - term("x0")) + term("z",
                                                                                                   as_float(sigma_up))
        return compile_step(self._dk_rows, x0, [prev], want_x0=True)

    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor, generator=None,
             return_dict: bool = True):
        refuse_integer_timestep("EulerDiscreteScheduler", timestep)
        self._dk_begin_step(timestep)
        return self._dk_sigma_step(self._dk_plan(self.step_index), model_output, sample, generator, return_dict,
                                   schedulers.scheduling_euler_ancestral_discrete.EulerAncestralDiscreteSchedulerOutput,
                                   always_draw=True)
