"""Whole 50-step loops compiled as one graph, per step: DDIM and DPM-Solver++ (2M) with an identity
model at 1x4x64x64 and 64x2, six ways side by side in one benchmark (interleaved rounds, since this
machine's speed drifts):

- diffkern eager: dk.sample_ddim / dk.sample_dpmpp;
- diffkern compiled: the same run through dk.capture (torch.compile(fullgraph=True); on CUDA
  mode="reduce-overhead", a CUDA graph);
- drop-in eager / compiled: a loop of diffkern.diffusers' scheduler.step calls, eager and compiled
  with fullgraph=True;
- diffusers eager / compiled: the same loop with diffusers' own scheduler, eager and under
  torch.compile (diffusers' step breaks the graph, so no fullgraph: dynamo's default).

The compiled ways are compiled (and warmed) before the timed rounds; "per step" is a round's time
over 50. The identity model costs nothing, so this is the loop's own cost.
"""
import functools

import pytest
import torch
from bench_common import DEVICES, interleaved

import diffkern as dk

STEPS = 50
SHAPES = [(1, 4, 64, 64), (64, 2)]


def identity(x, t):
    return x


def _drop_in_loop(scheduler, x):
    for t in scheduler.timesteps:
        x = scheduler.step(identity(x, t), t, x).prev_sample
    return x


def _diffusers_loop(scheduler, x):
    # the same loop as another code object: dynamo keeps its traces (and limits them) per code object,
    # and diffusers' graph breaks retrace this one at every step
    for t in scheduler.timesteps:
        x = scheduler.step(identity(x, t), t, x).prev_sample
    return x


def _loop(scheduler, device, body):
    loop = functools.partial(body, scheduler)

    def run(x, compiled=None):
        scheduler.set_timesteps(STEPS, device=device)
        return (compiled or loop)(x)
    return loop, run


def _ways(sampler: str, shape, device):
    diffusers = pytest.importorskip("diffusers")
    import diffkern.diffusers as D

    sched = dk.DDPMSchedule()
    if sampler == "DDIM":
        run = functools.partial(dk.sample_ddim, sched=sched, num_inference_steps=STEPS)
        kind = "DDIMScheduler"
    else:
        run = functools.partial(dk.sample_dpmpp, sched=sched, num_steps=STEPS)
        kind = "DPMSolverMultistepScheduler"
    captured = dk.capture(run, identity, shape, device=device)
    x = dk.randn(shape, seed=0, device=device)
    ways = {"diffkern eager": lambda: run(identity, shape, seed=0, device=device),
            "diffkern compiled": lambda: captured(0)}
    for label, scheduler, body, fullgraph in (("drop-in", getattr(D, kind)(), _drop_in_loop, True),
                                              ("diffusers", getattr(diffusers, kind)(), _diffusers_loop, False)):
        loop, step_loop = _loop(scheduler, device, body)
        compiled = torch.compile(loop, fullgraph=fullgraph)
        ways[f"{label} eager"] = functools.partial(step_loop, x)
        ways[f"{label} compiled"] = functools.partial(step_loop, x, compiled)
    for fn in ways.values():  # compile and warm every way before the timed rounds
        fn()
    return ways


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", SHAPES, ids=["x".join(map(str, s)) for s in SHAPES])
@pytest.mark.parametrize("sampler", ["DDIM", "DPM-Solver++"])
def test_compiled_loop(benchmark, sampler, shape, device):
    """One benchmark round runs every way once, in an order that rotates from round to round."""
    torch._dynamo.reset()
    one_round, times = interleaved(_ways(sampler, shape, device), device, per=STEPS)

    benchmark.group = f"{STEPS}-step {sampler} loop per step, identity model, {'x'.join(map(str, shape))} on {device}"
    benchmark.name = "all ways, interleaved"
    numel = 1
    for size in shape:
        numel *= size
    benchmark.extra_info.update(nbytes=3 * numel * 4 * STEPS, device=device, label="all ways, interleaved (per step)",
                                ways_s=times)
    with torch.no_grad():
        benchmark.pedantic(one_round, rounds=7, warmup_rounds=1)
