"""Training continuous normalizing flows: gradients through the fused likelihood solvers (backprop and
the adjoint method) against finite differences and against torchdiffeq driving FFJORD's own ODE
function, RNODE's regularisers against closed forms, the adjoint's memory, the toy densities, the
CNF objective and the train command."""
import hashlib
import json
import math
import os

import pytest
import torch
from ffjord_transcription import ODEfunc, ODEnet, ffjord_log_p

import diffkern as dk
from diffkern import ops
from diffkern.training import CNFObjective, ConcatSquashMLP, sample_toy, toy_log_density

VP = dk.VPSDE()


def _net(seed=0, hidden=(16, 16)):
    torch.manual_seed(seed)
    return ConcatSquashMLP(2, hidden).double()


def _x(n=6, seed=1):
    return torch.randn(n, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))


def _loss(result, kinetic=0.1, jacobian=0.05):
    loss = -result.log_p.mean()
    if result.kinetic_energy is not None:
        loss = loss + kinetic * result.kinetic_energy.mean() + jacobian * result.jacobian_norm.mean()
    return loss


def _grads(net, x, **kwargs):
    net.zero_grad()
    x = x.detach().clone().requires_grad_(True)
    loss = _loss(dk.cnf_log_likelihood(net, x, 0.0, 0.5, num_probes=2, **kwargs))
    loss.backward()
    return float(loss.detach()), x.grad.clone(), torch.cat([p.grad.reshape(-1) for p in net.parameters()])


# ---- the fused stage's backward ----

@pytest.mark.parametrize("rows", [1, 3])
@pytest.mark.parametrize("error", [False, True])
def test_rk_stage_backward_is_its_linear_map(rows, error):
    g = torch.Generator().manual_seed(rows + 2 * error)
    n, outputs, traces = (5, 1, 2) if error else (4, 2, 0)
    inputs = [torch.randn(3, 4, dtype=torch.float64, generator=g, requires_grad=True) for _ in range(n)]
    probes = torch.randn(2, 3, 4, dtype=torch.float64, generator=g)
    products = torch.randn(2, 3, 4, dtype=torch.float64, generator=g, requires_grad=True)
    earlier = [torch.randn(3, dtype=torch.float64, generator=g, requires_grad=True) for _ in range(traces)]
    q = torch.randn(3, dtype=torch.float64, generator=g, requires_grad=True)
    coefficients = torch.randn(rows, ops.rk_row_width(n, outputs, traces, error), dtype=torch.float64, generator=g)

    def stage(*tensors):
        out, trace, q_next, _ = ops.rk_stage(list(tensors[:n]), coefficients, probes=probes, products=tensors[n],
                                             traces=list(tensors[n + 1:n + 1 + traces]),
                                             log_density=tensors[-1] if error else None, outputs=outputs,
                                             error=error, trace_scale=0.5)
        return (*out, trace, q_next) if error else (*out, trace)

    arguments = (*inputs, products, *earlier, q) if error else (*inputs, products)
    assert torch.autograd.gradcheck(stage, arguments)
    assert torch.autograd.gradgradcheck(stage, arguments)


def test_rk_stage_opcheck_with_autograd():
    g = torch.Generator().manual_seed(0)
    inputs = [torch.randn(3, 4, dtype=torch.float64, generator=g, requires_grad=True) for _ in range(4)]
    probes = torch.randn(1, 3, 4, dtype=torch.float64, generator=g)
    products = torch.randn(1, 3, 4, dtype=torch.float64, generator=g, requires_grad=True)
    coefficients = torch.randn(1, ops.rk_row_width(4, 1, 1, True), dtype=torch.float64, generator=g)
    traces = [torch.randn(3, dtype=torch.float64, generator=g)]
    q = torch.randn(3, dtype=torch.float64, generator=g)
    torch.library.opcheck(torch.ops.diffkern.rk_stage.default,
                          (inputs, probes, products, coefficients, traces, q, 1, True, 1.0, 1e-5, 1e-5),
                          test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))


# ---- gradients: backprop, adjoint, finite differences ----

SOLVERS = [("euler", dict(num_steps=20)), ("heun", dict(num_steps=20)), ("rk4", dict(num_steps=10)),
           ("dopri5", dict(rtol=1e-9, atol=1e-9)), ("bosh3", dict(rtol=1e-8, atol=1e-8))]
# backprop differentiates the discrete solve, the adjoint the continuous one: they differ by the
# solver's error, measured as 2e-3 (Euler, 20 steps), 3e-7 (Heun), 5e-9 (RK4), 3e-9 (dopri5 at 1e-9),
# 9e-8 (bosh3 at 1e-8) on this net; the bounds below are ~5x those
AGREEMENT = {"euler": 1e-2, "heun": 2e-6, "rk4": 3e-8, "dopri5": 2e-8, "bosh3": 5e-7}


@pytest.mark.parametrize("solver,kwargs", SOLVERS, ids=[s for s, _ in SOLVERS])
@pytest.mark.parametrize("regularise", [False, True])
def test_backprop_and_adjoint_agree_to_the_solvers_error(solver, kwargs, regularise):
    net, x = _net(), _x()
    backprop = _grads(net, x, solver=solver, gradient="backprop", regularise=regularise, **kwargs)
    adjoint = _grads(net, x, solver=solver, gradient="adjoint", regularise=regularise, **kwargs)
    assert backprop[0] == adjoint[0]  # the same forward solve
    for b, a in zip(backprop[1:], adjoint[1:]):
        assert float((b - a).abs().max()) < AGREEMENT[solver] * max(1.0, float(b.abs().max()))


@pytest.mark.parametrize("error_norm", ["sample", "rms"])
def test_per_sample_and_rms_step_control_keep_working_under_both_gradients(error_norm, recwarn):
    net, x = _net(), _x()
    kwargs = dict(solver="dopri5", rtol=1e-9, atol=1e-9, error_norm=error_norm, regularise=True)
    backprop = _grads(net, x, gradient="backprop", **kwargs)
    adjoint = _grads(net, x, gradient="adjoint", **kwargs)
    assert backprop[0] == adjoint[0]
    for b, a in zip(backprop[1:], adjoint[1:]):
        assert float((b - a).abs().max()) < 2e-8 * max(1.0, float(b.abs().max()))  # as dopri5 in AGREEMENT
    assert not [w for w in recwarn if "requires_grad" in str(w.message)]  # step control outside autograd


@pytest.mark.parametrize("gradient", ["backprop", "adjoint"])
def test_gradients_are_the_finite_differences(gradient):
    net, x = _net(), _x()
    kwargs = dict(solver="dopri5", rtol=1e-10, atol=1e-10, regularise=True)
    _, grad_x, grad_params = _grads(net, x, gradient=gradient, **kwargs)

    def loss():
        with torch.no_grad():
            return float(_loss(dk.cnf_log_likelihood(net, x, 0.0, 0.5, num_probes=2, **kwargs)))

    weight = net.layers[0].layer.weight
    for tensor, index, analytic in ((weight.data, (3, 1), grad_params[3 * 2 + 1]), (x, (2, 0), grad_x[2, 0])):
        h = 1e-5
        tensor[index] += h
        plus = loss()
        tensor[index] -= 2 * h
        minus = loss()
        tensor[index] += h
        # the central difference's error h^2 f''' ~ 1e-10 plus the solves' 1e-10 / h: 1e-6 holds it
        assert abs((plus - minus) / (2 * h) - float(analytic)) < 1e-6


def test_against_torchdiffeq_driving_ffjords_ode_function():
    pytest.importorskip("torchdiffeq")
    torch.manual_seed(0)
    odenet = ODEnet((16, 16), 2).double()
    odefunc = ODEfunc(odenet)
    x = _x(8)
    probes = dk.likelihood.probes(x, 1, "gaussian", seed=5)  # [1, B, 2]: FFJORD's one Gaussian probe

    def f(z, t):
        return odenet(t[0], z)  # FFJORD's layers take one scalar time

    tolerance = dict(rtol=1e-8, atol=1e-8)
    results = {}
    for name in ("ffjord", "backprop", "adjoint"):
        odenet.zero_grad()
        if name == "ffjord":
            log_p = ffjord_log_p(odefunc, x, probes[0], 0.5, adjoint=True, **tolerance)
        else:
            log_p = dk.cnf_log_likelihood(f, x, 0.0, 0.5, distribution="gaussian", seed=5, gradient=name,
                                          adjoint_params=tuple(odenet.parameters()) if name == "adjoint" else None,
                                          **tolerance).log_p
        (-log_p.mean()).backward()
        results[name] = (log_p.detach(), torch.cat([p.grad.reshape(-1) for p in odenet.parameters()]))
    reference_log_p, reference_grad = results["ffjord"]
    for name in ("backprop", "adjoint"):
        log_p, grad = results[name]
        # both sides solve to 1e-8 with their own error norms (torchdiffeq's mixed RMS of (z, logpz),
        # diffkern's log-density per dimension): the step sequences differ, the answers agree to ~1e-7
        torch.testing.assert_close(log_p, reference_log_p, rtol=0, atol=1e-6)
        torch.testing.assert_close(grad, reference_grad, rtol=1e-5, atol=1e-6)


# ---- RNODE's regularisers ----

class Linear(torch.nn.Module):
    def __init__(self, a):
        super().__init__()
        self.a = torch.nn.Parameter(a)

    def forward(self, z, t):
        return z @ self.a.T


def test_regularisers_against_closed_forms_on_a_linear_flow():
    a = torch.tensor([[-0.5, 0.8], [-0.3, 0.2]], dtype=torch.float64)
    x, t1 = _x(4), 0.7
    flow = Linear(a)
    result = dk.cnf_log_likelihood(flow, x, 0.0, t1, trace="exact", regularise=True, rtol=1e-10, atol=1e-10,
                                   gradient="none")
    # z(t) = exp(A t) x, f = A z: the kinetic energy int ||A exp(A t) x||^2 dt by 4001-point Simpson
    times = torch.linspace(0, t1, 4001, dtype=torch.float64)
    velocity = torch.stack([x @ (a @ torch.linalg.matrix_exp(a * t)).T for t in times])
    integrand = velocity.pow(2).sum(-1)
    weights = torch.ones(4001, dtype=torch.float64)
    weights[1:-1:2], weights[2:-1:2] = 4.0, 2.0
    kinetic = (weights[:, None] * integrand).sum(0) * (t1 / 4000) / 3
    torch.testing.assert_close(result.kinetic_energy, kinetic, rtol=1e-8, atol=0)
    # the exact trace's probes are the unit vectors: sum_i ||e_i^T A||^2 = ||A||_F^2 at every t
    torch.testing.assert_close(result.jacobian_norm, torch.full((4,), float(a.pow(2).sum()) * t1,
                                                                dtype=torch.float64), rtol=1e-12, atol=0)
    torch.testing.assert_close(result.log_p, dk.likelihood.standard_normal_logp(result.x_end) + float(a.trace()) * t1,
                               rtol=1e-9, atol=0)
    # Hutchinson with Rademacher probes v: ||v^T A||^2 is exact per probe
    hutchinson = dk.cnf_log_likelihood(flow, x, 0.0, t1, num_probes=3, seed=2, regularise=True, gradient="none")
    v = dk.likelihood.probes(x, 3, "rademacher", seed=2)
    expected = (v @ a).pow(2).sum(-1).mean(0) * t1
    torch.testing.assert_close(hutchinson.jacobian_norm, expected, rtol=1e-12, atol=0)
    # and d/dA of the Jacobian term: d(t1 ||A||_F^2)/dA = 2 t1 A, by the adjoint
    flow.zero_grad()
    dk.cnf_log_likelihood(flow, x, 0.0, t1, trace="exact", regularise=True, gradient="adjoint", rtol=1e-10,
                          atol=1e-10).jacobian_norm.sum().backward()
    torch.testing.assert_close(flow.a.grad, 4 * 2 * t1 * a, rtol=1e-7, atol=1e-9)


# ---- memory ----

_PEAK_SCRIPT = """
import sys, torch, diffkern as dk
from diffkern.training import ConcatSquashMLP
def status(key):  # kB
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(key))
gradient, steps = sys.argv[1], int(sys.argv[2])
torch.manual_seed(0)
net, x = ConcatSquashMLP(2, (64, 64)), torch.randn(2048, 2)
dk.cnf_log_likelihood(net, x[:8], 0.0, 0.5, 1, solver="rk4", gradient=gradient).log_p.sum().backward()  # warm-up
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # resets the peak resident size (VmHWM) to the current one
before = status("VmRSS:")
dk.cnf_log_likelihood(net, x, 0.0, 0.5, steps, solver="rk4", gradient=gradient).log_p.sum().backward()
print((status("VmHWM:") - before) / 1024)
"""


def _peak_mb(gradient: str, steps: int) -> float:
    """The growth of the peak resident memory (MB) of a fresh process over one forward and backward."""
    import subprocess
    import sys
    done = subprocess.run([sys.executable, "-c", _PEAK_SCRIPT, gradient, str(steps)], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    return float(done.stdout.strip().splitlines()[-1])


def test_the_adjoints_peak_memory_does_not_grow_with_the_steps():
    # torch's CPU allocations are invisible to tracemalloc and saved-tensor hooks that keep a graph's
    # own outputs alive make cycles of their own, so this measures the growth of the process's peak
    # resident size (Linux's VmHWM, reset before the call) in fresh processes. Measured at batch 4096
    # (ru_maxrss): adjoint 45 / 46 / 47 MB at 4 / 16 / 64 RK4 steps (16 to 256 evaluations), backprop
    # 266 / 982 / 3856 MB.
    if not os.path.exists("/proc/self/clear_refs"):
        pytest.skip("needs Linux's /proc/self/clear_refs to reset the peak resident size")
    adjoint = [_peak_mb("adjoint", steps) for steps in (4, 16)]
    backprop = [_peak_mb("backprop", steps) for steps in (4, 16)]
    assert adjoint[1] < 1.2 * adjoint[0] + 8  # flat, within the allocator's page granularity
    # measured here at batch 2048: adjoint 19 / 21 MB, backprop 174 / 458 MB at 4 / 16 steps
    assert backprop[1] > 2 * backprop[0] and backprop[1] > 10 * adjoint[1]


@pytest.mark.cuda
@pytest.mark.skipif(not (torch.cuda.is_available() and dk.cuda_kernels_available()),
                    reason="needs a CUDA GPU and diffkern's CUDA kernels")
def test_cuda_adjoint_peak_memory_is_flat_and_matches_the_cpu():
    net, x = _net(hidden=(64, 64)), _x(1024)
    cpu = _grads(net, x, solver="rk4", num_steps=8, gradient="adjoint")
    net, x = net.cuda(), x.cuda()
    peaks = {}
    for gradient in ("adjoint", "backprop"):
        for steps in (8, 64):
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            dk.cnf_log_likelihood(net, x, 0.0, 0.5, steps, solver="rk4", gradient=gradient).log_p.sum().backward()
            peaks[gradient, steps] = torch.cuda.max_memory_allocated() - base
    assert peaks["adjoint", 64] < 1.2 * peaks["adjoint", 8]
    assert peaks["backprop", 64] > 4 * peaks["backprop", 8]
    cuda = _grads(net, x, solver="rk4", num_steps=8, gradient="adjoint")
    assert abs(cuda[0] - cpu[0]) < 1e-10
    torch.testing.assert_close(cuda[2].cpu(), cpu[2], rtol=1e-9, atol=1e-12)


# ---- sample_ode and log_likelihood ----

def test_sample_ode_adjoint_against_backprop():
    class Score(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.tensor([0.9, 1.1], dtype=torch.float64))

        def forward(self, x, t):
            return -self.w * x

    model = Score()
    grads = []
    for gradient in ("backprop", "adjoint"):
        model.zero_grad()
        dk.sample_ode(model, (4, 2), VP, solver="dopri5", rtol=1e-9, atol=1e-9, dtype=torch.float64,
                      gradient=gradient).pow(2).sum().backward()
        grads.append(model.w.grad.clone())
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-6, atol=0)


def test_log_likelihood_of_a_score_model_by_the_adjoint():
    model = _net(3)
    x = _x(5)
    grads = []
    for gradient in ("backprop", "adjoint"):
        model.zero_grad()
        dk.log_likelihood(model, x, VP, solver="dopri5", rtol=1e-8, atol=1e-8, gradient=gradient,
                          trace="exact").log_p.sum().backward()
        grads.append(torch.cat([p.grad.reshape(-1) for p in model.parameters()]))
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-5, atol=1e-7)


def test_no_warnings_and_auto_records_only_when_needed(recwarn):
    net, x = _net(), _x()
    result = dk.cnf_log_likelihood(net, x, 0.0, 0.5)  # parameters require grad: recorded
    assert result.log_p.requires_grad
    result.log_p.sum().backward()
    net.requires_grad_(False)
    assert not dk.cnf_log_likelihood(net, x, 0.0, 0.5).log_p.requires_grad
    assert not [w for w in recwarn if "requires_grad" in str(w.message)]


def test_a_model_that_ignores_z_has_zero_trace():
    class Drift(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.c = torch.nn.Parameter(torch.tensor([0.3, -0.2], dtype=torch.float64))

        def forward(self, z, t):
            return self.c.expand_as(z)

    model, x = Drift(), _x(3)
    for gradient in ("backprop", "adjoint"):
        model.zero_grad()
        result = dk.cnf_log_likelihood(model, x, 0.0, 1.0, gradient=gradient)
        assert torch.equal(result.delta_log_p, torch.zeros(3, dtype=torch.float64))
        result.log_p.sum().backward()  # log N(x + c; 0, I): d/dc = -(x + c) summed over samples
        torch.testing.assert_close(model.c.grad, -(x + model.c.detach()).sum(0), rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("kwargs,match", [
    (dict(gradient="magic"), "gradient"),
    (dict(gradient="adjoint", adjoint_rtol=0.0), "adjoint_rtol"),
    (dict(gradient="adjoint", adjoint_atol=-1e-5), "adjoint_atol"),
    (dict(gradient="adjoint", adjoint_atol=float("nan")), "adjoint_atol"),
    (dict(gradient="backprop", adjoint_rtol=1e-5), "adjoint_rtol"),
    (dict(gradient="adjoint", adjoint_params=[1.0]), "adjoint_params"),
    (dict(regularise="yes"), "regularise"),
    (dict(gradient="adjoint", num_steps=10, solver="heun", adjoint_rtol=1e-3), "adjoint_rtol"),
    (dict(gradient="backprop", mode="jvp"), "jvp"),
])
def test_bad_gradient_arguments_are_named(kwargs, match):
    with pytest.raises(ValueError, match=match):
        dk.cnf_log_likelihood(_net(), _x(), 0.0, 0.5, **kwargs)


def test_bad_sample_ode_gradient_arguments_are_named():
    with pytest.raises(ValueError, match="gradient"):
        dk.sample_ode(lambda x, t: -x, (2, 2), VP, 4, gradient="magic")
    with pytest.raises(ValueError, match="callback"):
        dk.sample_ode(_net(), (2, 2), VP, 4, gradient="adjoint", callback=print, dtype=torch.float64)
    with pytest.raises(ValueError, match="adjoint_params"):
        dk.sample_ode(lambda x, t: -x, (2, 2), VP, 4, gradient="adjoint")
    with pytest.raises(ValueError, match="adjoint_atol"):
        dk.sample_ode(lambda x, t: -x, (2, 2), VP, 4, adjoint_atol=1e-3)


def test_adjoint_needs_something_to_differentiate():
    net = _net()
    with pytest.raises(ValueError, match="adjoint_params"):  # a plain function: its parameters are unknown
        dk.cnf_log_likelihood(lambda z, t: net(z, t), _x(), 0.0, 0.5, gradient="adjoint")
    net.requires_grad_(False)
    with pytest.raises(ValueError, match="nothing to differentiate"):
        dk.cnf_log_likelihood(net, _x(), 0.0, 0.5, gradient="adjoint")
    x = _x().requires_grad_(True)  # x alone is enough
    dk.cnf_log_likelihood(net, x, 0.0, 0.5, gradient="adjoint").log_p.sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()


# ---- toy data, the objective, the train command ----

# the first 16 hex digits of the sha256 of sample_toy(name, 1000, seed=0)'s float64 bytes: the sets are
# fixed functions of their seed (torch.Generator's CPU stream), so a model's recorded NLL stays meaningful
TOY_HASHES = {"2spirals": "6c7d3ba6e820dac5", "8gaussians": "e8f72f3edbfe9c32", "checkerboard": "f611b08f56d46129",
              "pinwheel": "09d3fda96da1a75f", "rings": "ff0cee0a83460554"}


@pytest.mark.parametrize("name", sorted(dk.training.TOY_DATASETS))
def test_toy_sets_are_functions_of_their_seed(name):
    a, b, c = sample_toy(name, 1000, 0), sample_toy(name, 1000, 0), sample_toy(name, 1000, 1)
    assert a.shape == (1000, 2) and a.dtype == torch.float64 and torch.isfinite(a).all()
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert hashlib.sha256(a.numpy().tobytes()).hexdigest()[:16] == TOY_HASHES[name]


def test_toy_log_densities_integrate_to_one_and_cover_their_samples():
    axis = torch.linspace(-6, 6, 1201, dtype=torch.float64)
    grid = torch.stack(torch.meshgrid(axis, axis, indexing="xy"), -1).reshape(-1, 2)
    cell = float(axis[1] - axis[0]) ** 2
    for name in ("8gaussians", "checkerboard"):
        mass = float(toy_log_density(name, grid).exp().sum()) * cell
        assert abs(mass - 1.0) < 5e-3  # the grid's quadrature error at the squares' edges
        assert torch.isfinite(toy_log_density(name, sample_toy(name, 10000, 3))).all()
    with pytest.raises(ValueError, match="pinwheel"):
        toy_log_density("pinwheel", grid)
    with pytest.raises(ValueError, match="name"):
        sample_toy("moons", 10)
    with pytest.raises(ValueError, match="n "):
        sample_toy("rings", 0)


@pytest.mark.parametrize("options,match", [
    (dict(t1=0.0), "t1"), (dict(gradient="none"), "gradient"), (dict(kinetic_weight=-1.0), "kinetic_weight"),
    (dict(jacobian_weight=float("inf")), "jacobian_weight"), (dict(distribution="uniform"), "distribution"),
    (dict(num_probes=0), "num_probes"), (dict(max_num_evals=0), "max_num_evals"),
    (dict(num_steps=10, rtol=1e-3), "rtol"), (dict(solver="midpoint"), "solver"),
    (dict(gradient="adjoint", adjoint_rtol=0.0), "adjoint_rtol"), (dict(adjoint_atol=1e-3), "adjoint_atol"),
    (dict(dequantize=-0.1), "dequantize"), (dict(error_norm="max"), "error_norm"),
])
def test_bad_cnf_objective_options_are_named(options, match):
    with pytest.raises(ValueError, match=match):
        CNFObjective(**options)


def test_the_cnf_objective_is_reproducible_and_its_gradient_modes_agree():
    x = sample_toy("8gaussians", 64, 0).double()
    losses = {}
    for gradient in ("backprop", "adjoint"):
        net = _net(hidden=(32, 32))
        loss = dk.training_loss(net, x, "cnf", seed=3, step=7, gradient=gradient, rtol=1e-8, atol=1e-8,
                                kinetic_weight=0.01, jacobian_weight=0.01)
        loss.backward()
        losses[gradient] = (float(loss.detach()), torch.cat([p.grad.reshape(-1) for p in net.parameters()]))
    assert losses["backprop"][0] == losses["adjoint"][0]
    torch.testing.assert_close(losses["backprop"][1], losses["adjoint"][1], rtol=1e-5, atol=1e-7)
    # a split batch has the same per-sample losses (probes keyed by the global sample index)
    net = _net(hidden=(32, 32))
    kwargs = dict(seed=3, step=7, num_steps=8, solver="rk4", return_batch=True)
    whole = dk.training_loss(net, x, "cnf", **kwargs).per_sample
    halves = torch.cat([dk.training_loss(net, x[:32], "cnf", **kwargs).per_sample,
                        dk.training_loss(net, x[32:], "cnf", sample_offset=32, **kwargs).per_sample])
    torch.testing.assert_close(whole, halves, rtol=1e-12, atol=1e-12)


@pytest.mark.slow
def test_training_lowers_the_test_nll_toward_the_entropy():
    x_test = sample_toy("8gaussians", 1024, 9).float()
    data = sample_toy("8gaussians", 4096, 10).float()
    torch.manual_seed(0)
    net = ConcatSquashMLP(2, (64, 64, 64))
    optimizer = torch.optim.Adam(net.parameters(), lr=3e-3)
    nll = [dk.training.cnf_report.test_nll(net, x_test, 0.5)]
    for step in range(60):
        batch = data[torch.randint(0, 4096, (256,), generator=torch.Generator().manual_seed(step))]
        loss = dk.training_loss(net, batch, "cnf", seed=0, step=step, rtol=1e-4, atol=1e-4)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    nll.append(dk.training.cnf_report.test_nll(net, x_test, 0.5))
    # measured: 5.97 nats untrained, 3.9 after 60 steps; the data's entropy is 2.83
    assert nll[0] > 5.5 and nll[1] < 4.5 and nll[1] > 2.8


def test_the_train_command_trains_a_cnf(tmp_path):
    from diffkern import cli
    out = str(tmp_path / "run")
    code = cli.main(["train", "--data", "8gaussians", "--objective", "cnf", "--objective-options",
                     '{"num_steps": 4, "solver": "rk4", "kinetic_weight": 0.01}', "--model-kwargs",
                     '{"hidden": [16, 16]}', "--steps", "3", "--batch-size", "32", "--out", out, "--no-progress"])
    assert code == 0
    with open(os.path.join(out, "loss.json")) as f:
        summary = json.load(f)["summary"]
    assert math.isfinite(summary["test_nll"]) and abs(summary["data_entropy"] - 2.83) < 0.01
    assert os.path.isfile(os.path.join(out, "checkpoint.pt"))
    model = dk.training.load_checkpoint(os.path.join(out, "checkpoint.pt"))
    assert model.diffkern_trained["kind"] == "cnf"
    with torch.no_grad():
        assert torch.isfinite(dk.cnf_log_likelihood(model, sample_toy("8gaussians", 8, 0).float(), 0.0,
                                                    model.diffkern_trained["options"]["t1"]).log_p).all()


# ---- the digits, dequantized ----

def test_the_digits_are_the_pinned_file_and_a_fixed_split():
    import numpy as np

    from diffkern.training import data
    with np.load(data.DIGITS_PATH) as f:
        images = f["images"]
        assert hashlib.sha256(images.tobytes()).hexdigest() == (
            "8f26b2bd9d135c256808f68f14fdabddde6d9c7f869ae419704b051f0f14b3b3")  # tools/make_digits.py
        assert images.shape == (1797, 8, 8) and images.min() == 0 and images.max() == 16
    train, test, everything = data.digits("train"), data.digits("test"), data.digits("all")
    assert train.shape == (1497, 1, 8, 8) and test.shape == (300, 1, 8, 8)
    # every row in exactly one split: the multisets of rows agree
    rows = sorted(map(tuple, torch.cat([train, test]).flatten(1).tolist()))
    assert rows == sorted(map(tuple, everything.flatten(1).tolist()))
    levels = torch.round((everything + 1) * 17 / 2 - 0.5)
    assert torch.equal(levels.unique(), torch.arange(17, dtype=torch.float32))  # bin centres of 17 levels
    assert torch.equal(data.load_dataset("digits"), train)
    _, labels = data.digits("test", labels=True)
    assert labels.shape == (300,) and set(labels.tolist()) == set(range(10))
    with pytest.raises(ValueError, match="split"):
        data.digits("validation")


def test_dequantization_noise_is_uniform_within_the_bin():
    from diffkern.training import cnf_report, data
    x = data.digits("test")[:64].double()
    width = 2 / 17
    batch = dk.training_loss(lambda z, t: 0 * z, x, "cnf", seed=1, step=2, dequantize=width, num_steps=2,
                             solver="euler", return_batch=True)
    noise = batch.x_t.detach() - x  # a zero flow leaves the dequantized data where it was
    assert float(noise.abs().max()) <= width / 2 and float(noise.std()) > 0.9 * width / math.sqrt(12)
    again = dk.training_loss(lambda z, t: 0 * z, x, "cnf", seed=1, step=2, dequantize=width, num_steps=2,
                             solver="euler", return_batch=True)
    assert torch.equal(again.x_t, batch.x_t)  # a function of (seed, step, sample)
    # bits/dim of the uniform density on [-1, 1]^d is log2(17): 17 equally likely levels
    assert abs(cnf_report.bits_per_dim(64 * math.log(2), 64, width) - math.log2(17)) < 1e-12
    # the baseline the train command prints beside a CNF's: a Gaussian fit, measured 2.98 bits/dim
    gaussian = cnf_report.gaussian_bits_per_dim(cnf_report.dequantized(data.digits("train"), width, 8),
                                                cnf_report.dequantized(data.digits("test"), width), width)
    assert 2.9 < gaussian < 3.1
