"""Score SDEs, EDM and Langevin: definitions against calculus, single steps and samplers against
the published formulas (k-diffusion, score_sde, written out here), and against closed-form laws."""
import math

import pytest
import score_sde_transcription as score_sde
import torch
from common import TOLERANCES
from gaussian import GaussianMixture1d

import diffkern as dk

SDES = {"vp": dk.VPSDE(), "subvp": dk.SubVPSDE(), "ve": dk.VESDE(0.01, 50.0)}


def gaussian_score(sde, mu, s):
    def score(x, t):
        m = sde.mean_coef(t).reshape(-1, 1)
        sd = sde.marginal_std(t).reshape(-1, 1)
        return (-(x.double() - m * mu) / (m ** 2 * s ** 2 + sd ** 2)).to(x.dtype)
    return score


# ---- definitions ----

@pytest.mark.parametrize("name", list(SDES))
def test_marginals_solve_the_moment_equations(name):
    """For dx = f x dt + g dw: dm/dt = f m and d(std^2)/dt = 2 f std^2 + g^2 (finite differences)."""
    sde = SDES[name]
    t = torch.tensor([0.05, 0.3, 0.7, 0.95], dtype=torch.float64)
    h = 1e-6
    dm = (sde.mean_coef(t + h) - sde.mean_coef(t - h)) / (2 * h)
    dvar = (sde.marginal_std(t + h) ** 2 - sde.marginal_std(t - h) ** 2) / (2 * h)
    torch.testing.assert_close(dm, sde.drift_coef(t) * sde.mean_coef(t), rtol=1e-6, atol=1e-8)
    if name == "ve":  # score_sde's VE marginal is sigma(t) itself, which solves it up to sigma_min^2
        torch.testing.assert_close(dvar, sde.diffusion(t) ** 2, rtol=1e-6, atol=1e-6)
    else:
        torch.testing.assert_close(dvar, 2 * sde.drift_coef(t) * sde.marginal_std(t) ** 2 + sde.diffusion(t) ** 2,
                                   rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("name", list(SDES))
def test_prior(name):
    sde = SDES[name]
    z = sde.prior_sample((4096, 8), seed=1)
    assert abs(z.std().item() / sde.prior_std - 1) < 0.02
    expected = torch.distributions.Normal(0.0, sde.prior_std).log_prob(z.double()).sum(1)
    torch.testing.assert_close(sde.prior_logp(z), expected)


def test_karras_sigmas():
    sigmas = dk.karras_sigmas(10, 0.002, 80.0, rho=7.0)
    ramp = torch.linspace(0, 1, 10, dtype=torch.float64)
    expected = (80.0 ** (1 / 7) + ramp * (0.002 ** (1 / 7) - 80.0 ** (1 / 7))) ** 7
    torch.testing.assert_close(sigmas[:-1], expected)
    assert sigmas[-1] == 0 and sigmas[0].item() == pytest.approx(80.0) and sigmas[-2].item() == pytest.approx(0.002)


def test_parameterisation_conversions():
    sde = dk.VPSDE()
    mix = GaussianMixture1d([0.3, 0.7], [-1.0, 2.0], [0.5, 0.3])
    score = mix.sde_score(sde)
    x, t = torch.randn(16, 1, dtype=torch.float64), torch.full((16,), 0.4, dtype=torch.float64)
    eps = dk.epsilon_from_score(score, sde)
    torch.testing.assert_close(dk.score_from_epsilon(eps, sde)(x, t), score(x, t))
    sigma = torch.full((16,), 0.8, dtype=torch.float64)
    denoiser = dk.denoiser_from_score(mix.sigma_score)
    torch.testing.assert_close(denoiser(x, sigma), mix.denoiser(x, sigma))
    torch.testing.assert_close(dk.score_from_denoiser(denoiser)(x, sigma), mix.sigma_score(x, sigma))


# ---- single steps against the formulas ----

@pytest.mark.parametrize("dtype", list(TOLERANCES))
@pytest.mark.parametrize("name", list(SDES))
def test_euler_maruyama_and_ode_steps(device, dtype, name):
    sde = SDES[name]
    gen = torch.Generator().manual_seed(0)
    x, s, z = (torch.randn(5, 3, 7, generator=gen, dtype=torch.float64) for _ in range(3))
    t, dt = 0.6, -0.01
    f, g = float(sde.drift_coef(t)), float(sde.diffusion(t))
    def cast(a):
        return (a.to(device=device, dtype=dtype))
    em = dk.euler_maruyama_step(cast(s), cast(x), t, dt, sde, noise=cast(z))
    ode = dk.euler_maruyama_step(cast(s), cast(x), t, dt, sde, ode=True)
    xd, sd, zd = (cast(a).double() for a in (x, s, z))  # the inputs as the kernel sees them
    torch.testing.assert_close(em, cast(xd + (f * xd - g ** 2 * sd) * dt + g * math.sqrt(-dt) * zd),
                               **TOLERANCES[dtype])
    torch.testing.assert_close(ode, cast(xd + (f * xd - 0.5 * g ** 2 * sd) * dt), **TOLERANCES[dtype])
    # the epsilon parameterisation: s = -eps / std(t)
    eps = cast(-s * float(sde.marginal_std(t)))
    torch.testing.assert_close(dk.euler_maruyama_step(eps, cast(x), t, dt, sde, parameterization="epsilon",
                                                      noise=cast(z)), em, **TOLERANCES[dtype])


def test_euler_maruyama_per_sample_time():
    sde = dk.VPSDE()
    x, s = torch.randn(4, 6), torch.randn(4, 6)
    t = torch.tensor([0.9, 0.5, 0.2, 0.01])
    batched = dk.euler_maruyama_step(s, x, t, -0.001, sde, seed=3, step=2)
    for n in range(4):
        single = dk.euler_maruyama_step(s[n:n + 1], x[n:n + 1], float(t[n]), -0.001, sde, seed=3, step=2,
                                        sample_offset=n)
        torch.testing.assert_close(batched[n:n + 1], single, **TOLERANCES[torch.float32])


def test_edm_steps():
    mix = GaussianMixture1d([0.5, 0.5], [-1.0, 1.0], [0.3, 0.3])
    x = torch.randn(64, 1, dtype=torch.float64) * 2
    sigma, sigma_next = 2.0, 1.2
    s = torch.full((64,), sigma, dtype=torch.float64)
    denoised = mix.denoiser(x, s)
    d = (x - denoised) / sigma  # k-diffusion's to_d
    euler, slope = dk.euler_step(denoised, x, sigma, sigma_next, return_slope=True)
    torch.testing.assert_close(slope, d)
    torch.testing.assert_close(euler, x + d * (sigma_next - sigma))
    d2 = (euler - mix.denoiser(euler, torch.full((64,), sigma_next, dtype=torch.float64))) / sigma_next
    heun = x + (d + d2) / 2 * (sigma_next - sigma)
    torch.testing.assert_close(dk.heun_step(mix.denoiser, x, sigma, sigma_next), heun)
    torch.testing.assert_close(dk.heun_step(mix.denoiser, x, sigma, 0.0), x + d * (0 - sigma))
    z = torch.randn(64, 1, dtype=torch.float64)
    sigma_up = min(sigma_next, math.sqrt(sigma_next ** 2 * (sigma ** 2 - sigma_next ** 2) / sigma ** 2))
    sigma_down = math.sqrt(sigma_next ** 2 - sigma_up ** 2)
    torch.testing.assert_close(dk.euler_ancestral_step(denoised, x, sigma, sigma_next, noise=z),
                               x + d * (sigma_down - sigma) + z * sigma_up)


def test_langevin_step():
    x, s, z = torch.randn(3, 9), torch.randn(3, 9), torch.randn(3, 9)
    torch.testing.assert_close(dk.langevin_step(s, x, 0.01, noise=z), x + 0.005 * s + 0.1 * z,
                               **TOLERANCES[torch.float32])
    assert torch.equal(dk.langevin_step(s, x, 0.01, seed=4, step=7),
                       dk.langevin_step(s, x, 0.01, noise=dk.randn(x.shape, seed=4, step=7)))


# ---- samplers against the published loops, with the same noise ----

def noise(shape, seed, step):
    return dk.randn(shape, seed=seed, step=step, dtype=torch.float64)


def k_diffusion_sample_euler(model, x, sigmas, s_churn=0.0, s_tmin=0.0, s_tmax=float("inf"), s_noise=1.0,
                             heun=False, seed=0):
    """k-diffusion's sample_euler / sample_heun (Karras et al. Alg. 2), written out; churn noise is
    diffkern's stream with one step per draw, as in diffkern's samplers."""
    draws = 0
    for i in range(len(sigmas) - 1):
        gamma = min(s_churn / (len(sigmas) - 1), 2 ** 0.5 - 1) if s_tmin <= sigmas[i] <= s_tmax else 0.0
        sigma_hat = sigmas[i] * (gamma + 1)
        if gamma > 0:
            draws += 1
            x = x + noise(x.shape, seed, draws) * s_noise * (sigma_hat ** 2 - sigmas[i] ** 2) ** 0.5
        denoised = model(x, torch.full((x.shape[0],), float(sigma_hat), dtype=torch.float64))
        d = (x - denoised) / sigma_hat
        dt = sigmas[i + 1] - sigma_hat
        if not heun or sigmas[i + 1] == 0:
            x = x + d * dt
        else:
            x_2 = x + d * dt
            denoised_2 = model(x_2, torch.full((x.shape[0],), float(sigmas[i + 1]), dtype=torch.float64))
            d_2 = (x_2 - denoised_2) / sigmas[i + 1]
            x = x + (d + d_2) / 2 * dt
    return x


def k_diffusion_sample_euler_ancestral(model, x, sigmas, eta=1.0, s_noise=1.0, seed=0):
    draws = 0
    for i in range(len(sigmas) - 1):
        denoised = model(x, torch.full((x.shape[0],), float(sigmas[i]), dtype=torch.float64))
        sigma_up = min(sigmas[i + 1],
                       eta * (sigmas[i + 1] ** 2 * (sigmas[i] ** 2 - sigmas[i + 1] ** 2) / sigmas[i] ** 2) ** 0.5)
        sigma_down = (sigmas[i + 1] ** 2 - sigma_up ** 2) ** 0.5
        d = (x - denoised) / sigmas[i]
        x = x + d * (sigma_down - sigmas[i])
        if sigmas[i + 1] > 0:
            draws += 1
            x = x + noise(x.shape, seed, draws) * s_noise * sigma_up
    return x


MIX = GaussianMixture1d([0.3, 0.7], [-2.0, 1.5], [0.4, 0.6])


@pytest.mark.parametrize("sampler,kwargs", [
    ("euler", {}), ("euler", dict(s_churn=20.0, s_tmin=0.05, s_tmax=10.0, s_noise=1.003)),
    ("heun", {}), ("heun", dict(s_churn=40.0, s_tmin=0.05, s_tmax=50.0, s_noise=1.003)),
    ("euler_ancestral", {}), ("euler_ancestral", dict(eta=0.5, s_noise=0.9)),
])
def test_edm_samplers_match_k_diffusion(sampler, kwargs):
    sigmas = dk.karras_sigmas(12, 0.002, 80.0)
    shape = (256, 1)
    x_T = noise(shape, 7, 0) * sigmas[0]
    ours = getattr(dk, f"sample_{sampler}")(MIX.denoiser, shape, sigmas, seed=7, dtype=torch.float64, **kwargs)
    if sampler == "euler_ancestral":
        expected = k_diffusion_sample_euler_ancestral(MIX.denoiser, x_T, sigmas.tolist(), seed=7, **kwargs)
    else:
        expected = k_diffusion_sample_euler(MIX.denoiser, x_T, sigmas.tolist(), heun=sampler == "heun", seed=7,
                                            **kwargs)
    torch.testing.assert_close(ours, expected, rtol=1e-9, atol=1e-9)


def em_sampler_loop(score_fn, sde, x, num_steps, eps, seed):
    """Euler-Maruyama on the reverse SDE over linspace(T, eps, num_steps + 1), the last step without
    noise: what sample_euler_maruyama documents (not score_sde's grid, which test_pc_* covers)."""
    t_grid = torch.linspace(sde.T, eps, num_steps + 1, dtype=torch.float64)
    for i in range(num_steps):
        t, dt = t_grid[i], t_grid[i + 1] - t_grid[i]
        vec_t = torch.full((x.shape[0],), float(t), dtype=torch.float64)
        x_mean = x + (sde.drift_coef(t) * x - sde.diffusion(t) ** 2 * score_fn(x, vec_t)) * dt
        x = x_mean if i == num_steps - 1 else x_mean + sde.diffusion(t) * dt.abs().sqrt() * noise(x.shape, seed, i + 1)
    return x


def transcribed_sde(name, N):
    return {"vp": score_sde.VPSDE(0.1, 20.0, N), "subvp": score_sde.subVPSDE(0.1, 20.0, N),
            "ve": score_sde.VESDE(0.01, 50.0, N)}[name]


def stream_draws(seed):
    """score_sde's torch.randn_like, replaced by diffkern's stream in the order diffkern draws it."""
    count = [0]

    def draw(x):
        count[0] += 1
        return noise(x.shape, seed, count[0])
    return draw


@pytest.mark.parametrize("name", list(SDES))
@pytest.mark.parametrize("predictor", ["reverse_diffusion", "euler_maruyama"])
@pytest.mark.parametrize("corrector", ["langevin", None])
@pytest.mark.parametrize("num_steps", [100, 25])
def test_pc_sampler_is_score_sde(name, predictor, corrector, num_steps):
    """Against the transcription of score_sde's pc_sampler on its own grid and tables, with the same
    noise: agreement to rounding (float64; 1e-12 relative). score_sde's Langevin corrector reads
    sde.alphas, which its subVPSDE lacks (it raises there); diffkern uses the VP alphas for sub-VP,
    so that pair is compared to the transcription given those alphas."""
    sde = SDES[name]
    score = MIX.sde_score(sde)
    shape = (64, 3)
    reference = transcribed_sde(name, num_steps)
    if name == "subvp":
        reference.alphas = score_sde.VPSDE(0.1, 20.0, num_steps).alphas
    ours = dk.sample_pc(score, shape, sde, num_steps, predictor=predictor, corrector=corrector, snr=0.16, seed=5,
                        dtype=torch.float64)
    expected = score_sde.pc_sampler(reference, score, noise(shape, 5, 0), stream_draws(5), predictor=predictor,
                                    corrector=corrector, snr=0.16)
    torch.testing.assert_close(ours, expected, rtol=1e-12, atol=1e-12)


def test_pc_sampler_without_denoise_and_with_two_corrector_steps():
    sde, shape = SDES["ve"], (32, 2)
    score = MIX.sde_score(sde)
    ours = dk.sample_pc(score, shape, sde, 20, n_corrector_steps=2, denoise=False, seed=3, dtype=torch.float64)
    expected = score_sde.pc_sampler(transcribed_sde("ve", 20), score, noise(shape, 3, 0), stream_draws(3),
                                    n_steps=2, denoise=False)
    torch.testing.assert_close(ours, expected, rtol=1e-12, atol=1e-12)


def test_pc_sampler_ve_ends_at_sigma_zero():
    """score_sde's VE chain steps from sigma_min to 0 at the end: with a point mass at 0 the denoised
    samples are exactly 0 (a grid ending at sigma(eps) would leave noise of about sigma_min)."""
    sde, num_steps = SDES["ve"], 50
    sigmas = transcribed_sde("ve", num_steps).discrete_sigmas

    def score(x, t):  # the exact score of the point mass at 0 under score_sde's discrete noise levels
        return -x / (sigmas[(t * (num_steps - 1)).long()] ** 2).reshape(-1, 1)
    out = dk.sample_pc(score, (256, 2), sde, num_steps, corrector=None, seed=1, dtype=torch.float64)
    assert out.abs().max().item() < 1e-12


def test_euler_maruyama_sampler_is_the_em_loop():
    sde = SDES["vp"]
    score = MIX.sde_score(sde)
    x_T = noise((64, 1), 2, 0)
    ours = dk.sample_euler_maruyama(score, (64, 1), sde, 30, seed=2, dtype=torch.float64)
    expected = em_sampler_loop(score, sde, x_T, 30, 1e-3, seed=2)
    torch.testing.assert_close(ours, expected, rtol=1e-12, atol=1e-12)


# ---- mathematics ----

def convergence_order(steps, errors):
    """-slope of log(error) against log(steps), by least squares."""
    design = torch.stack([torch.log(torch.tensor(steps, dtype=torch.float64)), torch.ones(len(steps),
                                                                                          dtype=torch.float64)], 1)
    fit = torch.linalg.lstsq(design, torch.log(torch.tensor(errors, dtype=torch.float64))[:, None]).solution
    return -float(fit[0])


def test_euler_maruyama_has_weak_order_one():
    """Gaussian data under VP with the exact score: the errors of the sample mean and variance
    halve when the step count doubles (2^20 samples: standard error ~5e-4, errors ~1e-2)."""
    sde = dk.VPSDE()
    mu, s = 1.0, 0.5
    eps = 1e-3
    target_mean = float(sde.mean_coef(eps)) * mu
    target_var = float(sde.mean_coef(eps) ** 2 * s ** 2 + sde.marginal_std(eps) ** 2)
    steps = [16, 32, 64]
    mean_err, var_err = [], []
    for n in steps:
        x = dk.sample_euler_maruyama(gaussian_score(sde, mu, s), (1 << 20, 1), sde, n, denoise=False, seed=n,
                                     dtype=torch.float64)
        mean_err.append(abs(x.mean().item() - target_mean))
        var_err.append(abs(x.var().item() - target_var))
    assert 0.7 < convergence_order(steps, mean_err) < 1.4, mean_err  # measured ~1.05
    assert 0.7 < convergence_order(steps, var_err) < 1.6, var_err    # measured ~1.25


def pf_ode_affine_map(sde, score, solver, steps):
    """The PF-ODE solve is affine in x_T for Gaussian data: x_0 = A x_T + B, read off two runs."""
    kwargs = dict(solver=solver, dtype=torch.float64)
    b = dk.sample_ode(score, (1, 1), sde, steps, x_T=torch.zeros(1, 1, dtype=torch.float64), **kwargs)
    a = dk.sample_ode(score, (1, 1), sde, steps, x_T=torch.ones(1, 1, dtype=torch.float64), **kwargs) - b
    return float(a), float(b)


@pytest.mark.parametrize("name", ["vp", "ve"])
def test_heun_is_second_order_and_euler_first_on_the_pf_ode(name):
    """Exact solution for Gaussian data: x_eps = m(eps) mu + sqrt(v(eps) / v(T)) (x_T - m(T) mu) with
    v(t) = m(t)^2 s^2 + std(t)^2."""
    sde = SDES[name]
    mu, s, eps = 1.0, 0.5, 1e-3
    score = gaussian_score(sde, mu, s)
    def v(t):
        return (float(sde.mean_coef(t) ** 2 * s ** 2 + sde.marginal_std(t) ** 2))
    exact_a = math.sqrt(v(eps) / v(1.0))
    exact_b = float(sde.mean_coef(eps)) * mu - exact_a * float(sde.mean_coef(1.0)) * mu
    for solver, order in [("euler", 1), ("heun", 2)]:
        errors = []
        for steps in (20, 40, 80):
            a, b = pf_ode_affine_map(sde, score, solver, steps)
            errors.append(abs(a - exact_a) / exact_a + abs(b - exact_b))
        rates = [math.log2(errors[0] / errors[1]), math.log2(errors[1] / errors[2])]
        assert all(order - 0.35 < r < order + 0.5 for r in rates), (solver, errors, rates)


def mixture_moments(samples, mix):
    labels = mix.assign(samples.flatten())
    x = samples.flatten().double()
    return [((labels == k).double().mean().item(), x[labels == k].mean().item(), x[labels == k].std().item())
            for k in range(len(mix.w))]


def assert_mixture(samples, mix, allowance):
    """Weights, means and stds of each mode within 5 standard errors plus an allowance (for the
    discretisation and for the tails of each mode that cross the split point)."""
    n = samples.numel()
    for k, (w, m, s) in enumerate(mixture_moments(samples, mix)):
        wk, mk, sk = float(mix.w[k]), float(mix.mu[k]), float(mix.s[k])
        nk = wk * n
        assert abs(w - wk) < 5 * math.sqrt(wk * (1 - wk) / n) + allowance, (k, w, wk)
        assert abs(m - mk) < 5 * sk / math.sqrt(nk) + allowance, (k, m, mk)
        assert abs(s - sk) < 5 * sk / math.sqrt(2 * nk) + allowance, (k, s, sk)


MIXTURE = GaussianMixture1d([0.3, 0.7], [-2.0, 2.0], [0.4, 0.6])


@pytest.mark.parametrize("name", list(SDES))
def test_euler_maruyama_samples_a_gaussian_mixture(name):
    sde = SDES[name]
    samples = dk.sample_euler_maruyama(MIXTURE.sde_score(sde), (1 << 15, 1), sde, 500, seed=11)
    assert_mixture(samples, MIXTURE, allowance=0.02)


@pytest.mark.parametrize("name", list(SDES))
def test_pc_samples_a_gaussian_mixture(name):
    sde = SDES[name]
    samples = dk.sample_pc(MIXTURE.sde_score(sde), (1 << 15, 1), sde, 250, seed=12)
    assert_mixture(samples, MIXTURE, allowance=0.03)


def test_heun_samples_a_gaussian_mixture():
    samples = dk.sample_heun(MIXTURE.denoiser, (1 << 15, 1), dk.karras_sigmas(40, 0.002, 80.0), seed=13,
                             s_churn=10.0, s_tmin=0.05, s_tmax=20.0)
    assert_mixture(samples, MIXTURE, allowance=0.02)


def test_annealed_langevin_samples_a_gaussian_mixture():
    sigmas = torch.logspace(math.log10(20.0), math.log10(0.01), 10, dtype=torch.float64)
    samples = dk.sample_langevin(MIXTURE.sigma_score, (1 << 15, 1), sigmas, 100, step_size=2e-5, seed=14)
    assert_mixture(samples, MIXTURE, allowance=0.03)


# ---- bad inputs ----

def test_bad_inputs():
    sde = dk.VPSDE()
    x = torch.zeros(3, 4)
    with pytest.raises(ValueError, match=r"\(0, 1"):
        dk.euler_maruyama_step(x, x, 1.5, -0.01, sde, seed=0, step=0)
    with pytest.raises(ValueError, match=r"\(0, 1"):
        dk.euler_maruyama_step(x, x, torch.tensor([0.5, 0.0, 0.2]), -0.01, sde, seed=0, step=0)
    with pytest.raises(ValueError, match="step="):
        dk.euler_maruyama_step(x, x, 0.5, -0.01, sde, seed=0)
    with pytest.raises(ValueError, match="shape"):
        dk.euler_maruyama_step(torch.zeros(3, 5), x, 0.5, -0.01, sde, seed=0, step=0)
    with pytest.raises(ValueError, match="decreasing"):
        dk.sample_heun(MIX.denoiser, (4, 1), [1.0, 2.0, 0.0])
    with pytest.raises(ValueError, match="non-negative"):
        dk.sample_euler(MIX.denoiser, (4, 1), [1.0, -0.5])
    with pytest.raises(ValueError, match="positive noise levels"):
        dk.sample_langevin(MIX.sigma_score, (4, 1), [1.0, 0.0])
    with pytest.raises(ValueError, match="solver"):
        dk.sample_ode(lambda x, t: x, (4, 1), sde, 10, solver="rk45")
    with pytest.raises(ValueError, match="parameterization"):
        dk.sample_euler_maruyama(lambda x, t: x, (4, 1), sde, 10, parameterization="v")
    with pytest.raises(ValueError, match="shape"):
        dk.sample_euler_maruyama(lambda x, t: torch.zeros(2, 2), (4, 1), sde, 10)
    with pytest.raises(ValueError, match="beta_min"):
        dk.VPSDE(beta_min=5.0, beta_max=1.0)
    with pytest.raises(ValueError, match="sigma_min"):
        dk.karras_sigmas(10, 1.0, 0.5)
