"""k-diffusion's DPM-Solver (Lu et al. 2022, the noise-prediction form) with fixed steps (DPM-Solver-Fast)
and with adaptive steps (DPM-Solver-12 and -23 under a PID step-size controller).

In t = -log sigma a step from t to t_next = t + h is x - sum_k w_k eps_k over its stages, with
eps_k = (u_k - D_k) / sigma(s_k) the noise prediction at stage point u_k (u_0 = x, at s_0 = t), and each
stage point is such a sum too. So every stage is one fused launch of x, the denoised estimates and the
stage points, and the adaptive pair (the lower- and the higher-order solution) is one launch with two
outputs. The levels are float32 tensors as k-diffusion makes them (``torch.tensor(sigma_max)``), and
the weights are its scalars, formed in that dtype.
"""
from __future__ import annotations

import math
from typing import NamedTuple, Optional

import torch

from .._validate import check_positive_int, check_real
from ._run import Noise, Run, check_x
from .euler import ancestral_levels


class PIDStepSizeController:
    """k-diffusion's PID step-size controller: the step grows by limiter(e0^b1 e1^b2 e2^b3), e the inverse
    errors of this and the last two accepted steps, limiter(f) = 1 + atan(f - 1); a step is accepted
    when that factor reaches ``accept_safety``."""

    def __init__(self, h, pcoeff, icoeff, dcoeff, order=1, accept_safety=0.81, eps=1e-8):
        self.h = h
        self.b1 = (pcoeff + icoeff + dcoeff) / order
        self.b2 = -(pcoeff + 2 * dcoeff) / order
        self.b3 = dcoeff / order
        self.accept_safety = accept_safety
        self.eps = eps
        self.errs = []

    def limiter(self, x):
        return 1 + math.atan(x - 1)

    def propose_step(self, error) -> bool:
        inverse = 1 / (float(error) + self.eps)
        if not self.errs:
            self.errs = [inverse] * 3
        self.errs[0] = inverse
        factor = self.limiter(self.errs[0] ** self.b1 * self.errs[1] ** self.b2 * self.errs[2] ** self.b3)
        accept = factor >= self.accept_safety
        if accept:
            self.errs[2], self.errs[1] = self.errs[1], self.errs[0]
        self.h *= factor
        return accept


def _sigma(t):
    return t.neg().exp()


def _t(sigma):
    return sigma.log().neg()


class _Plan(NamedTuple):
    """One DPM-Solver step: each stage's eps weights and level, the final eps weights, and the level of
    every eps (0-d tensors, on the device the step was planned on)."""

    stages: list
    final: list
    levels: list


def _plan(t, t_next, order: int, r1: Optional[float] = None) -> _Plan:
    """A DPM-Solver-``order`` step from t to t_next (order 2 with its stage at t + r1 h)."""
    h = t_next - t
    first = _sigma(t_next) * h.expm1()  # the first-order term's weight
    if order == 1:
        return _Plan([], [first], [_sigma(t)])
    if order == 2:
        r1 = 1 / 2 if r1 is None else r1
        s1 = t + r1 * h
        c = _sigma(t_next) / (2 * r1) * h.expm1()
        return _Plan([([_sigma(s1) * (r1 * h).expm1()], s1)], [first - c, c], [_sigma(t), _sigma(s1)])
    r1, r2 = 1 / 3, 2 / 3
    s1, s2 = t + r1 * h, t + r2 * h
    e = _sigma(s2) * (r2 / r1) * ((r2 * h).expm1() / (r2 * h) - 1)
    f = _sigma(t_next) / r2 * (h.expm1() / h - 1)
    stages = [([_sigma(s1) * (r1 * h).expm1()], s1), ([_sigma(s2) * (r2 * h).expm1() - e, e], s2)]
    return _Plan(stages, [first - f, f * 0, f], [_sigma(t), _sigma(s1), _sigma(s2)])


def _coefs(weights, levels, inputs: int) -> list:
    """x - sum_k w_k (u_k - D_k) / sigma_k on the inputs [x, D, u1, D1, u2, D2][:inputs]."""
    coefs = [1.0] + [0.0] * (inputs - 1)
    for k, (w, sigma) in enumerate(zip(weights, levels)):
        w, sigma = float(w), float(sigma)
        coefs[2 * k] -= w / sigma
        coefs[2 * k + 1] += w / sigma
    return coefs


class _Solver:
    """A DPM-Solver run: the model's denoised estimate at level t (a progress bar counting the calls) and
    the fused stage launches."""

    def __init__(self, run: Run, bar):
        self.run, self.bar = run, bar

    def denoise(self, x, t):
        denoised = self.run.denoise(x, _sigma(t) * self.run.s_in)
        self.bar.update()
        return denoised

    def step(self, x, denoised, t, t_next, order, *, cpu=None, r1=None, lower=None, noise=0.0, draw=None):
        """The step from (x, t) to t_next given x's denoised estimate: its stages' model calls and
        launches. ``cpu`` = (t, t_next) on the CPU when t lives on the device (made before the loop).
        ``draw()`` gives the noise (called where k-diffusion draws it, after the stages). Returns the new
        x, or with ``lower`` = (order, r1) the pair (higher, lower) from one launch over the same stages."""
        t_cpu, t_next_cpu = cpu if cpu is not None else (t, t_next)
        host = _plan(t_cpu, t_next_cpu, order, r1)
        device = _plan(t, t_next, order, r1) if cpu is not None else host
        inputs = [x, denoised]
        for (weights, _), (_, level) in zip(host.stages, device.stages):
            (u,) = self.run.launch_rows(inputs, [(_coefs(weights, host.levels, len(inputs)), 0.0)])
            inputs += [u, self.denoise(u, level)]
        high = _coefs(host.final, host.levels, len(inputs))
        if lower is None:
            return self.run.launch_rows(inputs, [(high, noise)], draw() if draw is not None else None)[0]
        low = _plan(t_cpu, t_next_cpu, *lower)
        return self.run.launch_rows(inputs, [(high, 0.0), (_coefs(low.final, low.levels, len(inputs)), 0.0)])


def _levels_check(sigma_min, sigma_max):
    if isinstance(sigma_min, torch.Tensor):
        sigma_min = float(sigma_min)
    if isinstance(sigma_max, torch.Tensor):
        sigma_max = float(sigma_max)
    sigma_min, sigma_max = check_real("sigma_min", sigma_min), check_real("sigma_max", sigma_max)
    if sigma_min <= 0 or sigma_max <= 0:
        raise ValueError("sigma_min and sigma_max must not be 0")
    return sigma_min, sigma_max


def _wrap_callback(callback):
    """k-diffusion's DPM-Solver callbacks: its info dict with the levels as sigmas added."""
    if callback is None:
        return None
    return lambda info: callback({"sigma": _sigma(info["t"]), "sigma_hat": _sigma(info["t_up"]), **info})


def _bar(total, disable):
    from tqdm.auto import tqdm

    return tqdm(total=total, disable=disable)


@torch.no_grad()
def sample_dpm_fast(model, x, sigma_min, sigma_max, n, extra_args=None, callback=None, disable=None, eta=0.,
                    s_noise=1., noise_sampler=None, *, seed: Optional[int] = None, sample_offset: int = 0):
    """DPM-Solver-Fast (fixed steps in t = -log sigma; third-order steps, the last one or two lower, for
    ``n`` model calls in all), as k-diffusion's ``sample_dpm_fast``."""
    x = check_x(x)
    sigma_min, sigma_max = _levels_check(sigma_min, sigma_max)
    n = check_positive_int("n", n)
    eta, s_noise = check_real("eta", eta), check_real("s_noise", s_noise)
    t_start, t_end = _t(torch.tensor(sigma_max)), _t(torch.tensor(sigma_min))
    if not t_end > t_start and eta:
        raise ValueError("eta must be 0 for reverse sampling")
    m = math.floor(n / 3) + 1
    ts = torch.linspace(t_start, t_end, m + 1, device=x.device)
    orders = [3] * (m - 2) + [2, 1] if n % 3 == 0 else [3] * (m - 1) + [n % 3]
    run = Run(model, x, None, extra_args, _wrap_callback(callback), disable)
    # each step's levels: t, and t_next (lowered to the ancestral step's sigma_down with eta), on the
    # device and, copied once, on the CPU
    t_nexts, ups = list(ts[1:]), [0.0] * len(orders)
    if eta:  # 0-d operations, as k-diffusion's (a vectorised exp may round differently)
        for i in range(len(orders)):
            down = ancestral_levels(_sigma(ts[i]), _sigma(ts[i + 1]), eta)[0]
            t_nexts[i] = torch.minimum(t_end.to(ts.device), _t(down))
            ups[i] = (_sigma(ts[i + 1]) ** 2 - _sigma(t_nexts[i]) ** 2) ** 0.5
    cpu_ts, cpu_nexts = ts.cpu(), torch.stack(t_nexts).cpu()
    ups = [float(up) for up in torch.stack([torch.as_tensor(up, device=ts.device) for up in ups]).cpu()]
    run.noise = Noise(x, noise_sampler, seed, sample_offset, needed=any(up * s_noise != 0 for up in ups))
    with _bar(n, disable) as bar:
        solver = _Solver(run, bar)
        for i, order in enumerate(orders):
            t = ts[i]
            denoised = solver.denoise(x, t)
            run.report({"x": x, "i": i, "t": ts[i], "t_up": t, "denoised": denoised})
            x = solver.step(x, denoised, t, t_nexts[i], order, cpu=(cpu_ts[i], cpu_nexts[i]), noise=ups[i] * s_noise,
                            draw=lambda: run.noise.draw(x, _sigma(t), _sigma(ts[i + 1])))  # noqa: B023
    return x


@torch.no_grad()
def sample_dpm_adaptive(model, x, sigma_min, sigma_max, extra_args=None, callback=None, disable=None, order=3,
                        rtol=0.05, atol=0.0078, h_init=0.05, pcoeff=0., icoeff=1., dcoeff=0., accept_safety=0.81,
                        eta=0., s_noise=1., noise_sampler=None, return_info=False, *, seed: Optional[int] = None,
                        sample_offset: int = 0):
    """DPM-Solver-12 (``order=2``) or -23 (``order=3``) with adaptive steps in t = -log sigma: each step
    compares the solutions of two orders from the same stages (one launch) and a PID controller
    (``pcoeff``, ``icoeff``, ``dcoeff``, ``accept_safety``) accepts it or shrinks it, as k-diffusion's
    ``sample_dpm_adaptive``. ``return_info`` also returns {steps, nfe, n_accept, n_reject}."""
    x = check_x(x)
    sigma_min, sigma_max = _levels_check(sigma_min, sigma_max)
    if isinstance(order, bool) or order not in {2, 3}:
        raise ValueError(f"order should be 2 or 3, got {order!r}")
    eta, s_noise = check_real("eta", eta), check_real("s_noise", s_noise)
    rtol_f, atol_f = check_real("rtol", rtol), check_real("atol", atol)
    if rtol_f == 0 and atol_f == 0:
        raise ValueError("rtol and atol cannot both be 0 (every error would be infinite)")
    for name, value in (("h_init", h_init), ("pcoeff", pcoeff), ("icoeff", icoeff), ("dcoeff", dcoeff),
                        ("accept_safety", accept_safety)):
        check_real(name, value, low=-math.inf)
    t_start, t_end = _t(torch.tensor(sigma_max)), _t(torch.tensor(sigma_min))
    forward = bool(t_end > t_start)
    if not forward and eta:
        raise ValueError("eta must be 0 for reverse sampling")
    h_init = abs(h_init) * (1 if forward else -1)
    atol, rtol = torch.tensor(atol), torch.tensor(rtol)
    run = Run(model, x, None, extra_args, _wrap_callback(callback), disable)
    run.noise = Noise(x, noise_sampler, seed, sample_offset, needed=bool(eta) and s_noise != 0)
    pid = PIDStepSizeController(h_init, pcoeff, icoeff, dcoeff, 1.5 if eta else order, accept_safety)
    info = {"steps": 0, "nfe": 0, "n_accept": 0, "n_reject": 0}
    s, x_prev = t_start, x
    lower = (1, None) if order == 2 else (2, 1 / 3)
    with _bar(None, disable) as bar:
        solver = _Solver(run, bar)
        while s < t_end - 1e-5 if forward else s > t_end + 1e-5:
            t = torch.minimum(t_end, s + pid.h) if forward else torch.maximum(t_end, s + pid.h)
            if eta:
                down, _ = ancestral_levels(_sigma(s), _sigma(t), eta)
                t_ = torch.minimum(t_end, _t(down))
                up = (_sigma(t) ** 2 - _sigma(t_) ** 2) ** 0.5
            else:
                t_, up = t, 0.
            denoised = solver.denoise(x, s)
            x_high, x_low = solver.step(x, denoised, s, t_, order, lower=lower)
            delta = torch.maximum(atol, rtol * torch.maximum(x_low.abs(), x_prev.abs()))
            error = torch.linalg.norm((x_low - x_high) / delta) / x.numel() ** 0.5
            if pid.propose_step(error):
                x_prev = x_low
                if eta and s_noise * float(up) != 0:
                    draw = run.noise.draw(x, _sigma(s), _sigma(t))
                    (x,) = run.launch_rows([x_high], [([1.0], float(up) * s_noise)], draw)
                else:
                    if run.noise.mode == "sampler":  # k-diffusion calls its noise sampler at every step
                        run.noise.draw(x, _sigma(s), _sigma(t))
                    x = x_high
                s = t
                info["n_accept"] += 1
            else:
                info["n_reject"] += 1
            info["nfe"] += order
            info["steps"] += 1
            run.report({"x": x, "i": info["steps"] - 1, "t": s, "t_up": s, "denoised": denoised, "error": error,
                        "h": pid.h, **info})
    return (x, info) if return_info else x
