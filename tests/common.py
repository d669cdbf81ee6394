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

