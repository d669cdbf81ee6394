"""Helpers shared by the tests (devices, CPU instruction sets)."""
import pytest
import torch

import diffkern as dk

CUDA = torch.cuda.is_available() and dk.cuda_kernels_available()

# One place for the device list: every device-parametrised test runs on the CPU always and on
# CUDA when a GPU and the CUDA kernels are both present (marked `cuda`, skipped otherwise).
DEVICES = [
    pytest.param("cpu", id="cpu"),
    pytest.param("cuda", id="cuda", marks=[
        pytest.mark.cuda,
        pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU and diffkern's CUDA kernels")]),
]

requires_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU and diffkern's CUDA kernels")


def cpu_isas():
    """The CPU instruction sets this machine can run, lowest first."""
    order = ["scalar", "avx2", "avx512"]
    return order[: order.index(dk.build_info()["cpu_isa"]) + 1]



# Kernels vs the float64 reference: the kernels round each fused operation in the compute type
# (float32 for half types, float64 for float64) and the result once to the tensor dtype, so the
# difference is a few float32 ulps of the intermediate values, or one ulp of the output dtype.
TOLERANCES = {
    torch.float32: dict(atol=1e-5, rtol=1e-5),
    torch.float64: dict(atol=1e-12, rtol=1e-12),
    torch.float16: dict(atol=1e-3, rtol=2e-3),    # 2^-10 relative: one float16 ulp
    torch.bfloat16: dict(atol=1e-2, rtol=1.6e-2),  # 2^-7 relative: one bfloat16 ulp, twice
}
DTYPES = list(TOLERANCES)
