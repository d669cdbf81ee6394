"""The installation itself: build facts, and clear messages when the extension cannot load."""
import importlib
import subprocess
import sys

import pytest
import torch

import diffkern as dk
from diffkern.ops import _loader as _extension


def test_build_info():
    info = dk.build_info()
    assert info["diffkern"] == dk.__version__
    assert info["built_against_torch"] == torch.__version__
    assert info["cpu_isa"] in ("scalar", "avx2", "avx512")
    assert info["cuda_kernels"] == dk.cuda_kernels_available()
    assert torch.ops.diffkern.build_info().startswith("torch=" + torch.__version__.split("+")[0])


def test_torch_mismatch_is_caught_before_loading(monkeypatch):
    config = importlib.import_module("diffkern._build_config")
    monkeypatch.setattr(config, "TORCH_VERSION", "1.0.0+other")
    with pytest.raises(ImportError, match="(?s)built against torch 1.0.0.*--no-build-isolation"):
        _extension.load()


def test_missing_extension_says_what_to_run(monkeypatch):
    real_import = importlib.import_module

    def fake_import(name, *args):
        if name == "diffkern._build_config":
            raise ImportError("No module named 'diffkern._build_config'")
        return real_import(name, *args)

    monkeypatch.setattr(importlib, "import_module", fake_import)
    with pytest.raises(ImportError, match="(?s)not been built.*pip install --no-build-isolation -e ."):
        _extension.load()


def test_cli_info():
    result = subprocess.run([sys.executable, "-m", "diffkern", "--seed", "3", "info"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "agrees with the PyTorch reference (diffkern.reference.randn): yes" in result.stdout
    values = dk.randn((2, 4), seed=3)
    assert f"{float(values[0, 0]):+.6f}" in result.stdout


def test_cli_bad_option():
    result = subprocess.run([sys.executable, "-m", "diffkern", "--no-such-option"], capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 2 and "unrecognized arguments" in result.stderr
