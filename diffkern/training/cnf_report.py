"""What a trained CNF is worth: its test NLL (exact trace) beside the data's own entropy where that is
known, and for 2-d data a picture of its density beside the data."""
from __future__ import annotations

import math
from typing import Optional

import torch

from ..likelihood import cnf_log_likelihood
from ..noise import DEQUANTIZATION_STREAM
from .data import DIGITS_BIN_WIDTH, digits
from .draws import BatchKey, uniform_features
from .toy_data import TOY_DATASETS, sample_toy, toy_log_density

TEST_SIZE, TEST_SEED = 4096, 7  # the toy sets' test draws: a seed the training set (data.BUILTIN_SEED) never uses


def test_nll(model, x: torch.Tensor, t1: float, *, batch_size: int = 1024, rtol: float = 1e-5,
             atol: float = 1e-5) -> float:
    """The mean negative log-likelihood (nats per sample) of x under the CNF, exact trace, dopri5."""
    total = 0.0
    with torch.no_grad():
        for chunk in x.split(batch_size):
            result = cnf_log_likelihood(lambda z, t: model(z, t), chunk, 0.0, t1, trace="exact", rtol=rtol, atol=atol)
            total += float(result.log_p.sum())
    return -total / x.shape[0]


def dequantized(x: torch.Tensor, width: float, seed: int = TEST_SEED) -> torch.Tensor:
    """x plus one fixed draw of U(-width/2, width/2) per feature (the stream's, from ``seed``)."""
    u = uniform_features(x.shape[0], x[0].numel(), BatchKey(seed, 0, 0), x.device, DEQUANTIZATION_STREAM)
    return x + ((u.reshape(x.shape) - 0.5) * width).to(x.dtype)


def digits_test(seed: int = TEST_SEED):
    """(the digits' test split dequantized in its grey levels' bins with the draw of ``seed``, the bits
    offset log2(1 / width) that makes a density of it a likelihood of the 17-level images), as
    ``evaluate --data digits``, the demo and benchmarks/digits_bits_per_dim.py score it."""
    return dequantized(digits("test"), DIGITS_BIN_WIDTH, seed), math.log2(1.0 / DIGITS_BIN_WIDTH)


def bits_per_dim(nll: float, features: int, width: float) -> float:
    """Bits per dimension of the quantized data from the dequantized density's NLL (nats per sample):
    -log p / (d ln 2) + log2(1 / width) (the bins' width; score_sde's offset of 7 for 256 levels on [-1, 1])."""
    return nll / (features * math.log(2)) + math.log2(1.0 / width)


def gaussian_bits_per_dim(train: torch.Tensor, test: torch.Tensor, width: float) -> float:
    """The same bits/dim for a Gaussian with the training split's mean and covariance: a baseline."""
    train, test = train.flatten(1).double(), test.flatten(1).double()
    mean = train.mean(0)
    cov = torch.cov(train.T) + 1e-6 * torch.eye(train.shape[1], dtype=torch.float64)
    nll = -float(torch.distributions.MultivariateNormal(mean, cov).log_prob(test).mean())
    return bits_per_dim(nll, train.shape[1], width)


def toy_entropy(name: str) -> Optional[float]:
    """The entropy (nats) of a toy density whose log density is known: exact for checkerboard (log 32),
    a Monte-Carlo estimate on 10^6 draws for 8gaussians (standard error ~1e-3); else None."""
    if name == "checkerboard":
        return math.log(32.0)
    if name == "8gaussians":
        return float(-toy_log_density(name, sample_toy(name, 1_000_000, TEST_SEED + 1)).mean())
    return None


def report(model, data_name: str, data: torch.Tensor, objective, out: Optional[str] = None) -> dict:
    """{test_nll, data_entropy} for a built-in toy set (test draws of seed TEST_SEED); for the digits the
    test split's NLL and bits/dim (one fixed dequantization draw) beside a Gaussian fit's; and with
    ``out`` a density picture (out/density.png: data histogram | model density) for 2-d data."""
    result = {}
    t1 = objective.t1
    device = next(model.parameters()).device if any(True for _ in model.parameters()) else torch.device("cpu")
    if data_name in TOY_DATASETS:
        test = sample_toy(data_name, TEST_SIZE, TEST_SEED).to(device=device, dtype=data.dtype)
        result["test_nll"] = test_nll(model, test, t1)
        result["data_entropy"] = toy_entropy(data_name)
    elif data_name == "digits":
        width = objective.dequantize if objective.dequantize > 0 else DIGITS_BIN_WIDTH
        test = dequantized(digits("test").to(device=device, dtype=data.dtype), width)
        result["test_nll"] = test_nll(model, test, t1)
        result["test_bits_per_dim"] = bits_per_dim(result["test_nll"], test[0].numel(), width)
        result["gaussian_bits_per_dim"] = gaussian_bits_per_dim(dequantized(data.cpu(), width, TEST_SEED + 1),
                                                                test.cpu(), width)
    if out is not None and data[0].numel() == 2:
        result["density_plot"] = _density_plot(model, data, t1, out)
    return result


def _density_plot(model, data: torch.Tensor, t1: float, path: str) -> bool:
    try:
        import matplotlib
    except ImportError:
        return False
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    flat = data.reshape(data.shape[0], 2).double().cpu()
    low, high = float(flat.min()) - 0.5, float(flat.max()) + 0.5
    n = 96
    axis = torch.linspace(low, high, n, dtype=torch.float64)
    grid = torch.stack(torch.meshgrid(axis, axis, indexing="xy"), -1).reshape(-1, 2)
    device = next(model.parameters()).device
    with torch.no_grad():
        density = torch.cat([cnf_log_likelihood(lambda z, t: model(z, t), chunk.to(device=device, dtype=data.dtype),
                                                0.0, t1, trace="exact", rtol=1e-4, atol=1e-4).log_p.exp().cpu()
                             for chunk in grid.split(2048)]).reshape(n, n)
    fig, axes = plt.subplots(1, 2, figsize=(8, 4), layout="constrained")
    axes[0].hist2d(flat[:, 0].numpy(), flat[:, 1].numpy(), bins=n, range=[[low, high], [low, high]], cmap="magma")
    axes[0].set_title("data")
    axes[1].imshow(density.numpy(), origin="lower", extent=(low, high, low, high), cmap="magma")
    axes[1].set_title("CNF density")
    for ax in axes:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True
