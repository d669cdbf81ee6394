"""`generate` on the built-in ring mixture (1000-step DDPM, 4096 samples, one thread per process):
the sharded run in this process against plain dk.sample_ddpm calls over the same batches (one of
4096, or 16 of 256: the cost of shard writes, fsyncs, verification and the merge), and 1 against 2
processes under torchrun
(wall time of the whole command, start-up of the processes included; samples/s of the sampling
itself in extra_info, from the manifest)."""
import json
import os
import subprocess
import sys
import tempfile

import pytest
import torch

import diffkern as dk
from diffkern import distributed
from diffkern.models import mixture_model

N, BATCH, STEPS = 4096, 256, 1000
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(autouse=True)
def _one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.mark.parametrize("impl", ["dk.sample_ddpm", "distributed.generate", f"dk.sample_ddpm, batches of {BATCH}",
                                  f"distributed.generate, batches of {BATCH}"])
def test_sharding_overhead(benchmark, impl):
    benchmark.group = f"generate ring DDPM {STEPS} steps, {N} samples, 1 process, 1 thread"
    model = mixture_model()
    sched = dk.DDPMSchedule()
    if impl.startswith("dk.sample_ddpm"):
        size = N if impl == "dk.sample_ddpm" else BATCH
        benchmark.pedantic(lambda: [dk.sample_ddpm(model, (size, 2), sched, num_inference_steps=STEPS, seed=0,
                                                   sample_offset=start) for start in range(0, N, size)],
                           rounds=3, iterations=1)
        return

    def run():
        with tempfile.TemporaryDirectory() as out:
            distributed.generate(model, sampler=distributed.make_sampler("ddpm", steps=STEPS), num_samples=N,
                                 shape=(2,), batch_size=N if impl == "distributed.generate" else BATCH, seed=0,
                                 out=out, progress=False)

    benchmark.pedantic(run, rounds=3, iterations=1)


@pytest.mark.parametrize("nproc", [1, 2])
def test_torchrun(benchmark, nproc):
    benchmark.group = f"generate ring DDPM {STEPS} steps, {N} samples, batches of {BATCH}, torchrun"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT)
    manifests = []

    def run():
        with tempfile.TemporaryDirectory() as out:
            command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
                       "-m", "diffkern", "generate", "--model", "diffkern.models:mixture_model", "--sampler", "ddpm",
                       "--steps", str(STEPS), "--num-samples", str(N), "--shape", "2", "--batch-size", str(BATCH),
                       "--no-progress", "--device", "cpu", "--out", out]
            subprocess.run(command, check=True, capture_output=True, env=env)
            manifests.append(json.load(open(os.path.join(out, "manifest.json"))))

    benchmark.pedantic(run, rounds=2, iterations=1)
    benchmark.extra_info["samples_per_s_inside"] = [m["samples_per_s"] for m in manifests]
