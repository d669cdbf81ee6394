"""Rebuilds diffkern/datasets/digits.npz from scikit-learn's copy of the UCI handwritten digits (the file
sklearn/datasets/data/digits.csv.gz inside its wheel; no install needed):

    pip download scikit-learn --no-deps -d /tmp/skl && python tools/make_digits.py /tmp/skl/scikit_learn-*.whl

Writes images (uint8 [1797, 8, 8], grey levels 0..16) and labels (uint8 [1797]) in the file's row order,
and prints the sha256 of the images' bytes (tests/test_digits.py pins it)."""
import gzip
import hashlib
import io
import os
import sys
import zipfile

import numpy as np


def main(wheel: str) -> None:
    with zipfile.ZipFile(wheel) as z:
        raw = gzip.decompress(z.read("sklearn/datasets/data/digits.csv.gz"))
    table = np.loadtxt(io.BytesIO(raw), delimiter=",", dtype=np.int64)
    images, labels = table[:, :64], table[:, 64]
    assert images.shape == (1797, 64) and images.min() == 0 and images.max() == 16 and set(labels) == set(range(10))
    images = images.astype(np.uint8).reshape(-1, 8, 8)
    out = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "diffkern", "datasets",
                       "digits.npz")
    np.savez_compressed(out, images=images, labels=labels.astype(np.uint8))
    print(out, hashlib.sha256(images.tobytes()).hexdigest())


if __name__ == "__main__":
    main(sys.argv[1])
