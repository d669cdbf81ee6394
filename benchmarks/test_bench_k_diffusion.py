"""diffkern.k_diffusion against k-diffusion's own functions (0.1.1's sampling.py, as the tests load it):
30-step loops with a denoiser of one elementwise pass (x / 2), so that the sampler's own cost shows,
beside a copy of the same bytes. Each noisy sampler runs with its default noise (torch's global
generator or the Brownian tree, both as k-diffusion) and with diffkern's stream (``seed=``); the per-step
cost is the loop's time over 30.
"""
import os
import sys

import pytest
import torch
from bench_common import DEVICES, run

import diffkern.k_diffusion as K

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests"))
from kdiffusion_peer import load  # noqa: E402

KP, WHY = load()
STEPS = 30
SAMPLERS = ["sample_euler", "sample_euler_ancestral", "sample_heun", "sample_dpm_2", "sample_dpm_2_ancestral",
            "sample_lms", "sample_dpmpp_2s_ancestral", "sample_dpmpp_sde", "sample_dpmpp_2m", "sample_dpmpp_2m_sde",
            "sample_dpmpp_3m_sde"]
NOISY = {"sample_euler_ancestral", "sample_dpm_2_ancestral", "sample_dpmpp_2s_ancestral", "sample_dpmpp_sde",
         "sample_dpmpp_2m_sde", "sample_dpmpp_3m_sde"}
BROWNIAN = {"sample_dpmpp_sde", "sample_dpmpp_2m_sde", "sample_dpmpp_3m_sde"}
SHAPES = [(1, 4, 64, 64), (16, 4, 64, 64), (64, 3, 128, 128)]
CASES = [(d, s, name) for d in DEVICES for s in SHAPES for name in SAMPLERS
         # the largest shape for a few samplers only (the Brownian tree alone takes seconds a loop there)
         if s != SHAPES[2] or name in ("sample_euler", "sample_euler_ancestral", "sample_dpmpp_2m", "sample_heun")]
IMPLS = ["diffkern", "diffkern (stream noise)", "k-diffusion", "copy"]


def half(x, sigma):
    return x * 0.5


def label(shape):
    return "x".join(map(str, shape))


@pytest.mark.parametrize("device,shape,name", CASES, ids=[f"{d}-{label(s)}-{n[7:]}" for d, s, n in CASES])
@pytest.mark.parametrize("impl", IMPLS)
def test_k_diffusion_loop(benchmark, device, shape, name, impl):
    if impl == "k-diffusion" and KP is None:
        pytest.skip(WHY)
    if impl == "diffkern (stream noise)" and name not in NOISY:
        pytest.skip("no noise to draw")
    gen = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(shape, device=device, generator=gen) * 14.6
    sigmas = K.get_sigmas_karras(STEPS, 0.03, 14.6, device=device)
    if impl == "copy":
        dst = torch.empty_like(x)
        fn = lambda: dst.copy_(x)  # noqa: E731
    else:
        module = KP if impl == "k-diffusion" else K
        extra = {"seed": 0} if impl == "diffkern (stream noise)" else {}
        fn = lambda: getattr(module, name)(half, x, sigmas, disable=True, **extra)  # noqa: E731
    if name in BROWNIAN and impl in ("diffkern", "k-diffusion") and shape != SHAPES[0]:
        benchmark.extra_info["note"] = "Brownian tree (torchsde)"
    run(benchmark, fn, group=f"k-diffusion {name[7:]} x{STEPS} steps, float32 {label(shape)} on {device}", name=impl,
        nbytes=2 * x.numel() * x.element_size(), device=device)
