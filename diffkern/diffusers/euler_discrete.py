"""diffusers' EulerDiscreteScheduler with a fused step: one launch of ops.linear_step per call."""
from __future__ import annotations

import math

import torch
from diffusers import schedulers

from ._base import FusedScheduler, drop_in, refuse_integer_timestep, sigma_x0
from ._linear_form import as_float, compile_step, term


@drop_in
class EulerDiscreteScheduler(FusedScheduler, schedulers.EulerDiscreteScheduler):
    _dk_refuse = {}

    def _dk_schedule_keys(self):
        return [(i, 0.0, 0.0, math.inf, 1.0) for i in range(len(self._dk_timestep_list))]

    def _dk_build(self, key):
        index, s_churn, s_tmin, s_tmax, s_noise = key
        sigma = self.sigmas[index]
        gamma = min(s_churn / (len(self.sigmas) - 1), 2 ** 0.5 - 1) if s_tmin <= sigma <= s_tmax else 0.0
        sigma_hat = sigma * (gamma + 1)
        noise_scale = as_float(s_noise * (sigma_hat ** 2 - sigma ** 2) ** 0.5) if gamma > 0 else 0.0
        sample_hat = term("sample") + term("z", noise_scale)
        x0 = sigma_x0(self.config.prediction_type, as_float(sigma), noise_scale, sigma_hat=as_float(sigma_hat))
        dt = as_float(self.sigmas[index + 1] - sigma_hat)
        prev = sample_hat + (dt / as_float(sigma_hat)) * (sample_hat - term("x0"))
        return compile_step(self._dk_rows, x0, [prev], want_x0=True)

    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor, s_churn: float = 0.0,
             s_tmin: float = 0.0, s_tmax: float = float("inf"), s_noise: float = 1.0, generator=None,
             return_dict: bool = True):
        refuse_integer_timestep("EulerDiscreteScheduler", timestep)
        self._dk_begin_step(timestep)
        plan = self._dk_plan((self.step_index, float(s_churn), float(s_tmin), float(s_tmax), float(s_noise)))
        return self._dk_sigma_step(plan, model_output, sample, generator, return_dict,
                                   schedulers.scheduling_euler_discrete.EulerDiscreteSchedulerOutput)
