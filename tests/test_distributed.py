"""`python -m diffkern generate / evaluate` under torchrun (gloo, one thread per process): identical
results for any world size and batch size, resume after SIGKILL, corrupt shards regenerated, another
configuration refused, bad input failing fast on every rank, and the Python API."""
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from cli_runner import ROOT, environment, snapshot, torchrun, worker_pids

import diffkern as dk
from diffkern import distributed
from diffkern.models import GaussianMixture, mixture_model

MODEL = ["--model", "diffkern.models:mixture_model"]
GENERATE = ["generate", *MODEL, "--sampler", "ddpm", "--steps", "50", "--num-samples", "60", "--shape", "2",
            "--seed", "3", "--no-progress", "--device", "cpu"]


def _samples(out):
    with np.load(os.path.join(out, "samples.npz")) as f:
        return f["samples"]


def test_generate_is_identical_for_any_world_size_and_batch_size(tmp_path):
    results = {}
    for nproc, batch in ((1, 16), (1, 7), (2, 16), (2, 7), (3, 16), (3, 7)):
        out = str(tmp_path / f"w{nproc}b{batch}")
        run = torchrun(nproc, [*GENERATE, "--batch-size", str(batch), "--out", out])
        assert run.returncode == 0, run.stderr[-3000:]
        results[(nproc, batch)] = _samples(out)
        manifest = json.load(open(os.path.join(out, "manifest.json")))
        assert manifest["world_size"] == nproc and manifest["samples_computed_this_run"] == 60
        assert len(manifest["shards"]) == -(-60 // batch)
    reference = results[(1, 16)]
    assert reference.shape == (60, 2) and np.isfinite(reference).all()
    for key, value in results.items():
        assert np.array_equal(value, reference), key
    # and they are the samples of one dk.sample_ddpm call of all 60
    direct = dk.sample_ddpm(mixture_model(), (60, 2), dk.DDPMSchedule(), num_inference_steps=50, seed=3)
    assert np.array_equal(reference, direct.numpy())


def test_evaluate_is_identical_for_any_world_size_and_batch_size(tmp_path):
    data = GaussianMixture.ring().sample(40, seed=5, dtype=torch.float64).numpy()
    np.save(tmp_path / "data.npy", data)
    args = ["evaluate", "--model", "diffkern.models:mixture_model", "--model-kwargs", '{"output": "score"}',
            "--data", str(tmp_path / "data.npy"), "--steps", "20", "--probes", "2", "--seed", "1", "--no-progress",
            "--device", "cpu"]
    results = {}
    for nproc, batch in ((1, 16), (2, 16), (3, 16), (2, 7), (3, 7)):
        out = str(tmp_path / f"w{nproc}b{batch}")
        run = torchrun(nproc, [*args, "--batch-size", str(batch), "--out", out])
        assert run.returncode == 0, run.stderr[-3000:]
        assert "bits/dim:" in run.stdout
        with np.load(os.path.join(out, "likelihood.npz")) as f:
            results[(nproc, batch)] = (f["log_p"], f["bits_per_dim"])
    # any world size at one batch size: bitwise (the batches, probes and model calls are the same)
    for batch in (16, 7):
        reference = results[(2 if batch == 7 else 1, batch)]
        for (nproc, b), (log_p, bpd) in results.items():
            if b == batch:
                assert np.array_equal(log_p, reference[0]) and np.array_equal(bpd, reference[1]), (nproc, b)
    # across batch sizes the probes are the same (noise by global index) but autograd's Jacobian
    # products through the mixture's batched matmuls round differently in the last bit (measured
    # 4e-16 on the VJP alone, 1.3e-15 on log p)
    np.testing.assert_allclose(results[(2, 7)][0], results[(1, 16)][0], rtol=0, atol=1e-12)
    assert not np.array_equal(results[(1, 16)][0], np.zeros(40))
    # one batch of all 40 (on one of the two ranks) equals dk.log_likelihood on the whole set bitwise
    out = str(tmp_path / "one-batch")
    assert torchrun(2, [*args, "--batch-size", "40", "--out", out]).returncode == 0
    whole = dk.log_likelihood(mixture_model(output="score"), torch.from_numpy(data), dk.VPSDE(), 20, num_probes=2,
                              seed=1)
    with np.load(os.path.join(out, "likelihood.npz")) as f:
        assert np.array_equal(f["log_p"], whole.log_p.numpy())


def test_a_killed_worker_is_restarted_and_the_result_is_unchanged(tmp_path):
    args = ["generate", "--model", "dist_models:slow_mixture", "--sampler", "ddpm", "--steps", "100",
            "--num-samples", "96", "--shape", "2", "--batch-size", "4", "--seed", "8", "--no-progress", "--device",
            "cpu"]
    undisturbed = str(tmp_path / "undisturbed")
    assert torchrun(1, [*args, "--out", undisturbed]).returncode == 0
    out = str(tmp_path / "killed")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "--max-restarts=1",
               "-m", "diffkern", *args, "--out", out]
    agent = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=environment(),
                             cwd=ROOT)
    killed = False
    deadline = time.monotonic() + 120
    shards = os.path.join(out, "shards")
    while agent.poll() is None and time.monotonic() < deadline:
        done = len([n for n in os.listdir(shards) if n.endswith(".npy")]) if os.path.isdir(shards) else 0
        if not killed and done >= 4:
            workers = worker_pids(agent.pid)
            if 1 in workers:
                os.kill(workers[1], signal.SIGKILL)
                killed = True
        time.sleep(0.01)
    stdout, stderr = agent.communicate(timeout=120)
    assert killed, "the run ended before a worker could be killed"
    assert agent.returncode == 0, stderr[-3000:]
    manifest = json.load(open(os.path.join(out, "manifest.json")))
    assert manifest["samples_computed_this_run"] < 96  # the restarted run kept the shards written before the kill
    assert np.array_equal(_samples(out), _samples(undisturbed))


def test_truncated_and_corrupt_shards_are_regenerated(tmp_path):
    out = str(tmp_path / "run")
    assert torchrun(0, [*GENERATE, "--batch-size", "16", "--out", out]).returncode == 0
    before = _samples(out)
    shards = sorted(os.listdir(os.path.join(out, "shards")))
    with open(os.path.join(out, "shards", shards[0]), "r+b") as f:
        f.truncate(40)
    with open(os.path.join(out, "shards", shards[2]), "r+b") as f:
        f.seek(-3, os.SEEK_END)
        byte = f.read(1)
        f.seek(-3, os.SEEK_END)
        f.write(bytes([byte[0] ^ 0x40]))
    run = torchrun(2, [*GENERATE, "--batch-size", "16", "--out", out])
    assert run.returncode == 0, run.stderr[-3000:]
    manifest = json.load(open(os.path.join(out, "manifest.json")))
    assert sorted(manifest["regenerated_corrupt_shards"]) == sorted([shards[0], shards[2]])
    assert manifest["samples_computed_this_run"] == 32
    assert np.array_equal(_samples(out), before)


def test_another_configuration_is_refused_and_nothing_changes(tmp_path):
    out = str(tmp_path / "run")
    assert torchrun(0, [*GENERATE, "--batch-size", "16", "--out", out]).returncode == 0
    before = snapshot(out)
    changed = [a if a != "3" else "4" for a in GENERATE]  # --seed 3 -> 4
    run = torchrun(2, [*changed, "--batch-size", "16", "--out", out])
    assert run.returncode != 0
    assert "another configuration" in run.stderr and "seed: 3 there, 4 now" in run.stderr
    assert snapshot(out) == before
    # the same configuration with another batch size resumes (samples do not depend on it)
    run = torchrun(0, [*GENERATE, "--batch-size", "8", "--out", out])
    assert run.returncode == 0, run.stderr[-3000:]
    assert json.load(open(os.path.join(out, "manifest.json")))["samples_computed_this_run"] == 0


@pytest.mark.parametrize("args,match", [
    (["--sampler", "ddpmx"], "unknown sampler"),
    (["--model", "no_such_module:model"], "cannot import"),
    (["--model", "dist_models:nothing"], "has no attribute"),
    (["--model", "dist_models:NOT_CALLABLE"], "not a model or a factory"),
    (["--model-kwargs", "{oops"], "not JSON"),
    (["--num-samples", "0"], "positive integer"),
    (["--num-samples", "2.5"], "invalid _positive_int"),
    (["--shape", "2,x"], "--shape"),
    (["--dtype", "int8"], "--dtype"),
])
def test_bad_arguments_fail_on_every_rank(tmp_path, args, match):
    argv = list(GENERATE) + ["--batch-size", "4", "--out", str(tmp_path / "run")]
    for flag, value in zip(args[::2], args[1::2]):
        if flag in argv:
            argv[argv.index(flag) + 1] = value
        else:
            argv += [flag, value]
    run = torchrun(2, argv, timeout=120)
    assert run.returncode != 0
    assert run.stderr.count(match) >= 2, run.stderr[-2000:]  # both ranks say it


def test_a_model_of_the_wrong_shape_fails_the_job_without_hanging(tmp_path):
    argv = [a if a != "diffkern.models:mixture_model" else "dist_models:wrong_shape" for a in GENERATE]
    start = time.monotonic()
    run = torchrun(2, [*argv, "--batch-size", "4", "--out", str(tmp_path / "run"), "--timeout", "60"], timeout=150)
    assert run.returncode != 0
    assert "shape" in run.stderr
    assert time.monotonic() - start < 120
    assert not os.path.exists(tmp_path / "run" / "samples.npz")


def test_an_unwritable_folder_is_a_clear_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    run = torchrun(2, [*GENERATE, "--batch-size", "4", "--out", str(blocker / "run")], timeout=120)
    assert run.returncode != 0
    assert run.stderr.count("is not a writable folder") >= 2


def test_python_api_alone_equals_the_samplers(tmp_path):
    score = mixture_model(output="score")
    path = distributed.generate(score, sampler=distributed.make_sampler("ode", steps=30), num_samples=20, shape=(2,),
                                batch_size=6, seed=4, out=str(tmp_path / "ode"), progress=False,
                                config={"model": "ring"})
    direct = dk.sample_ode(score, (20, 2), dk.VPSDE(), 30, seed=4)
    with np.load(path) as f:
        assert np.array_equal(f["samples"], direct.numpy())
    denoiser = mixture_model(output="denoiser")
    path = distributed.generate(denoiser, sampler="heun", num_samples=10, shape=(2,), batch_size=3, seed=1,
                                out=str(tmp_path / "heun"), progress=False, dtype=torch.float64)
    direct = dk.sample_heun(denoiser, (10, 2), dk.karras_sigmas(18, 0.002, 80.0), seed=1, dtype=torch.float64)
    with np.load(path) as f:
        assert np.array_equal(f["samples"], direct.numpy())
    with pytest.raises(ValueError, match="num_samples"):
        distributed.generate(denoiser, sampler="heun", num_samples=0, shape=(2,), batch_size=3, out=str(tmp_path / "x"))
    with pytest.raises(ValueError, match="unknown sampler"):
        distributed.generate(denoiser, sampler="nope", num_samples=3, shape=(2,), batch_size=3, out=str(tmp_path / "x"))
    with pytest.raises(ValueError, match="shape must be"):
        distributed.generate(denoiser, sampler="heun", num_samples=3, shape=(2, 0), batch_size=3,
                             out=str(tmp_path / "x"))
    with pytest.raises(ValueError, match="timeout"):
        distributed.generate(denoiser, sampler="heun", num_samples=3, shape=(2,), batch_size=3, out=str(tmp_path / "x"),
                             timeout=0)
    with pytest.raises(ValueError, match="model must be callable"):
        distributed.generate(3, sampler="heun", num_samples=3, shape=(2,), batch_size=3, out=str(tmp_path / "x"))
