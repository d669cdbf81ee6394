"""Time to a log-likelihood accuracy: for 1e-2, 1e-3 and 1e-4 nats/dim, the cheapest setting of each
method that reaches it (the loosest tolerance, or the fewest fixed steps), timed side by side.

Problem (issue 14): VP-SDE (beta 0.1 -> 20), x in R^16 with 128 samples, float64, exact traces,
from t = 1e-5 to 1, on (a) Gaussian data with a full covariance (closed-form score; the error is
max_n |log p - exact| / d with the end point scored under the exact p_T, so that only the
integrator is measured) and (b) a small MLP noise-prediction model, score = -eps_hat / std (error
against torchdiffeq's dopri5 at 1e-10).

Methods: diffkern's dopri5 / bosh3 (adaptive, fused stages) and Heun (fixed steps); torchdiffeq's
dopri5 as FFJORD uses it (odeint on the (x, log p) tuple, rtol = atol = tol), once with FFJORD's
exact trace (a loop of d autograd.grad calls) and once given diffkern's batched Jacobian products
(so that only the solvers differ); and score_sde's approach, scipy's RK45 on the flattened state
with a host round trip per evaluation. The chosen setting, its model evaluations and its error go
to extra_info and the summary below the table.
"""
import functools
import math

import numpy as np
import pytest
import torch
from bench_common import run

import diffkern as dk
from diffkern.likelihood import basis_probes, jacobian_products

torchdiffeq = pytest.importorskip("torchdiffeq")
solve_ivp = pytest.importorskip("scipy.integrate").solve_ivp

B, D, EPS = 128, 16, 1e-5
SDE = dk.VPSDE()
TARGETS = (1e-2, 1e-3, 1e-4)
TOLERANCES = (1e-1, 5e-2, 2e-2, 1e-2, 5e-3, 2e-3, 1e-3, 5e-4, 2e-4, 1e-4, 5e-5, 2e-5, 1e-5, 5e-6, 2e-6, 1e-6)
HEUN_STEPS = (4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512)


class Gaussian:
    """N(mu, Q diag(s^2) Q^T): the marginal at t is N(m mu, Q diag(m^2 s^2 + std^2) Q^T)."""
    name = "Gaussian d=16"

    def __init__(self):
        gen = torch.Generator().manual_seed(0)
        self.q, _ = torch.linalg.qr(torch.randn(D, D, generator=gen, dtype=torch.float64))
        self.s = torch.exp(torch.linspace(math.log(0.1), math.log(1.5), D, dtype=torch.float64))
        self.mu = 0.5 * torch.randn(D, generator=gen, dtype=torch.float64)
        self.x = self.mu + (torch.randn(B, D, generator=gen, dtype=torch.float64) * self.s) @ self.q.T
        self.exact = self.log_marginal(self.x, EPS)

    def score(self, x, t):
        t = t.double().reshape(-1, 1) if isinstance(t, torch.Tensor) else torch.full((x.shape[0], 1), float(t))
        m, sd = SDE.mean_coef(t), SDE.marginal_std(t)
        return -(((x - m * self.mu) @ self.q) / (m ** 2 * self.s ** 2 + sd ** 2)) @ self.q.T

    def log_marginal(self, x, t):
        m, sd = float(SDE.mean_coef(t)), float(SDE.marginal_std(t))
        var = m ** 2 * self.s ** 2 + sd ** 2
        z = (x - m * self.mu) @ self.q
        return -0.5 * (z ** 2 / var).sum(1) - 0.5 * torch.log(2 * math.pi * var).sum()

    def error(self, x_end, delta):
        return ((self.log_marginal(x_end, 1.0) + delta - self.exact).abs().max() / D).item()


class MLP:
    name = "MLP d=16"

    def __init__(self):
        torch.manual_seed(0)
        self.net = torch.nn.Sequential(torch.nn.Linear(D + 1, 64), torch.nn.SiLU(), torch.nn.Linear(64, 64),
                                       torch.nn.SiLU(), torch.nn.Linear(64, D)).double()
        for p in self.net.parameters():
            p.requires_grad_(False)
        self.x = torch.randn(B, D, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
        x_end, delta, _ = torchdiffeq_solve(self, 1e-10, batched_trace)
        self.reference = SDE.prior_logp(x_end) + delta

    def score(self, x, t):
        """As a noise-prediction network is used: score = -eps_hat(x, log std) / std, with an untrained
        MLP plus std x standing in for eps_hat (large and fast-changing near the data, like a real one)."""
        t = t.double().reshape(-1, 1) if isinstance(t, torch.Tensor) else torch.full((x.shape[0], 1), float(t))
        std = SDE.marginal_std(t)
        eps_hat = self.net(torch.cat([x, std.log().expand(x.shape[0], 1)], 1)) + std * x
        return -eps_hat / std

    def error(self, x_end, delta):
        return ((SDE.prior_logp(x_end) + delta - self.reference).abs().max() / D).item()


def drift(problem, t):
    f, g2 = float(SDE.drift_coef(t)), float(SDE.diffusion(t)) ** 2
    return lambda y: f * y - 0.5 * g2 * problem.score(y, t)


def batched_trace(fn, x):
    v = basis_probes(x)
    out, products = jacobian_products(fn, x, v)
    return out, (v * products).sum((0, 2))


def ffjord_trace(fn, x):
    """FFJORD's divergence_bf: one autograd.grad per dimension."""
    with torch.enable_grad():
        x = x.detach().requires_grad_(True)
        out = fn(x)
        trace = sum(torch.autograd.grad(out[:, i].sum(), x, retain_graph=True)[0][:, i] for i in range(D))
    return out.detach(), trace


def torchdiffeq_solve(problem, tol, trace_fn):
    calls = [0]

    def func(t, state):
        calls[0] += 1
        out, trace = trace_fn(drift(problem, float(t)), state[0])
        return out, trace

    xs, deltas = torchdiffeq.odeint(func, (problem.x, torch.zeros(B, dtype=torch.float64)),
                                    torch.tensor([EPS, 1.0], dtype=torch.float64), rtol=tol, atol=tol, method="dopri5")
    return xs[-1], deltas[-1], calls[0]


def scipy_solve(problem, tol):
    """score_sde's likelihood: scipy RK45 on the flattened (x, delta), a host round trip per call."""
    calls = [0]

    def fun(t, state):
        calls[0] += 1
        x = torch.from_numpy(state[:B * D]).reshape(B, D)
        out, trace = batched_trace(drift(problem, t), x)
        return np.concatenate([out.reshape(-1).numpy(), trace.numpy()])

    out = solve_ivp(fun, (EPS, 1.0), np.concatenate([problem.x.reshape(-1).numpy(), np.zeros(B)]), rtol=tol,
                    atol=tol, method="RK45")
    y = torch.from_numpy(out.y[:, -1])
    return y[:B * D].reshape(B, D), y[B * D:], calls[0]


def diffkern_solve(problem, setting, solver):
    if solver == "heun":
        r = dk.log_likelihood(problem.score, problem.x, SDE, setting, solver="heun", trace="exact", eps=EPS)
    else:
        r = dk.log_likelihood(problem.score, problem.x, SDE, solver=solver, rtol=setting, atol=setting, trace="exact",
                              eps=EPS)
    return r.x_end, r.delta_log_p, r.num_evals


METHODS = {
    "diffkern dopri5": (TOLERANCES, lambda p, s: diffkern_solve(p, s, "dopri5")),
    "diffkern bosh3": (TOLERANCES, lambda p, s: diffkern_solve(p, s, "bosh3")),
    "diffkern heun": (HEUN_STEPS, lambda p, s: diffkern_solve(p, s, "heun")),
    "torchdiffeq dopri5": (TOLERANCES, lambda p, s: torchdiffeq_solve(p, s, batched_trace)),
    "torchdiffeq dopri5, FFJORD trace": (TOLERANCES, lambda p, s: torchdiffeq_solve(p, s, ffjord_trace)),
    "scipy RK45 (score_sde)": (TOLERANCES, lambda p, s: scipy_solve(p, s)),
}


@functools.lru_cache(maxsize=None)
def problem_of(name):
    return {"Gaussian d=16": Gaussian, "MLP d=16": MLP}[name]()


@functools.lru_cache(maxsize=None)
def sweep(problem_name, method):
    """(setting, error, evals) of each setting, loosest first; stops once 1e-4 nats/dim is reached
    (tighter settings only cost more)."""
    problem = problem_of(problem_name)
    settings, solve = METHODS[method]
    results = []
    for setting in settings:
        x_end, delta, evals = solve(problem, setting)
        results.append((setting, problem.error(x_end, delta), evals))
        if results[-1][1] <= min(TARGETS) / 2:
            break
    return results


def cheapest(problem_name, method, target):
    return next(((s, e, n) for s, e, n in sweep(problem_name, method) if e <= target), None)


@pytest.mark.parametrize("method", list(METHODS))
@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("problem_name", ["Gaussian d=16", "MLP d=16"])
def test_time_to_accuracy(benchmark, problem_name, target, method):
    torch.set_num_threads(2)
    choice = cheapest(problem_name, method, target)
    if choice is None:
        pytest.skip(f"{method} did not reach {target} nats/dim within its settings")
    setting, error, evals = choice
    problem = problem_of(problem_name)
    solve = METHODS[method][1]
    benchmark.extra_info.update(setting=setting, error=error, evals=evals)
    run(benchmark, lambda: solve(problem, setting),
        group=f"time to {target:g} nats/dim, {problem_name} (B={B}, exact trace)",
        name=f"{method} [{'steps' if 'heun' in method else 'tol'} {setting:g}, {evals} evals, err {error:.1e}]",
        nbytes=evals * B * D * 8, device="cpu")
