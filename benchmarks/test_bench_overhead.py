"""The samplers' own cost per step: sample_ddpm and sample_dpmpp with an identity model at 256 x 2, so
the time is the Python around the fused step plus the step itself.

Set DIFFKERN_BASELINE_REV to a git revision (e.g. DIFFKERN_BASELINE_REV=HEAD~3) to time that
revision's Python layer beside the current one in the same run, over the same compiled kernels: its
package is written from git into a temporary folder as ``diffkern_baseline`` (its op registrations
skipped: the current ones are loaded already). The summary then shows both per step.
"""
import importlib
import os
import re
import subprocess
import sys
import tempfile

import pytest
import torch
from bench_common import run

import diffkern as dk

SHAPE = (256, 2)
DDPM_STEPS, DPMPP_STEPS = 1000, 100
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _baseline():
    """The Python package of DIFFKERN_BASELINE_REV as the module diffkern_baseline, or None."""
    rev = os.environ.get("DIFFKERN_BASELINE_REV")
    if not rev:
        return None
    folder = tempfile.mkdtemp(prefix="diffkern-baseline-")
    files = subprocess.run(["git", "ls-tree", "-r", "--name-only", rev, "diffkern"], cwd=ROOT, check=True,
                           capture_output=True, text=True).stdout.split()
    for name in files:
        if not name.endswith(".py"):
            continue
        text = subprocess.run(["git", "show", f"{rev}:{name}"], cwd=ROOT, check=True, capture_output=True,
                              text=True).stdout
        text = re.sub(r"\bimport diffkern as dk\b", "import diffkern_baseline as dk", text)
        text = re.sub(r"\bfrom diffkern(\.| import)", r"from diffkern_baseline\1", text)
        # the ops are registered by the current diffkern already: registering them twice is an error
        text = text.replace("torch.library.register_fake(", "_no_registration(")
        text = text.replace("torch.library.register_autograd(", "_no_registration(")
        if "_no_registration(" in text:
            text = ("def _no_registration(name, fn=None, **kwargs):\n"
                    "    return (lambda f: f) if fn is None else fn\n\n\n") + text.replace(
                "from __future__ import annotations\n", "")
        path = os.path.join(folder, name.replace("diffkern", "diffkern_baseline", 1))
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w") as f:
            f.write(text)
    # the compiled library and its build facts are the current ones
    with open(os.path.join(folder, "diffkern_baseline", "_build_config.py"), "w") as f:
        f.write("from diffkern._build_config import *  # noqa: F401,F403\n")
    sys.path.insert(0, folder)
    return importlib.import_module("diffkern_baseline")


BASELINE = _baseline()
IMPLS = [("current", dk)] + ([(f"baseline {os.environ['DIFFKERN_BASELINE_REV']}", BASELINE)] if BASELINE else [])


def identity(x, t):
    return x


@pytest.mark.parametrize("impl", IMPLS, ids=[name for name, _ in IMPLS])
def test_sample_ddpm_per_step(benchmark, impl):
    name, module = impl
    torch.set_num_threads(1)
    sched = module.DDPMSchedule()
    run(benchmark, lambda: module.sample_ddpm(identity, SHAPE, sched, seed=0),
        group=f"sample_ddpm, identity model, {SHAPE[0]}x{SHAPE[1]}, {DDPM_STEPS} steps (per step: / {DDPM_STEPS})",
        name=name, nbytes=DDPM_STEPS * 3 * SHAPE[0] * SHAPE[1] * 4, device="cpu")


@pytest.mark.parametrize("impl", IMPLS, ids=[name for name, _ in IMPLS])
def test_sample_dpmpp_per_step(benchmark, impl):
    name, module = impl
    torch.set_num_threads(1)
    sigmas = module.karras_sigmas(DPMPP_STEPS, 0.002, 80.0)
    run(benchmark, lambda: module.sample_dpmpp(identity, SHAPE, sigmas, seed=0),
        group=f"sample_dpmpp, identity model, {SHAPE[0]}x{SHAPE[1]}, {DPMPP_STEPS} steps (per step: / {DPMPP_STEPS})",
        name=name, nbytes=DPMPP_STEPS * 4 * SHAPE[0] * SHAPE[1] * 4, device="cpu")
