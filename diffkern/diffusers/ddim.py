"""diffusers' DDIMScheduler with a fused step: one launch of ops.linear_step per call."""
from __future__ import annotations

from typing import Optional

import torch
from diffusers import schedulers

from ._base import FusedScheduler, drop_in
from ._linear_form import as_float, compile_step, term


@drop_in
class DDIMScheduler(FusedScheduler, schedulers.DDIMScheduler):

    def _dk_schedule_keys(self):
        return [(t, 0.0, False) for t in self._dk_timestep_list]

    def _dk_build(self, key):
        timestep, eta, use_clipped_model_output = key
        if not 0 <= timestep < len(self.alphas_cumprod):
            raise IndexError(f"timestep {timestep} outside [0, {len(self.alphas_cumprod)})")
        prev_timestep = timestep - self.config.num_train_timesteps // self.num_inference_steps
        alpha_prod_t = self.alphas_cumprod[timestep]
        alpha_prod_t_prev = self.alphas_cumprod[prev_timestep] if prev_timestep >= 0 else self.final_alpha_cumprod
        beta_prod_t = 1 - alpha_prod_t
        kind = self.config.prediction_type
        sqrt_a, sqrt_b = as_float(alpha_prod_t ** 0.5), as_float(beta_prod_t ** 0.5)
        if kind == "epsilon":
            x0 = (term("sample", as_float(1 / alpha_prod_t ** 0.5))
                  + term("model_output", as_float(-beta_prod_t ** 0.5 / alpha_prod_t ** 0.5)))
            eps = term("model_output")
        elif kind == "sample":
            x0 = term("model_output")
            eps = term("sample", 1 / sqrt_b) + term("model_output", -sqrt_a / sqrt_b)  # before clipping
        elif kind == "v_prediction":
            x0 = term("sample", sqrt_a) + term("model_output", -sqrt_b)
            eps = term("model_output", sqrt_a) + term("sample", sqrt_b)
        else:
            raise ValueError(f"prediction_type given as {kind} must be one of `epsilon`, `sample`, or"
                             " `v_prediction`")
        clip = None
        if self.config.clip_sample:
            clip = (-self.config.clip_sample_range, self.config.clip_sample_range)
        variance = self._get_variance(timestep, prev_timestep)
        std_dev_t = eta * variance ** 0.5
        if use_clipped_model_output:
            eps = term("sample", 1 / sqrt_b) + term("x0", -sqrt_a / sqrt_b)
        direction = as_float((1 - alpha_prod_t_prev - std_dev_t ** 2) ** 0.5) * eps
        prev = term("x0", as_float(alpha_prod_t_prev ** 0.5)) + direction
        if eta > 0:
            prev = prev + term("z", as_float(std_dev_t))
        return compile_step(self._dk_rows, x0, [prev], clip, want_x0=True)

    def step(self, model_output: torch.Tensor, timestep: int, sample: torch.Tensor, eta: float = 0.0,
             use_clipped_model_output: bool = False, generator=None, variance_noise: Optional[torch.Tensor] = None,
             return_dict: bool = True):
        if self.num_inference_steps is None:
            raise ValueError(
                "Number of inference steps is 'None', you need to run 'set_timesteps' after creating the scheduler")
        t = int(self._dk_timestep_value(timestep))
        plan = self._dk_plan((t, float(eta), bool(use_clipped_model_output)))
        noise = None
        if eta > 0:
            if variance_noise is not None and generator is not None:
                raise ValueError(
                    "Cannot pass both generator and variance_noise. Please make sure that either `generator` or"
                    " `variance_noise` stays `None`.")
            noise = variance_noise
            if noise is None and generator is not None:
                noise = self._dk_noise_like(generator, model_output.shape, model_output.dtype, model_output.device)
        return self._dk_output(plan, {"sample": sample, "model_output": model_output}, noise, t, return_dict,
                               schedulers.scheduling_ddim.DDIMSchedulerOutput)
