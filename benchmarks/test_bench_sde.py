"""Score-SDE / EDM / Langevin updates: diffkern's fused kernel against the same update in eager
PyTorch and under torch.compile (with torch.randn for noisy updates), and the Euler / Heun steps
against diffusers' EulerDiscreteScheduler / HeunDiscreteScheduler."""
import math

import pytest
import torch
from bench_common import DEVICES, run

import diffkern as dk

try:
    from diffusers import EulerDiscreteScheduler, HeunDiscreteScheduler
except ImportError:  # optional peer
    EulerDiscreteScheduler = HeunDiscreteScheduler = None

SHAPE = (64, 3, 128, 128)
SDE = dk.VPSDE()
T, DT = 0.5, -1e-3
F, G = float(SDE.drift_coef(T)), float(SDE.diffusion(T))
SIGMA, SIGMA_NEXT = 2.0, 1.6
SD, SU = (float(v) for v in dk.coefficients.ancestral_step(SIGMA, SIGMA_NEXT))
STEP_SIZE = 1e-3


# The updates as one writes them in PyTorch (x, m: state and model output; d: the first model output
# of a Heun step; z: noise).
def em(x, m, z):
    return x + (F * x - G ** 2 * m) * DT + G * math.sqrt(-DT) * z


def ode_euler(x, m):
    return x + (F * x - 0.5 * G ** 2 * m) * DT


def edm_euler(x, m):
    d = (x - m) / SIGMA
    return x + d * (SIGMA_NEXT - SIGMA), d


def heun_correct(x, m, d):
    """Heun's step from x, the first denoiser output d and the second one m."""
    h = SIGMA_NEXT - SIGMA
    slope = (x - d) / SIGMA
    return x + (slope + (x + h * slope - m) / SIGMA_NEXT) / 2 * h


def euler_ancestral(x, m, z):
    return x + (x - m) / SIGMA * (SD - SIGMA) + SU * z


def langevin(x, m, z):
    return x + 0.5 * STEP_SIZE * m + math.sqrt(STEP_SIZE) * z


UPDATES = {  # name: (eager formula, needs noise, needs slope, diffkern call)
    "euler_maruyama": (em, True, False, lambda x, m, d: dk.euler_maruyama_step(m, x, T, DT, SDE, seed=0, step=1)),
    "ode_euler": (ode_euler, False, False, lambda x, m, d: dk.euler_maruyama_step(m, x, T, DT, SDE, ode=True)),
    "edm_euler+slope": (edm_euler, False, False,
                        lambda x, m, d: dk.euler_step(m, x, SIGMA, SIGMA_NEXT, return_slope=True)),
    "heun_correct": (heun_correct, False, True, lambda x, m, d: dk.heun_correct(m, x, d, SIGMA, SIGMA_NEXT)),
    "euler_ancestral": (euler_ancestral, True, False,
                        lambda x, m, d: dk.euler_ancestral_step(m, x, SIGMA, SIGMA_NEXT, seed=0, step=1)),
    "langevin": (langevin, True, False, lambda x, m, d: dk.langevin_step(m, x, STEP_SIZE, seed=0, step=1)),
}
_compiled = {}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("update", list(UPDATES))
@pytest.mark.parametrize("impl", ["diffkern", "eager", "torch.compile", "copy"])
def test_update(benchmark, device, update, impl):
    formula, noisy, sloped, fused = UPDATES[update]
    gen = torch.Generator(device=device).manual_seed(0)
    x, m, d = (torch.randn(SHAPE, device=device, generator=gen) for _ in range(3))
    if impl == "diffkern":
        fn = lambda: fused(x, m, d)  # noqa: E731
    elif impl in ("eager", "torch.compile"):
        f = formula
        if impl == "torch.compile":
            f = _compiled.setdefault(update, torch.compile(formula))
        args = (lambda: (x, m, d)) if sloped else (lambda: (x, m))
        fn = (lambda: f(x, m, torch.randn_like(x))) if noisy else (lambda: f(*args()))  # noqa: E731
    else:
        dst = torch.empty_like(x)
        fn = lambda: dst.copy_(x)  # noqa: E731
    reads = 3 if sloped else 2
    writes = 2 if update == "edm_euler+slope" else 1
    nbytes = (reads + writes if impl != "copy" else 2) * x.numel() * x.element_size()
    run(benchmark, fn, group=f"{update} float32 {'x'.join(map(str, SHAPE))} on {device}", name=impl, nbytes=nbytes,
        device=device)


def _diffusers_scheduler(cls, device):
    """A diffusers scheduler over 50 timesteps, its sigmas on device, and the timestep benchmarked."""
    if cls is None:
        pytest.skip("diffusers is not installed")
    scheduler = cls(prediction_type="sample")
    scheduler.set_timesteps(50)
    scheduler.sigmas = scheduler.sigmas.to(device)
    return scheduler, scheduler.timesteps[10]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("impl", ["diffkern", "diffusers"])
def test_heun_step(benchmark, device, impl):
    """A whole Heun step without its two model calls: diffkern's predictor and corrector launches
    against the first- and second-order calls of diffusers' HeunDiscreteScheduler.step."""
    gen = torch.Generator(device=device).manual_seed(0)
    x, d1, d2 = (torch.randn(SHAPE, device=device, generator=gen) for _ in range(3))
    if impl == "diffkern":
        def fn():
            dk.euler_step(d1, x, SIGMA, SIGMA_NEXT)  # the predicted point, input of the second model call
            return dk.heun_correct(d2, x, d1, SIGMA, SIGMA_NEXT)
    else:
        scheduler, t = _diffusers_scheduler(HeunDiscreteScheduler, device)

        def fn():
            scheduler._step_index, scheduler.dt, scheduler.prev_derivative, scheduler.sample = 10, None, None, None
            x_pred = scheduler.step(d1, t, x).prev_sample
            return scheduler.step(d2, t, x_pred).prev_sample
    run(benchmark, fn, group=f"heun step float32 {'x'.join(map(str, SHAPE))} on {device}", name=impl,
        nbytes=7 * x.numel() * x.element_size(), device=device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("impl", ["diffkern", "diffusers"])
def test_euler_step(benchmark, device, impl):
    gen = torch.Generator(device=device).manual_seed(0)
    x, denoised = (torch.randn(SHAPE, device=device, generator=gen) for _ in range(2))
    if impl == "diffkern":
        fn = lambda: dk.euler_step(denoised, x, SIGMA, SIGMA_NEXT)  # noqa: E731
    else:
        scheduler, t = _diffusers_scheduler(EulerDiscreteScheduler, device)

        def fn():
            scheduler._step_index = 10
            return scheduler.step(denoised, t, x).prev_sample
    run(benchmark, fn, group=f"euler step float32 {'x'.join(map(str, SHAPE))} on {device}", name=impl,
        nbytes=3 * x.numel() * x.element_size(), device=device)
