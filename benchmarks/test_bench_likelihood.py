"""Hutchinson traces and likelihoods of a small MLP score model (B = 1024, d = 64) against the
FFJORD / score_sde pattern: a Python loop of K autograd.grad calls and a torch reduction."""
import pytest
import torch
from bench_common import DEVICES, run

import diffkern as dk

B, D, K = 1024, 64, 8


def mlp(device):
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(D + 1, 256), torch.nn.SiLU(), torch.nn.Linear(256, 256), torch.nn.SiLU(),
                              torch.nn.Linear(256, D)).to(device)
    for p in net.parameters():
        p.requires_grad_(False)

    def score(x, t):
        return net(torch.cat([x, t.reshape(-1, 1).to(x.dtype)], dim=1))
    return score


def loop_trace(fn, x, probes):
    """The FFJORD / score_sde pattern: one forward with autograd, then K vector-Jacobian products."""
    with torch.enable_grad():
        x = x.detach().requires_grad_(True)
        out = fn(x)
        total = torch.zeros(x.shape[0], device=x.device)
        for v in probes:
            vjp = torch.autograd.grad(out, x, v, retain_graph=True)[0]
            total = total + (vjp * v).sum(1)
    return total / len(probes), out.detach()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("impl", ["diffkern vjp", "diffkern jvp", "autograd loop"])
def test_hutchinson_trace(benchmark, device, impl):
    score = mlp(device)
    x = torch.randn(B, D, device=device)
    t = torch.full((B,), 0.5, device=device)
    def fn(y):
        return (score(y, t))
    if impl.startswith("diffkern"):
        call = lambda: dk.hutchinson_trace(fn, x, num_probes=K, seed=0, mode=impl.split()[1])  # noqa: E731
    else:
        probes = dk.rademacher((K, B, D), device=device)
        call = lambda: loop_trace(fn, x, probes)  # noqa: E731
    run(benchmark, call, group=f"hutchinson_trace K={K} MLP B={B} d={D} on {device}", name=impl,
        nbytes=2 * K * B * D * 4, device=device)


def loop_log_likelihood(score, x, sde, num_steps, eps=1e-5):
    """A plain Euler loop of the probability-flow ODE with the autograd trace, as score_sde writes it
    (with a fixed step count instead of its RK45)."""
    t_grid = torch.linspace(eps, 1.0, num_steps + 1)
    v = dk.rademacher((1, *x.shape), device=x.device)
    delta = torch.zeros(x.shape[0], device=x.device)
    for i in range(num_steps):
        t, dt = float(t_grid[i]), float(t_grid[i + 1] - t_grid[i])
        f, g2 = float(sde.drift_coef(t)), float(sde.diffusion(t)) ** 2

        def drift(y):  # called at once by loop_trace, in this iteration
            return f * y - 0.5 * g2 * score(y, torch.full((x.shape[0],), t, device=x.device))  # noqa: B023

        trace, velocity = loop_trace(drift, x, v)
        x = x + dt * velocity
        delta = delta + dt * trace
    return sde.prior_logp(x) + delta


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("impl", ["diffkern", "autograd loop"])
def test_log_likelihood(benchmark, device, impl):
    score = mlp(device)
    sde = dk.VPSDE()
    x = torch.randn(B, D, device=device)
    steps = 20
    if impl == "diffkern":
        call = lambda: dk.log_likelihood(score, x, sde, steps, solver="euler", num_probes=1, time_grid="uniform")  # noqa: E731
    else:
        call = lambda: loop_log_likelihood(score, x, sde, steps)  # noqa: E731
    run(benchmark, call, group=f"log_likelihood Euler {steps} steps, MLP B={B} d={D} on {device}", name=impl,
        nbytes=steps * 4 * B * D * 4, device=device)
