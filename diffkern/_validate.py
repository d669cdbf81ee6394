"""Every argument check of diffkern's Python layer, in one place.

Each check names the argument it refuses and says what it wanted, and returns the value in the form
the caller uses (a float, an int, a tuple). Nothing here imports the rest of diffkern, so every
layer (ops included) can use it.
"""
from __future__ import annotations

import math
import numbers
import os
import sys
import warnings
from typing import Optional, Sequence, Tuple

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_real(name: str, value, low: float = 0.0, *, strict: bool = False, allow_inf: bool = False) -> float:
    """value as a float, refused (naming it) unless it is a real number >= low (> low when strict),
    finite unless allow_inf; nan is always refused."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{name} must be a real number, got {value!r}")
    value = float(value)
    ok = value > low if strict else value >= low
    if not ok or value != value or (math.isinf(value) and not allow_inf):
        raise ValueError(f"{name} must be a {'finite ' if not allow_inf else ''}number "
                         f"{'>' if strict else '>='} {low}, got {value!r}")
    return value


def check_positive(name: str, value) -> float:
    """A finite real number > 0."""
    value = check_real(name, value)
    if value <= 0:
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
    return value


def check_finite(name: str, value) -> float:
    """Any finite real number."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    return float(value)


def check_positive_int(name: str, value) -> int:
    """An int >= 1 (a bool or a float such as 2.0 is refused: it is not a count)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    return int(value)


def _same_kind(value, choice) -> bool:
    """True unless value and choice are numbers of different kinds: a bool is not 1, 2.0 is not 2."""
    if isinstance(choice, bool) or isinstance(value, bool):
        return isinstance(choice, bool) and isinstance(value, bool)
    if isinstance(choice, numbers.Integral):
        return isinstance(value, numbers.Integral)
    return True


def check_choice(name: str, value, choices: Sequence):
    """One of ``choices``, compared by equality and kind (an order True or 2.0 is not the order 2)."""
    try:
        ok = any(_same_kind(value, c) and value == c for c in choices)
    except TypeError:  # an incomparable value
        ok = False
    if not ok:
        raise ValueError(f"{name} must be one of {tuple(choices)}, got {value!r}")
    return int(value) if isinstance(value, numbers.Integral) else value


def check_bool(name: str, value) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be a bool, got {value!r}")
    return value


def check_uint(name: str, value, bound: int) -> int:
    """An int in [0, bound) (bound a power of two, named as such in the message)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    value = int(value)
    if not 0 <= value < bound:
        raise ValueError(f"{name} must lie in [0, 2^{bound.bit_length() - 1}), got {value}")
    return value


def check_dtype(dtype, name: str = "dtype") -> torch.dtype:
    if dtype not in FLOAT_DTYPES:
        raise ValueError(f"{name} must be float16, bfloat16, float32 or float64, got {dtype}")
    return dtype


def check_shape(shape) -> list:
    """A shape as a list of ints: an int, or a sequence of ints (or integer 0-d tensors), none negative."""
    if isinstance(shape, numbers.Integral) and not isinstance(shape, bool):
        shape = (shape,)
    if isinstance(shape, (str, bytes)) or isinstance(shape, torch.Tensor) and shape.dim() > 1:
        raise TypeError(f"shape must be an int or a sequence of ints, got {shape!r}")
    try:
        dims = list(shape)
    except TypeError:
        raise TypeError(f"shape must be an int or a sequence of ints, got {shape!r}") from None
    # int() would silently truncate 2.7 to 2: only integers (or integer 0-d tensors) are sizes
    if not all(isinstance(d, numbers.Integral) and not isinstance(d, bool)
               or isinstance(d, torch.Tensor) and d.dim() == 0 and not d.is_floating_point()
               and not d.is_complex() and d.dtype != torch.bool for d in dims):
        raise TypeError(f"shape must be an int or a sequence of ints, got {shape!r}")
    dims = [int(d) for d in dims]
    if any(d < 0 for d in dims):
        raise ValueError(f"shape must not have negative sizes, got {tuple(dims)}")
    return dims


def clip_range(clip_sample) -> Optional[Tuple[float, float]]:
    """clip_sample as a (lo, hi) range, or None for no clipping: None / False, True (= 1), a positive
    number r (= (-r, r)) or a (lo, hi) pair with lo < hi."""
    if clip_sample is None or clip_sample is False:
        return None
    if clip_sample is True:
        return (-1.0, 1.0)
    if isinstance(clip_sample, numbers.Real):
        if not clip_sample > 0:  # also refuses nan, which would turn clipping off
            raise ValueError(f"clip_sample must be positive, got {clip_sample}")
        return (-float(clip_sample), float(clip_sample))
    try:
        lo, hi = (float(v) for v in clip_sample)
    except (TypeError, ValueError):
        raise ValueError(f"clip_sample must be None, a bool, a positive number or a (lo, hi) pair, "
                         f"got {clip_sample!r}") from None
    if not lo < hi:  # also refuses nan
        raise ValueError(f"clip_sample range must have lo < hi, got {clip_sample}")
    return (lo, hi)


def check_tensor(name: str, value, *, min_dim: int = 0) -> torch.Tensor:
    """A real floating-point tensor with at least ``min_dim`` dimensions."""
    if not isinstance(value, torch.Tensor) or not value.is_floating_point() or value.dim() < min_dim:
        what = f"{value.dtype} {tuple(value.shape)}" if isinstance(value, torch.Tensor) else type(value).__name__
        dims = f" with at least {min_dim} dimension{'s' if min_dim > 1 else ''}" if min_dim else ""
        raise ValueError(f"{name} must be a floating-point tensor{dims}, got {what}")
    return value


_PACKAGE = os.path.dirname(os.path.abspath(__file__))


def warn_caller(message: str, category=FutureWarning) -> None:
    """warnings.warn, attributed to the first frame outside diffkern (the user's call)."""
    frame, level = sys._getframe(1), 2
    while frame is not None and os.path.abspath(frame.f_code.co_filename).startswith(_PACKAGE):
        frame, level = frame.f_back, level + 1
    warnings.warn(message, category, stacklevel=level)
