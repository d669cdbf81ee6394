"""k-diffusion's DPM-Solver++ samplers (Lu et al. 2022): 2S ancestral, SDE, 2M, 2M SDE and 3M SDE, in
t = -log sigma. Every update is linear in x, this step's and the kept denoised estimates and the noise,
so each stage is one fused launch. The scalars (sigma ratios, expm1 of step sizes, the multistep ratios)
are formed before the loop for every step at once, with k-diffusion's operations in the sigmas' dtype
on a CPU copy (so they round as its own do), and the levels a stage's model call sees with the same
operations on the sigmas' device. The SDE samplers default to k-diffusion's Brownian-tree noise;
``seed=`` puts them on diffkern's stream.
"""
from __future__ import annotations

from typing import Optional

import torch

from .._validate import check_real
from ._run import Call, Noise, NoiseArgs, RowBook, Run, check_sigmas, check_x, euler_row, row
from .brownian import default_brownian
from .euler import ancestral_levels


def _sigma(t):
    return t.neg().exp()


def _t(sigma):
    return sigma.log().neg()


def _sde_noise(x, sigmas, noise_args: NoiseArgs, needed: bool) -> Noise:
    """The SDE samplers' noise: a given sampler, the stream, or (k-diffusion's default) a Brownian tree
    over the run's sigmas, made only when some step adds noise."""
    noise_sampler = noise_args.noise_sampler
    if noise_sampler is None and noise_args.seed is None and needed:
        noise_sampler = default_brownian(x, sigmas)
    return Noise(x, noise_sampler, noise_args.seed, noise_args.sample_offset, needed=needed)


def _lists(*tensors):
    return [t.tolist() for t in tensors]


def _2s_levels(sigmas, eta):
    """sigma_down, sigma_up, t, t_next, h and the stage's s of DPM-Solver++(2S) ancestral (r = 1/2)."""
    down, up = ancestral_levels(sigmas[:-1], sigmas[1:], eta)
    t, t_next = _t(sigmas[:-1]), _t(down)
    h = t_next - t
    return down, up, t, t_next, h, t + h / 2


def _2s_ancestral_plan(levels: torch.Tensor, values: list, eta: float, s_noise: float):
    """(rows, per step (launches, noisy, whether a stage), whether any step adds noise)."""
    r, n = 1 / 2, len(values) - 1
    down, up, t, t_next, h, s = _2s_levels(levels, eta)
    downs, ups, dts = _lists(down, up, down - levels[:-1])
    first_x, first_d = _lists(_sigma(s) / _sigma(t), (-h * r).expm1())
    second_x, second_d = _lists(_sigma(t_next) / _sigma(t), (-h).expm1())
    book, plan, needed = RowBook(), [], False
    for i in range(n):
        noisy = values[i + 1] > 0
        z = s_noise * ups[i] if noisy else 0.
        if downs[i] == 0:
            plan.append(((("euler", book.add("euler", euler_row(values[i], dts[i], z))),), noisy, False))
        else:
            plan.append(((("stage", book.add("stage", row([first_x[i], -first_d[i]]))),
                          ("step", book.add("step", row([second_x[i], -second_d[i]], z)))), noisy, True))
        needed = needed or (noisy and z != 0)
    return book.rows, plan, needed


@torch.no_grad()
def sample_dpmpp_2s_ancestral(model, x, sigmas, extra_args=None, callback=None, disable=None, eta=1., s_noise=1.,
                              noise_sampler=None, *, seed: Optional[int] = None, sample_offset: int = 0):
    """Ancestral DPM-Solver++(2S) steps, as k-diffusion's ``sample_dpmpp_2s_ancestral``: a stage at the
    log-midpoint toward sigma_down, the step, and the noise of std sigma_up (two launches, two model calls)."""
    x, given, sigmas = check_x(x), sigmas, check_sigmas(sigmas, x.device)
    eta, s_noise = check_real("eta", eta), check_real("s_noise", s_noise)
    run = Run(model, x, sigmas, extra_args, callback, disable, given=given)
    rows, steps, needed = run.plan(_2s_ancestral_plan, eta, s_noise)
    stage_on_device = _sigma(_2s_levels(sigmas, eta)[5])
    plan = [(launches, noisy, stage_on_device[i] if staged else None)
            for i, (launches, noisy, staged) in enumerate(steps)]
    run.noise = Noise(x, noise_sampler, seed, sample_offset, needed=needed)
    run.tables(rows)
    return run.ancestral_loop(x, plan, lambda x, x_2, denoised_2: [x, denoised_2])


def _sde_levels(sigmas, r):
    t, t_next = _t(sigmas[:-1]), _t(sigmas[1:])
    return t, t_next, t + (t_next - t) * r


def _sde_plan(levels: torch.Tensor, values: list, eta: float, s_noise: float, r: float):
    """(rows, per step (launches, whether a stage), whether any step adds noise) of DPM-Solver++ SDE."""
    n, fac = len(values) - 1, 1 / (2 * r)
    t, t_next, s = _sde_levels(levels, r)
    down, up = ancestral_levels(_sigma(t), _sigma(s), eta)
    s_ = _t(down)
    down_2, up_2 = ancestral_levels(_sigma(t), _sigma(t_next), eta)
    t_next_ = _t(down_2)
    a_1, b_1, a_2, b_2, ups, ups_2 = _lists(_sigma(s_) / _sigma(t), (t - s_).expm1(), _sigma(t_next_) / _sigma(t),
                                            (t - t_next_).expm1(), up, up_2)
    book, plan, needed = RowBook(), [], False
    for i in range(n):
        if values[i + 1] == 0:
            plan.append(((("euler", book.add("euler", euler_row(values[i], -values[i]))),), False))
            continue
        first = row([a_1[i], -b_1[i]], s_noise * ups[i])
        second = row([a_2[i], -b_2[i] * (1 - fac), -b_2[i] * fac], s_noise * ups_2[i])
        plan.append(((("stage", book.add("stage", first)), ("step", book.add("step", second))), True))
        needed = needed or s_noise * ups[i] != 0 or s_noise * ups_2[i] != 0
    return book.rows, plan, needed


@torch.no_grad()
def sample_dpmpp_sde(model, x, sigmas, extra_args=None, callback=None, disable=None, eta=1., s_noise=1.,
                     noise_sampler=None, r=1 / 2, *, seed: Optional[int] = None, sample_offset: int = 0):
    """Stochastic DPM-Solver++ with a stage at fraction ``r`` of each step in t, as k-diffusion's
    ``sample_dpmpp_sde`` (Brownian-tree noise by default): two launches and two model calls per step."""
    x, given, sigmas = check_x(x), sigmas, check_sigmas(sigmas, x.device)
    eta, s_noise = check_real("eta", eta), check_real("s_noise", s_noise)
    r = check_real("r", r, strict=True)
    run = Run(model, x, sigmas, extra_args, callback, disable, given=given)
    n = len(run.values) - 1
    rows, steps, needed = run.plan(_sde_plan, eta, s_noise, r)
    on_device = [_sigma(v) for v in _sde_levels(sigmas, r)]  # the levels of the stage call and of the noise
    plan = [(launches, tuple(v[i] for v in on_device) if staged else None)
            for i, (launches, staged) in enumerate(steps)]
    run.noise = _sde_noise(x, sigmas, NoiseArgs(noise_sampler, seed, sample_offset), needed)
    run.tables(rows)
    for i in run.steps(n):
        launches, levels_i = plan[i]
        denoised = run.denoise(x, sigmas[i] * run.s_in)
        run.report({"x": x, "i": i, "sigma": sigmas[i], "sigma_hat": sigmas[i], "denoised": denoised})
        if levels_i is None:
            (x,) = run.launch([x, denoised], *launches[0])
            continue
        sigma_t, sigma_next, sigma_s = levels_i
        (x_2,) = run.launch([x, denoised], *launches[0], run.noise.draw(x, sigma_t, sigma_s))
        denoised_2 = run.denoise(x_2, sigma_s * run.s_in)
        (x,) = run.launch([x, denoised, denoised_2], *launches[1], run.noise.draw(x, sigma_t, sigma_next))
    return x


@torch.no_grad()
def sample_dpmpp_2m(model, x, sigmas, extra_args=None, callback=None, disable=None):
    """DPM-Solver++(2M), as k-diffusion's ``sample_dpmpp_2m``: one model call and one launch per step
    (first order on the first step and onto sigma = 0)."""
    x, given, sigmas = check_x(x), sigmas, check_sigmas(sigmas, x.device)
    run = Run(model, x, sigmas, extra_args, callback, disable, given=given)
    n = len(run.values) - 1
    rows, plan = run.plan(_2m_plan)
    run.tables(rows)
    old = None
    for i in run.steps(n):
        denoised = run.denoise(x, sigmas[i] * run.s_in)
        run.report({"x": x, "i": i, "sigma": sigmas[i], "sigma_hat": sigmas[i], "denoised": denoised})
        kind, index = plan[i]
        (x,) = run.launch([x, denoised] if kind == "first" else [x, denoised, old], kind, index)
        old = denoised
    return x


def _2m_plan(levels: torch.Tensor, values: list):
    """(rows, per step (kind, row)) of DPM-Solver++(2M)."""
    n = len(values) - 1
    t, t_next = _t(levels[:-1]), _t(levels[1:])
    h = t_next - t
    ratio = (t[1:] - t[:-1]) / h[1:]  # step i's h_last / h, from step 1
    a, b = _lists(_sigma(t_next) / _sigma(t), (-h).expm1())
    c_1, c_2 = _lists(1 + 1 / (2 * ratio), 1 / (2 * ratio))
    book, plan = RowBook(), []
    for i in range(n):
        if values[i + 1] == 0:  # onto the data: x = D
            plan.append(("first", book.add("first", row([0.0, 1.0]))))
        elif i == 0:
            plan.append(("first", book.add("first", row([a[i], -b[i]]))))
        else:
            plan.append(("second", book.add("second", row([a[i], -b[i] * c_1[i - 1], b[i] * c_2[i - 1]]))))
    return book.rows, plan


def _multistep_rows(third_order: bool, levels: torch.Tensor, eta: float, s_noise: float, solver_type):
    """Per step: the coefficients of [x, D, D_1 (, D_2)] and of the noise, for 2M SDE and 3M SDE (None
    for the step onto sigma = 0, which returns D)."""
    n = levels.numel() - 1
    t, s = -levels[:-1].log(), -levels[1:].log()
    h = s - t
    rows = []
    if third_order:
        h_eta = h * (eta + 1)
        phi_2 = h_eta.neg().expm1() / h_eta + 1
        phi_3 = phi_2 / h_eta - 0.5
        r0 = torch.cat([h[:1], h[:-1]]) / h  # step i's h_1 / h (unused at i = 0)
        r1 = torch.cat([h[:2], h[:-2]]) / h if n > 1 else r0  # h_2 / h (unused below i = 2)
        a, e, p2, p3, ia, ib, w, v = _lists(torch.exp(-h_eta), h_eta.neg().expm1().neg(), phi_2, phi_3, 1 / r0, 1 / r1,
                                            r0 / (r0 + r1), 1 / (r0 + r1))
        z = _lists(levels[1:] * (-2 * h * eta).expm1().neg().sqrt())[0]
    else:
        eta_h = eta * h
        phi = (-h - eta_h).expm1().neg()
        ratio = torch.cat([h[:1], h[:-1]]) / h
        c = (phi / (-h - eta_h) + 1) * (1 / ratio) if solver_type == "heun" else 0.5 * phi * (1 / ratio)
        a, e, c = _lists(levels[1:] / levels[:-1] * (-eta_h).exp(), phi, c)
        z = _lists(levels[1:] * (-2 * eta_h).expm1().neg().sqrt())[0]
    nexts = levels[1:].tolist()
    for i in range(n):
        if nexts[i] == 0:
            rows.append(None)
            continue
        if third_order and i >= 2:
            coefs = [a[i], e[i] + p2[i] * (1 + w[i]) * ia[i] - p3[i] * v[i] * ia[i],
                     -p2[i] * (1 + w[i]) * ia[i] - p2[i] * w[i] * ib[i] + p3[i] * v[i] * (ia[i] + ib[i]),
                     p2[i] * w[i] * ib[i] - p3[i] * v[i] * ib[i]]
        elif third_order and i == 1:
            coefs = [a[i], e[i] + p2[i] * ia[i], -p2[i] * ia[i]]
        elif i >= 1:
            coefs = [a[i], e[i] + c[i], -c[i]]
        else:
            coefs = [a[i], e[i]]
        rows.append((coefs, z[i] * s_noise if eta else 0.))
    return rows


def _sde_multistep_plan(levels: torch.Tensor, values: list, third_order: bool, eta: float, s_noise: float,
                        solver_type):
    """(rows, per step (kind, row, noisy) or None onto sigma = 0) of 2M SDE and 3M SDE."""
    book, plan = RowBook(), []
    for rows in _multistep_rows(third_order, levels, eta, s_noise, solver_type):
        if rows is None:
            plan.append(None)
            continue
        kind = f"m{len(rows[0]) - 1}"
        plan.append((kind, book.add(kind, row(*rows)), bool(eta)))
    return book.rows, plan


def _sde_multistep(third_order: bool, call: Call, eta, s_noise, noise: NoiseArgs, solver_type=None):
    """DPM-Solver++(2M) SDE and (3M) SDE: per step one launch of x, the denoised estimates and the noise;
    the step onto sigma = 0 returns the denoised estimate itself (as k-diffusion)."""
    x, sigmas = check_x(call.x), check_sigmas(call.sigmas, call.x.device)
    eta, s_noise = check_real("eta", eta), check_real("s_noise", s_noise)
    run = Run(call.model, x, sigmas, call.extra_args, call.callback, call.disable, given=call.sigmas)
    n = len(run.values) - 1
    rows, plan = run.plan(_sde_multistep_plan, third_order, eta, s_noise, solver_type)
    run.noise = _sde_noise(x, sigmas, noise, any(p is not None and p[2] and s_noise != 0 for p in plan))
    run.tables(rows)
    history = []  # earlier denoised estimates, newest first
    for i in run.steps(n):
        denoised = run.denoise(x, sigmas[i] * run.s_in)
        run.report({"x": x, "i": i, "sigma": sigmas[i], "sigma_hat": sigmas[i], "denoised": denoised})
        if plan[i] is None:
            x = denoised
        else:
            kind, index, noisy = plan[i]
            draw = run.noise.draw(x, sigmas[i], sigmas[i + 1]) if noisy else None
            (x,) = run.launch([x, denoised] + history[:int(kind[1:]) - 1], kind, index, draw)
        history = [denoised] + history[:1]
    return x


@torch.no_grad()
def sample_dpmpp_2m_sde(model, x, sigmas, extra_args=None, callback=None, disable=None, eta=1., s_noise=1.,
                        noise_sampler=None, solver_type="midpoint", *, seed: Optional[int] = None,
                        sample_offset: int = 0):
    """DPM-Solver++(2M) SDE, as k-diffusion's ``sample_dpmpp_2m_sde`` (``solver_type`` midpoint or heun;
    Brownian-tree noise by default): one model call and one launch per step."""
    if solver_type not in {"heun", "midpoint"}:
        raise ValueError("solver_type must be 'heun' or 'midpoint'")
    return _sde_multistep(False, Call(model, x, sigmas, extra_args, callback, disable), eta, s_noise,
                          NoiseArgs(noise_sampler, seed, sample_offset), solver_type)


@torch.no_grad()
def sample_dpmpp_3m_sde(model, x, sigmas, extra_args=None, callback=None, disable=None, eta=1., s_noise=1.,
                        noise_sampler=None, *, seed: Optional[int] = None, sample_offset: int = 0):
    """DPM-Solver++(3M) SDE, as k-diffusion's ``sample_dpmpp_3m_sde`` (Brownian-tree noise by default): one
    model call and one launch per step."""
    return _sde_multistep(True, Call(model, x, sigmas, extra_args, callback, disable), eta, s_noise,
                          NoiseArgs(noise_sampler, seed, sample_offset))
