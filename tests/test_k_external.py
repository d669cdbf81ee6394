"""diffkern.k_diffusion.DiscreteEpsDDPMDenoiser against k-diffusion's own external.py, and against the
mathematics: Euler on its sigmas is DDIM on the same timesteps (DDIM is the probability-flow ODE's Euler
step in x / sqrt(alphas_cumprod))."""
import pytest
import torch

import diffkern as dk
import diffkern.k_diffusion as K
from tests import kdiffusion_peer


def eps_model(x, t):
    # smooth in x and t, and t-dependent enough that a wrong timestep shows
    t = torch.as_tensor(t, dtype=x.dtype).reshape(-1, *([1] * (x.dim() - 1)))
    return torch.tanh(x) * torch.cos(t / 300.0) + 0.1 * x * torch.sin(t / 170.0)


@pytest.fixture(scope="module")
def peer():
    module, why = kdiffusion_peer.load_external()
    if module is None:
        pytest.skip(why)
    return module


@pytest.mark.parametrize("quantize", [False, True])
def test_matches_k_diffusion_external(peer, quantize):
    abar = dk.DDPMSchedule().alphas_cumprod.to(torch.float64)
    ours, theirs = K.DiscreteEpsDDPMDenoiser(eps_model, abar, quantize), peer.DiscreteEpsDDPMDenoiser(eps_model, abar,
                                                                                                       quantize)
    gen = torch.Generator().manual_seed(0)
    # inside the range, on its levels, and outside it at both ends (clamped there)
    sigma = torch.cat([torch.exp(torch.empty(61, dtype=torch.float64).uniform_(-6, 6, generator=gen)),
                       ours.sigmas[[0, 1, 500, 998, 999]]])
    x = torch.randn(sigma.shape[0], 3, 4, dtype=torch.float64, generator=gen)
    torch.testing.assert_close(ours.sigma_to_t(sigma).to(torch.float64), theirs.sigma_to_t(sigma).to(torch.float64),
                               rtol=1e-12, atol=1e-9)
    torch.testing.assert_close(ours(x, sigma), theirs(x, sigma), rtol=1e-12, atol=1e-12)
    t = torch.tensor([0.0, 0.25, 17.5, 998.9, 999.0], dtype=torch.float64)
    # the peer's t_to_sigma computes in float32 whatever the table's dtype (its t.float()): float32's
    # rounding of the log sigmas is the gap
    torch.testing.assert_close(ours.t_to_sigma(t), theirs.t_to_sigma(t), rtol=1e-6, atol=0)
    torch.testing.assert_close(ours.get_sigmas(7), theirs.get_sigmas(7), rtol=1e-6, atol=0)
    assert torch.equal(ours.get_sigmas(), theirs.get_sigmas())
    assert float(ours.sigma_min) == float(theirs.sigma_min) and float(ours.sigma_max) == float(theirs.sigma_max)


def test_euler_on_its_levels_is_ddim():
    sched = dk.DDPMSchedule()
    denoiser = K.DiscreteEpsDDPMDenoiser(eps_model, sched.alphas_cumprod.to(torch.float64), quantize=True)
    timesteps = sched.timesteps(10)
    x_T = dk.randn((6, 2, 3), seed=3, dtype=torch.float64)
    ddim = dk.sample_ddim(eps_model, (6, 2, 3), sched, num_inference_steps=10, x_T=x_T, dtype=torch.float64)
    sigmas = torch.cat([denoiser.sigmas[torch.as_tensor(timesteps)], torch.zeros(1, dtype=torch.float64)])
    scale = sched.alphas_cumprod.to(torch.float64)[timesteps[0]].sqrt()
    euler = K.sample_euler(denoiser, x_T / scale, sigmas)
    torch.testing.assert_close(euler, ddim, rtol=1e-10, atol=1e-10)


def test_bad_sigmas():
    with pytest.raises(ValueError, match="sigmas must be a positive, increasing"):
        K.DiscreteSchedule(torch.tensor([1.0, 0.5]), False)
    with pytest.raises(ValueError, match="sigmas must be a positive, increasing"):
        K.DiscreteSchedule(torch.tensor([0.0, 0.5]), False)
