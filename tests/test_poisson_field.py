"""The fused Poisson field (ops.poisson_field, csrc/include/diffkern/poisson_field.h): against the float64
direct sum for 1 to 64 features (and, through EmpiricalPoissonField's matrix products, to 3,072), every
instruction set bitwise equal to the per-thread bodies, CPU and CUDA bitwise, invariances, the limit at
a charge, bad input, fake kernels."""
import math

import pytest
import torch
from common import DEVICES, cpu_isas, requires_cuda

from diffkern import ops, reference
from diffkern.models import DIRECT_FIELD_FEATURES, EmpiricalPoissonField

F64 = torch.float64
# float64: the direct sum's own rounding; float32: d^2 and the weights in float32 (relative error ~1e-7
# per pair, amplified by (N + 1) / 2 in the power of the ratio), mean relative to the charges' scale
TOLERANCE = {torch.float64: 1e-12, torch.float32: 2e-5}


def _case(batch, count, features, dtype, seed=0, height=0.3):
    gen = torch.Generator().manual_seed(seed)
    points = torch.randn(batch, features, generator=gen, dtype=F64)
    charges = torch.randn(count, features, generator=gen, dtype=F64)
    dz = torch.rand(batch, generator=gen, dtype=F64) * height + 0.01
    return points.to(dtype), dz.to(dtype), charges.to(dtype)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("features", [1, 2, 3, 4, 5, 16, 64])
@pytest.mark.parametrize("count", [1, 7, 16, 100])
def test_the_field_against_the_direct_sum(device, dtype, features, count):
    points, dz, charges = _case(9, count, features, dtype, seed=features * 1000 + count)
    mean, log_total = ops.poisson_field(points.to(device), dz.to(device), charges.to(device))
    expected_mean, expected_log = reference.poisson_field(points, dz, charges)
    assert mean.dtype == dtype and log_total.dtype == F64 and mean.shape == points.shape
    scale = charges.double().abs().max().item()
    assert (mean.cpu().double() - expected_mean.double()).abs().max().item() <= TOLERANCE[dtype] * scale
    # log sum w: (N + 1) / 2 log d^2 per term, relative to its size
    torch.testing.assert_close(log_total.cpu(), expected_log, rtol=TOLERANCE[dtype], atol=TOLERANCE[dtype])


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("features", [1, 2, 3, 4, 6, 33])
@pytest.mark.parametrize("count", [5, 16, 50])
def test_instruction_sets_equal_the_cuda_thread_bodies_bitwise(dtype, features, count):
    """'scalar' runs each lane with the per-thread body (what a CUDA thread runs), then the tree; the SIMD
    paths run the lanes as vectors (1 to 4 features compiled apart) and must agree bit for bit."""
    points, dz, charges = _case(11, count, features, dtype, seed=3)
    results = {isa: torch.ops.diffkern._poisson_field_cpu_isa(points, dz, charges, isa) for isa in cpu_isas()}
    for isa in cpu_isas()[1:]:
        assert torch.equal(results[isa][0], results["scalar"][0]), isa
        assert torch.equal(results[isa][1], results["scalar"][1]), isa


@requires_cuda
@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("features", [1, 2, 5, 64])
def test_cuda_equals_cpu_bitwise_on_the_mean(dtype, features):
    points, dz, charges = _case(37, 301, features, dtype, seed=5)
    cpu_mean, cpu_log = ops.poisson_field(points, dz, charges)
    cuda_mean, cuda_log = ops.poisson_field(points.cuda(), dz.cuda(), charges.cuda())
    assert torch.equal(cuda_mean.cpu(), cpu_mean)
    torch.testing.assert_close(cuda_log.cpu(), cpu_log, rtol=1e-15, atol=0)  # the devices' log differ by an ulp


@pytest.mark.parametrize("features", [1, 2, 3, 33, 200, 3072])
def test_the_empirical_field_against_the_direct_sum_in_any_dimension(features):
    """Through the kernel up to DIRECT_FIELD_FEATURES features, through matrix products above: the
    normalised field and the scale-free field against the float64 direct sum. At N = 3,072 the weights
    |x~ - x~_i|^-3073 leave float64's range, which neither path may notice."""
    points, dz, charges = _case(6, 40, features, F64, seed=features, height=2.0)
    field = EmpiricalPoissonField(charges)
    x_part, z_part = field(points, dz)
    mean, _ = reference.poisson_field(points, dz, charges)
    torch.testing.assert_close(x_part, points - mean, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(z_part, dz, rtol=0, atol=0)
    v_x, v_z = field.normalized(points, dz)
    direction = torch.cat([points - mean, dz[:, None]], 1)
    expected = -math.sqrt(features) * direction / direction.norm(dim=1, keepdim=True)
    torch.testing.assert_close(torch.cat([v_x, v_z[:, None]], 1), expected, rtol=1e-10, atol=1e-10)
    assert (features <= DIRECT_FIELD_FEATURES) == (features <= 32)


def test_invariances():
    """Translating points and charges together translates the mean; permuting the charges changes it by
    rounding only (the lanes add in another order); a charge repeated k times weighs k times."""
    points, dz, charges = _case(8, 33, 3, F64, seed=9)
    mean, log_total = ops.poisson_field(points, dz, charges)
    shift = torch.tensor([[0.5, -2.0, 3.0]], dtype=F64)
    moved, moved_log = ops.poisson_field(points + shift, dz, charges + shift)
    torch.testing.assert_close(moved, mean + shift, rtol=1e-13, atol=1e-13)
    torch.testing.assert_close(moved_log, log_total, rtol=1e-13, atol=1e-13)
    permuted, _ = ops.poisson_field(points, dz, charges[torch.randperm(33, generator=torch.Generator().manual_seed(1))])
    torch.testing.assert_close(permuted, mean, rtol=1e-13, atol=1e-13)
    _, doubled_log = ops.poisson_field(points, dz, torch.cat([charges, charges]))
    torch.testing.assert_close(doubled_log, log_total + math.log(2), rtol=1e-13, atol=1e-13)


def test_a_point_on_a_charge_is_the_documented_limit():
    """dz -> 0 over a charge: the field points at it (mean = the charge), and at dz = 0 exactly the mean is
    the charge and log sum w = +inf (the formula's own singularity), with no NaN."""
    charges = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 2.0]], dtype=F64)
    for dz in (1e-3, 1e-8, 0.0):
        mean, log_total = ops.poisson_field(torch.tensor([[1.0, 0.0]], dtype=F64), torch.tensor([dz], dtype=F64),
                                            charges)
        torch.testing.assert_close(mean, charges[1:2], rtol=0, atol=1e-8)
        assert not bool(torch.isnan(mean).any()) and (log_total.item() == math.inf) == (dz == 0.0)


@pytest.mark.parametrize("args,match", [
    (lambda p, z, c: (p, z, c[:, :1]), "charges must be"),
    (lambda p, z, c: (p, z, c[:0]), "charges must be"),
    (lambda p, z, c: (p, z[:2], c), "dz must be"),
    (lambda p, z, c: (p, z.float(), c), "dz must be"),
    (lambda p, z, c: (p.long(), z, c), "points must be"),
    (lambda p, z, c: (p[0], z, c), "points must be"),
    (lambda p, z, c: (torch.zeros(3, 65, dtype=F64), z, torch.zeros(2, 65, dtype=F64)), "1 to 64 features"),
])
def test_bad_input_is_named(args, match):
    points, dz, charges = _case(3, 4, 2, F64)
    with pytest.raises(ValueError, match=match):
        ops.poisson_field(*args(points, dz, charges))


def test_opcheck_and_empty_batches():
    points, dz, charges = _case(5, 9, 3, F64)
    torch.library.opcheck(torch.ops.diffkern.poisson_field.default, (points, dz, charges))
    mean, log_total = ops.poisson_field(points[:0], dz[:0], charges)
    assert mean.shape == (0, 3) and log_total.shape == (0,)
    meta = torch.ops.diffkern.poisson_field(points.to("meta"), dz.to("meta"), charges.to("meta"))
    assert meta[0].shape == (5, 3) and meta[1].dtype == F64
