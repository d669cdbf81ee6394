"""Command line: `python -m diffkern [info]` (also installed as the `diffkern` command)."""
from __future__ import annotations

import argparse
import sys


def _info(args: argparse.Namespace) -> int:
    import torch

    import diffkern as dk
    from diffkern import reference

    info = dk.build_info()
    cuda = "not compiled"
    if info["cuda_kernels"]:
        cuda = f"compiled for archs {info['cuda_arch_list'] or '(visible GPUs at build time)'}; "
        cuda += f"GPU: {info['cuda_device']}" if info["cuda_device"] else "no GPU visible"
    print(f"diffkern {info['diffkern']}")
    print(f"  torch         {info['torch']} (built against {info['built_against_torch']})")
    print(f"  CPU kernels   yes, instruction set {info['cpu_isa']}")
    print(f"  CUDA kernels  {cuda}")

    shape = (2, 4)
    z = dk.randn(shape, seed=args.seed)
    expected = reference.randn(shape, seed=args.seed)
    close = torch.allclose(z, expected, atol=reference.NORMAL_ATOL, rtol=reference.NORMAL_RTOL)
    print(f"\nnoise stream: dk.randn({shape}, seed={args.seed}) on cpu")
    for row in z.tolist():
        print("  " + "  ".join(f"{v:+.6f}" for v in row))
    print(f"  agrees with the PyTorch reference (diffkern.reference.randn): {'yes' if close else 'NO'}")
    ok = close
    if info["cuda_kernels"] and torch.cuda.is_available():
        same = torch.equal(dk.randn(shape, seed=args.seed, device="cuda").cpu(), z)
        print(f"  equal bit for bit on cuda: {'yes' if same else 'NO'}")
        ok = ok and same
    return 0 if ok else 1


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="diffkern", description="diffkern: fused diffusion-step kernels")
    commands = parser.add_subparsers(dest="command")
    info = commands.add_parser("info", help="what was built and a check of the noise stream (default)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the noise values shown (default 0)")
    # SUPPRESS: `diffkern --seed 3 info` must keep 3 rather than take the subcommand's default.
    info.add_argument("--seed", type=int, default=argparse.SUPPRESS, help="as above")
    args = parser.parse_args(argv)
    try:
        return _info(args)
    except ImportError as error:  # the extension is missing or built against another torch
        print(error, file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
