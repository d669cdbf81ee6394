"""docs/cnf_toys.png: for each 2-d toy CNF trained by tools/train_cnf_examples.sh (runs/cnf-NAME), the data
(top) above the learned density exp(log p) (bottom, exact trace, dopri5 at 1e-4), with the test NLL.

    python tools/cnf_toy_figure.py [RUNS_DIR]"""
import json
import os
import sys

import matplotlib
import torch

import diffkern as dk

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

NAMES = ["8gaussians", "checkerboard", "pinwheel", "2spirals", "rings"]


def main(runs: str = "runs") -> None:
    fig, axes = plt.subplots(2, len(NAMES), figsize=(3 * len(NAMES), 6), layout="constrained")
    axis = torch.linspace(-4.5, 4.5, 120, dtype=torch.float32)
    grid = torch.stack(torch.meshgrid(axis, axis, indexing="xy"), -1).reshape(-1, 2)
    for column, name in enumerate(NAMES):
        folder = os.path.join(runs, f"cnf-{name}")
        model = dk.training.load_checkpoint(os.path.join(folder, "checkpoint.pt"))
        t1 = model.diffkern_trained["options"]["t1"]
        with open(os.path.join(folder, "loss.json")) as f:
            summary = json.load(f)["summary"]
        with torch.no_grad():
            density = torch.cat([dk.cnf_log_likelihood(model, chunk, 0.0, t1, trace="exact", rtol=1e-4,
                                                        atol=1e-4).log_p.exp() for chunk in grid.split(2400)])
        data = dk.training.sample_toy(name, 20000, 3)
        axes[0, column].hist2d(data[:, 0].numpy(), data[:, 1].numpy(), bins=120, range=[[-4.5, 4.5]] * 2,
                               cmap="magma")
        axes[0, column].set_title(name)
        axes[1, column].imshow(density.reshape(120, 120).numpy(), origin="lower", extent=(-4.5, 4.5, -4.5, 4.5),
                               cmap="magma")
        entropy = summary.get("data_entropy")
        axes[1, column].set_title(f"CNF: test NLL {summary['test_nll']:.2f}"
                                  + (f" (H {entropy:.2f})" if entropy is not None else ""), fontsize=9)
        for row in range(2):
            axes[row, column].set_xticks([])
            axes[row, column].set_yticks([])
    out = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "docs", "cnf_toys.png")
    fig.savefig(out, dpi=72)
    print(out)


if __name__ == "__main__":
    main(*sys.argv[1:])
