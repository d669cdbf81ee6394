"""The embedded Runge-Kutta solvers of log_likelihood / cnf_log_likelihood / sample_ode: the fused
stage op against its reference and its documented summation order, the pairs' orders, accuracy
against closed forms and scipy's solve_ivp across tolerances, the evaluation count, batch-split
independence of the per-sample norm, and clear errors."""
import math

import numpy as np
import pytest
import torch
from common import requires_cuda
from test_likelihood import DATA, MU, SIGMA, chunked_tree_order, gaussian_marginal, gaussian_score

import diffkern as dk
from diffkern import likelihood, ode, ops, reference

# ---- the fused stage op ----


def stage_case(features, dtype, outputs, error, probes, rows, traces=3, seed=0):
    gen = torch.Generator().manual_seed(seed)
    batch, n = 5, 6
    inputs = [torch.randn(batch, features, generator=gen, dtype=torch.float64).to(dtype) for _ in range(n)]
    m = traces if error else 0
    width = ops.rk_row_width(n, outputs, m, error)
    coefficients = torch.randn(rows, width, generator=gen, dtype=torch.float64)
    coefficients[:, 2 + 1] = 0.0  # a zero coefficient: its input is skipped
    kwargs = dict(outputs=outputs, error=error, trace_scale=0.25, atol=1e-3, rtol=1e-2)
    if probes:
        kwargs["probes"] = torch.randn(3, batch, features, generator=gen, dtype=torch.float64).to(dtype)
        kwargs["products"] = torch.randn(3, batch, features, generator=gen, dtype=torch.float64).to(dtype)
    if error:
        kwargs["traces"] = [torch.randn(batch, generator=gen, dtype=torch.float64) for _ in range(m)]
        kwargs["log_density"] = torch.randn(batch, generator=gen, dtype=torch.float64) * 10
    return inputs, coefficients, kwargs


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("features", [1, 21, 300, 4100])
@pytest.mark.parametrize("outputs,error", [(2, False), (1, True), (0, True)])
@pytest.mark.parametrize("probes", [True, False])
@pytest.mark.parametrize("rows", [1, 5])
def test_rk_stage_matches_reference(dtype, features, outputs, error, probes, rows):
    inputs, coefficients, kwargs = stage_case(features, dtype, outputs, error, probes, rows)
    got = ops.rk_stage(inputs, coefficients, **kwargs)
    want = reference.rk_stage(inputs, coefficients, **kwargs)
    # float64: 1e-12 relative (sums of <= 4100 terms in another order); float32: the stage sums round
    # each term (~1e-7) and the norm divides by atol + rtol |x| >= 1e-3
    rtol = 1e-10 if dtype == torch.float64 else 2e-4
    assert len(got[0]) == outputs
    for a, b in zip(got[0], want[0]):
        torch.testing.assert_close(a, b, rtol=rtol, atol=rtol)
    for a, b in zip(got[1:], want[1:]):
        torch.testing.assert_close(a, b, rtol=rtol, atol=rtol * 10)


def emulated_stage(inputs, coefficients, kwargs):
    """The order of csrc/include/diffkern/rk_stage.h in float32 torch ops (each a separate rounding):
    the outputs as sums over inputs in order skipping zero coefficients, the squared scaled errors
    summed in the trace order (chunked_tree_order with unit products)."""
    n, outputs = len(inputs), kwargs["outputs"]
    row = coefficients[0].float()

    def combine(c):
        total = None
        for ci, u in zip(c, inputs):
            if ci != 0:
                total = ci * u if total is None else total + ci * u
        return total if total is not None else torch.zeros_like(inputs[0])

    outs = [combine(row[2 + j * n:2 + (j + 1) * n]) for j in range(outputs)]
    e = combine(row[2 + outputs * n:2 + (outputs + 1) * n])
    atol, rtol = torch.tensor(kwargs["atol"], dtype=torch.float32), torch.tensor(kwargs["rtol"], dtype=torch.float32)
    squares = (e / (atol + rtol * torch.maximum(inputs[0].abs(), inputs[2].abs()))) ** 2
    sums = chunked_tree_order(squares[None], torch.ones_like(squares)[None], 1.0)
    # in Python floats: torch's vectorised double division / sqrt here are not always correctly rounded
    features = inputs[0].shape[1]
    return outs, torch.tensor([math.sqrt(total / features) for total in sums.tolist()], dtype=torch.float64)


@pytest.mark.parametrize("features", [3, 128, 300, 4097])
def test_rk_stage_sums_in_the_documented_order(features):
    """Bitwise: the CPU's vector loops compute what the CUDA per-thread body and block tree compute."""
    inputs, coefficients, kwargs = stage_case(features, torch.float32, 1, True, True, 1, traces=0)
    kwargs.pop("log_density")
    kwargs.pop("traces")
    outs, trace, _, norm = ops.rk_stage(inputs, coefficients, **kwargs)
    want_outs, want_norm = emulated_stage(inputs, coefficients, kwargs)
    assert torch.equal(outs[0], want_outs[0])
    assert torch.equal(norm, want_norm)
    raw = chunked_tree_order(kwargs["probes"], kwargs["products"], 1.0)
    assert torch.equal(trace, coefficients[0, 0] + coefficients[0, 1] * (raw * 0.25))


def test_rk_stage_skips_zero_coefficients_even_for_nan_inputs():
    inputs, coefficients, kwargs = stage_case(21, torch.float64, 2, False, False, 1)
    inputs[1][0, 0] = float("nan")
    coefficients[:, 2 + 6 + 1] = 0.0  # input 1 in both outputs
    outs, _, _, _ = ops.rk_stage(inputs, coefficients, **kwargs)
    assert not torch.isnan(outs[0]).any() and not torch.isnan(outs[1]).any()


def test_rk_stage_norm_is_nan_when_the_error_is():
    inputs, coefficients, kwargs = stage_case(21, torch.float64, 1, True, True, 1)
    inputs[0][2, 3] = float("nan")
    _, _, _, norm = ops.rk_stage(inputs, coefficients, **kwargs)
    assert torch.isnan(norm[2]) and not torch.isnan(norm[[0, 1, 3, 4]]).any()


def test_rk_stage_opcheck():
    for outputs, error, probes in [(2, False, True), (1, True, True), (1, True, False)]:
        inputs, coefficients, kwargs = stage_case(7, torch.float64, outputs, error, probes, 5)
        args = (inputs, kwargs.get("probes"), kwargs.get("products"), coefficients, kwargs.get("traces", []),
                kwargs.get("log_density"), outputs, error, 0.25, 1e-3, 1e-2)
        torch.library.opcheck(torch.ops.diffkern.rk_stage.default, args,
                              test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_dynamic"))


@pytest.mark.parametrize("change,match", [
    (lambda i, c, k: (i[:2], c, dict(k)), "3 or more inputs|coefficients"),
    (lambda i, c, k: (i, c[:, :-1], k), "coefficients"),
    (lambda i, c, k: (i, c, {**k, "atol": 0.0}), "atol"),
    (lambda i, c, k: (i, c, {**k, "error": False}), "coefficients|error"),
    (lambda i, c, k: (i, c.float(), k), "coefficients"),
    (lambda i, c, k: (i, c.repeat(2, 1), k), "coefficients"),
    (lambda i, c, k: ([i[0].float()] + i[1:], c, k), "inputs\\[1\\]"),
    (lambda i, c, k: (i, c, {**k, "log_density": k["log_density"].float()}), "log_density"),
    (lambda i, c, k: (i, c, {**k, "traces": k["traces"][:2]}), "coefficients"),
])
def test_rk_stage_bad_arguments(change, match):
    inputs, coefficients, kwargs = stage_case(7, torch.float64, 1, True, True, 1)
    inputs, coefficients, kwargs = change(inputs, coefficients, kwargs)
    with pytest.raises(RuntimeError, match=match):
        ops.rk_stage(inputs, coefficients, **kwargs)
    if coefficients.shape[0] == 1 or coefficients.shape[0] == inputs[0].shape[0]:
        with pytest.raises(RuntimeError, match=match):  # the fake kernel says the same
            with torch._subclasses.fake_tensor.FakeTensorMode() as mode:
                fake = lambda t: mode.from_tensor(t) if isinstance(t, torch.Tensor) else t  # noqa: E731
                ops.rk_stage([fake(t) for t in inputs], fake(coefficients),
                             **{key: ([fake(t) for t in v] if isinstance(v, list) else fake(v))
                                for key, v in kwargs.items()})


@requires_cuda
@pytest.mark.cuda
@pytest.mark.parametrize("features", [3, 300, 4100])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cuda_rk_stage_equals_cpu_bitwise(features, dtype):
    inputs, coefficients, kwargs = stage_case(features, dtype, 1, True, True, 5)
    cpu = ops.rk_stage(inputs, coefficients, **kwargs)
    move = lambda v: [t.cuda() for t in v] if isinstance(v, list) else (v.cuda() if isinstance(v, torch.Tensor) else v)  # noqa: E731
    cuda = ops.rk_stage(move(inputs), coefficients.cuda(), **{k: move(v) for k, v in kwargs.items()})
    assert torch.equal(cuda[0][0].cpu(), cpu[0][0])
    for a, b in zip(cuda[1:], cpu[1:]):
        assert torch.equal(a.cpu(), b)


# ---- the solvers on Gaussian data (exact log-density; the prior mismatch removed as in test_likelihood) ----

VP = dk.VPSDE()
EXACT = gaussian_marginal(VP, 1e-5).log_prob(DATA)


def per_dim_error(result):
    prior_mismatch = result.prior_log_p - gaussian_marginal(VP, 1.0).log_prob(result.x_end)
    return ((result.log_p - prior_mismatch - EXACT).abs().max() / 3).item()


def batched_gaussian_score(sde):
    """The exact score for per-sample times (the per-sample norm evaluates samples at different t)."""
    def score(x, t):
        m, sd = sde.mean_coef(t.double()), sde.marginal_std(t.double())
        cov = m[:, None, None] ** 2 * SIGMA + sd[:, None, None] ** 2 * torch.eye(3, dtype=torch.float64)
        return -torch.linalg.solve(cov, (x.double() - m[:, None] * MU)[..., None])[..., 0].to(x.dtype)
    return score


@pytest.mark.parametrize("solver,order", [("dopri5", 5), ("bosh3", 3)])
def test_fixed_step_order(solver, order):
    """On a fixed grid (num_steps), halving the step divides the error by about 2^order: the fitted
    slope of log error against log steps is -order within 0.6 (pre-asymptotic noise on 3 points)."""
    steps = [6, 12, 24] if solver == "dopri5" else [12, 24, 48]
    errors = [per_dim_error(dk.log_likelihood(gaussian_score(VP), DATA, VP, n, solver=solver, trace="exact"))
              for n in steps]
    slope = np.polyfit(np.log(steps), np.log(errors), 1)[0]
    assert abs(slope + order) < 0.6, (errors, slope)


@pytest.mark.parametrize("solver", ["dopri5", "bosh3"])
def test_error_shrinks_with_the_tolerance(solver):
    """Tighter tolerances: smaller errors (each 100x tighter tolerance at least 10x smaller error) and
    more evaluations; at every tolerance the error per dimension stays below 10 tol (the norm holds
    local errors to tol; their sum over a few steps stays within a small multiple)."""
    results = [dk.log_likelihood(batched_gaussian_score(VP), DATA, VP, solver=solver, rtol=tol, atol=tol,
                                 trace="exact") for tol in (1e-3, 1e-5, 1e-7)]
    errors = [per_dim_error(r) for r in results]
    for tol, error in zip((1e-3, 1e-5, 1e-7), errors):
        assert error < 10 * tol, (tol, errors)
    assert errors[1] < errors[0] / 10 and errors[2] < errors[1] / 10, errors
    evals = [r.num_evals for r in results]
    assert evals[0] < evals[1] < evals[2], evals


def test_dopri5_needs_fewer_evaluations_than_heun_for_1e_4():
    heun = dk.log_likelihood(gaussian_score(VP), DATA, VP, 100, trace="exact")
    dopri = dk.log_likelihood(gaussian_score(VP), DATA, VP, rtol=1e-4, atol=1e-4, trace="exact")
    assert per_dim_error(dopri) < 1e-4 and per_dim_error(dopri) < per_dim_error(heun)
    assert dopri.num_evals < heun.num_evals / 3, (dopri.num_evals, heun.num_evals)


def counting(fn):
    def counted(x, t):
        counted.calls += 1
        return fn(x, t)
    counted.calls = 0
    return counted


@pytest.mark.parametrize("solver,num_steps,expected", [
    ("euler", 7, 7), ("heun", 7, 14), ("dopri5", 7, 6 * 7 + 1), ("bosh3", 7, 3 * 7 + 1),
    ("dopri5", None, None), ("bosh3", None, None)])
@pytest.mark.parametrize("error_norm", ["batch", "rms", "sample"])
def test_num_evals_counts_model_calls(solver, num_steps, expected, error_norm):
    if num_steps is not None and error_norm != "batch":
        pytest.skip("fixed steps take no error norm")
    score = counting(batched_gaussian_score(VP))
    kwargs = {} if num_steps is not None else {"error_norm": error_norm, "rtol": 1e-4, "atol": 1e-4}
    result = dk.log_likelihood(score, DATA, VP, num_steps, solver=solver, trace="exact", **kwargs)
    assert result.num_evals == score.calls
    if expected is not None:
        assert result.num_evals == expected
    else:  # the first evaluation, Hairer's probe, then (stages - 1) per attempted step (FSAL)
        assert (result.num_evals - 2) % (len(ode.TABLEAUS[solver].c) - 1) == 0 and result.num_evals > 2


def test_per_sample_norm_is_independent_of_the_batch_split():
    """error_norm="sample": each sample's steps are its own, so a sample gives the same result alone or
    among others (to 1e-12: the batched closed-form score may round differently by batch size); the
    batch norm's steps follow the worst sample, so there the result moves (here by > 1e-9)."""
    score = batched_gaussian_score(VP)
    kwargs = dict(rtol=1e-4, atol=1e-4, trace="exact")
    whole = dk.log_likelihood(score, DATA, VP, error_norm="sample", **kwargs)
    parts = [dk.log_likelihood(score, DATA[i:i + 5], VP, error_norm="sample", **kwargs) for i in range(0, 32, 5)]
    torch.testing.assert_close(torch.cat([p.log_p for p in parts]), whole.log_p, rtol=0, atol=1e-12)
    torch.testing.assert_close(torch.cat([p.x_end for p in parts]), whole.x_end, rtol=0, atol=1e-12)
    batch_whole = dk.log_likelihood(score, DATA, VP, error_norm="batch", **kwargs)
    batch_parts = torch.cat([dk.log_likelihood(score, DATA[i:i + 5], VP, error_norm="batch", **kwargs).log_p
                             for i in range(0, 32, 5)])
    assert (batch_parts - batch_whole.log_p).abs().max() > 1e-9


def test_hutchinson_with_dopri5_matches_the_fixed_probe_heun_limit():
    """With Hutchinson probes the ODE is still deterministic (one probe set per solve): dopri5 at a
    tight tolerance equals Heun on a fine grid with the same probes."""
    dopri = dk.log_likelihood(gaussian_score(VP), DATA, VP, rtol=1e-8, atol=1e-8, num_probes=2, seed=3)
    heun = dk.log_likelihood(gaussian_score(VP), DATA, VP, 2000, num_probes=2, seed=3)
    torch.testing.assert_close(dopri.log_p, heun.log_p, rtol=0, atol=1e-4)  # Heun-2000's own error ~1e-6 per dim


# ---- the CNF path on a linear flow, and scipy ----

A = torch.tensor([[-0.5, 1.0, 0.2, 0.0], [-1.0, -0.3, 0.0, 0.4], [0.1, 0.0, 0.2, -0.6], [0.3, -0.2, 0.5, -0.1]],
                 dtype=torch.float64)


@pytest.mark.parametrize("solver", ["dopri5", "bosh3"])
@pytest.mark.parametrize("direction", [(0.0, 1.0), (1.0, -0.5)])
def test_cnf_linear_flow_closed_form(solver, direction):
    """dz/dt = A z: z(t1) = exp(A (t1 - t0)) x and log p(x) = log N(z; 0, I) + (t1 - t0) tr(A)."""
    t0, t1 = direction
    x = torch.randn(6, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    z = x @ torch.linalg.matrix_exp(A * (t1 - t0)).T
    expected = likelihood.standard_normal_logp(z) + (t1 - t0) * torch.trace(A)
    result = dk.cnf_log_likelihood(lambda y, t: y @ A.T, x, t0, t1, solver=solver, rtol=1e-9, atol=1e-9,
                                   trace="exact")
    torch.testing.assert_close(result.x_end, z, rtol=0, atol=1e-7)
    torch.testing.assert_close(result.log_p, expected, rtol=0, atol=1e-7)
    torch.testing.assert_close(result.delta_log_p, torch.full((6,), (t1 - t0) * torch.trace(A).item(),
                                                              dtype=torch.float64), rtol=0, atol=1e-9)


def mlp_score():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(4, 32), torch.nn.Tanh(), torch.nn.Linear(32, 3)).double()
    for p in net.parameters():
        p.requires_grad_(False)
    return lambda x, t: net(torch.cat([x, t.reshape(-1, 1).to(x.dtype)], 1))


def scipy_log_likelihood(score, x, sde, eps, rtol):
    """score_sde's approach, written independently of diffkern: scipy RK45 on the flattened
    (x, delta) of one sample, the exact trace from torch.autograd.functional.jacobian."""
    from scipy.integrate import solve_ivp

    d = x.shape[0]

    def fun(t, state):
        y = torch.tensor(state[:d], dtype=torch.float64)
        tt = torch.tensor([t], dtype=torch.float64)
        f, g2 = float(sde.drift_coef(t)), float(sde.diffusion(t)) ** 2
        drift = lambda z: f * z - 0.5 * g2 * score(z[None], tt)[0]  # noqa: E731
        jac = torch.autograd.functional.jacobian(drift, y)
        return np.concatenate([drift(y).numpy(), [float(torch.trace(jac))]])

    out = solve_ivp(fun, (eps, sde.T), np.concatenate([x.numpy(), [0.0]]), rtol=rtol, atol=rtol, method="RK45")
    return torch.tensor(out.y[:d, -1]), float(out.y[d, -1])


@pytest.mark.parametrize("solver", ["dopri5", "bosh3"])
def test_agrees_with_scipy_solve_ivp(solver):
    """A nonlinear (MLP) score: diffkern at 1e-8 and scipy's RK45 at 1e-11 agree on delta log p and the
    end point to 1e-6 (both solvers' errors are far below that)."""
    score = mlp_score()
    x = torch.randn(4, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    result = dk.log_likelihood(score, x, VP, solver=solver, rtol=1e-8, atol=1e-8, trace="exact")
    for n in range(4):
        x_end, delta = scipy_log_likelihood(score, x[n], VP, 1e-5, 1e-11)
        torch.testing.assert_close(result.x_end[n], x_end, rtol=0, atol=1e-6)
        assert abs(result.delta_log_p[n].item() - delta) < 1e-6


# ---- sample_ode ----

@pytest.mark.parametrize("solver", ["dopri5", "bosh3"])
def test_sample_ode_adaptive_against_the_closed_form_flow(solver):
    """For N(mu, s^2) data the probability-flow ODE maps x_T to m(eps) mu + sqrt(v(eps) / v(T)) (x_T -
    m(T) mu) with v = m^2 s^2 + std^2 (each marginal's standardised coordinate is conserved)."""
    mu, s = 0.7, 0.4

    def score(x, t):
        m, sd = VP.mean_coef(t.double())[:, None], VP.marginal_std(t.double())[:, None]
        return (-(x.double() - m * mu) / (m ** 2 * s ** 2 + sd ** 2)).to(x.dtype)

    x_T = torch.linspace(-2, 2, 9, dtype=torch.float64)[:, None]
    x = dk.sample_ode(score, (9, 1), VP, solver=solver, rtol=1e-9, atol=1e-9, x_T=x_T, dtype=torch.float64)
    v = lambda t: float(VP.mean_coef(t)) ** 2 * s ** 2 + float(VP.marginal_std(t)) ** 2  # noqa: E731
    expected = float(VP.mean_coef(1e-3)) * mu + math.sqrt(v(1e-3) / v(1.0)) * (x_T - float(VP.mean_coef(1.0)) * mu)
    torch.testing.assert_close(x, expected, rtol=0, atol=1e-7)
    fixed = dk.sample_ode(score, (9, 1), VP, 40, solver=solver, x_T=x_T, dtype=torch.float64)
    assert (fixed - expected).abs().max() < 1e-4
    seen = []
    dk.sample_ode(score, (9, 1), VP, 5, solver=solver, x_T=x_T, dtype=torch.float64,
                  callback=lambda i, t, y: seen.append(i))
    assert seen == [0, 1, 2, 3, 4]


# ---- clear errors ----

@pytest.mark.parametrize("call,match", [
    (lambda: dk.log_likelihood(gaussian_score(VP), DATA, VP, 10, rtol=1e-3), "rtol"),
    (lambda: dk.log_likelihood(gaussian_score(VP), DATA, VP, solver="heun", atol=1e-3), "atol"),
    (lambda: dk.log_likelihood(gaussian_score(VP), DATA, VP, 10, solver="dopri5", error_norm="sample"), "error_norm"),
    (lambda: dk.log_likelihood(gaussian_score(VP), DATA, VP, time_grid="uniform"), "time_grid"),
    (lambda: dk.log_likelihood(gaussian_score(VP), DATA, VP, solver="rk45"), "solver"),
    (lambda: dk.log_likelihood(gaussian_score(VP), DATA, VP, atol=0.0), "atol"),
    (lambda: dk.log_likelihood(gaussian_score(VP), DATA, VP, rtol=1.5), "rtol"),
    (lambda: dk.log_likelihood(gaussian_score(VP), DATA, VP, rtol=float("nan")), "rtol"),
    (lambda: dk.log_likelihood(gaussian_score(VP), DATA, VP, error_norm="max"), "error_norm"),
    (lambda: dk.log_likelihood(gaussian_score(VP), DATA, VP, max_num_evals=0), "max_num_evals"),
    (lambda: dk.cnf_log_likelihood(lambda y, t: -y, DATA, rtol="a"), "rtol"),
    (lambda: dk.sample_ode(lambda y, t: -y, (2, 2), VP, solver="rk45"), "solver"),
    (lambda: dk.sample_ode(lambda y, t: -y, (2, 2), VP, solver="dopri5", callback=print), "callback"),
    (lambda: dk.sample_ode(lambda y, t: -y, (2, 2), VP, solver="dopri5", eps=2.0), "eps"),
])
def test_bad_solver_arguments(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_evaluation_budget_and_non_finite_models_stop_with_a_clear_error():
    with pytest.raises(RuntimeError, match="max_num_evals=5"):
        dk.log_likelihood(gaussian_score(VP), DATA, VP, max_num_evals=5, trace="exact")
    nan_model = lambda x, t: x * float("nan")  # noqa: E731
    with pytest.raises(RuntimeError, match="non-finite|max_num_evals"):
        dk.cnf_log_likelihood(nan_model, DATA, trace="exact", max_num_evals=200)


def test_empty_batches_and_defaults():
    empty = dk.log_likelihood(gaussian_score(VP), DATA[:0], VP)
    assert empty.log_p.shape == (0,) and empty.num_evals == 0
    assert likelihood.SOLVERS == ("auto", "euler", "heun", "rk4", "dopri5", "bosh3")
    default = dk.log_likelihood(gaussian_score(VP), DATA[:4], VP, trace="exact")
    explicit = dk.log_likelihood(gaussian_score(VP), DATA[:4], VP, solver="dopri5", rtol=1e-5, atol=1e-5,
                                 trace="exact")
    assert torch.equal(default.log_p, explicit.log_p) and default.num_evals == explicit.num_evals
    fixed = dk.log_likelihood(gaussian_score(VP), DATA[:4], VP, 20, trace="exact")
    assert fixed.num_evals == 40  # "auto" with num_steps: Heun, as before the adaptive solvers


def test_the_rms_norm_steps_on_the_average_error():
    """error_norm="rms" (torchdiffeq's kind): fewer evaluations than the worst sample's norm on a batch
    whose samples differ in difficulty, and a result still within the tolerance's reach of a tight solve."""
    torch.manual_seed(0)
    net = dk.training.ConcatSquashMLP(2, (32, 32)).double()
    with torch.no_grad():
        for p in net.parameters():
            p.mul_(3.0)  # dynamics that vary across the plane
        x = 2 * torch.randn(64, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
        tight = dk.cnf_log_likelihood(net, x, 0.0, 1.0, trace="exact", rtol=1e-10, atol=1e-10)
        worst, rms = (dk.cnf_log_likelihood(net, x, 0.0, 1.0, trace="exact", rtol=1e-4, atol=1e-4, error_norm=norm)
                      for norm in ("batch", "rms"))
    assert rms.num_evals < worst.num_evals  # measured 26 against 38
    # local errors of 1e-4 per dimension over ~10 steps: the global error reaches a few 1e-3 (measured
    # 2.6e-3 for rms, 7e-4 for the worst-sample norm)
    assert float((rms.log_p - tight.log_p).abs().max()) < 1e-2


@requires_cuda
@pytest.mark.cuda
@pytest.mark.parametrize("error_norm", ["batch", "rms", "sample"])
def test_cuda_adaptive_likelihood_matches_cpu(error_norm):
    score = mlp_score()
    x = torch.randn(16, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    cpu = dk.log_likelihood(score, x, VP, rtol=1e-6, atol=1e-6, trace="exact", error_norm=error_norm)
    cuda_score = lambda y, t: score(y.cpu(), t.cpu()).to(y.device)  # noqa: E731
    cuda = dk.log_likelihood(cuda_score, x.cuda(), VP, rtol=1e-6, atol=1e-6, trace="exact", error_norm=error_norm)
    torch.testing.assert_close(cuda.log_p.cpu(), cpu.log_p, rtol=0, atol=1e-10)
    assert cuda.num_evals == cpu.num_evals
