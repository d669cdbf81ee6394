"""diffusers' DPMSolverMultistepScheduler with a fused step: one launch of ops.linear_step per call."""
from __future__ import annotations

import torch
from diffusers import schedulers
from diffusers.utils.torch_utils import randn_tensor

from ._base import FusedScheduler, drop_in, lambda_of
from ._linear_form import as_float, compile_step, div, term


@drop_in
class DPMSolverMultistepScheduler(FusedScheduler, schedulers.DPMSolverMultistepScheduler):

    def _dk_setup(self, seed, exact_coefficients, sample_offset=0):
        if self.config.thresholding and self.config.algorithm_type in ("dpmsolver", "sde-dpmsolver"):
            raise NotImplementedError(
                "diffkern.diffusers.DPMSolverMultistepScheduler supports thresholding only with the dpmsolver++ "
                f"algorithms, not algorithm_type={self.config.algorithm_type!r}; use diffusers' class for it")
        super()._dk_setup(seed, exact_coefficients, sample_offset)

    def _dk_orders(self, index: int, lower_order_nums: int) -> int:
        n = len(self._dk_timestep_list)
        lower_order_final = (index == n - 1) and (
            self.config.euler_at_final or (self.config.lower_order_final and n < 15)
            or self.config.final_sigmas_type == "zero")
        lower_order_second = (index == n - 2) and self.config.lower_order_final and n < 15
        if self.config.solver_order == 1 or lower_order_nums < 1 or lower_order_final:
            return 1
        if self.config.solver_order == 2 or lower_order_nums < 2 or lower_order_second:
            return 2
        return 3

    def _dk_schedule_keys(self):
        start = self.begin_index or 0
        return [(i, self._dk_orders(i, min(i - start, self.config.solver_order)))
                for i in range(start, len(self._dk_timestep_list))]

    def _dk_build(self, key):
        index, order = key
        sigmas = self.sigmas
        alpha_s0, sigma_s0 = self._sigma_to_alpha_sigma_t(sigmas[index])
        # x0 (or epsilon for the dpmsolver / sde-dpmsolver algorithms) from the model output
        kind, algorithm = self.config.prediction_type, self.config.algorithm_type
        a, s = as_float(alpha_s0), as_float(sigma_s0)
        if algorithm in ("dpmsolver++", "sde-dpmsolver++"):
            if kind == "epsilon":
                x0 = term("sample", as_float(1 / alpha_s0)) + term("model_output", as_float(-sigma_s0 / alpha_s0))
            elif kind == "sample":
                x0 = term("model_output")
            elif kind == "v_prediction":
                x0 = term("sample", a) + term("model_output", -s)
            elif kind == "flow_prediction":
                x0 = term("sample") + term("model_output", -as_float(sigmas[index]))
            else:
                raise ValueError(f"prediction_type given as {kind} must be one of `epsilon`, `sample`, "
                                 "`v_prediction`, or `flow_prediction` for the DPMSolverMultistepScheduler.")
        else:
            if kind == "epsilon":
                x0 = term("model_output")
            elif kind == "sample":
                x0 = term("sample", 1 / s) + term("model_output", -a / s)
            elif kind == "v_prediction":
                x0 = term("model_output", a) + term("sample", s)
            else:
                raise ValueError(f"prediction_type given as {kind} must be one of `epsilon`, `sample`, or"
                                 " `v_prediction` for the DPMSolverMultistepScheduler.")
        alpha_t, sigma_t = self._sigma_to_alpha_sigma_t(sigmas[index + 1])
        h = lambda_of((alpha_t, sigma_t)) - lambda_of((alpha_s0, sigma_s0))
        m0, m1, m2 = term("x0"), term("h1"), term("h2")
        plus, sde = algorithm in ("dpmsolver++", "sde-dpmsolver++"), algorithm.startswith("sde")
        sample_coefficient = (sigma_t / sigma_s0 * torch.exp(-h) if sde else sigma_t / sigma_s0) if plus \
            else alpha_t / alpha_s0
        noise = 0.0
        if sde:
            noise = sigma_t * (torch.sqrt(1.0 - torch.exp(-2 * h)) if plus else torch.sqrt(torch.exp(2 * h) - 1.0))
        if order == 1:
            D = [m0]
        else:
            alpha_s1, sigma_s1 = self._sigma_to_alpha_sigma_t(sigmas[index - 1])
            r0 = (lambda_of((alpha_s0, sigma_s0)) - lambda_of((alpha_s1, sigma_s1))) / h
            if order == 2:
                D = [m0, div(1.0, as_float(r0)) * (m0 - m1)]
            else:
                alpha_s2, sigma_s2 = self._sigma_to_alpha_sigma_t(sigmas[index - 2])
                r1 = (lambda_of((alpha_s1, sigma_s1)) - lambda_of((alpha_s2, sigma_s2))) / h
                d1_0, d1_1 = div(1.0, as_float(r0)) * (m0 - m1), div(1.0, as_float(r1)) * (m1 - m2)
                D = [m0, d1_0 + as_float(r0 / (r0 + r1)) * (d1_0 - d1_1), as_float(1.0 / (r0 + r1)) * (d1_0 - d1_1)]
        weights = self._dk_weights(order, h, alpha_t, sigma_t, plus, sde)
        prev = term("sample", as_float(sample_coefficient)) + term("z", as_float(noise))
        for w, d in zip(weights, D):
            prev = prev + as_float(w) * d
        return compile_step(self._dk_rows, x0, [prev], want_x0=True)

    def _dk_weights(self, order, h, alpha_t, sigma_t, plus, sde):
        """The coefficients of D0, D1, D2 in diffusers' update formulas (its scalar arithmetic)."""
        e = torch.exp
        heun = self.config.solver_type == "heun"
        if plus and not sde:
            w0 = -(alpha_t * (e(-h) - 1.0))
            w1 = (alpha_t * ((e(-h) - 1.0) / h + 1.0)) if (heun or order == 3) else -0.5 * (alpha_t * (e(-h) - 1.0))
            w2 = -(alpha_t * ((e(-h) - 1.0 + h) / h ** 2 - 0.5))
        elif plus:
            w0 = alpha_t * (1 - e(-2.0 * h))
            w1 = (alpha_t * ((1.0 - e(-2.0 * h)) / (-2.0 * h) + 1.0)) if (heun or order == 3) \
                else 0.5 * (alpha_t * (1 - e(-2.0 * h)))
            w2 = alpha_t * ((1.0 - e(-2.0 * h) - 2.0 * h) / (2.0 * h) ** 2 - 0.5)
        elif not sde:
            w0 = -(sigma_t * (e(h) - 1.0))
            w1 = -(sigma_t * ((e(h) - 1.0) / h - 1.0)) if (heun or order == 3) else -0.5 * (sigma_t * (e(h) - 1.0))
            w2 = -(sigma_t * ((e(h) - 1.0 - h) / h ** 2 - 0.5))
        else:
            if order == 3:
                raise NotImplementedError("diffusers has no third-order sde-dpmsolver update")
            w0 = -2.0 * (sigma_t * (e(h) - 1.0))
            w1 = -2.0 * (sigma_t * ((e(h) - 1.0) / h - 1.0)) if heun else -(sigma_t * (e(h) - 1.0))
            w2 = 0.0
        return [w0, w1, w2][:order]

    def step(self, model_output, timestep, sample, generator=None, variance_noise=None, return_dict: bool = True):
        if self.num_inference_steps is None:
            raise ValueError(
                "Number of inference steps is 'None', you need to run 'set_timesteps' after creating the scheduler")
        self._dk_begin_step(timestep)
        if self.config.variance_type in ("learned", "learned_range") and self.config.prediction_type == "epsilon":
            model_output = model_output[:, :3]
        plan = self._dk_plan((self.step_index, self._dk_orders(self.step_index, self.lower_order_nums)))
        noise = None
        if self.config.algorithm_type in ("sde-dpmsolver", "sde-dpmsolver++"):
            if variance_noise is not None:
                noise = variance_noise.to(device=model_output.device, dtype=torch.float32)
            elif generator is not None:
                noise = randn_tensor(model_output.shape, generator=generator, device=model_output.device,
                                     dtype=torch.float32)
        tensors = {"sample": sample, "model_output": model_output,
                   "h1": self.model_outputs[-1], "h2": self.model_outputs[-2] if self.config.solver_order > 1 else None}
        prev_sample, converted = self._dk_run(plan, tensors, noise, noise_step=self.step_index)
        for i in range(self.config.solver_order - 1):
            self.model_outputs[i] = self.model_outputs[i + 1]
        self.model_outputs[-1] = converted
        if self.lower_order_nums < self.config.solver_order:
            self.lower_order_nums += 1
        if prev_sample.dtype != model_output.dtype:  # (.to costs ~0.7 us even when it returns its input)
            prev_sample = prev_sample.to(model_output.dtype)
        self._step_index += 1
        if not return_dict:
            return (prev_sample,)
        return schedulers.scheduling_utils.SchedulerOutput(prev_sample=prev_sample)
