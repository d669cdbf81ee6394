"""One DDPM step: diffkern's fused kernel against the same step in eager PyTorch, under
torch.compile (both with torch.randn), and diffusers' DDPMScheduler.step; torch.randn alone,
dk.randn plus a copy, and a copy for scale. Shapes from 1 feature per sample to images."""
import pytest
import torch
from bench_common import DEVICES, run

import diffkern as dk

try:
    from diffusers import DDPMScheduler
except ImportError:  # optional peer
    DDPMScheduler = None

# Few features per sample (2-d toy data, tabular and 1-d models, many-sample runs) as well as images.
SHAPES = [(4096, 1), (4096, 2), (65536, 2), (1048576, 1), (4096, 16), (16, 3, 32, 32), (64, 3, 128, 128)]
CASES = [(d, s) for d in DEVICES for s in SHAPES]
# On a GPU the shapes above are bound by launch and host overhead (a copy of 64x3x128x128 takes about
# as long as an empty launch); 600 MB of traffic shows what the kernel does against memory bandwidth.
CASES += [("cuda", (256, 3, 256, 256))] if "cuda" in DEVICES else []
IMPLS = ["diffkern (in-kernel noise)", "diffkern (noise given)", "eager", "torch.compile", "diffusers",
         "torch.randn alone", "dk.randn + copy", "copy"]
T = 500


def step_formula(x, m, noise, a: float, b: float, c: float, d: float, sigma: float):
    """The epsilon-prediction DDPM step as one writes it in PyTorch (clip_sample on)."""
    x0 = (a * x + b * m).clamp(-1, 1)
    return c * x0 + d * x + sigma * noise


_compiled_formula = None


def coefficients_at(sched, t):
    ab, ab_prev = float(sched.alphas_cumprod[t]), float(sched.alphas_cumprod[t - 1])
    beta = 1 - ab / ab_prev
    return dict(a=ab ** -0.5, b=-((1 - ab) / ab) ** 0.5, c=ab_prev ** 0.5 * beta / (1 - ab),
                d=(ab / ab_prev) ** 0.5 * (1 - ab_prev) / (1 - ab), sigma=((1 - ab_prev) / (1 - ab) * beta) ** 0.5)


def label(shape):
    return "x".join(map(str, shape))


@pytest.mark.parametrize("device,shape", CASES, ids=[f"{d}-{label(s)}" for d, s in CASES])
@pytest.mark.parametrize("impl", IMPLS)
def test_ddpm_step(benchmark, device, shape, impl):
    global _compiled_formula
    sched = dk.DDPMSchedule()
    gen = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(shape, device=device, generator=gen)
    m = torch.randn(shape, device=device, generator=gen)
    noise = torch.randn(shape, device=device, generator=gen)
    coef = coefficients_at(sched, T)
    if impl == "diffkern (in-kernel noise)":
        fn = lambda: dk.ddpm_step(m, T, x, sched, seed=0, clip_sample=True)  # noqa: E731
    elif impl == "diffkern (noise given)":
        fn = lambda: dk.ddpm_step(m, T, x, sched, noise=noise, clip_sample=True)  # noqa: E731
    elif impl == "eager":
        fn = lambda: step_formula(x, m, torch.randn_like(x), **coef)  # noqa: E731
    elif impl == "torch.compile":
        if _compiled_formula is None:
            _compiled_formula = torch.compile(step_formula)
        fn = lambda: _compiled_formula(x, m, torch.randn_like(x), **coef)  # noqa: E731
    elif impl == "diffusers":
        if DDPMScheduler is None:
            pytest.skip("diffusers is not installed")
        scheduler = DDPMScheduler(clip_sample=True)
        fn = lambda: scheduler.step(m, T, x).prev_sample  # noqa: E731
    elif impl == "torch.randn alone":
        fn = lambda: torch.randn(shape, device=device)  # noqa: E731
    elif impl == "dk.randn + copy":  # the floor of a step that draws its noise: the noise and one pass
        dst = torch.empty_like(x)
        fn = lambda: dst.copy_(dk.randn(shape, seed=0, step=1, device=device))  # noqa: E731
    else:
        dst = torch.empty_like(x)
        fn = lambda: dst.copy_(x)  # noqa: E731
    # bytes a fused step must move: read x and the model output, write x_prev
    nbytes = 3 * x.numel() * x.element_size() if impl != "copy" else 2 * x.numel() * x.element_size()
    run(benchmark, fn, group=f"ddpm_step float32 {label(shape)} on {device}", name=impl, nbytes=nbytes,
        device=device)
