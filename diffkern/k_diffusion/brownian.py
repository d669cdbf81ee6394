"""k-diffusion's Brownian-tree noise (torchsde's BrownianTree, which it needs: a clear ImportError
without it). The SDE samplers default to it, so their noise depends only on the tree's seed and the
two noise levels of each step, not on how many steps a schedule has; the tree's seed comes from torch's
global generator unless given, as in k-diffusion."""
from __future__ import annotations

import torch


def _torchsde():
    try:
        import torchsde
    except ImportError:
        raise ImportError("the Brownian-tree noise sampler needs torchsde (pip install torchsde), as k-diffusion's "
                          "does; or pass noise_sampler= (e.g. diffkern.k_diffusion.stream_noise_sampler(seed)) or "
                          "seed=") from None
    return torchsde


class BatchedBrownianTree:
    """torchsde.BrownianTree over [t0, t1] for a tensor like x: one tree (a seed), or one per batch
    item (a list of seeds, one per row of x)."""

    def __init__(self, x, t0, t1, seed=None, **kwargs):
        torchsde = _torchsde()
        t0, t1, self.sign = self.sort(t0, t1)
        w0 = kwargs.get("w0", torch.zeros_like(x))
        if seed is None:
            seed = torch.randint(0, 2 ** 63 - 1, []).item()
        if isinstance(seed, (list, tuple)):
            if len(seed) != x.shape[0]:
                raise ValueError(f"a list of seeds needs one per batch item ({x.shape[0]}), got {len(seed)}")
            self.batched, seeds, w0 = True, list(seed), w0[0]
        else:
            self.batched, seeds = False, [seed]
        self.trees = [torchsde.BrownianTree(t0, w0, t1, entropy=s, **kwargs) for s in seeds]

    @staticmethod
    def sort(a, b):
        return (a, b, 1) if a < b else (b, a, -1)

    def __call__(self, t0, t1):
        t0, t1, sign = self.sort(t0, t1)
        w = torch.stack([tree(t0, t1) for tree in self.trees]) * (self.sign * sign)
        return w if self.batched else w[0]


class BrownianTreeNoiseSampler:
    """A noise sampler on a Brownian tree over [sigma_min, sigma_max] (through ``transform``, sigma to
    the tree's time): a call (sigma, sigma_next) returns the tree's increment between them divided by the
    square root of their distance, a standard normal per element."""

    def __init__(self, x, sigma_min, sigma_max, seed=None, transform=lambda x: x):
        self.transform = transform
        t0, t1 = self.transform(torch.as_tensor(sigma_min)), self.transform(torch.as_tensor(sigma_max))
        self.tree = BatchedBrownianTree(x, t0, t1, seed)

    def __call__(self, sigma, sigma_next):
        t0, t1 = self.transform(torch.as_tensor(sigma)), self.transform(torch.as_tensor(sigma_next))
        return self.tree(t0, t1) / (t1 - t0).abs().sqrt()


def default_brownian(x: torch.Tensor, sigmas: torch.Tensor) -> BrownianTreeNoiseSampler:
    """The SDE samplers' default: a tree over the run's positive sigmas, seeded from the global generator."""
    return BrownianTreeNoiseSampler(x, sigmas[sigmas > 0].min(), sigmas.max())
