"""diffusers' FlowMatchEulerDiscreteScheduler with a fused step: one launch of ops.linear_step per call."""
from __future__ import annotations

import torch
from diffusers import schedulers
from diffusers.utils.torch_utils import randn_tensor

from ._base import FusedScheduler, drop_in, refuse_integer_timestep
from ._linear_form import Lin, as_float, compile_step, term


@drop_in
class FlowMatchEulerDiscreteScheduler(FusedScheduler, schedulers.FlowMatchEulerDiscreteScheduler):
    _dk_refuse = {}

    def _dk_reset(self):
        super()._dk_reset()
        self._dk_host_sigmas = self.sigmas.detach().to("cpu")

    def _dk_schedule_keys(self):
        return range(len(self._dk_timestep_list))

    def _dk_build(self, index):
        sigma, sigma_next = self._dk_host_sigmas[index], self._dk_host_sigmas[index + 1]
        if self.config.stochastic_sampling:
            x0 = term("sample") + term("model_output", -as_float(sigma))
            prev = term("x0", as_float(1.0 - sigma_next)) + term("z", as_float(sigma_next))
            return compile_step(self._dk_rows, x0, [prev])
        dt = as_float(sigma_next - sigma)
        return compile_step(self._dk_rows, Lin(), [term("sample") + term("model_output", dt)])

    def step(self, model_output, timestep, sample, s_churn: float = 0.0, s_tmin: float = 0.0,
             s_tmax: float = float("inf"), s_noise: float = 1.0, generator=None, per_token_timesteps=None,
             return_dict: bool = True):
        if isinstance(timestep, int) or isinstance(timestep, (torch.IntTensor, torch.LongTensor)):
            refuse_integer_timestep("FlowMatchEulerDiscreteScheduler", timestep)
        if per_token_timesteps is not None:
            raise NotImplementedError("diffkern.diffusers.FlowMatchEulerDiscreteScheduler does not support "
                                      "per_token_timesteps; use diffusers' class for it")
        self._dk_begin_step(timestep)
        plan = self._dk_plan(self.step_index)
        noise = None
        if self.config.stochastic_sampling and generator is not None:
            noise = randn_tensor(sample.shape, generator=generator, device=sample.device, dtype=torch.float32)
        (prev_sample,) = self._dk_run(plan, {"sample": sample, "model_output": model_output}, noise,
                                      noise_step=self.step_index)
        self._step_index += 1
        if prev_sample.dtype != model_output.dtype:  # (.to costs ~0.7 us even when it returns its input)
            prev_sample = prev_sample.to(model_output.dtype)
        if not return_dict:
            return (prev_sample,)
        return schedulers.scheduling_flow_match_euler_discrete.FlowMatchEulerDiscreteSchedulerOutput(
            prev_sample=prev_sample)
