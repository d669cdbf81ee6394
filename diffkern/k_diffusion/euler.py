"""k-diffusion's Euler, Heun and DPM-2 samplers (Karras et al. 2022, Alg. 2, with its stochastic churn)
and their ancestral variants, each step one or two fused launches.

The derivative d = (x - D) / sigma never exists as a tensor: an Euler step x + d dt is the launch
(1 + dt / sigma) x - (dt / sigma) D, Heun's corrector and DPM-2's second stage combine x, D and the
stage's own x and D the same way, and the ancestral noise rides in the last launch of its step.
Everything a step needs from the sigmas is made before the loop, so the loop never reads the device:
the coefficients in float64 from a CPU copy, and the levels the model and the callback see (sigma_hat,
the midpoints) with k-diffusion's own tensor arithmetic on the sigmas' device.
"""
from __future__ import annotations

from typing import Optional

import torch

from .._validate import check_real
from ._run import Call, Noise, NoiseArgs, RowBook, Run, check_sigmas, check_x, euler_row, row


def ancestral_levels(sigma_from: torch.Tensor, sigma_to: torch.Tensor, eta: float):
    """get_ancestral_step on 0-d tensors with tensor ops only (torch.minimum where k-diffusion takes
    Python's min, the same value): no host read, so it can run on the sigmas' device."""
    if not eta:
        return sigma_to, torch.zeros_like(sigma_to)
    ratio = sigma_to ** 2 * (sigma_from ** 2 - sigma_to ** 2) / sigma_from ** 2
    sigma_up = torch.minimum(sigma_to, eta * ratio ** 0.5)
    return (sigma_to ** 2 - sigma_up ** 2) ** 0.5, sigma_up


def _midpoint(sigma, sigma_next):
    """DPM-2's stage level, the geometric mean, as k-diffusion forms it."""
    return sigma.log().lerp(sigma_next.log(), 0.5).exp()


def _churned_plan(levels: torch.Tensor, values: list, name: str, churn: tuple):
    """The rows and per-step launches of Euler, Heun and DPM-2 with EDM's churn, from the CPU copy of the
    levels: (rows, gammas, [(churn row or None, launches)])."""
    s_churn, s_tmin, s_tmax, s_noise = churn
    n = len(values) - 1
    gammas = [min(s_churn / n, 2 ** 0.5 - 1) if s_tmin <= values[i] <= s_tmax else 0. for i in range(n)]
    factor = [g + 1 for g in gammas]
    hat = levels[:-1] * torch.tensor(factor, dtype=levels.dtype)
    mid = _midpoint(hat, levels[1:])
    hats, dts, mids = hat.tolist(), (levels[1:] - hat).tolist(), mid.tolist()
    scales, dts_1 = ((hat ** 2 - levels[:-1] ** 2) ** 0.5).tolist(), (mid - hat).tolist()
    book, plan = RowBook(), []
    for i, gamma in enumerate(gammas):
        h, s, dt = hats[i], values[i + 1], dts[i]
        churn_row = book.add("churn", row([1.0], s_noise * scales[i])) if gamma > 0 else None
        if name == "euler" or s == 0:
            launches = (("euler", book.add("euler", euler_row(h, dt))),)
        elif name == "heun":
            launches = (("predict", book.add("predict", euler_row(h, dt))),
                        ("heun", book.add("heun", row([1 + dt / (2 * h), -dt / (2 * h), dt / (2 * s),
                                                       -dt / (2 * s)]))))
        else:
            launches = (("predict", book.add("predict", euler_row(h, dts_1[i]))),
                        ("dpm2", book.add("dpm2", row([1.0, dt / mids[i], -dt / mids[i]]))))
        plan.append((churn_row, launches))
    return book.rows, gammas, plan


def _churned_sampler(name: str, call: Call, churn_args: tuple, noise: NoiseArgs):
    """The loop of Euler, Heun and DPM-2: churn (EDM's gamma), one model call at sigma_hat, the method's step."""
    x, sigmas = check_x(call.x), check_sigmas(call.sigmas, call.x.device)
    run = Run(call.model, x, sigmas, call.extra_args, call.callback, call.disable, given=call.sigmas)
    s_churn, s_tmin, s_tmax, s_noise = churn_args
    s_churn, s_noise = check_real("s_churn", s_churn), check_real("s_noise", s_noise)
    s_tmin, s_tmax = check_real("s_tmin", s_tmin, allow_inf=True), check_real("s_tmax", s_tmax, allow_inf=True)
    n = len(run.values) - 1
    rows, gammas, steps = run.plan(_churned_plan, name, (s_churn, s_tmin, s_tmax, s_noise))
    churns = any(g > 0 for g in gammas)
    # k-diffusion draws eps = randn_like(x) at every step and uses it where gamma > 0
    run.noise = Noise(x, None, noise.seed, noise.sample_offset, needed=churns)
    # every step's levels at once: the model and the callback get k-diffusion's sigma_hat and midpoint
    # (its arithmetic, on the sigmas' device), the coefficients the same on the CPU copy (the plan)
    factor = [g + 1 for g in gammas]
    hat_on_device = sigmas[:-1] * torch.tensor(factor, dtype=sigmas.dtype, device=sigmas.device)
    second_on_device = sigmas[1:] if name == "heun" else _midpoint(hat_on_device, sigmas[1:])
    plan = [(churn, launches, hat_on_device[i] if gammas[i] > 0 else sigmas[i], second_on_device[i])
            for i, (churn, launches) in enumerate(steps)]
    run.tables(rows)
    for i in run.steps(n):
        churn, launches, sigma_hat, sigma_2 = plan[i]
        draw = run.noise.draw(x, None, None) if churns and (churn is not None or run.noise.mode == "global") else None
        if churn is not None:
            (x,) = run.launch([x], "churn", churn, draw)
        denoised = run.denoise(x, sigma_hat * run.s_in)
        run.report({"x": x, "i": i, "sigma": sigmas[i], "sigma_hat": sigma_hat, "denoised": denoised})
        (x_2,) = run.launch([x, denoised], *launches[0])
        if len(launches) == 1:
            x = x_2
            continue
        denoised_2 = run.denoise(x_2, sigma_2 * run.s_in)
        inputs = [x, denoised, x_2, denoised_2] if name == "heun" else [x, x_2, denoised_2]
        (x,) = run.launch(inputs, *launches[1])
    return x


@torch.no_grad()
def sample_euler(model, x, sigmas, extra_args=None, callback=None, disable=None, s_churn=0., s_tmin=0.,
                 s_tmax=float("inf"), s_noise=1., *, seed: Optional[int] = None, sample_offset: int = 0):
    """Euler steps of the probability-flow ODE with EDM's churn (Karras et al. 2022, Alg. 2), as
    k-diffusion's ``sample_euler``: one model call and one fused launch per step (two with churn).
    ``seed=`` draws the churn noise from diffkern's stream instead of torch's global generator."""
    return _churned_sampler("euler", Call(model, x, sigmas, extra_args, callback, disable),
                            (s_churn, s_tmin, s_tmax, s_noise), NoiseArgs(None, seed, sample_offset))


@torch.no_grad()
def sample_heun(model, x, sigmas, extra_args=None, callback=None, disable=None, s_churn=0., s_tmin=0.,
                s_tmax=float("inf"), s_noise=1., *, seed: Optional[int] = None, sample_offset: int = 0):
    """Heun's second-order steps (Karras et al. 2022, Alg. 2; an Euler step onto sigma = 0), as
    k-diffusion's ``sample_heun``: two model calls and two fused launches per step."""
    return _churned_sampler("heun", Call(model, x, sigmas, extra_args, callback, disable),
                            (s_churn, s_tmin, s_tmax, s_noise), NoiseArgs(None, seed, sample_offset))


@torch.no_grad()
def sample_dpm_2(model, x, sigmas, extra_args=None, callback=None, disable=None, s_churn=0., s_tmin=0.,
                 s_tmax=float("inf"), s_noise=1., *, seed: Optional[int] = None, sample_offset: int = 0):
    """DPM-Solver-2-style steps (a stage at the log-midpoint of the noise levels) with EDM's churn, as
    k-diffusion's ``sample_dpm_2``."""
    return _churned_sampler("dpm_2", Call(model, x, sigmas, extra_args, callback, disable),
                            (s_churn, s_tmin, s_tmax, s_noise), NoiseArgs(None, seed, sample_offset))


def _ancestral_plan(levels: torch.Tensor, values: list, second_order: bool, eta: float, s_noise: float):
    """The rows of Euler-ancestral / DPM-2-ancestral from the CPU copy of the levels: (rows, per step
    (launches, noisy, whether a stage at the midpoint), whether any step adds noise)."""
    n = len(values) - 1
    down, up = ancestral_levels(levels[:-1], levels[1:], eta)
    mid = _midpoint(levels[:-1], down)
    downs, ups, dts, mids = down.tolist(), up.tolist(), (down - levels[:-1]).tolist(), mid.tolist()
    dts_1 = (mid - levels[:-1]).tolist()
    book, plan, needed = RowBook(), [], False
    for i in range(n):
        sigma, up, dt = values[i], ups[i], dts[i]
        if not second_order:  # k-diffusion adds the noise while sigma_next > 0
            noisy = values[i + 1] > 0
            launches = (("euler", book.add("euler", euler_row(sigma, dt, s_noise * up if noisy else 0.))),)
            plan.append((launches, noisy, False))
        elif downs[i] == 0:  # an Euler step, no noise
            noisy = False
            plan.append(((("euler", book.add("euler", euler_row(sigma, -sigma))),), False, False))
        else:  # a stage at the log-midpoint of sigma and sigma_down, then the step with the noise
            noisy = True
            launches = (("predict", book.add("predict", euler_row(sigma, dts_1[i]))),
                        ("dpm2", book.add("dpm2", row([1.0, dt / mids[i], -dt / mids[i]], s_noise * up))))
            plan.append((launches, True, True))
        needed = needed or (noisy and s_noise * up != 0)
    return book.rows, plan, needed


def _ancestral_sampler(second_order: bool, call: Call, eta, s_noise, noise: NoiseArgs):
    x, sigmas = check_x(call.x), check_sigmas(call.sigmas, call.x.device)
    eta, s_noise = check_real("eta", eta), check_real("s_noise", s_noise)
    run = Run(call.model, x, sigmas, call.extra_args, call.callback, call.disable, given=call.sigmas)
    rows, steps, needed = run.plan(_ancestral_plan, second_order, eta, s_noise)
    mid_on_device = _midpoint(sigmas[:-1], ancestral_levels(sigmas[:-1], sigmas[1:], eta)[0]) if second_order else None
    plan = [(launches, noisy, mid_on_device[i] if staged else None)
            for i, (launches, noisy, staged) in enumerate(steps)]
    run.noise = Noise(x, noise.noise_sampler, noise.seed, noise.sample_offset, needed=needed)
    run.tables(rows)
    return run.ancestral_loop(x, plan, lambda x, x_2, denoised_2: [x, x_2, denoised_2])


@torch.no_grad()
def sample_euler_ancestral(model, x, sigmas, extra_args=None, callback=None, disable=None, eta=1., s_noise=1.,
                           noise_sampler=None, *, seed: Optional[int] = None, sample_offset: int = 0):
    """Ancestral sampling with Euler steps, as k-diffusion's ``sample_euler_ancestral``: each step goes to
    sigma_down and adds noise of std sigma_up (get_ancestral_step) in the same launch."""
    return _ancestral_sampler(False, Call(model, x, sigmas, extra_args, callback, disable), eta, s_noise,
                              NoiseArgs(noise_sampler, seed, sample_offset))


@torch.no_grad()
def sample_dpm_2_ancestral(model, x, sigmas, extra_args=None, callback=None, disable=None, eta=1., s_noise=1.,
                           noise_sampler=None, *, seed: Optional[int] = None, sample_offset: int = 0):
    """Ancestral sampling with DPM-Solver-2 steps, as k-diffusion's ``sample_dpm_2_ancestral``."""
    return _ancestral_sampler(True, Call(model, x, sigmas, extra_args, callback, disable), eta, s_noise,
                              NoiseArgs(noise_sampler, seed, sample_offset))
