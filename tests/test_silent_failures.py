"""What used to be quietly wrong or unclear (each test failed before its fix): gradients that could not
be right, stale resumes, drop-in noise that ignored the batch split, solvers spinning on nan, silently
ignored or misread arguments, and command-line errors that were tracebacks."""
import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

import diffkern as dk
from diffkern import distributed, ops
from diffkern.models import GaussianMixture, mixture_model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VP = dk.VPSDE()
RING = GaussianMixture.ring()


class LinearScore(torch.nn.Module):
    """score(x, t) = -w x with a learnable w: a model with a parameter."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.tensor(1.0, dtype=torch.float64))

    def forward(self, x, t):
        return -self.w * x


# ---- 1. likelihood gradients: they were ~214x too small, or None; now right ----

def _finite_difference(loss, tensor, index, h=1e-5):
    with torch.no_grad():
        tensor[index] += h
        plus = loss()
        tensor[index] -= 2 * h
        minus = loss()
        tensor[index] += h
    return (plus - minus) / (2 * h)


@pytest.mark.parametrize("solver", ["euler", "heun", "rk4", "dopri5", "bosh3"])
def test_likelihood_gradient_in_x_is_the_finite_difference(solver):
    # the round-2 report: log_likelihood(..., num_steps=200).log_p.sum().backward() gave -0.0102 where
    # finite differences give -2.179. Here with the exact trace, so both sides see the same function.
    x = torch.randn(4, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    kwargs = dict(num_steps=40) if solver in ("euler", "heun", "rk4") else dict(rtol=1e-9, atol=1e-9)
    model = LinearScore()

    def loss():
        return dk.log_likelihood(model, x, VP, solver=solver, trace="exact", **kwargs).log_p.sum()

    x.requires_grad_(True)
    (grad,) = torch.autograd.grad(loss(), x)
    x.requires_grad_(False)
    for index in ((0, 0), (3, 1)):
        # the solve is a smooth function of x (fixed steps, or adaptive steps constant near x): the
        # central difference is right to ~h^2 = 1e-10 plus the rounding 1e-16 / h
        assert abs(float(grad[index]) - float(_finite_difference(loss, x, index))) < 1e-7


@pytest.mark.parametrize("solver", ["euler", "heun", "dopri5"])
def test_likelihood_gradient_in_the_parameters_is_the_finite_difference(solver):
    x = torch.randn(4, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    model = LinearScore()
    num_steps = 20 if solver != "dopri5" else None

    def loss():
        return dk.log_likelihood(model, x, VP, num_steps, solver=solver).log_p.sum()

    value = loss()
    assert value.requires_grad  # gradient="auto" records it: the model's parameter requires grad
    (grad,) = torch.autograd.grad(value, model.w)
    assert abs(float(grad) - float(_finite_difference(loss, model.w.data, ()))) < 1e-6
    with torch.no_grad():  # evaluating records nothing and gives the same value
        assert not dk.log_likelihood(model, x, VP, num_steps, solver=solver).log_p.requires_grad
    torch.testing.assert_close(dk.log_likelihood(model, x, VP, num_steps, solver=solver, gradient="none").log_p.sum(),
                               value.detach())


def test_jvp_products_are_not_differentiated_and_say_so():
    x = torch.randn(4, 2, dtype=torch.float64)
    with pytest.raises(ValueError, match="mode='jvp'.*not differentiated"):
        dk.log_likelihood(LinearScore(), x, VP, 10, mode="jvp")
    with torch.no_grad():
        assert torch.isfinite(dk.log_likelihood(LinearScore(), x, VP, 10, mode="jvp").log_p).all()


def test_adaptive_sample_ode_is_differentiable_like_the_fixed_steps():
    model = LinearScore()
    x = dk.sample_ode(model, (4, 2), VP, solver="dopri5", dtype=torch.float64, rtol=1e-9, atol=1e-9)
    (adaptive,) = torch.autograd.grad(x.sum(), model.w)
    x = dk.sample_ode(model, (4, 2), VP, 400, solver="heun", dtype=torch.float64)
    (fixed,) = torch.autograd.grad(x.sum(), model.w)
    assert adaptive != 0 and abs(float(adaptive - fixed)) < 1e-4 * abs(float(fixed))  # Heun's error at 400 steps


# ---- 2. double backward ----

def test_double_backward_through_a_fused_step_is_refused():
    sched = dk.DDPMSchedule()
    m = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    x, z = torch.randn(4, 3, dtype=torch.float64), torch.randn(4, 3, dtype=torch.float64)
    (first,) = torch.autograd.grad((dk.ddpm_step(m, 500, x, sched, noise=z) ** 2).sum(), m, create_graph=True)
    a = float(dk.coefficients.ddpm_rows(sched.alphas_cumprod[500], sched.alphas_cumprod[499])[
        dk.coefficients.INDEX["c"]]) * float(dk.coefficients.x0_prediction(sched.alphas_cumprod[500], "epsilon")[1])
    out = dk.ddpm_step(m.detach(), 500, x, sched, noise=z)
    torch.testing.assert_close(first, 2 * a * out)  # the first derivative is right with create_graph
    with pytest.raises(RuntimeError, match="no double backward"):
        torch.autograd.grad(first.sum(), m)


# ---- 3. resumes keyed to the whole configuration ----

def test_another_sampler_option_is_another_configuration(tmp_path):
    model = mixture_model()
    kwargs = dict(num_samples=8, shape=(2,), batch_size=4, seed=0, out=str(tmp_path), progress=False)
    distributed.generate(model, sampler=distributed.make_sampler("ddim", steps=5), **kwargs)
    config = json.load(open(tmp_path / "config.json"))
    assert config["sampler"] == "ddim" and config["steps"] == 5 and config["options"]["eta"] == 0.0
    with pytest.raises(ValueError, match="another configuration.*steps"):
        distributed.generate(model, sampler=distributed.make_sampler("ddim", steps=50), **kwargs)
    with pytest.raises(ValueError, match="plain function"):
        distributed.generate(model, sampler=lambda m, shape, **kw: dk.sample_ddim(m, shape, **kw), **kwargs)


def test_shards_of_another_configuration_are_never_taken(tmp_path):
    model = mixture_model()
    kwargs = dict(sampler=distributed.make_sampler("ddim", steps=5), num_samples=8, shape=(2,), batch_size=4,
                  out=str(tmp_path), progress=False)
    distributed.generate(model, seed=1, **kwargs)
    os.remove(tmp_path / "config.json")
    path = distributed.generate(model, seed=2, **kwargs)
    with np.load(path) as f:
        samples = f["samples"]
    expected = dk.sample_ddim(model, (8, 2), num_inference_steps=5, seed=2)
    assert np.array_equal(samples, expected.numpy())  # seed 2's, not seed 1's shards
    manifest = json.load(open(tmp_path / "manifest.json"))
    assert manifest["samples_computed_this_run"] == 8 and len(manifest["ignored_shards_of_other_configurations"]) == 2


# ---- 4. drop-in noise keyed by the global sample index ----

@pytest.mark.parametrize("name", ["DDPMScheduler", "EulerAncestralDiscreteScheduler"])
def test_drop_in_noise_follows_sample_offset(name):
    dkd = pytest.importorskip("diffkern.diffusers")

    def loop(x, offset):
        scheduler = getattr(dkd, name)(seed=3, sample_offset=offset)
        scheduler.set_timesteps(6)
        x = x * scheduler.init_noise_sigma
        for t in scheduler.timesteps:
            x = scheduler.step(0.1 * scheduler.scale_model_input(x, t), t, x).prev_sample
        return x

    x = torch.randn(6, 3, generator=torch.Generator().manual_seed(0))
    whole = loop(x, 0)
    assert torch.equal(loop(x[2:], 2), whole[2:])
    assert not torch.equal(loop(x[2:], 0), whole[2:])
    with pytest.raises(ValueError, match="sample_offset"):
        getattr(dkd, name)(sample_offset=-1)


# ---- 5. nan at the start of an adaptive solve fails at once ----

def test_nan_in_x_fails_at_once():
    x = torch.randn(4, 2, dtype=torch.float64)
    x[1, 0] = float("nan")
    with pytest.raises(ValueError, match="x holds non-finite"):
        dk.log_likelihood(lambda y, t: -y, x, VP)


def test_a_model_returning_nan_fails_at_its_first_call():
    calls = []

    def nan_model(y, t):
        calls.append(1)
        return y * float("nan")
    start = time.perf_counter()
    with pytest.raises(RuntimeError, match="first evaluation"):
        dk.log_likelihood(nan_model, torch.randn(4, 2, dtype=torch.float64), VP)
    assert len(calls) == 1 and time.perf_counter() - start < 5


# ---- 6. arguments that were ignored or misread ----

def test_smaller_silent_failures():
    with pytest.raises(ValueError, match="order"):
        dk.sample_dpmpp(RING.denoiser, (4, 2), dk.karras_sigmas(5, 0.01, 10.0), order=True)
    with pytest.raises(ValueError, match="order"):
        dk.sample_dpmpp(RING.denoiser, (4, 2), dk.karras_sigmas(5, 0.01, 10.0), order=2.0)
    with pytest.raises(ValueError, match="shift"):
        dk.sample_flow(RING.velocity, (4, 2), [1.0, 0.5, 0.0], shift=3.0)
    with pytest.raises(ValueError, match="max_num_evals=5"):
        dk.log_likelihood(lambda y, t: -y, torch.randn(4, 2), VP, num_steps=10, max_num_evals=5)
    assert dk.log_likelihood(lambda y, t: -y, torch.randn(4, 2), VP, num_steps=10, max_num_evals=20).num_evals == 20


def test_inf_in_x_does_not_become_nan_through_a_zero_coefficient():
    """DDPM's last step with a sample prediction: x_prev = x0 = m, x's coefficient 0."""
    x = torch.tensor([[float("inf"), 1.0]])
    m = torch.tensor([[0.5, -0.5]])
    out = dk.ddpm_step(m, 0, x, dk.DDPMSchedule(), prediction_type="sample")
    assert torch.equal(out, m)
    reference_out, _ = dk.reference.fused_step(x, m, coefficients=dk.DDPMSchedule().device_table(
        ("ddpm", 1, "sample", "fixed_small", None, None, 0.0), lambda a, p: dk.coefficients.ddpm_rows(
            a, p, prediction_type="sample"), x.device, torch.float32), row=0)
    assert torch.equal(reference_out, m)


def test_drop_in_misuse_is_named():
    dkd = pytest.importorskip("diffkern.diffusers")
    heun = dkd.HeunDiscreteScheduler()
    heun.set_timesteps(3)
    x = torch.randn(2, 3)
    for t in heun.timesteps:
        x = heun.step(0.1 * x, t, x).prev_sample
    with pytest.raises(IndexError, match="past the end"):
        heun.step(x, heun.timesteps[-1], x)
    for name in ("DDPMScheduler", "DDIMScheduler", "LCMScheduler"):
        with pytest.raises(ValueError, match="num_inference_steps"):
            getattr(dkd, name)().set_timesteps(0)
    lcm = dkd.LCMScheduler()
    lcm.set_timesteps(4)
    with pytest.raises(IndexError, match="not in the schedule"):
        lcm.step(x, torch.tensor(998), x)


# ---- 8. unclear errors ----

def test_unclear_errors_are_clear():
    assert dk.pfgm_forward(lambda x, z: (x, z), torch.zeros(0, 2)).shape == (0, 2)
    x = torch.randn(4, 2, dtype=torch.float64)
    result = dk.log_likelihood(lambda y, t: (-y).float(), x, VP, 10)  # a float32 model for float64 data
    exact = dk.log_likelihood(lambda y, t: -y, x, VP, 10)
    torch.testing.assert_close(result.log_p, exact.log_p, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="probes"):
        ops.probe_trace(torch.tensor(1.0), torch.tensor(1.0), 1.0)
    with pytest.raises(RuntimeError, match="num_probes, batch"):
        torch.ops.diffkern.probe_trace(torch.tensor(1.0), torch.tensor(1.0), 1.0)


# ---- 7. the command line: one line, exit 2, and nothing left that refuses the corrected rerun ----

def run_cli(*args):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("WORLD_SIZE", None)
    return subprocess.run([sys.executable, "-m", "diffkern", *args], capture_output=True, text=True, timeout=300,
                          env=env, cwd=ROOT)


def _one_line_error(result, *words):
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2 and len(lines) == 1, result.stderr
    for word in words:
        assert word in lines[0], lines[0]


def test_cli_generate_shape_error_then_the_corrected_rerun(tmp_path):
    base = ["generate", "--model", "diffkern.models:mixture_model", "--sampler", "ddim", "--steps", "3",
            "--num-samples", "4", "--no-progress", "--device", "cpu", "--out", str(tmp_path)]
    _one_line_error(run_cli(*base, "--shape", "3"), "shape (3,)")
    assert not os.path.exists(tmp_path / "config.json")
    assert run_cli(*base, "--shape", "2").returncode == 0


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error without a GPU")
def test_cli_cuda_without_a_gpu(tmp_path):
    _one_line_error(run_cli("generate", "--model", "diffkern.models:mixture_model", "--sampler", "ddim",
                            "--num-samples", "4", "--shape", "2", "--device", "cuda", "--out", str(tmp_path)),
                    "--device cuda")


def test_cli_evaluate_wrong_width_and_bad_solver_then_the_corrected_rerun(tmp_path):
    np.save(tmp_path / "wide.npy", np.zeros((4, 3)))
    np.save(tmp_path / "data.npy", RING.sample(4, seed=1, dtype=torch.float64).numpy())
    base = ["evaluate", "--model", "diffkern.models:mixture_model", "--model-kwargs", '{"output": "score"}',
            "--steps", "5", "--no-progress", "--device", "cpu", "--out", str(tmp_path / "run")]
    _one_line_error(run_cli(*base, "--data", str(tmp_path / "wide.npy")), "shape (3,)")
    _one_line_error(run_cli(*base, "--data", str(tmp_path / "data.npy"), "--solver", "hune"), "--solver")
    assert not os.path.exists(tmp_path / "run" / "config.json")
    result = run_cli(*base, "--data", str(tmp_path / "data.npy"), "--solver", "heun")
    assert result.returncode == 0, result.stderr
