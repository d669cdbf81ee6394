"""What keeps a sampling loop one graph under ``torch.compile(fullgraph=True)``.

A run's plan (its levels, coefficient rows and tables) depends only on Python values: the number of
steps, a schedule, the noise levels. Each sampler computes it in one function marked with
:func:`plan`; eagerly that function simply runs, and under ``torch.compile`` dynamo calls it once
at trace time with the real values and bakes its result into the graph
(``torch.compiler.assume_constant_result``), so the loop itself never reads a tensor on the host
and nothing in it changes a Python value that dynamo guards per step. Its arguments must be Python
values or schedules and SDEs (PlanArgument: passed by identity). A tensor of levels given as an
argument is refused while compiling (:func:`constant_levels`): a graph input's values can change
between calls without a retrace, so baking them would be silently wrong.

Nothing here imports the rest of diffkern.
"""
from __future__ import annotations

import functools
import types
import weakref

import torch

# Plans running now: dynamo runs a plan eagerly while it traces, where torch.compiler.is_compiling()
# is still True, but the plan's code is plain Python on real tensors.
_planning = [0]


def compiling() -> bool:
    """True while dynamo traces the caller (torch.compile, torch._dynamo.explain, export), and not
    inside a plan that runs at trace time."""
    return torch.compiler.is_compiling() and not _planning[0]


class PlanArgument:
    """Base of the objects a plan may take (a schedule, an SDE). Dynamo hands a plan its arguments as
    Python constants: torch 2.14 takes such an object as one (guarded by identity), older versions
    (2.11 was seen) refuse it ("UserDefinedObjectVariable is not a constant"). So each instance is
    registered at creation by its ``id``, the traced call passes that number (a constant everywhere;
    dynamo guards on the object's identity), and the plan looks the object up. An instance made while
    dynamo traces is not registered: its attributes are set only when the graph runs, and the plan
    refuses it."""

    __slots__ = ()

    def __new__(cls, *args, **kwargs):
        self = super().__new__(cls)
        if not torch.compiler.is_compiling():
            key = id(self)
            _OBJECTS[key] = weakref.ref(self, lambda _, key=key: _OBJECTS.pop(key, None))
        return self


_OBJECTS: dict = {}  # id -> weak reference, for the live PlanArguments
_OBJECT = "<diffkern plan argument>"


def _passed(value):
    """A plan argument as the traced call passes it: a PlanArgument as (marker, its id, its type's name)."""
    if isinstance(value, PlanArgument):
        return (_OBJECT, id(value), type(value).__name__)
    return _realized(value)


def _received(value):
    """The argument a plan was passed, the PlanArgument looked up again."""
    if isinstance(value, tuple) and len(value) == 3 and value[0] == _OBJECT:
        found = _OBJECTS[value[1]]() if value[1] in _OBJECTS else None
        if found is None:
            raise ValueError(f"the {value[2]} was made inside the compiled function: make it outside (as the model "
                             "is) and pass it in")
        return found
    return value


def plan(function):
    """Marks ``function`` as a run's plan: a function of Python values whose result is a constant of
    the compiled graph (see the module's docstring). A schedule or SDE among its arguments reaches it
    as a PlanArgument, and one made inside the compiled function is refused (see PlanArgument).
    Tensors in the result (at its top or in tuples) reach the graph through ``_TENSORS``."""
    @functools.wraps(function)
    def planned(*args, **kwargs):
        args = tuple(_received(value) for value in args)
        kwargs = {name: _received(value) for name, value in kwargs.items()}
        _planning[0] += 1
        try:
            return _stored(function(*args, **kwargs))
        finally:
            _planning[0] -= 1

    # named after the plan (dynamo names a constant after its function's code)
    planned.__code__ = planned.__code__.replace(co_name=f"diffkern_plan_{function.__name__}")
    constant = torch.compiler.assume_constant_result(planned)

    @functools.wraps(function)
    def call(*args, **kwargs):
        if not compiling():
            return function(*args, **kwargs)
        args = tuple(_passed(value) for value in args)
        kwargs = {name: _passed(value) for name, value in kwargs.items()}
        return _restored(constant(*args, **kwargs))
    return call


# The tensors of the plans traced so far, as attributes t0, t1, ... A graph reads each as an input
# found here: dynamo names the tensor constants of one function alike, and two of them in one graph
# (a plan that runs twice) would clash. Marked static, so a CUDA graph replays them without copying.
# They live as long as the process, as the compiled graphs that read them do.
_TENSORS = types.SimpleNamespace(count=0)


class _Stored:
    """Where a plan's tensor was: its name in _TENSORS."""

    def __init__(self, name: str):
        self.name = name


def _stored(value):
    if isinstance(value, torch.Tensor):
        name = f"t{_TENSORS.count}"
        _TENSORS.count += 1
        # torch._dynamo.mark_static_address(value, guard=False), which refuses to run while tracing
        value._dynamo_static_input_type = "unguarded"
        setattr(_TENSORS, name, value)
        return _Stored(name)
    if isinstance(value, tuple):
        return tuple(_stored(item) for item in value)
    return value


def _restored(value):
    if isinstance(value, _Stored):
        return getattr(_TENSORS, value.name)
    if isinstance(value, tuple):
        return tuple(_restored(item) for item in value)
    return value


def _realized(value):
    """``value`` rebuilt from its parts while tracing: dynamo defers reading a number it found in a
    closure or a dict (a lazy constant), and a plan's arguments must be read now."""
    if isinstance(value, bool):
        return bool(value)
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        # dynamo reads a float it found (in a closure, an argument) as a symbolic float; as a dict key
        # it is specialised to its value
        return next(iter({value: None}))
    if isinstance(value, (list, tuple)):
        return tuple(_realized(item) for item in value)
    return value


@plan
def device_table(rows, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """Coefficient rows (float64: a tensor [..., width] or a list of equal-width lists) as a table
    [rows, width] on ``device`` in ``dtype``; compiled, made once at trace time, already on the device
    (a graph without host-to-device copies, which a CUDA graph can replay)."""
    rows = torch.as_tensor(rows, dtype=torch.float64)
    if rows.dim() == 1:
        rows = rows[None]
    return rows.reshape(-1, rows.shape[-1]).to(device=device, dtype=dtype)


def constant_levels(name: str, levels):
    """``levels`` as given, refused while compiling when it is a tensor (a compiled loop's levels
    are constants of its graph: a list or tuple of floats, or the sampler's own grid)."""
    if isinstance(levels, torch.Tensor) and compiling():
        raise ValueError(f"{name} is a tensor: under torch.compile give the levels as a list or tuple of floats "
                         f"(e.g. {name}.tolist() outside the compiled function), so that they are constants of the "
                         "graph")
    return levels


def default_device() -> torch.device:
    """torch's default device (torch.set_default_device and its context manager included). While
    compiling, as the device of a new tensor: dynamo cannot trace torch.get_default_device."""
    if compiling():
        return torch.empty(0).device
    getter = getattr(torch, "get_default_device", None)
    return getter() if getter is not None else torch.device("cpu")

