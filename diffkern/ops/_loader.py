"""Loads the compiled library diffkern._C, or explains why it cannot and what to run."""
from __future__ import annotations

import importlib

import torch

_REBUILD = (
    "Build it against the installed torch from the diffkern source tree with\n"
    "    pip install --no-build-isolation -e .\n"
    "(or `pip install --no-build-isolation .`; see README.md, 'Building')."
)


def _base_version(version: str) -> str:
    return version.split("+")[0]


def load() -> dict:
    """Import diffkern._C (which registers torch.ops.diffkern.*) and return its build facts."""
    try:
        config = importlib.import_module("diffkern._build_config")
    except ImportError:
        raise ImportError("diffkern: the compiled extension has not been built.\n" + _REBUILD) from None

    if config.TORCH_VERSION != torch.__version__:
        raise ImportError(
            f"diffkern: the compiled extension was built against torch {config.TORCH_VERSION}, but "
            f"torch {torch.__version__} is installed; a torch extension only loads with the torch it "
            "was built against. This happens when pip builds diffkern in an isolated environment or "
            "when torch is upgraded afterwards. Reinstall diffkern with --no-build-isolation:\n"
            "    pip install --no-build-isolation --force-reinstall --no-deps <diffkern source>\n"
            "(from a source checkout: pip install --no-build-isolation -e .)"
        )

    try:
        importlib.import_module("diffkern._C")
    except ImportError as error:
        hint = ""
        if "undefined symbol" in str(error):
            hint = " An undefined symbol means it was compiled against a different torch."
        raise ImportError(f"diffkern: failed to load the compiled extension ({error}).{hint}\n" + _REBUILD) from error

    info = dict(item.split("=", 1) for item in torch.ops.diffkern.build_info().split(";"))
    if info["torch"] != _base_version(config.TORCH_VERSION):
        raise ImportError(
            f"diffkern: diffkern/_build_config.py says torch {config.TORCH_VERSION} but the library was "
            f"compiled against torch {info['torch']}; the build is stale.\n" + _REBUILD
        )
    return {
        "torch_version": config.TORCH_VERSION,
        "cuda_kernels": info["cuda"] == "1",
        "cuda_arch_list": config.CUDA_ARCH_LIST,
        "cpu_isa": info["cpu_isa"],
    }
