"""Datasets by name or file, for ``train``, ``generate``'s checks, ``evaluate`` and the demo: ``.npy`` /
``.npz`` files ([N, ...] rows) and built-in sets that need no download."""
from __future__ import annotations

import os

import numpy as np
import torch

from ..models import GaussianMixture
from .toy_data import TOY_DATASETS, sample_toy

BUILTIN_SIZE, BUILTIN_SEED = 8192, 2026
DIGITS_PATH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "datasets", "digits.npz")
DIGITS_LEVELS, DIGITS_TEST_SIZE = 17, 300
DIGITS_BIN_WIDTH = 2 / DIGITS_LEVELS  # a grey level's bin in (-1, 1): uniform dequantization's width


def digits(split: str = "train", *, labels: bool = False):
    """The 8x8 handwritten digits (diffkern/datasets/README.md), float32 [N, 1, 8, 8]: grey level p of 0..16
    as its bin's centre 2 (p + 1/2) / 17 - 1 in (-1, 1) (bins of width 2 / 17: uniform dequantization adds
    U(-1/17, 1/17)). A fixed split: a permutation of the 1,797 rows drawn from seed 2026, its first 300
    rows the test split ("test"), the other 1,497 the training split ("train"); "all" keeps the file's
    order. With ``labels``, (images, labels int64 [N])."""
    if split not in ("train", "test", "all"):
        raise ValueError(f"split must be 'train', 'test' or 'all', got {split!r}")
    with np.load(DIGITS_PATH) as f:
        images, digit_labels = torch.from_numpy(f["images"].astype(np.int64)), torch.from_numpy(
            f["labels"].astype(np.int64))
    x = (2 * (images.to(torch.float32) + 0.5) / DIGITS_LEVELS - 1).reshape(-1, 1, 8, 8)
    if split != "all":
        order = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(BUILTIN_SEED))
        rows = order[:DIGITS_TEST_SIZE] if split == "test" else order[DIGITS_TEST_SIZE:]
        x, digit_labels = x[rows], digit_labels[rows]
    return (x, digit_labels) if labels else x


BUILTIN = {
    "ring": lambda: GaussianMixture.ring().sample(BUILTIN_SIZE, seed=BUILTIN_SEED),
    "mixture64d": lambda: GaussianMixture.high_dimensional().sample(BUILTIN_SIZE, seed=BUILTIN_SEED),
    # FFJORD's 2-d toy densities (diffkern.training.toy_data)
    **{name: (lambda name=name: sample_toy(name, BUILTIN_SIZE, BUILTIN_SEED)) for name in TOY_DATASETS},
    # the 8x8 handwritten digits' training split (digits())
    "digits": lambda: digits("train"),
}


def load_array(path) -> np.ndarray:
    """A dataset from .npy, or from .npz (its array ``data``, ``samples`` or ``x``, or its only array)."""
    if not isinstance(path, (str, os.PathLike)) or not os.path.isfile(path):
        raise ValueError(f"data file {path!r} does not exist")
    try:
        loaded = np.load(path, allow_pickle=False)
    except (ValueError, OSError) as error:
        raise ValueError(f"{path} is not a .npy or .npz file numpy can read: {error}") from None
    if isinstance(loaded, np.ndarray):
        return loaded
    keys = list(loaded.keys())
    for key in ("data", "samples", "x"):
        if key in keys:
            return loaded[key]
    if len(keys) == 1:
        return loaded[keys[0]]
    raise ValueError(f"{path} holds arrays {keys}; name the data 'data', 'samples' or 'x'")


def load_dataset(data) -> torch.Tensor:
    """float32 [N, ...]: a built-in set by name (``BUILTIN``), a file, or an array; checked for at least
    one row, a feature dimension and finite values."""
    if isinstance(data, str) and data in BUILTIN:
        return BUILTIN[data]().to(torch.float32)
    if isinstance(data, (str, os.PathLike)) and not os.path.isfile(data):
        raise ValueError(f"data {str(data)!r} does not exist: it is neither a built-in set "
                         f"({', '.join(BUILTIN)}) nor a file")
    array = load_array(data) if isinstance(data, (str, os.PathLike)) else np.asarray(data)
    if array.ndim < 2 or array.shape[0] < 1 or not np.issubdtype(array.dtype, np.number):
        raise ValueError(f"data must be a numeric array [N, ...] with N >= 1 and a feature dimension, got "
                         f"{array.dtype} {array.shape} (built-in sets: {', '.join(BUILTIN)})")
    if not np.isfinite(array).all():
        raise ValueError("data holds non-finite values (nan or inf)")
    return torch.from_numpy(np.ascontiguousarray(array)).to(torch.float32)
