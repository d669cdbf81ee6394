"""Repository-level pytest configuration: `pytest --benchmark-only` at the root runs the benchmarks.

Plain `pytest` runs the tests (testpaths = tests); with --benchmark-only and no paths given there
would be nothing to run there, so the benchmarks folder is collected instead."""
import os

import pytest

ROOT = os.path.dirname(os.path.abspath(__file__))


def pytest_configure(config):
    if not config.getoption("benchmark_only", default=False):
        return
    source = getattr(config, "args_source", None)
    if source == pytest.Config.ArgsSource.TESTPATHS:
        config.args[:] = [os.path.join(ROOT, "benchmarks")]
