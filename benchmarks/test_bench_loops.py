"""Whole sampling loops with a tiny MLP, where the step's overhead shows: diffkern's samplers against
the same loop written with diffusers' scheduler (DDPM) or k-diffusion-style PyTorch (Euler-Maruyama,
EDM Heun), and against the model alone (the same number of calls), at batch 256 and 4096 on 2-d and
64-d data. Time outside the model = loop - model alone."""
import math

import pytest
import torch

import diffkern as dk

try:
    from diffusers import DDPMScheduler
except ImportError:  # optional peer
    DDPMScheduler = None

CASES = [(b, d) for d in (2, 64) for b in (256, 4096)]
IDS = [f"{b}x{d}" for b, d in CASES]


class TinyMLP(torch.nn.Module):
    """x and a time feature -> 128 -> 128 -> x's size, SiLU (a 2-d toy-data denoiser)."""

    def __init__(self, features):
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(features + 1, 128), torch.nn.SiLU(), torch.nn.Linear(128, 128),
                                       torch.nn.SiLU(), torch.nn.Linear(128, features))

    def forward(self, x, t):
        return self.net(torch.cat([x, t.to(x.dtype).reshape(-1, 1) / 1000], dim=1))


@pytest.fixture(autouse=True)
def _flush_denormals():
    """An untrained model drives the states to ~1e3, where SiLU produces denormals and the model
    itself slows down by up to 1.8x on this CPU; that would be charged to the loop around it. With
    denormals flushed the model costs the same on every input, so loop - model alone is the loop."""
    previous = torch.set_flush_denormal(True)
    yield
    torch.set_flush_denormal(False) if previous else None


def _model(features):
    torch.manual_seed(0)
    return TinyMLP(features).eval().requires_grad_(False)


def _bench(benchmark, fn, group, name, nbytes):
    benchmark.group, benchmark.name = group, name
    benchmark.extra_info.update(nbytes=nbytes, device="cpu", label=name)
    return benchmark.pedantic(fn, rounds=3, warmup_rounds=1)


@pytest.mark.parametrize("batch,features", CASES, ids=IDS)
@pytest.mark.parametrize("impl", ["diffkern", "diffusers", "model alone"])
def test_ddpm_loop(benchmark, batch, features, impl):
    """1000-step ancestral DDPM."""
    model, shape = _model(features), (batch, features)
    if impl == "diffkern":
        fn = lambda: dk.sample_ddpm(model, shape, seed=0)  # noqa: E731
    elif impl == "diffusers":
        if DDPMScheduler is None:
            pytest.skip("diffusers is not installed")
        scheduler = DDPMScheduler()

        def fn():
            scheduler.set_timesteps(1000)
            x = torch.randn(shape, generator=torch.Generator().manual_seed(0))
            for t in scheduler.timesteps:
                x = scheduler.step(model(x, t.expand(batch)), t, x).prev_sample
            return x
    else:
        x, timesteps = torch.randn(shape), torch.arange(999, -1, -1)

        def fn():
            for t in timesteps:
                model(x, t.expand(batch))
    _bench(benchmark, fn, f"1000-step DDPM loop {batch}x{features}", impl, 3 * 1000 * batch * features * 4)


def _vp_em_torch(model, shape, steps, sde, eps=1e-3):
    """Euler-Maruyama on the reverse VP-SDE as a k-diffusion-style PyTorch loop (eps-model)."""
    x = torch.randn(shape)
    t = torch.linspace(sde.T, eps, steps + 1, dtype=torch.float64)
    for i in range(steps):
        ti, dt = float(t[i]), float(t[i + 1] - t[i])
        beta = sde.beta_min + ti * (sde.beta_max - sde.beta_min)
        std = math.sqrt(-math.expm1(-0.5 * ti ** 2 * (sde.beta_max - sde.beta_min) - ti * sde.beta_min))
        score = -model(x, torch.full((shape[0],), ti * 999)) / std
        x = x + (-0.5 * beta * x - beta * score) * dt + math.sqrt(beta * -dt) * torch.randn_like(x)
    return x


@pytest.mark.parametrize("batch,features", CASES, ids=IDS)
@pytest.mark.parametrize("impl", ["diffkern", "pytorch loop", "model alone"])
def test_euler_maruyama_loop(benchmark, batch, features, impl):
    """1000-step Euler-Maruyama on the VP-SDE with a noise-prediction model."""
    model, shape, sde = _model(features), (batch, features), dk.VPSDE()
    time_model = (lambda x, t: model(x, t * 999))  # noqa: E731
    if impl == "diffkern":
        fn = lambda: dk.sample_euler_maruyama(time_model, shape, sde, 1000, parameterization="epsilon")  # noqa: E731
    elif impl == "pytorch loop":
        fn = lambda: _vp_em_torch(model, shape, 1000, sde)  # noqa: E731
    else:
        x, t = torch.randn(shape), torch.full((batch,), 0.5)

        def fn():
            for _ in range(1000):
                time_model(x, t)
    _bench(benchmark, fn, f"1000-step Euler-Maruyama loop {batch}x{features}", impl, 3 * 1000 * batch * features * 4)


def _heun_torch(denoiser, shape, sigmas):
    """k-diffusion's sample_heun without churn."""
    x = torch.randn(shape) * float(sigmas[0])
    s_in = x.new_ones([shape[0]])
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = float(sigmas[i]), float(sigmas[i + 1])
        denoised = denoiser(x, sigma * s_in)
        d = (x - denoised) / sigma
        dt = sigma_next - sigma
        if sigma_next == 0:
            x = x + d * dt
        else:
            x_2 = x + d * dt
            d_2 = (x_2 - denoiser(x_2, sigma_next * s_in)) / sigma_next
            x = x + (d + d_2) / 2 * dt
    return x


@pytest.mark.parametrize("batch,features", CASES, ids=IDS)
@pytest.mark.parametrize("impl", ["diffkern", "pytorch loop", "model alone"])
def test_heun_loop(benchmark, batch, features, impl):
    """18-step EDM Heun (35 denoiser calls) on Karras sigmas."""
    model, shape = _model(features), (batch, features)
    sigmas = dk.karras_sigmas(18, 0.002, 80.0)
    denoiser = (lambda x, sigma: model(x, sigma))  # noqa: E731
    if impl == "diffkern":
        fn = lambda: dk.sample_heun(denoiser, shape, sigmas)  # noqa: E731
    elif impl == "pytorch loop":
        fn = lambda: _heun_torch(denoiser, shape, sigmas)  # noqa: E731
    else:
        x, s = torch.randn(shape), torch.ones(batch)

        def fn():
            for _ in range(35):
                denoiser(x, s)
    _bench(benchmark, fn, f"18-step Heun loop {batch}x{features}", impl, 7 * 18 * batch * features * 4)
