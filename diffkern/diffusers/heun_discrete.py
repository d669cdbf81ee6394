"""diffusers' HeunDiscreteScheduler with a fused step: one launch of ops.linear_step per call."""
from __future__ import annotations

from diffusers import schedulers

from ._base import FusedScheduler, drop_in, sigma_x0
from ._linear_form import as_float, compile_step, div, term


@drop_in
class HeunDiscreteScheduler(FusedScheduler, schedulers.HeunDiscreteScheduler):
    _dk_refuse = {}

    def _dk_schedule_keys(self):
        start = self.begin_index or 0  # the stages alternate from the first step on
        return [(index, (index - start) % 2 == 0) for index in range(start, len(self._dk_timestep_list))]

    def _dk_build(self, key):
        index, first = key
        if first:
            sigma, sigma_next = as_float(self.sigmas[index]), as_float(self.sigmas[index + 1])
        else:
            sigma, sigma_next = as_float(self.sigmas[index - 1]), as_float(self.sigmas[index])
        sigma_input = sigma if first else sigma_next
        x0 = sigma_x0(self.config.prediction_type, sigma_input)
        clip = None
        if self.config.clip_sample:
            clip = (-self.config.clip_sample_range, self.config.clip_sample_range)
        if first:
            derivative = div(1.0, sigma) * (term("sample") - term("x0"))
            dt = sigma_next - sigma
            return compile_step(self._dk_rows, x0, [term("sample") + dt * derivative, derivative], clip, want_x0=True)
        # sigma_next = 0 happens only out of order (diffusers then returns inf / nan, and so does this)
        derivative = 0.5 * (term("derivative") + div(1.0, sigma_next) * (term("sample") - term("x0")))
        dt = as_float(self.sigmas[index]) - sigma  # the first stage's dt, sigma_next - sigma of that stage
        return compile_step(self._dk_rows, x0, [term("orig_sample") + dt * derivative], clip, want_x0=True)

    def step(self, model_output, timestep, sample, return_dict: bool = True):
        self._dk_begin_step(timestep)
        first = self.state_in_first_order
        plan = self._dk_plan((self.step_index, first))
        if first:
            prev_sample, derivative, pred_original_sample = self._dk_run(
                plan, {"sample": sample, "model_output": model_output}, None, noise_step=self.step_index)
            self.prev_derivative = derivative
            self.dt = self.sigmas[self.step_index + 1] - self.sigmas[self.step_index]
            self.sample = sample
        else:
            prev_sample, pred_original_sample = self._dk_run(
                plan, {"sample": sample, "model_output": model_output, "orig_sample": self.sample,
                       "derivative": self.prev_derivative}, None, noise_step=self.step_index)
            self.prev_derivative = None
            self.dt = None
            self.sample = None
        self._step_index += 1
        if not return_dict:
            return (prev_sample, pred_original_sample)
        return schedulers.scheduling_heun_discrete.HeunDiscreteSchedulerOutput(
            prev_sample=prev_sample, pred_original_sample=pred_original_sample)
