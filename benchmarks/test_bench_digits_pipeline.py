"""The whole sampling loop with a trained network: the shipped digits DDPM (a 304k-parameter ConvUNet,
diffkern.training.pretrained) at batch 64 and 256, DDPM 1000 steps and DDIM 50 steps, four ways:
diffkern's sampler, diffusers' own pipeline (DDPMPipeline / DDIMPipeline with the same network and
diffusers' scheduler), a plain PyTorch loop of the same update, and the model alone (the same number of
calls: the floor every loop pays). With a network this size the model is most of the time; the gap
between a loop and "model alone" is what the loop adds.

The ways run interleaved within each benchmark round (see test_digits_sampling_loop); the summary after
the run gives each way's median. In a smoke run (--benchmark-disable) DDPM takes 10 steps instead of
1000, to keep CI short."""
import types

import pytest
import torch
from bench_common import DEVICES, interleaved

import diffkern as dk
from diffkern.training import load_pretrained

try:
    import diffusers
except ImportError:  # optional peer
    diffusers = None

BATCHES = (64, 256)


class AsUNet2DModel(torch.nn.Module):
    """The shipped model as diffusers' pipelines call a UNet2DModel: .config.sample_size and .in_channels,
    .dtype and .device, and an output with .sample."""

    def __init__(self, model, device):
        super().__init__()
        self.model, self._device = model, torch.device(device)
        self.config = types.SimpleNamespace(sample_size=8, in_channels=1)

    @property
    def dtype(self):
        return torch.float32

    @property
    def device(self):
        return self._device

    def forward(self, x, t):
        return types.SimpleNamespace(sample=self.model(x, t))


@pytest.fixture(scope="module", params=DEVICES)
def model(request):
    return load_pretrained("digits-ddpm", device=request.param)


def _device_of(model) -> torch.device:
    return next(model.parameters()).device


def _plain_loop(model, shape, sched, timesteps, ddim: bool):
    """DDPM's ancestral step or DDIM's (eta = 0) step written in PyTorch ops on the schedule's tensors."""
    device = _device_of(model)
    abar = sched.alphas_cumprod.to(device=device, dtype=torch.float32)
    one = torch.ones((), device=device)
    generator = torch.Generator(device).manual_seed(0)
    x = torch.randn(shape, generator=generator, device=device)
    for i, t in enumerate(timesteps):
        prev = timesteps[i + 1] if i + 1 < len(timesteps) else -1
        a_t, a_prev = abar[t], abar[prev] if prev >= 0 else one
        eps = model(x, torch.full((shape[0],), t, device=device))
        x0 = (x - (1 - a_t).sqrt() * eps) / a_t.sqrt()
        if ddim:
            x = a_prev.sqrt() * x0 + (1 - a_prev).sqrt() * eps
        else:
            beta = 1 - a_t / a_prev
            mean = (a_prev.sqrt() * beta * x0 + (1 - beta).sqrt() * (1 - a_prev) * x) / (1 - a_t)
            x = mean + ((1 - a_prev) / (1 - a_t) * beta).sqrt() * torch.randn(shape, generator=generator,
                                                                              device=device) \
                if prev >= 0 else mean
    return x


IMPLS = ("diffkern", "diffusers pipeline", "pytorch loop", "model alone")


def _loops(model, sampler: str, steps: int, batch: int) -> dict:
    """{impl: fn} of the four ways."""
    shape, sched, device = (batch, 1, 8, 8), dk.DDPMSchedule(), _device_of(model)
    function = dk.sample_ddim if sampler == "DDIM" else dk.sample_ddpm
    timesteps = sched.timesteps(steps)
    x = torch.randn(shape, device=device)

    def model_alone():
        for t in timesteps:
            model(x, torch.full((batch,), t, device=device))

    fns = {"diffkern": lambda: function(model, shape, sched, num_inference_steps=steps, seed=0, device=device),
           "pytorch loop": lambda: _plain_loop(model, shape, sched, timesteps, sampler == "DDIM"),
           "model alone": model_alone}
    if diffusers is not None:
        unet = AsUNet2DModel(model, device)
        pipeline = (diffusers.DDIMPipeline(unet=unet, scheduler=diffusers.DDIMScheduler()) if sampler == "DDIM" else
                    diffusers.DDPMPipeline(unet=unet, scheduler=diffusers.DDPMScheduler()))
        pipeline.set_progress_bar_config(disable=True)
        kwargs = {"eta": 0.0} if sampler == "DDIM" else {}
        fns["diffusers pipeline"] = lambda: pipeline(batch_size=batch, num_inference_steps=steps, output_type="np",
                                                     generator=torch.Generator().manual_seed(0), **kwargs)
    return fns


@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("sampler", ["DDPM", "DDIM"])
def test_digits_sampling_loop(benchmark, model, batch, sampler):
    """One benchmark round runs every way once, in an order that rotates from round to round: this
    machine's speed drifts by up to 2x over minutes, which separate benchmarks one after another would
    charge to whichever ran at the slow time. The ways' own times are in extra_info["ways_s"]; the
    summary prints their medians."""
    steps = 50 if sampler == "DDIM" else (10 if benchmark.disabled else 1000)
    fns = _loops(model, sampler, steps, batch)
    device = _device_of(model)
    one_round, times = interleaved(fns, device.type)

    benchmark.group = f"digits {sampler} {steps} steps, batch {batch} on {device.type}"
    benchmark.name = "all ways, interleaved"
    benchmark.extra_info.update(nbytes=3 * steps * batch * 64 * 4, device=device.type, label="all ways, interleaved",
                                ways_s=times)
    with torch.no_grad():
        benchmark.pedantic(one_round, rounds=3, warmup_rounds=0 if sampler == "DDPM" else 1)
