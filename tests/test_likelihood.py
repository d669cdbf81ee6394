"""Hutchinson traces and log-likelihoods: the estimator's law for linear maps, the reduction
kernel against the reference, and likelihoods against closed-form Gaussian densities."""
import math

import pytest
import torch
from common import TOLERANCES, requires_cuda

import diffkern as dk
from diffkern import likelihood, ops, reference

A = torch.tensor([[1.0, 0.5, -0.3, 0.2], [0.1, -2.0, 0.4, 0.0], [0.7, 0.3, 0.5, -1.1], [0.0, 0.9, 0.2, 1.5]],
                 dtype=torch.float64)
S = (A + A.T) / 2


def linear(x):
    return x @ A.T


# ---- the estimator ----

@pytest.mark.parametrize("distribution", ["rademacher", "gaussian"])
@pytest.mark.parametrize("num_probes", [1, 4])
@pytest.mark.parametrize("mode", ["jvp", "vjp"])
def test_hutchinson_mean_and_variance_for_a_linear_map(distribution, num_probes, mode):
    """Each sample draws its own probes, so 2^15 samples are 2^15 independent estimates: their mean is
    tr(A) within 5 standard errors and their variance 2 (||S||_F^2 - sum S_ii^2) / K (Rademacher) or
    2 ||S||_F^2 / K (Gaussian) within 5 standard errors of a variance estimate (kurtosis included)."""
    n = 1 << 15
    x = torch.zeros(n, 4, dtype=torch.float64)
    estimates = dk.hutchinson_trace(linear, x, num_probes=num_probes, distribution=distribution, seed=3, mode=mode)
    assert estimates.dtype == torch.float64 and estimates.shape == (n,)
    off_diagonal = (S ** 2).sum() - (S.diag() ** 2).sum()
    variance = float((2 * off_diagonal if distribution == "rademacher" else 2 * (S ** 2).sum()) / num_probes)
    assert abs(estimates.mean().item() - torch.trace(A).item()) < 5 * math.sqrt(variance / n)
    centred = estimates - estimates.mean()
    variance_se = math.sqrt(((centred ** 4).mean().item() - variance ** 2) / n)
    assert abs(estimates.var().item() - variance) < 5 * variance_se


def test_rademacher_is_exact_for_diagonal_jacobians():
    x = torch.randn(8, 5, dtype=torch.float64)
    def fn(y):
        return (torch.sin(y) * 3)
    torch.testing.assert_close(dk.hutchinson_trace(fn, x, num_probes=1), (3 * torch.cos(x)).sum(1))


def mlp(x):
    return torch.tanh(x @ A.T + 0.1) @ A


def test_exact_trace_is_the_jacobian_trace():
    x = torch.randn(5, 4, dtype=torch.float64)
    expected = torch.stack([torch.trace(torch.autograd.functional.jacobian(lambda y: mlp(y[None])[0], x[n]))
                            for n in range(5)])
    torch.testing.assert_close(dk.exact_trace(mlp, x), expected)
    torch.testing.assert_close(dk.exact_trace(mlp, x, mode="vjp"), expected)


def test_jvp_and_vjp_agree_on_the_same_probes():
    x = torch.randn(64, 4, dtype=torch.float64)
    for distribution in ["rademacher", "gaussian"]:
        jvp = dk.hutchinson_trace(mlp, x, num_probes=8, distribution=distribution, seed=1, mode="jvp")
        vjp = dk.hutchinson_trace(mlp, x, num_probes=8, distribution=distribution, seed=1, mode="vjp")
        torch.testing.assert_close(jvp, vjp, rtol=1e-12, atol=1e-12)


def test_probes_are_a_separate_batch_invariant_stream():
    x = torch.zeros(6, 2, 3)
    v = likelihood.probes(x, 3, "gaussian", seed=5, step=2)
    assert v.shape == (3, 6, 2, 3)
    flat = dk.randn((6, 18), seed=5, step=2, stream=likelihood.PROBE_STREAM)
    assert torch.equal(v.movedim(0, 1).reshape(6, 18), flat)
    half = likelihood.probes(x[3:], 3, "gaussian", seed=5, step=2, sample_offset=3)
    assert torch.equal(v[:, 3:], half)
    signs = likelihood.probes(x, 3, "rademacher", seed=5)
    assert set(signs.unique().tolist()) == {-1.0, 1.0}


# ---- the kernels ----

@pytest.mark.parametrize("dtype", list(TOLERANCES))
@pytest.mark.parametrize("features", [1, 5, 128, 300])
def test_probe_trace_matches_reference(device, dtype, features):
    gen = torch.Generator().manual_seed(features)
    v = torch.randn(3, 7, features, generator=gen).to(device=device, dtype=dtype)
    jv = torch.randn(3, 7, features, generator=gen).to(device=device, dtype=dtype)
    got = ops.probe_trace(v, jv, 1 / 3)
    expected = reference.probe_trace(v, jv, 1 / 3)
    assert got.dtype == torch.float64
    # float32 accumulation for 32-bit and half inputs: relative error ~ features * 2^-24
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    torch.testing.assert_close(got, expected, rtol=tol, atol=tol * features)


def test_probe_trace_of_strided_views():
    v = torch.randn(7, 3, 10, dtype=torch.float64).movedim(1, 0)  # [3, 7, 10] with strided leading dims
    jv = torch.randn(3, 7, 10, dtype=torch.float64)
    torch.testing.assert_close(ops.probe_trace(v, jv, 0.5), reference.probe_trace(v, jv, 0.5))


@pytest.mark.parametrize("dtype", list(TOLERANCES))
def test_likelihood_step_matches_reference(device, dtype):
    gen = torch.Generator().manual_seed(0)
    x, m, m_prev = (torch.randn(6, 2, 9, generator=gen).to(device=device, dtype=dtype) for _ in range(3))
    v, jv = (torch.randn(4, 6, 2, 9, generator=gen).to(device=device, dtype=dtype) for _ in range(2))
    delta = torch.randn(6, dtype=torch.float64, generator=gen).to(device)
    trace_prev = torch.randn(6, dtype=torch.float64, generator=gen).to(device)
    coefficients = dict(c_x=0.9, c_model=0.05, c_prev=-0.02, l0=0.3, l_prev=0.01, l_trace=0.02, trace_scale=0.25)
    got = ops.likelihood_step(x, m, m_prev, v, jv, delta, trace_prev, **coefficients)
    expected = reference.likelihood_step(x, m, m_prev, v, jv, delta, trace_prev, **coefficients)
    torch.testing.assert_close(got[0], expected[0], **TOLERANCES[dtype])
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    torch.testing.assert_close(got[1], expected[1], rtol=tol, atol=tol * 18)
    torch.testing.assert_close(got[2], expected[2], rtol=tol, atol=tol * 18)


def test_trace_is_deterministic():
    v, jv = torch.randn(8, 32, 3000), torch.randn(8, 32, 3000)
    first = ops.probe_trace(v, jv, 0.125)
    torch.set_num_threads(1)
    try:
        assert torch.equal(first, ops.probe_trace(v, jv, 0.125))  # same bits whatever the threading
    finally:
        torch.set_num_threads(2)


def test_opcheck():
    v, jv = torch.randn(2, 3, 5), torch.randn(2, 3, 5)
    torch.library.opcheck(torch.ops.diffkern.probe_trace.default, (v, jv, 0.5))
    x, m = torch.randn(3, 5), torch.randn(3, 5)
    delta = torch.zeros(3, dtype=torch.float64)
    torch.library.opcheck(torch.ops.diffkern.likelihood_step.default,
                          (x, m, m, v, jv, delta, delta, 1.0, 0.1, 0.2, 0.0, 0.5, 0.5, 0.5))
    torch.library.opcheck(torch.ops.diffkern.rademacher.default,
                          ([3, 5], 1, 2, 3, 4, None, torch.float32, torch.device("cpu")))


@pytest.mark.parametrize("dtype", list(TOLERANCES))
def test_rademacher(device, dtype):
    shape = (5, 37)
    signs = dk.rademacher(shape, seed=4, step=1, device=device, dtype=dtype)
    assert torch.equal(signs.cpu(), reference.rademacher(shape, seed=4, step=1, dtype=dtype))
    bits = dk.random_bits(shape, seed=4, step=1)
    assert torch.equal(signs.cpu(), torch.where(bits < 0, -1.0, 1.0).to(dtype))


@pytest.mark.parametrize("shape", [(3, 1), (9, 2), (17, 3), (4, 129), (1000,)])
def test_rademacher_instruction_sets_agree(shape):
    from common import cpu_isas

    results = [torch.ops.diffkern._noise_cpu_isa(list(shape), 3, 2, 1, 1, torch.float32, isa,
                                                 True) for isa in cpu_isas()]
    for z in results[1:]:
        assert torch.equal(z, results[0])


def chunked_tree_order(v, jv, scale):
    """The summation order of csrc/include/diffkern/trace_math.h in float32 torch ops (elementwise
    adds round as the kernels' separate adds do): chunks of kTraceChunk features; in each, per probe,
    128 lanes over strided features, a binary tree over the lanes, probes added in order; chunks
    added in order. Returns float64 [B]."""
    lanes, chunk = 128, 32 * 128
    probes, batch, features = v.shape
    products = v.float() * jv.float()
    traces = []
    for n in range(batch):
        total = torch.zeros((), dtype=torch.float32)
        for first in range(0, max(features, 1), chunk):
            chunk_sum = torch.zeros((), dtype=torch.float32)
            for k in range(probes):
                part = products[k, n, first:first + chunk]
                padded = torch.cat([part, part.new_zeros(-part.numel() % lanes)]).reshape(-1, lanes)
                partial = torch.zeros(lanes, dtype=torch.float32)
                for row in padded:  # lane l: features l, l + 128, ... in increasing order
                    partial = partial + row
                stride = lanes // 2
                while stride:
                    partial = torch.cat([partial[:stride] + partial[stride:2 * stride], partial[stride:]])
                    stride //= 2
                chunk_sum = chunk_sum + partial[0]
            total = total + chunk_sum
        traces.append(total.double() * scale)
    return torch.stack(traces)


@pytest.mark.parametrize("features", [1, 2, 3, 77, 128, 129, 4096, 4097, 9000])
def test_trace_sums_in_the_documented_order(features):
    """The CPU kernel is bitwise the chunked order that the CUDA blocks follow (one block per sample
    and chunk of 4096 features), for samples within one chunk, across chunk edges and many chunks."""
    gen = torch.Generator().manual_seed(features)
    v, jv = torch.randn(3, 4, features, generator=gen), torch.randn(3, 4, features, generator=gen)
    assert torch.equal(ops.probe_trace(v, jv, 1 / 3), chunked_tree_order(v, jv, 1 / 3))


@requires_cuda
@pytest.mark.cuda
@pytest.mark.parametrize("features", [2, 777, 3 * 64 * 64 + 5])
def test_cuda_trace_equals_cpu_bitwise(features):
    v, jv = torch.randn(8, 16, features), torch.randn(8, 16, features)
    assert torch.equal(ops.probe_trace(v.cuda(), jv.cuda(), 0.125).cpu(), ops.probe_trace(v, jv, 0.125))
    x, m = torch.randn(16, features), torch.randn(16, features)
    delta = torch.randn(16, dtype=torch.float64)
    cpu = ops.likelihood_step(x, m, None, v, jv, delta, None, c_x=0.9, c_model=0.1, l_trace=0.5, trace_scale=0.125)
    cuda = ops.likelihood_step(x.cuda(), m.cuda(), None, v.cuda(), jv.cuda(), delta.cuda(), None, c_x=0.9,
                               c_model=0.1, l_trace=0.5, trace_scale=0.125)
    for a, b in zip(cpu, cuda):
        assert torch.equal(a, b.cpu())


# ---- log-likelihoods against closed forms ----

MU = torch.tensor([0.5, -1.0, 2.0], dtype=torch.float64)
L_FACTOR = torch.tensor([[0.4, 0.0, 0.0], [0.3, 0.8, 0.0], [-0.2, 0.1, 0.5]], dtype=torch.float64)
SIGMA = L_FACTOR @ L_FACTOR.T  # a full covariance: the score mixes features


def gaussian_marginal(sde, t):
    m, sd = float(sde.mean_coef(t)), float(sde.marginal_std(t))
    return torch.distributions.MultivariateNormal(m * MU, m ** 2 * SIGMA + sd ** 2 * torch.eye(3, dtype=torch.float64))


def gaussian_score(sde):
    def score(x, t):
        m = sde.mean_coef(t[0]).item()
        sd = sde.marginal_std(t[0]).item()
        cov = m ** 2 * SIGMA + sd ** 2 * torch.eye(3, dtype=torch.float64)
        return -torch.linalg.solve(cov, (x.double() - m * MU).T).T.to(x.dtype)
    return score


DATA = MU + torch.randn(32, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) @ L_FACTOR.T
SDES = {"vp": (dk.VPSDE(), 100), "subvp": (dk.SubVPSDE(), 100), "ve": (dk.VESDE(0.01, 50.0), 600)}


def likelihood_error(sde, steps, **kwargs):
    """max |log p - exact| over DATA, the prior's own mismatch removed: the SDE's prior N(0, prior_std^2)
    is not exactly p_T, and that term (evaluated in closed form at the ODE's end point) belongs to the
    model, not to the solver."""
    result = dk.log_likelihood(gaussian_score(sde), DATA, sde, steps, **kwargs)
    prior_mismatch = result.prior_log_p - gaussian_marginal(sde, 1.0).log_prob(result.x_end)
    exact = gaussian_marginal(sde, 1e-5).log_prob(DATA)
    return (result.log_p - prior_mismatch - exact).abs().max().item(), result


@pytest.mark.parametrize("name", list(SDES))
def test_log_likelihood_matches_the_gaussian_density(name):
    sde, steps = SDES[name]
    error, result = likelihood_error(sde, steps, trace="exact")
    assert error < 1e-3 * 3, error  # within 1e-3 nats per dimension
    coarse, _ = likelihood_error(sde, steps // 4, trace="exact")
    assert coarse > 4 * error  # converges (Heun: about 16x for 4x the steps)
    torch.testing.assert_close(result.bits_per_dim, -result.log_p / (3 * math.log(2)))
    assert torch.equal(dk.log_likelihood(gaussian_score(sde), DATA, sde, steps, trace="exact", bits_offset=7.0)
                       .bits_per_dim, result.bits_per_dim + 7.0)


def test_log_likelihood_without_the_prior_correction_on_near_centred_data():
    """With data near the origin the VP prior mismatch is negligible: plain comparison, 1e-3 nats/dim."""
    sde = dk.VPSDE()
    global MU
    saved, MU = MU, MU * 0.05
    try:
        data = MU + torch.randn(16, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(1)) @ L_FACTOR.T
        result = dk.log_likelihood(gaussian_score(sde), data, sde, 100, trace="exact")
        exact = gaussian_marginal(sde, 1e-5).log_prob(data)
        assert (result.log_p - exact).abs().max().item() < 3e-3
    finally:
        MU = saved


@pytest.mark.parametrize("num_probes", [1, 4, 16])
def test_hutchinson_likelihood_is_unbiased(num_probes):
    """The same point repeated over the batch draws independent probes per copy: the mean of the
    Hutchinson log-likelihoods equals the exact-trace one within 5 standard errors."""
    sde = dk.VPSDE()
    x = DATA[:1].expand(4096, 3).contiguous()
    exact = dk.log_likelihood(gaussian_score(sde), x[:1], sde, 50, trace="exact").log_p[0].item()
    estimates = dk.log_likelihood(gaussian_score(sde), x, sde, 50, num_probes=num_probes, seed=2).log_p
    assert abs(estimates.mean().item() - exact) < 5 * estimates.std().item() / math.sqrt(4096)
    assert estimates.std() > 0  # the full covariance makes the estimate random


def test_cnf_with_a_linear_flow():
    """dz/dt = A z from t0 = 0 to t1 = 1: z(1) = exp(A) x and log p(x) = log N(z(1); 0, I) + tr(A)."""
    x = torch.randn(8, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    z = x @ torch.linalg.matrix_exp(A).T
    expected = torch.distributions.MultivariateNormal(torch.zeros(4, dtype=torch.float64),
                                                      torch.eye(4, dtype=torch.float64)).log_prob(z) + torch.trace(A)
    result = dk.cnf_log_likelihood(lambda y, t: y @ A.T, x, 0.0, 1.0, 200, trace="exact")
    torch.testing.assert_close(result.log_p, expected, rtol=0, atol=1e-3)
    torch.testing.assert_close(result.x_end, z, rtol=0, atol=1e-3)
    torch.testing.assert_close(result.delta_log_p, torch.full((8,), torch.trace(A).item(), dtype=torch.float64))
    hutchinson = dk.cnf_log_likelihood(lambda y, t: y @ A.T, x.repeat(512, 1), 0.0, 1.0, 50, num_probes=2, seed=1)
    per_point = hutchinson.log_p.reshape(512, 8).mean(0)
    euler_exact = dk.cnf_log_likelihood(lambda y, t: y @ A.T, x, 0.0, 1.0, 50, trace="exact").log_p
    assert (per_point - euler_exact).abs().max() < 5 * hutchinson.log_p.reshape(512, 8).std(0).max() / math.sqrt(512)


# ---- bad inputs ----

def test_bad_inputs():
    x = torch.randn(4, 3)
    with pytest.raises(ValueError, match="x's shape"):
        dk.hutchinson_trace(lambda y: y[:, :2], x)
    with pytest.raises(ValueError, match="num_probes"):
        dk.hutchinson_trace(linear, x.double(), num_probes=0)
    with pytest.raises(ValueError, match="batch"):
        dk.hutchinson_trace(lambda y: y, torch.randn(5))
    with pytest.raises(ValueError, match="distribution"):
        dk.hutchinson_trace(lambda y: y, x, distribution="uniform")
    with pytest.raises(ValueError, match="mode"):
        dk.hutchinson_trace(lambda y: y, x, mode="fd")
    with pytest.raises(ValueError, match="solver"):
        dk.log_likelihood(lambda y, t: y, x, dk.VPSDE(), 10, solver="rk45")
    with pytest.raises(ValueError, match="trace"):
        dk.log_likelihood(lambda y, t: y, x, dk.VPSDE(), 10, trace="approximate")
    with pytest.raises(ValueError, match="eps"):
        dk.log_likelihood(lambda y, t: y, x, dk.VPSDE(), 10, eps=0.0)
