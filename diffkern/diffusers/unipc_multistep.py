"""diffusers' UniPCMultistepScheduler with a fused step: one launch of ops.linear_step per call."""
from __future__ import annotations

import torch
from diffusers import schedulers

from ._base import FusedScheduler, drop_in, lambda_of
from ._linear_form import Lin, as_float, compile_step, div, term


@drop_in
class UniPCMultistepScheduler(FusedScheduler, schedulers.UniPCMultistepScheduler):
    _dk_refuse = {"solver_p": lambda v: v is not None}

    def _dk_setup(self, seed, exact_coefficients, sample_offset=0):
        if getattr(self, "solver_p", None) is not None:
            raise NotImplementedError("diffkern.diffusers.UniPCMultistepScheduler does not support solver_p; "
                                      "use diffusers.UniPCMultistepScheduler for it")
        if self.config.thresholding and not self.predict_x0:
            raise NotImplementedError("diffkern.diffusers.UniPCMultistepScheduler supports thresholding only with "
                                      "predict_x0=True; use diffusers.UniPCMultistepScheduler for it")
        super()._dk_setup(seed, exact_coefficients, sample_offset)

    def _dk_this_order(self, index: int, lower_order_nums: int) -> int:
        order = self.config.solver_order
        if self.config.lower_order_final:
            order = min(order, len(self._dk_timestep_list) - index)
        return min(order, lower_order_nums + 1)

    def _dk_schedule_keys(self):
        start = self.begin_index or 0
        keys, previous_order = [], None
        for i in range(start, len(self._dk_timestep_list)):
            done = min(i - start, self.config.solver_order)
            corrector = previous_order if (i > start and (i - 1) not in self.disable_corrector) else 0
            order = self._dk_this_order(i, done)
            keys.append((i, corrector, order))
            previous_order = order
        return keys

    def _dk_solve(self, index: int, order: int, history_offset: int, h, predictor: bool):
        """rks, rhos and the scalars of diffusers' UniPC bh update (its float32 arithmetic)."""
        lambda_s0 = lambda_of(self._sigma_to_alpha_sigma_t(self.sigmas[index - history_offset]))
        rks = []
        for i in range(1, order):
            lambda_si = lambda_of(self._sigma_to_alpha_sigma_t(self.sigmas[index - history_offset - i]))
            rks.append((lambda_si - lambda_s0) / h)
        rks.append(torch.ones(()))
        rks = torch.stack(rks)
        hh = -h if self.predict_x0 else h
        h_phi_1 = torch.expm1(hh)
        h_phi_k = h_phi_1 / hh - 1
        factorial_i = 1
        B_h = hh if self.config.solver_type == "bh1" else torch.expm1(hh)
        R, b = [], []
        for i in range(1, order + 1):
            R.append(torch.pow(rks, i - 1))
            b.append(h_phi_k * factorial_i / B_h)
            factorial_i *= i + 1
            h_phi_k = h_phi_k / hh - 1 / factorial_i
        R, b = torch.stack(R), torch.stack(b)
        if predictor:
            rhos = [] if order == 1 else ([0.5] if order == 2 else torch.linalg.solve(R[:-1, :-1], b[:-1]).tolist())
        else:
            rhos = [0.5] if order == 1 else torch.linalg.solve(R, b).tolist()
        return [as_float(r) for r in rks[:-1]], rhos, h_phi_1, B_h

    def _dk_build(self, key):
        index, corrector_order, order = key
        kind = self.config.prediction_type
        alpha, sigma = self._sigma_to_alpha_sigma_t(self.sigmas[index])
        if self.predict_x0:
            if kind == "epsilon":
                x0 = term("sample", as_float(1 / alpha)) + term("model_output", as_float(-sigma / alpha))
            elif kind == "sample":
                x0 = term("model_output")
            elif kind == "v_prediction":
                x0 = term("sample", as_float(alpha)) + term("model_output", -as_float(sigma))
            elif kind == "flow_prediction":
                x0 = term("sample") + term("model_output", -as_float(self.sigmas[index]))
            else:
                raise ValueError(f"prediction_type given as {kind} must be one of `epsilon`, `sample`, "
                                 "`v_prediction`, or `flow_prediction` for the UniPCMultistepScheduler.")
        else:
            if kind == "epsilon":
                x0 = term("model_output")
            elif kind == "sample":
                x0 = term("sample", as_float(1 / sigma)) + term("model_output", as_float(-alpha / sigma))
            elif kind == "v_prediction":
                x0 = term("model_output", as_float(alpha)) + term("sample", as_float(sigma))
            else:
                raise ValueError(f"prediction_type given as {kind} must be one of `epsilon`, `sample`, or"
                                 " `v_prediction` for the UniPCMultistepScheduler.")
        history = [term("h1"), term("h2"), term("h3")]  # model_outputs[-1], [-2], [-3] before this step
        corrected = term("sample")
        if corrector_order:  # corrector: from last_sample at sigma[index - 1] to sigma[index]
            alpha_t, sigma_t = self._sigma_to_alpha_sigma_t(self.sigmas[index])
            alpha_s0, sigma_s0 = self._sigma_to_alpha_sigma_t(self.sigmas[index - 1])
            h = lambda_of((alpha_t, sigma_t)) - lambda_of((alpha_s0, sigma_s0))
            rks, rhos, h_phi_1, B_h = self._dk_solve(index, corrector_order, 1, h, predictor=False)
            scale, outer = (alpha_t, sigma_t / sigma_s0) if self.predict_x0 else (sigma_t, alpha_t / alpha_s0)
            m0 = history[0]
            corr = Lin()
            for rk, rho, mi in zip(rks, rhos[:-1], history[1:]):
                corr = corr + div(rho, rk) * (mi - m0)
            corrected = (as_float(outer) * term("last_sample") - as_float(scale * h_phi_1) * m0
                         - as_float(scale * B_h) * (corr + rhos[-1] * (term("x0") - m0)))
        alpha_t, sigma_t = self._sigma_to_alpha_sigma_t(self.sigmas[index + 1])
        alpha_s0, sigma_s0 = self._sigma_to_alpha_sigma_t(self.sigmas[index])
        h = lambda_of((alpha_t, sigma_t)) - lambda_of((alpha_s0, sigma_s0))
        rks, rhos, h_phi_1, B_h = self._dk_solve(index, order, 0, h, predictor=True)
        scale, outer = (alpha_t, sigma_t / sigma_s0) if self.predict_x0 else (sigma_t, alpha_t / alpha_s0)
        m0 = term("x0")
        pred = Lin()
        for rk, rho, mi in zip(rks, rhos, history):
            pred = pred + div(rho, rk) * (mi - m0)
        prev = as_float(outer) * corrected - as_float(scale * h_phi_1) * m0 - as_float(scale * B_h) * pred
        outputs = [prev, corrected] if corrector_order else [prev]
        return compile_step(self._dk_rows, x0, outputs, want_x0=True)

    def step(self, model_output, timestep, sample, return_dict: bool = True):
        if self.num_inference_steps is None:
            raise ValueError(
                "Number of inference steps is 'None', you need to run 'set_timesteps' after creating the scheduler")
        self._dk_begin_step(timestep)
        use_corrector = (self.step_index > 0 and self.step_index - 1 not in self.disable_corrector
                         and self.last_sample is not None)
        corrector_order = self.this_order if use_corrector else 0
        if self.config.lower_order_final:
            this_order = min(self.config.solver_order, len(self.timesteps) - self.step_index)
        else:
            this_order = self.config.solver_order
        this_order = min(this_order, self.lower_order_nums + 1)
        plan = self._dk_plan((self.step_index, corrector_order, this_order))
        history = self.model_outputs
        tensors = {"sample": sample, "model_output": model_output, "last_sample": self.last_sample,
                   "h1": history[-1], "h2": history[-2] if len(history) > 1 else None,
                   "h3": history[-3] if len(history) > 2 else None}
        results = self._dk_run(plan, tensors, None, noise_step=self.step_index)
        prev_sample, converted = results[0], results[-1]
        for i in range(self.config.solver_order - 1):
            self.model_outputs[i] = self.model_outputs[i + 1]
            self.timestep_list[i] = self.timestep_list[i + 1]
        self.model_outputs[-1] = converted
        self.timestep_list[-1] = timestep
        self.this_order = this_order
        self.last_sample = results[1] if use_corrector else sample
        if self.lower_order_nums < self.config.solver_order:
            self.lower_order_nums += 1
        self._step_index += 1
        if not return_dict:
            return (prev_sample,)
        return schedulers.scheduling_utils.SchedulerOutput(prev_sample=prev_sample)
