"""The loop that matters on a GPU: diffusers' UNet2DModel at 32x32 (the DDPM-CIFAR10 configuration,
random weights), 50 DDIM steps, batch 1, 16 and 256, five ways side by side (interleaved rounds):

- diffusers pipeline: DDIMPipeline as shipped (eager UNet, diffusers' scheduler);
- diffusers compiled: the same loop by hand, set_begin_index(0) where the scheduler has it, and
  torch.compile(unet, mode="reduce-overhead");
- diffkern eager: dk.sample_ddim (prev_timestep="stride": diffusers' DDIM steps) with the eager UNet;
- diffkern + compiled UNet: the same with the reduce-overhead UNet;
- diffkern captured: dk.capture of the whole run (UNet and steps, one CUDA graph).

CUDA only (skipped elsewhere); it has not run yet: no GPU was lent to the work that wrote it.
Compilation and capture happen before the timed rounds (the whole-run capture unrolls 50 UNet
calls into one graph: expect minutes of compilation).
"""
import functools

import pytest
import torch
from bench_common import CUDA, interleaved

import diffkern as dk

STEPS = 50


def _unet():
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    return diffusers.UNet2DModel(
        sample_size=32, in_channels=3, out_channels=3, layers_per_block=2, block_out_channels=(128, 256, 256, 256),
        down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D")).to("cuda").eval()


def _ways(batch):
    import diffusers

    unet = _unet()
    compiled_unet = torch.compile(unet, mode="reduce-overhead")
    shape = (batch, 3, 32, 32)
    pipe = diffusers.DDIMPipeline(unet=unet, scheduler=diffusers.DDIMScheduler())
    pipe.set_progress_bar_config(disable=True)
    scheduler = diffusers.DDIMScheduler()

    def diffusers_compiled():
        scheduler.set_timesteps(STEPS, device="cuda")
        if hasattr(scheduler, "set_begin_index"):
            scheduler.set_begin_index(0)
        x = torch.randn(shape, device="cuda")
        for t in scheduler.timesteps:
            x = scheduler.step(compiled_unet(x, t).sample, t, x).prev_sample
        return x

    def eps(model):
        return lambda x, t: model(x, t).sample

    run = functools.partial(dk.sample_ddim, sched=dk.DDPMSchedule(), num_inference_steps=STEPS,
                            timestep_spacing="leading", prev_timestep="stride")
    captured = dk.capture(run, eps(unet), shape, device="cuda")
    ways = {"diffusers pipeline": lambda: pipe(batch_size=batch, num_inference_steps=STEPS, output_type="np"),
            "diffusers compiled": diffusers_compiled,
            "diffkern eager": lambda: run(eps(unet), shape, seed=0, device="cuda"),
            "diffkern + compiled UNet": lambda: run(eps(compiled_unet), shape, seed=0, device="cuda"),
            "diffkern captured": lambda: captured(0)}
    with torch.no_grad():
        for fn in ways.values():  # compile, record and warm every way before the timed rounds
            fn()
            fn()
    return ways


@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU and diffkern's CUDA kernels")
@pytest.mark.parametrize("batch", [1, 16, 256])
def test_unet_ddim_loop_cuda(benchmark, batch):
    one_round, times = interleaved(_ways(batch), "cuda", per=STEPS)
    benchmark.group = f"UNet2DModel 32x32, {STEPS} DDIM steps, batch {batch} on cuda (per step)"
    benchmark.name = "all ways, interleaved"
    benchmark.extra_info.update(nbytes=3 * batch * 3 * 32 * 32 * 4 * STEPS, device="cuda",
                                label="all ways, interleaved (per step)", ways_s=times)
    with torch.no_grad():
        benchmark.pedantic(one_round, rounds=5, warmup_rounds=0)
