"""The built-in models and `python -m diffkern demo`, end to end on the CPU."""
import json
import subprocess
import sys

import pytest
import torch

import diffkern as dk
from diffkern.models import GaussianMixture

MIXTURES = {
    "ring": GaussianMixture.ring(),
    "64d": GaussianMixture.high_dimensional(),
    "full3d": GaussianMixture([[0.0, 1.0, -1.0], [2.0, -1.0, 0.5]],
                              covariances=[[[1.0, 0.3, 0.0], [0.3, 0.5, 0.1], [0.0, 0.1, 0.8]],
                                           [[0.4, 0.0, 0.0], [0.0, 0.2, 0.0], [0.0, 0.0, 0.9]]],
                              weights=[0.3, 0.7]),
}


@pytest.mark.parametrize("name", list(MIXTURES))
@pytest.mark.parametrize("mean_coef,std", [(1.0, 0.0), (0.9, 0.3), (0.2, 0.98), (1.0, 5.0)])
def test_scores_are_gradients_of_the_log_density(name, mean_coef, std):
    mixture = MIXTURES[name]
    x = mixture.sample(6, seed=1, dtype=torch.float64) * mean_coef + std * torch.randn(6, mixture.dim,
                                                                                       dtype=torch.float64)
    x.requires_grad_(True)
    grad = torch.autograd.grad(mixture.log_prob_at(x, mean_coef, std).sum(), x)[0]
    torch.testing.assert_close(mixture.score_at(x.detach(), mean_coef, std), grad, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("name", list(MIXTURES))
def test_model_parameterisations(name):
    mixture = MIXTURES[name]
    sched, sde = dk.DDPMSchedule(), dk.VPSDE()
    x = torch.randn(5, mixture.dim, dtype=torch.float64)
    t_int = torch.tensor([0, 10, 300, 700, 999])
    abar = sched.alphas_cumprod[t_int]
    score = torch.stack([mixture.score_at(x[i:i + 1], abar[i].sqrt(), (1 - abar[i]).sqrt())[0] for i in range(5)])
    torch.testing.assert_close(mixture.epsilon_model(sched)(x, t_int), -(1 - abar).sqrt()[:, None] * score)
    t = torch.tensor([0.01, 0.2, 0.5, 0.8, 1.0], dtype=torch.float64)
    expected = torch.stack([mixture.score_at(x[i:i + 1], sde.mean_coef(t[i]),
                                             sde.marginal_std(t[i]))[0] for i in range(5)])
    torch.testing.assert_close(mixture.score_model(sde)(x, t), expected)
    sigma = torch.tensor([0.01, 0.1, 1.0, 3.0, 50.0], dtype=torch.float64)
    x.requires_grad_(True)
    grad = torch.autograd.grad(mixture.log_prob_at(x, 1.0, sigma).sum(), x)[0]
    torch.testing.assert_close(mixture.denoiser(x.detach(), sigma), x.detach() + sigma[:, None] ** 2 * grad)
    torch.testing.assert_close(mixture.noise_level_score(x.detach(), sigma), grad)


def test_exact_sampling_moments():
    mixture = MIXTURES["full3d"]
    x = mixture.sample(1 << 17, seed=3, dtype=torch.float64)
    mean = (mixture.weights[:, None] * mixture.means).sum(0)
    covs = mixture.rotations @ torch.diag_embed(mixture.eigenvalues) @ mixture.rotations.transpose(1, 2)
    second = (mixture.weights[:, None, None] * (covs + mixture.means[:, :, None] * mixture.means[:, None, :])).sum(0)
    torch.testing.assert_close(x.mean(0), mean, atol=0.02, rtol=0)
    torch.testing.assert_close(x.T @ x / x.shape[0], second, atol=0.03, rtol=0)
    # and the density integrates to one on a 1-d slice's worth: check normalisation of the ring in 2-d
    ring = MIXTURES["ring"]
    grid = torch.linspace(-7, 7, 401, dtype=torch.float64)
    gx, gy = torch.meshgrid(grid, grid, indexing="xy")
    mass = ring.log_prob(torch.stack([gx.flatten(), gy.flatten()], 1)).exp().sum() * (grid[1] - grid[0]) ** 2
    assert abs(mass.item() - 1) < 1e-3


def run_cli(*args, timeout=600):
    return subprocess.run([sys.executable, "-m", "diffkern", *args], capture_output=True, text=True, timeout=timeout)


def test_demo_end_to_end(tmp_path):
    result = run_cli("demo", "--quick", "--samples", "512", "--no-high-dim", "--data", "mixtures", "--no-progress",
                     "--out", str(tmp_path))
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "demo.png").stat().st_size > 10_000
    report = json.loads((tmp_path / "demo.json").read_text())
    ring = report["datasets"]["ring2d"]
    assert set(ring["samplers"]) == {"ddpm", "ddim", "euler_maruyama", "heun", "langevin", "dpmpp", "flow", "pfgm"}
    for name, r in ring["samplers"].items():
        # few steps and 512 samples: every mode found, distances within a few noise floors
        assert r["modes_covered"] == 8, name
        assert r["mode_tv"] < 0.1, name
        assert r["sliced_wasserstein"] < 3 * ring["exact_sliced_wasserstein"] + 0.1, name
    assert ring["likelihood"]["mean_abs_error_per_dim"] < 0.02  # 20 Heun steps, exact trace
    assert "DDPM" in result.stdout and "log-likelihood" in result.stdout
    assert "PFGM follows the exact field of 512 reference samples" in result.stdout


@pytest.mark.slow
def test_demo_high_dimensional(tmp_path):
    result = run_cli("demo", "--quick", "--samples", "256", "--sampler", "ddim,heun,pfgm,likelihood", "--data",
                     "mixtures", "--no-progress", "--out", str(tmp_path))
    assert result.returncode == 0, result.stderr
    high = json.loads((tmp_path / "demo.json").read_text())["datasets"]["mixture64d"]
    assert high["samplers"]["heun"]["modes_covered"] == 8
    assert high["samplers"]["pfgm"]["modes_covered"] == 8
    assert abs(high["likelihood"]["bias_per_dim"]) < 0.01


@pytest.mark.parametrize("args,message", [
    (["demo", "--samples", "0"], "positive"),
    (["demo", "--sampler", "ddpm,eulerx"], "unknown sampler"),
    (["demo", "--device", "meta"], "cpu or cuda"),
    (["demo", "--device", "nonsense"], "unknown device"),
    (["demo", "--frobnicate"], "unrecognized arguments"),
])
def test_demo_bad_options(args, message):
    result = run_cli(*args)
    assert result.returncode == 2 and message in result.stderr, result.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error without a GPU")
def test_demo_cuda_without_gpu():
    result = run_cli("demo", "--device", "cuda")
    assert result.returncode == 2 and "needs a GPU" in result.stderr
