"""A PFGM sampling run (20 Heun steps in log z, 40 field evaluations) on the exact empirical field of
1024 reference points: dk.sample_pfgm against the same loop in plain PyTorch
(diffkern.reference.pfgm_integrate) and against the 40 field evaluations alone. The field (a
[batch x points] log-sum-exp in float64) dominates; loop - field alone is the sampler's own cost."""
import pytest
import torch
from bench_common import DEVICES, run

import diffkern as dk
from diffkern import reference
from diffkern.models import EmpiricalPoissonField

CASES = [(b, d) for d in (2, 64) for b in (256, 2048)]
STEPS, Z_MAX, Z_MIN = 20, 40.0, 1e-3


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("batch,features", CASES, ids=[f"{b}x{d}" for b, d in CASES])
@pytest.mark.parametrize("impl", ["diffkern", "pytorch loop", "field alone"])
def test_pfgm_loop(benchmark, impl, batch, features, device):
    points = torch.randn(1024, features, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    field = EmpiricalPoissonField(points.to(device))
    start = dk.pfgm_prior((batch, features), Z_MAX, seed=1, device=device)
    if impl == "diffkern":
        fn = lambda: dk.sample_pfgm(field, (batch, features), x_T=start, z_max=Z_MAX, z_min=Z_MIN,  # noqa: E731
                                    num_steps=STEPS, device=device)
    elif impl == "pytorch loop":
        fn = lambda: reference.pfgm_integrate(field, start, Z_MAX, Z_MIN, STEPS)  # noqa: E731
    else:
        z = torch.full((batch,), 1.0, device=device)

        def fn():
            for _ in range(2 * STEPS):
                out = field(start, z)
            return out
    run(benchmark, fn, group=f"pfgm heun {STEPS} steps, {batch}x{features}, 1024-point field on {device}", name=impl,
        nbytes=2 * STEPS * 2 * start.numel() * 4, device=device)
