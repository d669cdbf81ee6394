"""One training iteration of FFJORD's toy CNF (concat-squash MLP 64-64-64, one Gaussian Hutchinson probe,
dopri5 at rtol = atol = 1e-5, batch 512, t in [0, 0.5]): forward solve, loss -mean log p, backward.
Every implementation drives the same network (FFJORD's ODEnet, transcribed in
tests/ffjord_transcription.py) from the same weights, so only the solver, the trace and the gradient
machinery differ:

- diffkern backprop / adjoint: dk.cnf_log_likelihood(gradient=...), with the default error norm (the
  worst sample's) and with error_norm="rms" (torchdiffeq's kind);
- torchdiffeq odeint / odeint_adjoint driving FFJORD's ODEfunc (its tuple state and divergence);
- torchode (per-sample step control, backprop through the solver), where it installs.

Model evaluations (forward + backward) are recorded with each row (extra_info "evals"): the tolerances
are equal but the error norms differ (diffkern holds the log-density to atol per dimension,
torchdiffeq takes the RMS over (z, logp) tensors), so the step counts differ too. Weights are those of
a network trained for 300 steps on 8 Gaussians (a fresh one's dynamics are nearly linear and take
few steps), made by the first call and cached."""
import functools
import os
import sys

import pytest
import torch
from bench_common import DEVICES

import diffkern as dk

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests"))
from ffjord_transcription import ODEfunc, ODEnet, ffjord_log_p  # noqa: E402

BATCH, T1, TOL = 512, 0.5, 1e-5
IMPLS = ["diffkern backprop", "diffkern adjoint", "diffkern backprop rms", "diffkern adjoint rms", "torchdiffeq odeint",
         "torchdiffeq odeint_adjoint", "torchode"]


class Counted(torch.nn.Module):
    def __init__(self, net):
        super().__init__()
        self.net, self.evals = net, 0

    def forward(self, t, y):
        self.evals += 1
        return self.net(t, y)


@functools.lru_cache(maxsize=1)
def trained_state():
    """FFJORD's toy network after 300 diffkern steps on 8 Gaussians (seeded): dynamics worth solving."""
    torch.manual_seed(0)
    net = ODEnet((64, 64, 64), 2)
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-3)
    data = dk.training.sample_toy("8gaussians", 8192, 1).float()
    for step in range(300):
        x = data[torch.randint(0, 8192, (BATCH,), generator=torch.Generator().manual_seed(step))]
        loss = -dk.cnf_log_likelihood(lambda z, t: net(t[0], z), x, 0.0, T1, rtol=1e-4, atol=1e-4, seed=step,
                                      distribution="gaussian").log_p.mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return {k: v.clone() for k, v in net.state_dict().items()}


def iteration(impl, device):
    torch.manual_seed(1)
    net = ODEnet((64, 64, 64), 2)
    net.load_state_dict(trained_state())
    net = net.to(device)
    counted = Counted(net)
    x = dk.training.sample_toy("8gaussians", BATCH, 2).float().to(device)
    probe = dk.likelihood.probes(x, 1, "gaussian", seed=3)

    def f(z, t):
        return counted(t[0], z)

    if impl.startswith("diffkern"):
        gradient = impl.split()[1]
        params = tuple(net.parameters()) if gradient == "adjoint" else None
        norm = "rms" if impl.endswith("rms") else "batch"

        def step():
            net.zero_grad()
            loss = -dk.cnf_log_likelihood(f, x, 0.0, T1, rtol=TOL, atol=TOL, distribution="gaussian", seed=3,
                                          gradient=gradient, adjoint_params=params, error_norm=norm).log_p.mean()
            loss.backward()
            return loss
    elif impl.startswith("torchdiffeq"):
        pytest.importorskip("torchdiffeq")
        odefunc = ODEfunc(counted)

        def step():
            net.zero_grad()
            loss = -ffjord_log_p(odefunc, x, probe[0], T1, rtol=TOL, atol=TOL, adjoint=impl.endswith("adjoint")).mean()
            loss.backward()
            return loss
    else:
        to = pytest.importorskip("torchode")
        e = probe[0]

        def per_sample_net(t, z):  # FFJORD's layers with a time per sample (torchode steps each sample alone)
            counted.evals += 1
            h, t = z, t.reshape(-1, 1)
            for i, layer in enumerate(net.layers):
                h = layer._layer(h) * torch.sigmoid(layer._hyper_gate(t)) + layer._hyper_bias(t)
                h = torch.tanh(h) if i < len(net.layers) - 1 else h
            return h

        def dynamics(t, y):
            with torch.enable_grad():
                z = y[:, :2].detach().requires_grad_(True) if not y.requires_grad else y[:, :2]
                dz = per_sample_net(t, z)
                e_dzdx = torch.autograd.grad(dz, z, e, create_graph=True)[0]
                return torch.cat([dz, -(e_dzdx * e).sum(1, keepdim=True)], 1)

        term = to.ODETerm(dynamics)
        solver = to.AutoDiffAdjoint(to.Dopri5(term=term), to.IntegralController(atol=TOL, rtol=TOL, term=term))

        def step():
            net.zero_grad()
            y0 = torch.cat([x, torch.zeros(BATCH, 1, device=device)], 1)
            problem = to.InitialValueProblem(y0=y0, t_start=torch.zeros(BATCH, device=device),
                                             t_end=torch.full((BATCH,), T1, device=device))
            end = solver.solve(problem).ys[:, -1]
            z, delta = end[:, :2], end[:, 2]
            loss = -(dk.likelihood.standard_normal_logp(z) - delta).mean()
            loss.backward()
            return loss
    return step, counted


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("impl", IMPLS)
def test_cnf_training_iteration(benchmark, impl, device):
    step, counted = iteration(impl, device)

    def timed():
        loss = step()
        if device == "cuda":
            torch.cuda.synchronize()
        return loss

    timed()  # warm-up
    counted.evals = 0
    loss = timed()
    benchmark.extra_info.update(evals=counted.evals, loss=float(loss.detach()))
    benchmark.group = f"CNF training iteration (FFJORD toy, batch {BATCH}, dopri5 {TOL}) on {device}"
    benchmark.name = impl
    benchmark.extra_info.update(nbytes=BATCH * 2 * 4, device=device, label=f"{impl} ({counted.evals} evals)")
    benchmark.pedantic(timed, rounds=5, iterations=1)
