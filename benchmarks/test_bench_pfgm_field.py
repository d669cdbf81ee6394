"""The empirical Poisson field at 4096 points x 4096 charges: the fused kernel (ops.poisson_field, float64
and float32) against the chunked matrix-product path EmpiricalPoissonField used before it (and still
uses above DIRECT_FIELD_FEATURES features) and against a torch.cdist + logsumexp version that
materialises the 4096 x 4096 matrix. N = 3,072 is past the kernel's 64 features: the two matrix paths only."""
import pytest
import torch
from bench_common import DEVICES, run

from diffkern import ops
from diffkern.models import _chunked_field  # noqa: PLC2701 (the path before the kernel, for comparison)

POINTS = CHARGES = 4096
CASES = [(d, n) for d in DEVICES for n in (2, 64, 3072)]
IMPLS = ["kernel float64", "kernel float32", "chunked matmul (before)", "cdist + logsumexp"]


def cdist_field(points, dz, charges):
    log_w = -(points.shape[1] + 1) / 2 * (torch.cdist(points, charges) ** 2 + dz[:, None] ** 2).log()
    return torch.softmax(log_w, 1) @ charges, torch.logsumexp(log_w, 1)


@pytest.mark.parametrize("device,features", CASES, ids=[f"{d}-N{n}" for d, n in CASES])
@pytest.mark.parametrize("impl", IMPLS)
def test_poisson_field(benchmark, device, features, impl):
    if impl.startswith("kernel") and features > ops.FIELD_MAX_FEATURES:
        pytest.skip(f"the kernel takes up to {ops.FIELD_MAX_FEATURES} features")
    gen = torch.Generator().manual_seed(0)
    points = torch.randn(POINTS, features, generator=gen, dtype=torch.float64).to(device)
    charges = torch.randn(CHARGES, features, generator=gen, dtype=torch.float64).to(device)
    dz = torch.full((POINTS,), 0.5, dtype=torch.float64, device=device)
    if impl == "kernel float32":
        points, charges, dz = points.float(), charges.float(), dz.float()
    if impl.startswith("kernel"):
        fn = lambda: ops.poisson_field(points, dz, charges)  # noqa: E731
    elif impl == "chunked matmul (before)":
        norms = (charges ** 2).sum(1)
        fn = lambda: _chunked_field(points, dz, charges, norms, 2048)  # noqa: E731
    else:
        fn = lambda: cdist_field(points, dz, charges)  # noqa: E731
    run(benchmark, fn, group=f"poisson field {POINTS} x {CHARGES}, N = {features} on {device}", name=impl,
        nbytes=(POINTS + CHARGES) * features * points.element_size(), device=device)
