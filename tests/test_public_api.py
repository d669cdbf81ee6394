"""The public API, pinned: every name of ``dk.__all__`` and of the documented modules with its
signature, against tests/api_snapshot.json. A change to it fails here until the snapshot is
regenerated on purpose:

    DIFFKERN_UPDATE_API_SNAPSHOT=1 pytest tests/test_public_api.py

(and the change says in its message and the README what users must change)."""
import importlib
import inspect
import json
import os
import re

import pytest

import diffkern as dk

SNAPSHOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "api_snapshot.json")
MODULES = ("diffkern.ops", "diffkern.reference", "diffkern.coefficients", "diffkern.models", "diffkern.distributed",
           "diffkern.sampling", "diffkern.sampling.registry", "diffkern.likelihood", "diffkern.ode",
           "diffkern.training", "diffkern.k_diffusion")


def _describe(obj) -> object:
    """A function's signature; a class's constructor and public methods' signatures; a value's type."""
    if inspect.isclass(obj):
        described = {"__init__": _signature(obj)}
        for name, member in vars(obj).items():
            if not name.startswith("_") and callable(member):
                described[name] = _signature(member)
        return described
    if callable(obj):
        return _signature(obj)
    if inspect.ismodule(obj):
        return "module"
    return type(obj).__name__


def _signature(fn) -> str:
    try:
        text = str(inspect.signature(fn))
    except (TypeError, ValueError):
        return "(...)"
    return re.sub(r" at 0x[0-9a-f]+", "", text)  # default values that are functions: no address


def _public(module) -> list:
    names = getattr(module, "__all__", None)
    if names is None:
        names = [n for n, v in vars(module).items() if not n.startswith("_") and not inspect.ismodule(v)
                 and getattr(v, "__module__", module.__name__).startswith("diffkern")]
    return sorted(names)


def snapshot() -> dict:
    result = {"diffkern": {name: _describe(getattr(dk, name)) for name in sorted(dk.__all__) if name != "__version__"}}
    for name in MODULES:
        module = importlib.import_module(name)
        result[name] = {n: _describe(getattr(module, n)) for n in _public(module)}
    try:
        import diffkern.diffusers as dkd
    except ImportError:
        pass
    else:  # diffusers' own signatures belong to diffusers' version: pin ours only
        result["diffkern.diffusers"] = {n: {"set_seed": _signature(getattr(dkd, n).set_seed)} for n in dkd.__all__}
    return json.loads(json.dumps(result))


def test_public_api_matches_the_snapshot():
    current = snapshot()
    if os.environ.get("DIFFKERN_UPDATE_API_SNAPSHOT"):
        with open(SNAPSHOT, "w") as f:
            json.dump(current, f, indent=1, sort_keys=True)
            f.write("\n")
    with open(SNAPSHOT) as f:
        pinned = json.load(f)
    if "diffkern.diffusers" not in current:
        pinned.pop("diffkern.diffusers", None)
    changes = []
    for module in sorted(set(pinned) | set(current)):
        old, new = pinned.get(module, {}), current.get(module, {})
        for name in sorted(set(old) | set(new)):
            if old.get(name) != new.get(name):
                changes.append(f"{module}.{name}: {old.get(name, 'absent')!r} -> {new.get(name, 'absent')!r}")
    assert not changes, "the public API changed:\n" + "\n".join(changes)


def test_the_snapshot_pins_what_the_readme_promises():
    with open(SNAPSHOT) as f:
        pinned = json.load(f)
    for name in ("sample_ddpm", "ddpm_step", "log_likelihood", "randn", "StepInfo"):
        assert name in pinned["diffkern"]
    assert "seed" in pinned["diffkern"]["sample_ddpm"] and "callback" in pinned["diffkern"]["sample_ddpm"]


@pytest.mark.parametrize("shim,name", [("diffkern.samplers", "sample_ddpm"), ("diffkern.solvers", "sample_dpmpp"),
                                       ("diffkern.steps", "ddpm_step"), ("diffkern.rk", "TABLEAUS"),
                                       ("diffkern.pfgm", "sample_pfgm")])
def test_old_module_paths_still_import(shim, name):
    with pytest.warns(DeprecationWarning) if shim != "diffkern.steps" else _no_warning():
        import sys
        sys.modules.pop(shim, None)
        module = importlib.import_module(shim)
    assert hasattr(module, name)


class _no_warning:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False
