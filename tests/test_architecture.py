"""The house rules of diffkern's Python package, read from its source (no import needed):

- data flows one way through the layers (a module imports only from its own layer or below);
- no import cycles, lazy imports inside functions included;
- no private name crosses a module boundary: ``from .x import _y`` and ``x._y`` are refused; private
  helpers live in private modules (``_validate``, ``_model``, ``sampling/_engine``), which only their
  own package imports;
- no private function takes more than 8 positional parameters or 12 in all (what travels together
  travels in a small frozen dataclass; the rest by keyword).
"""
import ast
import os

import pytest

PACKAGE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "diffkern")

# Lowest first. A module belongs to the layer of the longest prefix listed.
LAYERS = [
    ["diffkern._version", "diffkern._validate", "diffkern._graph"],
    ["diffkern.ops"],
    ["diffkern.coefficients", "diffkern.reference", "diffkern.noise", "diffkern.schedules", "diffkern.sde",
     "diffkern._model", "diffkern.steps", "diffkern.ode", "diffkern.models"],
    # the k-diffusion drop-ins need nothing above the formulas (no peer package), and the registry lists them
    ["diffkern.sampling", "diffkern.likelihood", "diffkern.training", "diffkern.k_diffusion"],
    ["diffkern", "diffkern.__main__", "diffkern.cli", "diffkern.demo", "diffkern.demo_digits", "diffkern.distributed",
     "diffkern.diffusers", "diffkern.sampler_table", "diffkern.samplers", "diffkern.solvers", "diffkern.rk",
     "diffkern.pfgm"],
]
# Functions whose signature is fixed by something else: the fake kernels and autograd formulas take
# their op's schema (csrc/ops.cpp).
SCHEMA_MODULES = {"diffkern.ops._fake", "diffkern.ops._autograd"}
MAX_POSITIONAL, MAX_PARAMETERS = 8, 12


def _modules():
    """{module name: (path, ast)} of every module of the package."""
    found = {}
    for base, _, files in os.walk(PACKAGE):
        for name in files:
            if not name.endswith(".py"):
                continue
            path = os.path.join(base, name)
            parts = os.path.relpath(path, os.path.dirname(PACKAGE))[:-3].split(os.sep)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            with open(path) as f:
                found[".".join(parts)] = (path, ast.parse(f.read(), path))
    return found


MODULES = _modules()


def _is_package(module: str) -> bool:
    return MODULES[module][0].endswith("__init__.py")


def _resolve(module: str, node) -> list:
    """The diffkern modules an import statement names (a name of a package that is a submodule counts as
    that submodule), with the names it takes: [(module, name or None)]."""
    if isinstance(node, ast.Import):
        return [(alias.name, None) for alias in node.names if alias.name.split(".")[0] == "diffkern"]
    if node.level:
        base = module.split(".") if _is_package(module) else module.split(".")[:-1]
        base = base[:len(base) - node.level + 1]
        target = ".".join(base + ([node.module] if node.module else []))
    else:
        target = node.module or ""
    if target.split(".")[0] != "diffkern":
        return []
    result = []
    for alias in node.names:
        sub = f"{target}.{alias.name}"
        result.append((sub, None) if sub in MODULES else (target, alias.name))
    return result


def _imports():
    """{module: [(imported module, imported name or None, line)]} over every import, nested ones too."""
    edges = {}
    for module, (_, tree) in MODULES.items():
        found = []
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                found += [(target, name, node.lineno) for target, name in _resolve(module, node)]
        edges[module] = found
    return edges


IMPORTS = _imports()


def _layer(module: str) -> int:
    best, layer = -1, None
    for i, names in enumerate(LAYERS):
        for prefix in names:
            if (module == prefix or module.startswith(prefix + ".")) and len(prefix) > best:
                best, layer = len(prefix), i
    assert layer is not None, f"{module} is in no layer: add it to LAYERS"
    return layer


def test_every_module_has_a_layer():
    for module in MODULES:
        _layer(module)


def test_data_flows_down_the_layers():
    wrong = [f"{module}:{line} imports {target} (layer {_layer(target)} above {_layer(module)})"
             for module, edges in IMPORTS.items() for target, _, line in edges
             if target in MODULES and _layer(target) > _layer(module)]
    assert not wrong, "\n".join(wrong)


def test_no_import_cycles():
    graph = {m: sorted({t for t, _, _ in edges if t in MODULES and t != m}) for m, edges in IMPORTS.items()}
    # a module that imports its own package's __init__ depends on it; the package importing the
    # module back is the cycle this test is for
    index, low, stack, on_stack, cycles = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for v in graph:
        if v not in index:
            visit(v)
    assert not cycles, f"import cycles: {cycles}"


def _private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def test_no_private_name_crosses_a_module_boundary():
    wrong = []
    for module, edges in IMPORTS.items():
        for target, name, line in edges:
            if name is not None and _private(name):
                wrong.append(f"{module}:{line} imports {name} from {target}")
            private_parts = [i for i, part in enumerate(target.split(".")) if _private(part)]
            if private_parts:  # a private module: only its own package imports it
                owner = ".".join(target.split(".")[:private_parts[0]])
                if not (module == owner or module.startswith(owner + ".")):
                    wrong.append(f"{module}:{line} imports the private module {target}")
    for module, (_, tree) in MODULES.items():
        aliases = {}
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                for alias, (target, name) in zip(node.names, _resolve(module, node)):
                    if name is None and target in MODULES:
                        aliases[alias.asname or alias.name.split(".")[0]] = target
        for node in ast.walk(tree):
            if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in aliases
                    and _private(node.attr) and not aliases[node.value.id].startswith(module)):
                wrong.append(f"{module}:{node.lineno} reads {node.value.id}.{node.attr}")
    assert not wrong, "\n".join(wrong)


def _functions(tree):
    """(function node, private?) for every def, with the context that makes it private."""
    found = []

    def walk(node, private_context, in_class):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                found.append((child, private_context or _private(child.name), in_class))
                walk(child, True, False)  # nested functions are private to their function
            elif isinstance(child, ast.ClassDef):
                walk(child, private_context or _private(child.name), True)
            else:
                walk(child, private_context, in_class)

    walk(tree, False, False)
    return found


def test_private_functions_take_few_parameters():
    wrong = []
    for module, (_, tree) in MODULES.items():
        if module in SCHEMA_MODULES:
            continue
        for node, private, method in _functions(tree):
            if not private:
                continue
            args = node.args
            positional = [a.arg for a in args.posonlyargs + args.args]
            if method and positional and positional[0] in ("self", "cls"):
                positional = positional[1:]
            total = len(positional) + len(args.kwonlyargs)
            if len(positional) > MAX_POSITIONAL or total > MAX_PARAMETERS:
                wrong.append(f"{module}:{node.lineno} {node.name}: {len(positional)} positional, {total} in all")
    assert not wrong, "\n".join(wrong)


@pytest.mark.parametrize("rule", ["layers", "cycles", "private names", "private attributes", "private modules",
                                  "parameters"])
def test_the_checks_catch_what_they_are_for(rule):
    """Each rule on a made-up module that breaks it: a check that cannot fail is no check."""
    sources = {
        "layers": ("diffkern.ops.bad", "from ..sampling import sample_ddpm\n"),
        "cycles": ("diffkern.ops.bad", "from . import bad2\n"),
        "private names": ("diffkern.sampling.bad", "from ..steps import _apply_rows\n"),
        "private attributes": ("diffkern.sampling.bad", "from .. import ops\nops._noise_dtype(None)\n"),
        "private modules": ("diffkern.likelihood.bad", "from ..sampling import _engine\n"),
        "parameters": ("diffkern.sampling.bad", "def _f(a, b, c, d, e, f, g, h, i):\n    pass\n"),
    }
    module, source = sources[rule]
    extra = {module: ("bad.py", ast.parse(source))}
    if rule == "cycles":
        extra["diffkern.ops.bad2"] = ("bad2.py", ast.parse("from . import bad\n"))
    MODULES.update(extra)
    try:
        IMPORTS.update({m: [(t, n, 1) for node in ast.walk(tree) if isinstance(node, (ast.Import, ast.ImportFrom))
                            for t, n in _resolve(m, node)] for m, (_, tree) in extra.items()})
        check = {"layers": test_data_flows_down_the_layers, "cycles": test_no_import_cycles,
                 "private names": test_no_private_name_crosses_a_module_boundary,
                 "private attributes": test_no_private_name_crosses_a_module_boundary,
                 "private modules": test_no_private_name_crosses_a_module_boundary,
                 "parameters": test_private_functions_take_few_parameters}[rule]
        with pytest.raises(AssertionError):
            check()
    finally:
        for m in extra:
            MODULES.pop(m, None)
            IMPORTS.pop(m, None)
