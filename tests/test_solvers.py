"""dk.sample_dpmpp and dk.sample_flow: against k-diffusion's and diffusers' own loops (k-diffusion's
transcribed, diffusers' called), against closed-form probability-flow solutions (convergence
orders), the noise contract, and bad arguments."""
import math

import numpy as np
import pytest
import torch
from gaussian import GaussianMixture1d, GaussianModel

import diffkern as dk

MIX = GaussianMixture1d([0.3, 0.7], [-2.0, 1.5], [0.4, 0.6])


def stream(shape, seed, step):
    return dk.randn(shape, seed=seed, step=step, dtype=torch.float64)


# ---- k-diffusion's samplers, transcribed from k_diffusion/sampling.py (its loops and its
# expressions; its noise_sampler(sigma, sigma_next) here returns diffkern's stream for step i + 1) ----

def k_sample_dpmpp_2m(model, x, sigmas):
    s_in = x.new_ones([x.shape[0]])
    sigma_fn = lambda t: t.neg().exp()  # noqa: E731
    t_fn = lambda sigma: sigma.log().neg()  # noqa: E731
    old_denoised = None
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i] * s_in)
        t, t_next = t_fn(sigmas[i]), t_fn(sigmas[i + 1])
        h = t_next - t
        if old_denoised is None or sigmas[i + 1] == 0:
            x = (sigma_fn(t_next) / sigma_fn(t)) * x - (-h).expm1() * denoised
        else:
            h_last = t - t_fn(sigmas[i - 1])
            r = h_last / h
            denoised_d = (1 + 1 / (2 * r)) * denoised - (1 / (2 * r)) * old_denoised
            x = (sigma_fn(t_next) / sigma_fn(t)) * x - (-h).expm1() * denoised_d
        old_denoised = denoised
    return x


def k_sample_dpmpp_2m_sde(model, x, sigmas, eta=1.0, s_noise=1.0, solver_type="midpoint", seed=0):
    s_in = x.new_ones([x.shape[0]])
    old_denoised, h_last = None, None
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i] * s_in)
        if sigmas[i + 1] == 0:
            x = denoised
        else:
            t, s = -sigmas[i].log(), -sigmas[i + 1].log()
            h = s - t
            eta_h = eta * h
            x = sigmas[i + 1] / sigmas[i] * (-eta_h).exp() * x + (-h - eta_h).expm1().neg() * denoised
            if old_denoised is not None:
                r = h_last / h
                if solver_type == "heun":
                    x = x + ((-h - eta_h).expm1().neg() / (-h - eta_h) + 1) * (1 / r) * (denoised - old_denoised)
                elif solver_type == "midpoint":
                    x = x + 0.5 * (-h - eta_h).expm1().neg() * (1 / r) * (denoised - old_denoised)
            if eta:
                x = x + stream(x.shape, seed, i + 1) * sigmas[i + 1] * (-2 * eta_h).expm1().neg().sqrt() * s_noise
        old_denoised = denoised
        h_last = h
    return x


def k_sample_dpmpp_3m_sde(model, x, sigmas, eta=1.0, s_noise=1.0, seed=0):
    s_in = x.new_ones([x.shape[0]])
    denoised_1, denoised_2 = None, None
    h_1, h_2 = None, None
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i] * s_in)
        if sigmas[i + 1] == 0:
            x = denoised
        else:
            t, s = -sigmas[i].log(), -sigmas[i + 1].log()
            h = s - t
            h_eta = h * (eta + 1)
            x = torch.exp(-h_eta) * x + (-h_eta).expm1().neg() * denoised
            if h_2 is not None:
                r0 = h_1 / h
                r1 = h_2 / h
                d1_0 = (denoised - denoised_1) / r0
                d1_1 = (denoised_1 - denoised_2) / r1
                d1 = d1_0 + (d1_0 - d1_1) * r0 / (r0 + r1)
                d2 = (d1_0 - d1_1) / (r0 + r1)
                phi_2 = h_eta.neg().expm1() / h_eta + 1
                phi_3 = phi_2 / h_eta - 0.5
                x = x + phi_2 * d1 - phi_3 * d2
            elif h_1 is not None:
                r = h_1 / h
                d = (denoised - denoised_1) / r
                phi_2 = h_eta.neg().expm1() / h_eta + 1
                x = x + phi_2 * d
            if eta:
                x = x + stream(x.shape, seed, i + 1) * sigmas[i + 1] * (-2 * h * eta).expm1().neg().sqrt() * s_noise
        denoised_1, denoised_2 = denoised, denoised_1
        h_1, h_2 = h, h_1
    return x


SIGMAS = dk.karras_sigmas(14, 0.002, 80.0)
SHAPE = (256, 1)


@pytest.mark.parametrize("order,eta,solver_type,s_noise", [
    (1, 0.0, "midpoint", 1.0),
    (2, 0.0, "midpoint", 1.0),              # sample_dpmpp_2m
    (2, 1.0, "midpoint", 1.0),              # sample_dpmpp_2m_sde
    (2, 0.5, "heun", 0.9),
    (2, 1.0, "heun", 1.0),
])
def test_sample_dpmpp_matches_k_diffusion(order, eta, solver_type, s_noise):
    x_T = stream(SHAPE, 5, 0) * SIGMAS[0]
    ours = dk.sample_dpmpp(MIX.denoiser, SHAPE, SIGMAS, order=order, eta=eta, solver_type=solver_type,
                           s_noise=s_noise, lower_order_final=False, seed=5, dtype=torch.float64)
    if order == 1:
        expected = x_T.clone()
        for i in range(len(SIGMAS) - 1):  # first order throughout: k-diffusion's steps with no history
            expected = k_sample_dpmpp_2m(MIX.denoiser, expected, SIGMAS[i:i + 2])
    elif eta == 0:
        expected = k_sample_dpmpp_2m(MIX.denoiser, x_T, SIGMAS)
    else:
        expected = k_sample_dpmpp_2m_sde(MIX.denoiser, x_T, SIGMAS, eta=eta, s_noise=s_noise,
                                         solver_type=solver_type, seed=5)
    # float64 on both sides; the rows are formed once in float64 instead of per step with tensors
    torch.testing.assert_close(ours, expected, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_sample_dpmpp_3m_differs_from_k_diffusion_only_in_the_third_order_term(eta):
    """The first two steps of 3M (orders 1 and 2) are k-diffusion's; from the third on, diffkern
    weights D2 by -2 phi_3 where k-diffusion has -phi_3 (coefficients.dpmpp_update)."""
    x_T = stream(SHAPE, 5, 0) * SIGMAS[0]
    states = []
    dk.sample_dpmpp(MIX.denoiser, SHAPE, SIGMAS, order=3, eta=eta, solver_type="heun", lower_order_final=False,
                    seed=5, dtype=torch.float64, callback=lambda i, s, x, x0: states.append(x.clone()))
    expected = k_sample_dpmpp_3m_sde(MIX.denoiser, x_T, SIGMAS[:3], eta=eta, seed=5)
    torch.testing.assert_close(states[1], expected, rtol=1e-10, atol=1e-10)
    third = k_sample_dpmpp_3m_sde(MIX.denoiser, x_T, SIGMAS[:4], eta=eta, seed=5)
    assert (states[2] - third).abs().max() > 1e-6


# ---- diffusers' DPMSolverMultistepScheduler on a DDPM model, called ----

diffusers = pytest.importorskip("diffusers")


@pytest.mark.parametrize("order,solver_type,algorithm,prediction_type", [
    (1, "midpoint", "dpmsolver++", "epsilon"),
    (2, "midpoint", "dpmsolver++", "epsilon"),
    (2, "heun", "dpmsolver++", "v_prediction"),
    (1, "midpoint", "sde-dpmsolver++", "epsilon"),
    (2, "midpoint", "sde-dpmsolver++", "epsilon"),
    (2, "heun", "sde-dpmsolver++", "v_prediction"),
])
@pytest.mark.parametrize("steps", [10, 25])
def test_sample_dpmpp_matches_diffusers(order, solver_type, algorithm, prediction_type, steps):
    """Orders 1 and 2; diffusers' third-order step weights D2 differently (see coefficients.dpmpp_update
    and test_dpmpp_update_local_error_order)."""
    sched = dk.DDPMSchedule()
    reference = diffusers.DPMSolverMultistepScheduler(solver_order=order, solver_type=solver_type,
                                                      algorithm_type=algorithm, prediction_type=prediction_type)
    reference.set_timesteps(steps)
    timesteps = reference.timesteps.tolist()
    model = GaussianModel([0.5, -1.0], [0.3, 0.8], sched.alphas_cumprod, prediction_type)
    shape = (64, 2)
    sde = algorithm.startswith("sde")
    x = stream(shape, 3, 0)
    for i, t in enumerate(reference.timesteps):
        out = model(x, t.expand(shape[0]))
        x = reference.step(out, t, x, variance_noise=stream(shape, 3, i + 1) if sde else None).prev_sample
    ours = dk.sample_dpmpp(model, shape, sched=sched, timesteps=timesteps, order=order, solver_type=solver_type,
                           eta=1.0 if sde else 0.0, prediction_type=prediction_type, seed=3, dtype=torch.float64)
    # diffusers forms its alphas_cumprod table and step coefficients in float32 (relative error ~1e-6
    # near t = 0, amplified by the first-order difference quotients); measured differences 3e-6 .. 6e-5
    assert torch.allclose(ours, x.to(ours.dtype), rtol=0, atol=2e-4), (ours - x).abs().max()


def test_sample_dpmpp_timestep_spacing_is_sched_timesteps():
    sched = dk.DDPMSchedule()
    model = GaussianModel(0.0, 0.5, sched.alphas_cumprod)
    a = dk.sample_dpmpp(model, (8, 1), sched=sched, num_steps=12, timestep_spacing="trailing", dtype=torch.float64)
    b = dk.sample_dpmpp(model, (8, 1), sched=sched, timesteps=sched.timesteps(12, "trailing"), dtype=torch.float64)
    assert torch.equal(a, b)


# ---- mathematics: the probability-flow ODE of Gaussian data in closed form ----

def dpmpp_gaussian_error(steps, order, convention, std=0.5):
    """Data N(0, std^2): with x_t = alpha (x0 + sigma' eps) the PF-ODE keeps x / (alpha (std^2 +
    sigma'^2)^(1/2)) constant (sigma' = sigma / alpha), so the exact end point is known."""
    shape = (7, 1)
    x_T = torch.linspace(-3, 3, 7, dtype=torch.float64).reshape(shape)
    if convention == "sigmas":
        sigmas = dk.karras_sigmas(steps, 0.01, 20.0)[:-1]  # stop at sigma_min: no final jump to the data
        x = dk.sample_dpmpp(lambda x, s: x * std ** 2 / (std ** 2 + s.reshape(-1, 1) ** 2), shape, sigmas, order=order,
                            lower_order_final=False, x_T=x_T, dtype=torch.float64)
        return (x - x_T * math.sqrt(std ** 2 + 0.01 ** 2) / math.sqrt(std ** 2 + 20.0 ** 2)).abs().max().item()
    sde = dk.VPSDE()

    def score(x, t):
        alpha, sigma = sde.mean_coef(t).reshape(-1, 1), sde.marginal_std(t).reshape(-1, 1)
        return -x / (alpha ** 2 * std ** 2 + sigma ** 2)

    x = dk.sample_dpmpp(score, shape, sde=sde, num_steps=steps, order=order, lower_order_final=False, x_T=x_T,
                        dtype=torch.float64)
    t = torch.tensor([sde.T, 1e-3], dtype=torch.float64)
    scale = (sde.mean_coef(t) ** 2 * std ** 2 + sde.marginal_std(t) ** 2).sqrt()
    return (x - x_T * scale[1] / scale[0]).abs().max().item()


@pytest.mark.parametrize("convention,steps", [("sigmas", [20, 40, 80, 160]), ("sde", [160, 320, 640, 1280])])
@pytest.mark.parametrize("order", [1, 2, 3])
def test_sample_dpmpp_convergence_order(order, convention, steps):
    errors = [dpmpp_gaussian_error(n, order, convention) for n in steps]
    slope = -np.polyfit(np.log(steps), np.log(errors), 1)[0]
    # measured slopes: Karras sigmas 1.00 / 2.11 / 3.16; VP-SDE, steps uniform in t (large steps in
    # log-SNR near t = eps, so the asymptotic regime starts later) 1.00 / 2.04 / 2.86
    assert abs(slope - order) < 0.2, (errors, slope)


def test_k_diffusion_3m_is_second_order():
    """The same problem with k-diffusion's sample_dpmpp_3m_sde at eta = 0 (its -phi_3 weight on D2):
    second order, where diffkern's 3M is third (above)."""
    std = 0.5
    x_T = torch.linspace(-3, 3, 7, dtype=torch.float64).reshape(7, 1)

    def error(n):
        sigmas = dk.karras_sigmas(n, 0.01, 20.0)[:-1]
        x = k_sample_dpmpp_3m_sde(lambda x, s: x * std ** 2 / (std ** 2 + s.reshape(-1, 1) ** 2), x_T, sigmas, eta=0.0)
        return (x - x_T * math.sqrt(std ** 2 + 0.01 ** 2) / math.sqrt(std ** 2 + 20.0 ** 2)).abs().max().item()

    steps = [80, 160, 320, 640]
    errors = [error(n) for n in steps]
    slope = -np.polyfit(np.log(steps), np.log(errors), 1)[0]
    assert abs(slope - 2.0) < 0.2, (errors, slope)
    assert errors[-1] > 10 * dpmpp_gaussian_error(640, 3, "sigmas")


def local_error(weights_of, order, eta, h, ratios=(0.7, 1.3)):
    """One step of x_t = e^{-eta h} (sigma_t / sigma_s) x_s + int_0^h (1 + eta) e^{-(1 + eta)(h - u)} D(u) du
    (the noise-free part, alpha = 1) for an x0 path D(u) = sin(2u + 0.3) + e^{0.8u} (no derivative
    vanishes at 0) that does not depend on x:
    the update's error against the integral by 40-point Gauss-Legendre (exact to rounding here)."""
    D = lambda u: np.sin(2 * u + 0.3) + np.exp(0.8 * u)  # noqa: E731
    nodes, w = np.polynomial.legendre.leggauss(40)
    u = (nodes + 1) * h / 2
    exact = float(np.sum(w * (1 + eta) * np.exp(-(1 + eta) * (h - u)) * D(u)) * h / 2)
    history = [-ratios[0] * h, -(ratios[0] + ratios[1]) * h][:order - 1]
    c_m = weights_of(order, h, [ratios[0] * h, ratios[1] * h], eta)
    return abs(sum(c * D(p) for c, p in zip(c_m, [0.0] + history)) - exact)


def diffkern_weights(order, h, h_prev, eta):
    return dk.coefficients.dpmpp_update(order, 1.0, 1.0, 1.0, math.exp(-h), h_prev, eta=eta, solver_type="heun")[1]


def reference_code_weights(order, h, h_prev, eta):
    """The third-order weights of the DPM-Solver reference code / diffusers / k-diffusion: -phi_3 on D2."""
    H = (1 + eta) * h
    phi_1 = -math.expm1(-H)
    phi_2, r0, r1 = 1 - phi_1 / H, h_prev[0] / h, h_prev[1] / h
    phi_3 = phi_2 / H - 0.5
    d0, d1 = np.array([1 / r0, -1 / r0, 0]), np.array([0, 1 / r1, -1 / r1])
    return phi_1 * np.array([1, 0, 0]) + phi_2 * (d0 + r0 / (r0 + r1) * (d0 - d1)) - phi_3 * (d0 - d1) / (r0 + r1)


@pytest.mark.parametrize("eta", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("order", [1, 2, 3])
def test_dpmpp_update_local_error_order(order, eta):
    hs = np.array([0.04, 0.02, 0.01, 0.005])
    errors = [local_error(diffkern_weights, order, eta, h) for h in hs]
    slope = np.polyfit(np.log(hs), np.log(errors), 1)[0]
    assert abs(slope - (order + 1)) < 0.1, (errors, slope)  # measured 2.00 / 3.00 / 4.00
    if order == 3:
        # the reference code's weights: the error ratio per halving tends to 2^3 (a local h^3, so a
        # second-order method); measured 9.2 at h = 0.01 -> 0.005, about 8.3 at 0.0025 -> 0.00125
        ratio = local_error(reference_code_weights, order, eta, 0.0025) / local_error(reference_code_weights, order,
                                                                                      eta, 0.00125)
        assert 7 < ratio < 9.5, ratio


def flow_velocity(std):
    """The exact velocity E[z - x0 | x_t] of x_t = (1 - t) x0 + t z with x0 ~ N(0, std^2)."""
    def velocity(x, t):
        t = t.reshape(-1, 1).double()
        return (x * (t - (1 - t) * std ** 2) / ((1 - t) ** 2 * std ** 2 + t ** 2)).to(x.dtype)
    return velocity


@pytest.mark.parametrize("solver,order", [("euler", 1), ("heun", 2)])
def test_sample_flow_convergence_order(solver, order):
    std = 0.5
    x_T = torch.linspace(-3, 3, 7, dtype=torch.float64).reshape(7, 1)
    end = 1e-2  # stop short of t = 0, where the exact flow is smooth, to see the order of every step

    def error(n):
        t = torch.linspace(1.0, end, n + 1, dtype=torch.float64)
        x = dk.sample_flow(flow_velocity(std), (7, 1), t, solver=solver, x_T=x_T, dtype=torch.float64)
        return (x - x_T * math.sqrt((1 - end) ** 2 * std ** 2 + end ** 2)).abs().max().item()

    steps = [10, 20, 40, 80]
    errors = [error(n) for n in steps]
    slope = -np.polyfit(np.log(steps), np.log(errors), 1)[0]
    assert abs(slope - order) < 0.15, (errors, slope)


@pytest.mark.parametrize("solver,diffusers_class", [("euler", "FlowMatchEulerDiscreteScheduler"),
                                                    ("heun", "FlowMatchHeunDiscreteScheduler")])
@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_sample_flow_matches_diffusers(solver, diffusers_class, shift):
    reference = getattr(diffusers, diffusers_class)(shift=shift)
    reference.set_timesteps(12)
    velocity = flow_velocity(0.7)
    x = stream((32, 3), 9, 0)
    x_T = x.clone()
    with torch.no_grad():
        for t in reference.timesteps:
            x = reference.step(velocity(x, (t / 1000).expand(32)), t, x).prev_sample
    sigmas = torch.unique_consecutive(reference.sigmas.double())
    ours = dk.sample_flow(velocity, (32, 3), sigmas, solver=solver, x_T=x_T, dtype=torch.float64)
    # diffusers steps with float32 sigmas (the same values here) in float32 scalar arithmetic
    torch.testing.assert_close(ours, x.double(), rtol=1e-5, atol=1e-5)


def test_sample_flow_default_grid_is_shifted_linspace():
    velocity = flow_velocity(0.7)
    t = torch.linspace(1, 0, 9, dtype=torch.float64)
    shifted = 3 * t / (1 + 2 * t)
    a = dk.sample_flow(velocity, (4, 2), num_steps=8, shift=3.0, seed=2, dtype=torch.float64)
    b = dk.sample_flow(velocity, (4, 2), shifted, seed=2, dtype=torch.float64)
    assert torch.equal(a, b)


# ---- the noise contract and devices ----

def test_sample_dpmpp_sde_batch_split(device):
    kwargs = dict(order=3, eta=1.0, seed=11, device=device, dtype=torch.float32)
    whole = dk.sample_dpmpp(MIX.denoiser, (12, 1), SIGMAS, **kwargs)
    parts = torch.cat([dk.sample_dpmpp(MIX.denoiser, (n, 1), SIGMAS, sample_offset=o, **kwargs)
                       for o, n in ((0, 5), (5, 7))])
    assert torch.equal(whole, parts)


def test_sample_dpmpp_cpu_float32_against_float64(device):
    x32 = dk.sample_dpmpp(MIX.denoiser, SHAPE, SIGMAS, order=3, eta=0.5, seed=4, device=device)
    x64 = dk.sample_dpmpp(MIX.denoiser, SHAPE, SIGMAS, order=3, eta=0.5, seed=4, dtype=torch.float64)
    torch.testing.assert_close(x32.cpu().double(), x64, rtol=1e-4, atol=1e-4)


def test_sample_flow_half_precision(device):
    velocity = flow_velocity(0.7)
    x16 = dk.sample_flow(velocity, (16, 4), num_steps=10, solver="heun", seed=1, device=device, dtype=torch.bfloat16)
    x64 = dk.sample_flow(velocity, (16, 4), num_steps=10, solver="heun", seed=1, dtype=torch.float64)
    assert x16.dtype == torch.bfloat16
    torch.testing.assert_close(x16.cpu().double(), x64, rtol=3e-2, atol=3e-2)


def test_callbacks_see_x0():
    seen = []
    dk.sample_dpmpp(MIX.denoiser, (8, 1), SIGMAS, callback=lambda i, s, x, x0: seen.append((i, s, x0)),
                    dtype=torch.float64)
    assert [i for i, _, _ in seen] == list(range(len(SIGMAS) - 1))
    i, s, x0 = seen[3]
    assert s == float(SIGMAS[3])
    flows = []
    dk.sample_flow(flow_velocity(0.5), (8, 1), num_steps=4, callback=lambda i, t, x, x0: flows.append((x, x0)),
                   dtype=torch.float64)
    x_last, x0_last = flows[-1]
    torch.testing.assert_close(x_last, x0_last)  # the last step lands on its own x0 estimate


# ---- bad arguments: each names itself ----

@pytest.mark.parametrize("kwargs,match", [
    (dict(order=4), "order"),
    (dict(solver_type="rk"), "solver_type"),
    (dict(eta=-1.0), "eta"),
    (dict(eta=float("nan")), "eta"),
    (dict(s_noise=-0.5), "s_noise"),
    (dict(lower_order_final=1), "lower_order_final"),
    (dict(num_steps=10), "num_steps"),
    (dict(timesteps=[5, 3]), "timesteps"),
    (dict(seed=-1), "seed"),
    (dict(sample_offset=-1), "sample_offset"),
    (dict(x_T=torch.zeros(3, 1)), "x_T"),
    (dict(dtype=torch.int32), "dtype"),
])
def test_sample_dpmpp_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        dk.sample_dpmpp(MIX.denoiser, (4, 1), SIGMAS, **kwargs)


def test_sample_dpmpp_bad_schedules():
    with pytest.raises(ValueError, match="exactly one of sigmas"):
        dk.sample_dpmpp(MIX.denoiser, (4, 1))
    with pytest.raises(ValueError, match="exactly one of sigmas"):
        dk.sample_dpmpp(MIX.denoiser, (4, 1), SIGMAS, sde=dk.VPSDE())
    with pytest.raises(ValueError, match="timesteps"):
        dk.sample_dpmpp(MIX.denoiser, (4, 1), sched=dk.DDPMSchedule(), timesteps=[3, 5])
    with pytest.raises(ValueError, match="timesteps"):
        dk.sample_dpmpp(MIX.denoiser, (4, 1), sched=dk.DDPMSchedule(), timesteps=[3000, 5])
    with pytest.raises(ValueError, match="prediction_type"):
        dk.sample_dpmpp(MIX.denoiser, (4, 1), sched=dk.DDPMSchedule(), num_steps=5, prediction_type="x0")
    with pytest.raises(ValueError, match="parameterization"):
        dk.sample_dpmpp(MIX.denoiser, (4, 1), sde=dk.VPSDE(), parameterization="v")
    with pytest.raises(ValueError, match="prediction_type"):  # an argument of another convention
        dk.sample_dpmpp(MIX.denoiser, (4, 1), SIGMAS, prediction_type="v_prediction")
    with pytest.raises(ValueError, match="parameterization"):
        dk.sample_dpmpp(MIX.denoiser, (4, 1), sched=dk.DDPMSchedule(), num_steps=5, parameterization="epsilon")
    with pytest.raises(TypeError, match="sde"):
        dk.sample_dpmpp(MIX.denoiser, (4, 1), sde="vp")
    with pytest.raises(ValueError, match="sigmas"):
        dk.sample_dpmpp(MIX.denoiser, (4, 1), [1.0, 2.0])
    with pytest.raises(ValueError, match="the model returned shape"):
        dk.sample_dpmpp(lambda x, s: x[:2], (4, 1), SIGMAS)


@pytest.mark.parametrize("kwargs,match", [
    (dict(solver="rk4"), "solver"),
    (dict(num_steps=0), "num_steps"),
    (dict(shift=0.0), "shift"),
    (dict(shift=float("inf")), "shift"),
    (dict(sigmas=[2.0, 1.0, 0.0]), "sigmas"),
    (dict(sigmas=[1.0, 1.0, 0.0]), "sigmas"),
])
def test_sample_flow_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        dk.sample_flow(flow_velocity(0.5), (4, 1), **kwargs)
