"""Each drop-in scheduler's step against the diffusers class of the same name, at a latent
(1x4x64x64), a batch of latents (16x4x64x64) and pixels (64x3x128x128); and a DDIMPipeline run
with a tiny UNet. Run: pytest benchmarks/test_bench_diffusers.py --benchmark-only"""
import pytest
import torch

diffusers = pytest.importorskip("diffusers")
from bench_common import DEVICES, run  # noqa: E402

import diffkern.diffusers as dkd  # noqa: E402

SHAPES = [(1, 4, 64, 64), (16, 4, 64, 64), (64, 3, 128, 128)]
CONFIGS = {
    "DDPMScheduler": {}, "DDIMScheduler": {}, "EulerDiscreteScheduler": {}, "EulerAncestralDiscreteScheduler": {},
    "HeunDiscreteScheduler": {}, "DPMSolverMultistepScheduler": {"solver_order": 3},
    "UniPCMultistepScheduler": {"solver_order": 3}, "FlowMatchEulerDiscreteScheduler": {}, "LCMScheduler": {},
}


STOCHASTIC = ("DDPMScheduler", "EulerAncestralDiscreteScheduler", "LCMScheduler")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", SHAPES, ids=["x".join(map(str, s)) for s in SHAPES])
@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("impl", ["diffusers", "diffkern", "diffkern-stream", "copy"])
def test_step(benchmark, impl, name, shape, device):
    """diffkern with a generator draws diffusers' noise with torch.randn (the same images);
    diffkern-stream passes no generator and draws in the kernel (the stochastic schedulers only);
    copy is a tensor copy of x for scale (its GB/s is what memory allows)."""
    if impl == "diffkern-stream" and name not in STOCHASTIC:
        pytest.skip("deterministic scheduler: no noise to draw")
    shape_label = "x".join(map(str, shape))
    group = f"{name} step {shape_label} on {device}"
    if impl == "copy":
        src = torch.randn(shape, device=device)
        dst = torch.empty_like(src)
        run(benchmark, lambda: dst.copy_(src), group=group, name=impl, nbytes=2 * src.numel() * 4, device=device)
        return
    module = diffusers if impl == "diffusers" else dkd
    sch = getattr(module, name)(**CONFIGS[name])
    sch.set_timesteps(50, device=device)
    x = torch.randn(shape, generator=torch.Generator().manual_seed(0)).to(device)
    m = torch.randn(shape, generator=torch.Generator().manual_seed(1)).to(device)
    generator = torch.Generator(device).manual_seed(2)
    takes_generator = name in STOCHASTIC and impl != "diffkern-stream"
    timesteps = sch.timesteps
    middle = len(timesteps) // 2
    # warm up into the middle of the schedule (multistep solvers at full order), then time one step
    # there again and again: the state is restored before each call
    for t in timesteps[:middle]:
        x = sch.step(m, t, x, **({"generator": generator} if takes_generator else {})).prev_sample
    state = dict(sch.__dict__)
    state_lists = {k: list(v) for k, v in state.items() if isinstance(v, list)}

    def step():
        sch.__dict__.update(state)
        sch.__dict__.update({k: list(v) for k, v in state_lists.items()})
        kwargs = {"generator": generator} if takes_generator else {}
        return sch.step(m, timesteps[middle], x, **kwargs).prev_sample

    # bytes a memory-bound step must move: read x and the model output, write the result
    run(benchmark, step, group=group, name=impl, nbytes=3 * x.numel() * 4,
        device=device)


@pytest.mark.parametrize("impl", ["diffusers", "diffkern"])
def test_ddim_pipeline(benchmark, impl):
    benchmark.group = "DDIMPipeline tiny UNet 4x3x32x32, 20 steps"
    torch.manual_seed(0)
    unet = diffusers.UNet2DModel(sample_size=32, in_channels=3, out_channels=3, layers_per_block=1,
                                 block_out_channels=(16, 32), down_block_types=("DownBlock2D", "DownBlock2D"),
                                 up_block_types=("UpBlock2D", "UpBlock2D"), norm_num_groups=8).eval()
    pipe = diffusers.DDIMPipeline(unet=unet, scheduler=diffusers.DDIMScheduler())
    module = diffusers if impl == "diffusers" else dkd
    pipe.scheduler = module.DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    benchmark.pedantic(lambda: pipe(batch_size=4, num_inference_steps=20, output_type="np",
                                    generator=torch.Generator().manual_seed(0)), rounds=5, iterations=1)
