"""Sample quality at 8x8: a small digit classifier trained on the digits' training split (shipped in
diffkern/datasets/digit_classifier.pt, made by tools/train_digit_classifier.py) and four measures of a
set of samples in its penultimate features (64-d):

- ``fd``: the Frechet distance between the Gaussians fitted to the samples' and the test split's
  features, |mu_s - mu_t|^2 + tr(S_s + S_t - 2 (S_s^1/2 S_t S_s^1/2)^1/2) (FID's formula, "digits-FD");
- ``coverage``: the predicted classes' distribution, and its total-variation distance to uniform
  (0: every digit equally often; 0.9: one digit only);
- ``precision`` / ``recall``: the improved precision and recall of Kynkaenniemi et al. (2019), k = 3:
  the share of samples inside some test image's k-NN ball, and of test images inside some sample's;
- ``nearest_train``: the median pixel-space L2 distance of a sample to its nearest training image
  (memorisation shows as distances far below the test split's own).

``floor()`` gives the same numbers for real data (the training split against the test split; the test
split's own distances to the training set): what a perfect sampler would score at this sample size.
"""
from __future__ import annotations

import functools
import os
from typing import Optional

import torch

from .data import digits

CLASSIFIER_PATH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "datasets",
                               "digit_classifier.pt")
K_NEAREST = 3


class DigitClassifier(torch.nn.Module):
    """[B, 1, 8, 8] in (-1, 1) -> 10 logits; ``features`` is the 64-d penultimate layer."""

    def __init__(self):
        super().__init__()
        self.body = torch.nn.Sequential(
            torch.nn.Conv2d(1, 16, 3, padding=1), torch.nn.SiLU(), torch.nn.Conv2d(16, 32, 3, padding=1),
            torch.nn.SiLU(), torch.nn.AvgPool2d(2), torch.nn.Flatten(), torch.nn.Linear(32 * 4 * 4, 64),
            torch.nn.SiLU())
        self.head = torch.nn.Linear(64, 10)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x.reshape(-1, 1, 8, 8).float())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def train_classifier(seed: int = 0, epochs: int = 60) -> DigitClassifier:
    """The shipped classifier's recipe: Adam (lr 2e-3), batch 64, the training split with Gaussian pixel
    noise (std 0.05) as augmentation, ``epochs`` passes in an order drawn from ``seed``."""
    torch.manual_seed(seed)
    x, labels = digits("train", labels=True)
    model = DigitClassifier()
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-3)
    g = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        for rows in torch.randperm(x.shape[0], generator=g).split(64):
            noisy = x[rows] + 0.05 * torch.randn(x[rows].shape, generator=g)
            loss = torch.nn.functional.cross_entropy(model(noisy), labels[rows])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return model.eval()


@functools.lru_cache(maxsize=1)
def load_classifier() -> DigitClassifier:
    """The shipped classifier (CPU, eval mode, frozen)."""
    if not os.path.isfile(CLASSIFIER_PATH):
        raise FileNotFoundError(f"{CLASSIFIER_PATH} is missing: run python tools/train_digit_classifier.py")
    model = DigitClassifier()
    model.load_state_dict(torch.load(CLASSIFIER_PATH, map_location="cpu", weights_only=True))
    return model.eval().requires_grad_(False)


def _check_images(name: str, x) -> torch.Tensor:
    if not isinstance(x, torch.Tensor) or x.dim() < 2 or x[0].numel() != 64 or x.shape[0] < K_NEAREST + 1:
        raise ValueError(f"{name} must be a tensor of at least {K_NEAREST + 1} 8x8 images ([N, 64] or "
                         f"[N, 1, 8, 8]), got {tuple(getattr(x, 'shape', ())) or type(x).__name__}")
    x = x.detach().reshape(-1, 64).cpu().float()
    if not bool(torch.isfinite(x).all()):
        raise ValueError(f"{name} holds non-finite values")
    return x


def frechet_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """The Frechet distance between Gaussians fitted to the rows of a and b (float64)."""
    a, b = a.double(), b.double()
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = torch.cov(a.T), torch.cov(b.T)
    values, vectors = torch.linalg.eigh(cov_a)
    root_a = vectors @ torch.diag(values.clamp_min(0).sqrt()) @ vectors.T
    middle = torch.linalg.eigvalsh(root_a @ cov_b @ root_a).clamp_min(0).sqrt().sum()
    return float((mu_a - mu_b).pow(2).sum() + cov_a.trace() + cov_b.trace() - 2 * middle)


def _inside_balls(points: torch.Tensor, centres: torch.Tensor) -> float:
    """The share of points inside some centre's ball (radius: its K_NEAREST-th neighbour among centres)."""
    radii = torch.cdist(centres, centres).kthvalue(K_NEAREST + 1, dim=1).values  # the 0th is itself
    return float((torch.cdist(points, centres) <= radii[None]).any(1).double().mean())


def metrics(samples: torch.Tensor, reference: Optional[torch.Tensor] = None,
            train: Optional[torch.Tensor] = None) -> dict:
    """fd, coverage (per-class shares and their total-variation distance to uniform), precision,
    recall, nearest_train of ``samples`` ([N, 1, 8, 8] or [N, 64] in the digits' scale) against
    ``reference`` (default: the test split) and ``train`` (default: the training split)."""
    samples = _check_images("samples", samples)
    reference = _check_images("reference", digits("test") if reference is None else reference)
    train = _check_images("train", digits("train") if train is None else train)
    classifier = load_classifier()
    with torch.no_grad():
        features_s, features_r = classifier.features(samples), classifier.features(reference)
        shares = torch.bincount(classifier.head(features_s).argmax(1), minlength=10).double() / samples.shape[0]
    return {
        "fd": frechet_distance(features_s, features_r),
        "class_shares": shares.tolist(),
        "coverage_tv": float(0.5 * (shares - 0.1).abs().sum()),
        "precision": _inside_balls(features_s, features_r),
        "recall": _inside_balls(features_r, features_s),
        "nearest_train": float(torch.cdist(samples, train).min(1).values.median()),
    }


def floor() -> dict:
    """The scores of real digits: the training split's 1,497 images as "samples" against the test split
    (fd, coverage, precision, recall), and the test split's median distance to its nearest training
    image (nearest_train; the training split's own would be 0)."""
    train, test = digits("train"), digits("test")
    scores = metrics(train, test, train)
    scores["nearest_train"] = float(torch.cdist(test.reshape(-1, 64), train.reshape(-1, 64)).min(1).values.median())
    return scores
