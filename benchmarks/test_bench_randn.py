"""dk.randn against torch.randn, and a tensor copy of the same size as the bandwidth ceiling."""
import pytest
import torch
from bench_common import DEVICES, run

import diffkern as dk

SHAPES = {
    "cpu": [(1 << 20,), (1024, 1024), (64, 3, 128, 128)],
    "cuda": [(64, 3, 128, 128), (256, 3, 256, 256)],
}
CASES = [(device, shape) for device in DEVICES for shape in SHAPES[device]]


def label(shape):
    return "x".join(map(str, shape))


@pytest.mark.parametrize("device,shape", CASES, ids=[f"{d}-{label(s)}" for d, s in CASES])
@pytest.mark.parametrize("impl", ["diffkern", "torch.randn", "copy"])
def test_randn(benchmark, device, shape, impl):
    nbytes = torch.Size(shape).numel() * 4  # written once; a copy moves twice that
    if impl == "diffkern":
        fn = lambda: dk.randn(shape, seed=0, step=1, device=device)  # noqa: E731
    elif impl == "torch.randn":
        fn = lambda: torch.randn(shape, device=device)  # noqa: E731
    else:
        src = torch.ones(shape, device=device)
        dst = torch.empty_like(src)
        fn = lambda: dst.copy_(src)  # noqa: E731
        nbytes *= 2
    run(benchmark, fn, group=f"randn float32 {label(shape)} on {device}", name=impl, nbytes=nbytes,
        device=device)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("impl", ["diffkern", "torch.randn"])
def test_randn_half(benchmark, dtype, impl):
    shape = (64, 3, 128, 128)
    if impl == "diffkern":
        fn = lambda: dk.randn(shape, seed=0, dtype=dtype)  # noqa: E731
    else:
        fn = lambda: torch.randn(shape, dtype=dtype)  # noqa: E731
    run(benchmark, fn, group=f"randn {dtype} {label(shape)} on cpu", name=impl,
        nbytes=torch.Size(shape).numel() * 2, device="cpu")
