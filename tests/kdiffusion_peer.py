"""k-diffusion's own ``sampling.py`` (k-diffusion 0.1.1, installed with ``pip install --no-deps
k-diffusion``), loaded without its package ``__init__``, which imports torchvision, CLIP and the rest of
the training stack. Its one in-package import, ``utils.append_dims``, is given a stand-in with that
function's documented behaviour; everything else runs as k-diffusion ships it."""
import importlib.util
import os
import sys
import types

PACKAGE = "_kdiffusion_peer"


def _append_dims(x, target_dims):
    """Appends trailing dimensions of size 1 until x has target_dims dimensions."""
    missing = target_dims - x.ndim
    if missing < 0:
        raise ValueError(f"input has {x.ndim} dims but target_dims is {target_dims}, which is less")
    return x[(...,) + (None,) * missing]


def load():
    """The peer's sampling module, or (None, why it is unavailable)."""
    if PACKAGE + ".sampling" in sys.modules:
        return sys.modules[PACKAGE + ".sampling"], None
    spec = importlib.util.find_spec("k_diffusion")
    if spec is None or not spec.submodule_search_locations:
        return None, "k-diffusion is not installed (pip install --no-deps k-diffusion==0.1.1)"
    path = os.path.join(spec.submodule_search_locations[0], "sampling.py")
    for dependency in ("scipy", "torchdiffeq", "torchsde", "tqdm"):
        if importlib.util.find_spec(dependency) is None:
            return None, f"k-diffusion's sampling.py needs {dependency} (pip install --no-deps {dependency})"
    package = types.ModuleType(PACKAGE)
    package.__path__ = [os.path.dirname(path)]
    utils = types.ModuleType(PACKAGE + ".utils")
    utils.append_dims = _append_dims
    sys.modules[PACKAGE], sys.modules[PACKAGE + ".utils"] = package, utils
    module_spec = importlib.util.spec_from_file_location(PACKAGE + ".sampling", path)
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[PACKAGE + ".sampling"] = module
    module_spec.loader.exec_module(module)
    return module, None


def load_external():
    """The peer's ``external.py`` (its model wrappers: DiscreteEpsDDPMDenoiser and friends), or (None, why)."""
    if PACKAGE + ".external" in sys.modules:
        return sys.modules[PACKAGE + ".external"], None
    sampling, why = load()
    if sampling is None:
        return None, why
    path = os.path.join(os.path.dirname(sampling.__file__), "external.py")
    module_spec = importlib.util.spec_from_file_location(PACKAGE + ".external", path)
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[PACKAGE + ".external"] = module
    module_spec.loader.exec_module(module)
    return module, None
