"""PFGM (seed 002, section 5): the prior against its derived law, the exact empirical field against
eq. 98, the backward ODE landing on the data (each point with equal mass, the seed's theorem), the
forward-backward round trip, Euler / Heun orders against scipy's solve_ivp, the fused path against
the plain-PyTorch loop, the noise contract and bad input."""
import math

import numpy as np
import pytest
import torch
from scipy import integrate, stats

import diffkern as dk
from diffkern import reference
from diffkern.models import EmpiricalPoissonField


def _data(points, features, seed=0):
    return torch.randn(points, features, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * 2


def point_charge(x, z):
    """The field of one charge at the origin of R^{N+1}: E = x~ / |x~|^(N+1) (elementwise per sample,
    so the noise-contract tests can ask for bitwise equality)."""
    flat = x.reshape(x.shape[0], -1)
    r2 = (flat.double() ** 2).sum(1) + z.double() ** 2
    scale = r2 ** (-(flat.shape[1] + 1) / 2)
    return (flat.double() * scale[:, None]).to(x.dtype).reshape(x.shape), (z.double() * scale).to(z.dtype)


# ---- the prior ----

@pytest.mark.parametrize("features", [1, 2, 16])
def test_prior_radial_law_is_the_derived_beta(features):
    """R^2 / (R^2 + z_max^2) ~ Beta(N/2, 1/2) (the docstring's derivation); the KS test rejects the
    law one gets from a wrong exponent, Beta(N/2, 1), so it can fail."""
    z_max = 7.0
    x = dk.pfgm_prior((4000, features), z_max, seed=3, dtype=torch.float64)
    r2 = (x ** 2).sum(1)
    u = (r2 / (r2 + z_max ** 2)).numpy()
    assert stats.kstest(u, stats.beta(features / 2, 0.5).cdf).pvalue > 0.01
    assert stats.kstest(u, stats.beta(features / 2, 1.0).cdf).pvalue < 1e-6


def test_prior_in_one_dimension_is_cauchy():
    """N = 1: the density z / (x^2 + z^2) / pi, the Cauchy law of scale z_max (an independent check of
    the projection of the half circle onto the line z = z_max)."""
    x = dk.pfgm_prior((4000, 1), 5.0, seed=1, dtype=torch.float64).flatten().numpy()
    assert stats.kstest(x, stats.cauchy(scale=5.0).cdf).pvalue > 0.01
    assert stats.kstest(x, stats.cauchy(scale=3.5).cdf).pvalue < 1e-6


def test_prior_directions_are_uniform():
    x2 = dk.pfgm_prior((4000, 2), 3.0, seed=2, dtype=torch.float64)
    angle = torch.atan2(x2[:, 1], x2[:, 0]).numpy()
    assert stats.kstest(angle, stats.uniform(-math.pi, 2 * math.pi).cdf).pvalue > 0.01
    x16 = dk.pfgm_prior((4000, 16), 3.0, seed=2, dtype=torch.float64)
    u = x16 / x16.norm(dim=1, keepdim=True)
    for k in (0, 7, 15):  # a coordinate of a uniform unit vector in R^16: u_k^2 ~ Beta(1/2, 15/2)
        assert stats.kstest((u[:, k] ** 2).numpy(), stats.beta(0.5, 7.5).cdf).pvalue > 0.01


def test_prior_is_the_noise_stream(device):
    x = dk.pfgm_prior((6, 2, 3), 4.0, seed=9, sample_offset=5, device=device)
    g = dk.randn((6, 7), seed=9, step=0, sample_offset=5, device=device)
    assert torch.equal(x, (4.0 * g[:, :6] / g[:, 6:].abs()).reshape(6, 2, 3))


# ---- the empirical field ----

def test_empirical_field_is_eq_98():
    data = _data(64, 2)
    field = EmpiricalPoissonField(data, z_data=0.25, chunk=10)
    x = torch.randn(9, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    z = torch.rand(9, generator=torch.Generator().manual_seed(2), dtype=torch.float64) + 0.5
    charges = torch.cat([data, torch.full((64, 1), 0.25, dtype=torch.float64)], 1)
    diff = torch.cat([x, z[:, None]], 1)[:, None] - charges[None]
    exact = (diff / diff.norm(dim=2, keepdim=True) ** 3).sum(1)
    field_x, field_z = field.field(x, z)
    torch.testing.assert_close(torch.cat([field_x, field_z[:, None]], 1), exact, rtol=1e-12, atol=0)
    # the scaled field has E's direction, and v = -sqrt(N) E / |E|
    scaled = torch.cat([t.reshape(9, -1) for t in (field(x, z)[0], field(x, z)[1][:, None])], 1)
    cosine = (scaled * exact).sum(1) / scaled.norm(dim=1) / exact.norm(dim=1)
    torch.testing.assert_close(cosine, torch.ones(9, dtype=torch.float64), rtol=0, atol=1e-13)
    v_x, v_z = field.normalized(x, z)
    expected_v = -math.sqrt(2) * exact / exact.norm(dim=1, keepdim=True)
    torch.testing.assert_close(torch.cat([v_x, v_z[:, None]], 1), expected_v, rtol=1e-12, atol=1e-14)


def test_empirical_field_chunks_agree():
    data = _data(100, 16)
    x = torch.randn(7, 16, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    z = torch.full((7,), 0.3, dtype=torch.float64)
    whole = EmpiricalPoissonField(data, chunk=1000)(x, z)[0]
    for chunk in (1, 7, 33):
        torch.testing.assert_close(EmpiricalPoissonField(data, chunk=chunk)(x, z)[0], whole, rtol=1e-12, atol=1e-12)


def test_empirical_field_is_finite_in_high_dimension():
    """N = 512: |x~ - x~_i|^-(N+1) is 0 in float64 at distance ~30 (and overflows at distance 0.1),
    so eq. 98 as written gives 0 / nan; the log-space form still gives the direction, which near a
    data point points away from it."""
    data = _data(32, 512)
    field = EmpiricalPoissonField(data)
    x = (data[:4] + 0.01 * torch.randn(4, 512, generator=torch.Generator().manual_seed(5), dtype=torch.float64)).float()
    z = torch.full((4,), 0.05)
    field_x, field_z = field(x, z)
    assert torch.isfinite(field_x).all() and torch.isfinite(field_z).all()
    away = (field_x.double() * (x.double() - data[:4])).sum(1)
    assert (away > 0).all()
    far = torch.full((2, 512), 30.0)
    raw_x, _ = field.field(far, torch.ones(2))
    assert (raw_x == 0).all()  # the raw formula underflows here: what the scaled form avoids
    assert (field(far, torch.ones(2))[0] != 0).all()


# ---- the backward ODE on the exact empirical field ----

@pytest.mark.parametrize("features", [2, 16])
def test_samples_land_on_the_data_with_equal_mass(features):
    """Measured (4096 samples, 64 points, z_max 40, z_min 1e-5, Heun in log z): median distance to
    the nearest data point 5.1e-5 / 2.2e-5 / 1.9e-5 for 25 / 50 / 100 steps in 2-d (2.5e-4 / 8.0e-5 /
    6.4e-5 in 16-d), every point reached, and the counts per point consistent with 1/64 each (chi^2
    p ~ 0.4): each charge sends the same flux through the far hemisphere (the seed's theorem)."""
    data = _data(64, features)
    field = EmpiricalPoissonField(data)
    medians = []
    for steps in (25, 50, 100):
        samples = dk.sample_pfgm(field, (4096, features), z_min=1e-5, num_steps=steps, seed=1, dtype=torch.float64)
        distances = torch.cdist(samples, data)
        nearest = distances.min(1).values
        medians.append(float(nearest.median()))
        counts = torch.bincount(distances.argmin(1), minlength=64)
    assert medians[0] > medians[1] > medians[2], medians
    assert medians[2] < 1e-3 * 10 ** (features > 2)  # a few z_min: the samples sit on the points
    assert float(nearest.quantile(0.99)) < 1e-2
    assert (counts > 0).all()
    assert stats.chisquare(counts.numpy()).pvalue > 0.01


def test_forward_then_backward_returns_to_the_data():
    data = _data(64, 16)
    field = EmpiricalPoissonField(data)
    start = data[:8]
    encoded = dk.pfgm_forward(field, start, z_min=1e-3, num_steps=200)
    assert float(encoded.norm(dim=1).min()) > 10  # out on the far plane
    decoded = dk.sample_pfgm(field, (8, 16), x_T=encoded, z_min=1e-3, num_steps=200, dtype=torch.float64)
    assert float((decoded - start).norm(dim=1).max()) < 1e-6


# ---- orders against solve_ivp ----

@pytest.mark.parametrize("time", ["log_z", "z"])
def test_euler_is_first_and_heun_second_order(time):
    """Against DOP853 at rtol 1e-12 on the same ODE (z from 40 down to 1, where the field of 32
    points in 4-d is smooth), three trajectories; fitted slopes of log error vs log steps."""
    data = _data(32, 4)
    field = EmpiricalPoissonField(data)
    start = dk.pfgm_prior((3, 4), 40.0, seed=7, dtype=torch.float64)

    def rhs(tau, y):
        z = math.exp(tau) if time == "log_z" else tau
        field_x, field_z = field(torch.from_numpy(y).reshape(1, 4), torch.tensor([z], dtype=torch.float64))
        return (field_x / field_z * (z if time == "log_z" else 1.0)).flatten().numpy()

    span = (math.log(40.0), 0.0) if time == "log_z" else (40.0, 1.0)
    exact = torch.stack([torch.from_numpy(integrate.solve_ivp(rhs, span, y.numpy(), method="DOP853", rtol=1e-12,
                                                              atol=1e-12).y[:, -1]) for y in start])
    steps = [16, 32, 64, 128]
    for solver, order in (("euler", 1), ("heun", 2)):
        errors = [float((dk.sample_pfgm(field, (3, 4), x_T=start, z_max=40.0, z_min=1.0, num_steps=n, solver=solver,
                                        time=time, dtype=torch.float64) - exact).abs().max()) for n in steps]
        slope = -np.polyfit(np.log(steps), np.log(errors), 1)[0]
        assert abs(slope - order) < 0.2, (solver, time, errors, slope)


# ---- the fused path, the noise contract, devices ----

@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 1e-4), (torch.bfloat16, 6e-2),
                                       (torch.float16, 1e-2)])
@pytest.mark.parametrize("solver", ["euler", "heun"])
def test_fused_matches_the_plain_pytorch_loop(device, dtype, tol, solver):
    """Half types: the state is rounded to 8 (bf16) or 11 (fp16) bits each step in both paths, so
    their difference is a few ulps of the state after 12 steps."""
    data = _data(16, 3).to(device)
    field = EmpiricalPoissonField(data)
    start = dk.pfgm_prior((32, 3), 10.0, seed=4, device=device, dtype=dtype)
    ours = dk.sample_pfgm(field, (32, 3), x_T=start, z_max=10.0, z_min=0.05, num_steps=12, solver=solver,
                          device=device, dtype=dtype)
    ref = reference.pfgm_integrate(field, start, 10.0, 0.05, 12, solver)
    scale = float(ref.double().abs().max())
    torch.testing.assert_close(ours.double(), ref.double(), rtol=tol, atol=tol * scale)


def test_one_tensor_field_output_equals_the_pair():
    data = _data(16, 6).reshape(16, 2, 3)
    field = EmpiricalPoissonField(data)

    def packed(x, z):
        field_x, field_z = field(x, z)
        return torch.cat([field_x.reshape(x.shape[0], -1), field_z[:, None].to(x.dtype)], 1)

    a = dk.sample_pfgm(field, (8, 2, 3), num_steps=10, seed=2)
    b = dk.sample_pfgm(packed, (8, 2, 3), num_steps=10, seed=2)
    assert torch.equal(a, b)


def test_raw_and_normalized_fields_give_the_same_path():
    data = _data(16, 4)
    field = EmpiricalPoissonField(data)
    a = dk.sample_pfgm(field, (8, 4), num_steps=20, z_min=0.01, seed=3, dtype=torch.float64)
    b = dk.sample_pfgm(field.normalized, (8, 4), num_steps=20, z_min=0.01, seed=3, dtype=torch.float64)
    c = dk.sample_pfgm(field.field, (8, 4), num_steps=20, z_min=0.01, seed=3, dtype=torch.float64)
    torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(a, c, rtol=1e-9, atol=1e-9)


def test_same_seed_same_samples_and_batch_split(device):
    kwargs = dict(num_steps=15, z_max=5.0, z_min=0.1, seed=6, device=device)
    whole = dk.sample_pfgm(point_charge, (12, 3), **kwargs)
    assert torch.equal(whole, dk.sample_pfgm(point_charge, (12, 3), **kwargs))
    parts = torch.cat([dk.sample_pfgm(point_charge, (n, 3), sample_offset=o, **kwargs) for o, n in ((0, 5), (5, 7))])
    assert torch.equal(whole, parts)
    assert not torch.equal(whole, dk.sample_pfgm(point_charge, (12, 3), **{**kwargs, "seed": 7}))


def test_callback_and_progress():
    seen = []
    dk.sample_pfgm(point_charge, (4, 2), num_steps=5, z_max=4.0, z_min=0.5, progress=True,
                   callback=lambda i, z, x: seen.append((i, z, tuple(x.shape))))
    assert [s[0] for s in seen] == list(range(5))
    assert seen[-1][1] == pytest.approx(0.5) and seen[0][1] == pytest.approx(4.0 * (0.5 / 4.0) ** 0.2)


# ---- bad input ----

@pytest.mark.parametrize("kwargs,match", [
    (dict(z_min=5.0, z_max=5.0), "z_min must be smaller"),
    (dict(z_min=6.0, z_max=5.0), "z_min must be smaller"),
    (dict(z_min=0.0), "z_min must be a finite number > 0"),
    (dict(z_min=-1.0), "z_min"),
    (dict(z_max=float("inf")), "z_max"),
    (dict(num_steps=0), "num_steps"),
    (dict(num_steps=-3), "num_steps"),
    (dict(num_steps=2.5), "num_steps"),
    (dict(solver="rk4"), "solver"),
    (dict(time="t"), "time"),
    (dict(dtype=torch.int32), "dtype"),
    (dict(x_T=torch.zeros(3, 2)), "x_T"),
    (dict(shape=(4,)), "shape"),
])
def test_sampler_bad_arguments(kwargs, match):
    args = dict(shape=(4, 2))
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        dk.sample_pfgm(point_charge, **args)


@pytest.mark.parametrize("bad_field,match", [
    (lambda x, z: (x[:, :1], z), "x part of shape"),
    (lambda x, z: (x, z[:2]), "z part"),
    (lambda x, z: torch.zeros(x.shape[0], 5), "one tensor of shape"),
    (lambda x, z: x, "one tensor of shape"),
    (lambda x, z: "field", "must return a pair"),
    (lambda x, z: (x, torch.where(z > 2, z, -z)), "changed sign"),
    (lambda x, z: (x, z * 0), "zero, not finite"),
    (lambda x, z: (x, z * float("nan")), "zero, not finite"),
])
def test_bad_fields_are_named(bad_field, match):
    with pytest.raises(ValueError, match=match):
        dk.sample_pfgm(bad_field, (4, 2), num_steps=3)


def test_forward_and_field_bad_arguments():
    with pytest.raises(ValueError, match="x0"):
        dk.pfgm_forward(point_charge, torch.zeros(4, dtype=torch.int64))
    with pytest.raises(ValueError, match="z_min must be smaller"):
        dk.pfgm_forward(point_charge, torch.zeros(4, 2), z_min=2.0, z_max=1.0)
    bad_data = ((torch.zeros(3), "data"), (torch.zeros(0, 2), "data"), (torch.tensor([[1.0, float("nan")]]), "finite"))
    for data, match in bad_data:
        with pytest.raises(ValueError, match=match):
            EmpiricalPoissonField(data)
    with pytest.raises(ValueError, match="chunk"):
        EmpiricalPoissonField(torch.zeros(3, 2), chunk=0)
    with pytest.raises(ValueError, match="z_data"):
        EmpiricalPoissonField(torch.zeros(3, 2), z_data=float("nan"))
    field = EmpiricalPoissonField(torch.zeros(3, 2))
    with pytest.raises(ValueError, match="x must be"):
        field(torch.zeros(4, 3), torch.ones(4))
    with pytest.raises(ValueError, match="z must be"):
        field(torch.zeros(4, 2), torch.ones(3))


def test_prior_truncated_at_max_radius():
    """max_radius moves the samples beyond it onto that sphere along their rays, and leaves the others
    (bitwise); PFGM's heavy tail at 64 features puts half the radii beyond 470 at z_max = 40."""
    exact = dk.pfgm_prior((4000, 64), 40.0, seed=3, dtype=torch.float64)
    cut = dk.pfgm_prior((4000, 64), 40.0, seed=3, dtype=torch.float64, max_radius=470.0)
    r_exact, r_cut = exact.norm(dim=1), cut.norm(dim=1)
    inside = r_exact <= 470.0
    assert 0.4 < inside.double().mean() < 0.6 and (r_exact > 3200).double().mean() > 0.05
    assert torch.equal(cut[inside], exact[inside])
    torch.testing.assert_close(r_cut[~inside], torch.full_like(r_cut[~inside], 470.0), rtol=1e-12, atol=0)
    torch.testing.assert_close(cut[~inside] / r_cut[~inside, None], exact[~inside] / r_exact[~inside, None],
                               rtol=1e-12, atol=1e-15)


def test_max_radius_is_checked_and_reaches_the_sampler():
    field = EmpiricalPoissonField(dk.randn((16, 2), seed=1))
    with pytest.raises(ValueError, match="max_radius"):
        dk.pfgm_prior((4, 2), 40.0, max_radius=0.0)
    with pytest.raises(ValueError, match="max_radius"):
        dk.sample_pfgm(field, (4, 2), num_steps=2, max_radius=-1.0)
    with pytest.raises(ValueError, match="max_radius shapes the prior"):
        dk.sample_pfgm(field, (4, 2), num_steps=2, x_T=torch.zeros(4, 2), max_radius=10.0)
    # the sampler starts from the truncated prior: the same run as from that prior given as x_T
    start = dk.pfgm_prior((64, 2), 40.0, seed=2, max_radius=50.0)
    untruncated = dk.pfgm_prior((64, 2), 40.0, seed=2)
    assert float(start.norm(dim=1).max()) <= 50.0 * (1 + 1e-6) < float(untruncated.norm(dim=1).max())
    assert torch.equal(dk.sample_pfgm(field, (64, 2), num_steps=2, max_radius=50.0, seed=2),
                       dk.sample_pfgm(field, (64, 2), num_steps=2, x_T=start, seed=2))
    from diffkern.sampling import registry
    assert registry.make_sampler("pfgm", steps=2, max_radius=50.0).config()["options"]["max_radius"] == 50.0
