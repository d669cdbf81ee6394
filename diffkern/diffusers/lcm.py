"""diffusers' LCMScheduler with a fused step: one launch of ops.linear_step per call."""
from __future__ import annotations

import torch
from diffusers import schedulers
from diffusers.utils.torch_utils import randn_tensor

from ._base import FusedScheduler, drop_in
from ._linear_form import as_float, compile_step, term


@drop_in
class LCMScheduler(FusedScheduler, schedulers.LCMScheduler):

    def _dk_schedule_keys(self):
        return range(len(self._dk_timestep_list)) if self.num_inference_steps else []

    def _dk_build(self, index):
        schedule = self._dk_timestep_list
        timestep = schedule[index]
        prev_timestep = schedule[index + 1] if index + 1 < len(schedule) else timestep
        alpha_prod_t = self.alphas_cumprod[timestep]
        alpha_prod_t_prev = self.alphas_cumprod[prev_timestep] if prev_timestep >= 0 else self.final_alpha_cumprod
        beta_prod_t = 1 - alpha_prod_t
        beta_prod_t_prev = 1 - alpha_prod_t_prev
        c_skip, c_out = self.get_scalings_for_boundary_condition_discrete(torch.tensor(timestep))
        kind = self.config.prediction_type
        if kind == "epsilon":
            x0 = (term("sample", as_float(1 / alpha_prod_t.sqrt()))
                  + term("model_output", as_float(-beta_prod_t.sqrt() / alpha_prod_t.sqrt())))
        elif kind == "sample":
            x0 = term("model_output")
        elif kind == "v_prediction":
            x0 = term("sample", as_float(alpha_prod_t.sqrt())) + term("model_output", as_float(-beta_prod_t.sqrt()))
        else:
            raise ValueError(f"prediction_type given as {kind} must be one of `epsilon`, `sample` or"
                             " `v_prediction` for LCMScheduler.")
        clip = None
        if self.config.clip_sample:
            clip = (-self.config.clip_sample_range, self.config.clip_sample_range)
        denoised = term("x0", as_float(c_out)) + term("sample", as_float(c_skip))
        prev = denoised
        if index != self.num_inference_steps - 1:
            prev = as_float(alpha_prod_t_prev.sqrt()) * denoised + term("z", as_float(beta_prod_t_prev.sqrt()))
        return compile_step(self._dk_rows, x0, [prev, denoised], clip)

    def step(self, model_output, timestep, sample, generator=None, return_dict: bool = True):
        if self.num_inference_steps is None:
            raise ValueError(
                "Number of inference steps is 'None', you need to run 'set_timesteps' after creating the scheduler")
        self._dk_begin_step(timestep)
        plan = self._dk_plan(self.step_index)
        noise = None
        if plan.noisy and generator is not None:
            noise = randn_tensor(model_output.shape, generator=generator, device=model_output.device,
                                 dtype=torch.promote_types(model_output.dtype, sample.dtype))
        prev_sample, denoised = self._dk_run(plan, {"sample": sample, "model_output": model_output}, noise,
                                             noise_step=self.step_index)
        self._step_index += 1
        if not return_dict:
            return (prev_sample, denoised)
        return schedulers.scheduling_lcm.LCMSchedulerOutput(prev_sample=prev_sample, denoised=denoised)
