"""Time to a given test NLL on 8 Gaussians: FFJORD's training loop (torchdiffeq's odeint_adjoint driving
FFJORD's ODEfunc, transcribed in tests/ffjord_transcription.py) against diffkern's (dk.training_loss with
objective="cnf", adjoint or backprop, with the default error norm (the worst sample's) and with
error_norm="rms" (torchdiffeq's kind)), from the same initial weights, on the same batches, with the same
optimizer (Adam, lr 1e-3), probe distribution (Gaussian, one probe) and tolerances (dopri5, 1e-5).

Every EVERY steps the training clock stops and both models' test NLL is measured the same way
(diffkern's exact trace on 2048 test draws, dopri5 at 1e-5). A run stops when its test NLL reaches
TARGET nats (the data's entropy is 2.83) or after MAX_STEPS.

    python benchmarks/cnf_time_to_nll.py [--target 3.6] [--max-steps 600] [--batch 512]
"""
import argparse
import os
import sys
import time

import torch

import diffkern as dk

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests"))
from ffjord_transcription import ODEfunc, ODEnet, ffjord_log_p  # noqa: E402

T1, TOL = 0.5, 1e-5


def run(loop: str, args) -> dict:
    torch.manual_seed(0)
    net = ODEnet((64, 64, 64), 2)
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-3)
    data = dk.training.sample_toy("8gaussians", 8192, 1).float()
    test = dk.training.sample_toy("8gaussians", 2048, 2).float()
    odefunc = ODEfunc(net)

    def f(z, t):
        return net(t[0], z)

    def nll() -> float:
        return dk.training.cnf_report.test_nll(lambda z, t: net(t[0], z), test, T1)

    clock, history = 0.0, []
    for step in range(args.max_steps):
        x = data[torch.randint(0, 8192, (args.batch,), generator=torch.Generator().manual_seed(step))]
        started = time.perf_counter()
        if loop == "ffjord":
            e = torch.randn(x.shape, generator=torch.Generator().manual_seed(10_000 + step))
            loss = -ffjord_log_p(odefunc, x, e, T1, rtol=TOL, atol=TOL, adjoint=True).mean()
        else:
            gradient = loop.split()[1]
            loss = dk.training_loss(_Module(f, net), x, "cnf", seed=0, step=step, t1=T1, rtol=TOL, atol=TOL,
                                    gradient=gradient, error_norm="rms" if loop.endswith("rms") else None)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        clock += time.perf_counter() - started
        if (step + 1) % args.every == 0:
            value = nll()
            history.append((step + 1, clock, value))
            print(f"  {loop:<20} step {step + 1:4d}  {clock:7.1f} s  test NLL {value:.4f}", flush=True)
            if value <= args.target:
                break
    return {"loop": loop, "history": history}


class _Module(torch.nn.Module):
    """f(z, t) as an nn.Module over net's parameters (the adjoint finds them through .parameters())."""

    def __init__(self, f, net):
        super().__init__()
        self.f, self.net = f, net

    def forward(self, z, t):
        return self.f(z, t)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", type=float, default=3.6)
    parser.add_argument("--max-steps", type=int, default=600)
    parser.add_argument("--batch", type=int, default=512)
    parser.add_argument("--every", type=int, default=25)
    args = parser.parse_args()
    print(f"8 Gaussians, batch {args.batch}, target test NLL {args.target} nats (entropy 2.83); training time only")
    loops = ("ffjord", "diffkern adjoint", "diffkern backprop", "diffkern adjoint rms", "diffkern backprop rms")
    results = [run(loop, args) for loop in loops]
    for r in results:
        reached = next(((s, c, v) for s, c, v in r["history"] if v <= args.target), None)
        what = (f"reached at step {reached[0]} after {reached[1]:.1f} s" if reached
                else f"not reached in {args.max_steps} steps (last {r['history'][-1][2]:.4f})")
        print(f"{r['loop']:<20} {what}")


if __name__ == "__main__":
    main()
