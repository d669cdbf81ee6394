import pytest
from common import DEVICES


@pytest.fixture(params=DEVICES)
def device(request):
    """Every device-parametrised test runs on the CPU, and on CUDA when present (marked `cuda`)."""
    return request.param
