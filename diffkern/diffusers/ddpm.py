"""diffusers' DDPMScheduler with a fused step: one launch of ops.linear_step per call."""
from __future__ import annotations

from typing import Optional

import torch
from diffusers import schedulers

from ._base import FusedScheduler, drop_in
from ._linear_form import as_float, compile_step, term


@drop_in
class DDPMScheduler(FusedScheduler, schedulers.DDPMScheduler):
    # diffusers treats any other variance_type as fixed_small, and so does this class
    _dk_refuse = {"variance_type": lambda v: v in ("learned", "learned_range", "fixed_large_log")}

    def _dk_schedule_keys(self):
        return self._dk_timestep_list

    def _dk_previous(self, t: int) -> int:
        if self.custom_timesteps or self.num_inference_steps:
            schedule = self._dk_timestep_list
            if t not in schedule:
                raise IndexError(f"timestep {t} is not in the schedule {schedule}")
            index = schedule.index(t)
            return -1 if index == len(schedule) - 1 else schedule[index + 1]
        return t - 1

    def _dk_build(self, t):
        if not 0 <= t < len(self.alphas_cumprod):
            raise IndexError(f"timestep {t} outside [0, {len(self.alphas_cumprod)})")
        prev_t = self._dk_previous(t)
        alpha_prod_t = self.alphas_cumprod[t]
        alpha_prod_t_prev = self.alphas_cumprod[prev_t] if prev_t >= 0 else self.one
        beta_prod_t = 1 - alpha_prod_t
        beta_prod_t_prev = 1 - alpha_prod_t_prev
        current_alpha_t = alpha_prod_t / alpha_prod_t_prev
        current_beta_t = 1 - current_alpha_t
        kind = self.config.prediction_type
        if kind == "epsilon":
            x0 = (term("sample", as_float(1 / alpha_prod_t ** 0.5))
                  + term("model_output", as_float(-beta_prod_t ** 0.5 / alpha_prod_t ** 0.5)))
        elif kind == "sample":
            x0 = term("model_output")
        elif kind == "v_prediction":
            x0 = term("sample", as_float(alpha_prod_t ** 0.5)) + term("model_output", as_float(-beta_prod_t ** 0.5))
        else:
            raise ValueError(f"prediction_type given as {kind} must be one of `epsilon`, `sample` or"
                             " `v_prediction`  for the DDPMScheduler.")
        clip = None
        if self.config.clip_sample:
            clip = (-self.config.clip_sample_range, self.config.clip_sample_range)
        prev = term("x0", as_float((alpha_prod_t_prev ** 0.5 * current_beta_t) / beta_prod_t)) + \
            term("sample", as_float(current_alpha_t ** 0.5 * beta_prod_t_prev / beta_prod_t))
        if t > 0:
            variance = self._get_variance(t)
            std = variance if self.variance_type == "fixed_small_log" else variance ** 0.5
            prev = prev + term("z", as_float(std))
        return compile_step(self._dk_rows, x0, [prev], clip, want_x0=True)

    def step(self, model_output: torch.Tensor, timestep: int, sample: torch.Tensor,
             generator: Optional[torch.Generator] = None, return_dict: bool = True):
        t = int(self._dk_timestep_value(timestep))
        plan = self._dk_plan(t)
        noise = None
        if t > 0 and generator is not None:
            noise = self._dk_noise_like(generator, model_output.shape, model_output.dtype, model_output.device)
        return self._dk_output(plan, {"sample": sample, "model_output": model_output}, noise, t, return_dict,
                               schedulers.scheduling_ddpm.DDPMSchedulerOutput)
