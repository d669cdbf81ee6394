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


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def _demo(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    import torch

    import diffkern as dk
    from diffkern import demo

    samplers = list(demo.SAMPLERS) if args.sampler == "all" else [s.strip() for s in args.sampler.split(",")]
    unknown = [s for s in samplers if s not in demo.SAMPLERS]
    if unknown:
        parser.error(f"unknown sampler {', '.join(unknown)}; choose from {', '.join(demo.SAMPLERS)} or all")
    if args.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() and dk.cuda_kernels_available() else "cpu")
    else:
        try:
            device = torch.device(args.device)
        except RuntimeError:
            parser.error(f"unknown device {args.device!r}")
        if device.type == "cuda" and not (torch.cuda.is_available() and dk.cuda_kernels_available()):
            parser.error("--device cuda needs a GPU and diffkern built with its CUDA kernels "
                         f"(GPU visible: {torch.cuda.is_available()}, CUDA kernels: {dk.cuda_kernels_available()})")
        if device.type not in ("cpu", "cuda"):
            parser.error(f"the demo runs on cpu or cuda, not {device.type}")
    demo.run(device, args.samples, args.seed, args.out, samplers, quick=args.quick, progress=not args.no_progress,
             high_dim=not args.no_high_dim)
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="diffkern", description="diffkern: fused diffusion-step kernels")
    commands = parser.add_subparsers(dest="command")
    info = commands.add_parser("info", help="what was built and a check of the noise stream (default)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the noise values shown (default 0)")
    # SUPPRESS: `diffkern --seed 3 info` must keep 3 rather than take the subcommand's default.
    info.add_argument("--seed", type=int, default=argparse.SUPPRESS, help="as above")
    demo = commands.add_parser("demo", help="every sampler on exact Gaussian-mixture models: timings, quality, "
                                            "a picture and a JSON report")
    demo.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda or cuda:N")
    demo.add_argument("--samples", type=_positive_int, default=4096, help="samples per sampler (default 4096)")
    demo.add_argument("--seed", type=int, default=argparse.SUPPRESS, help="seed of every sampler (default 0)")
    demo.add_argument("--out", default="diffkern-demo", help="folder for demo.png and demo.json (default ./diffkern-demo)")
    demo.add_argument("--sampler", default="all",
                      help="comma-separated: ddpm, ddim, euler_maruyama, heun, langevin, likelihood (default all)")
    demo.add_argument("--quick", action="store_true", help="fewer steps, for a smoke test")
    demo.add_argument("--no-high-dim", action="store_true", help="skip the 64-d mixture")
    demo.add_argument("--no-progress", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)
    try:
        if args.command == "demo":
            return _demo(args, demo)
        return _info(args)
    except ImportError as error:  # the extension is missing or built against another torch
        print(error, file=sys.stderr)
        return 2
    except BrokenPipeError:  # output piped into e.g. `head`: stop quietly
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1


if __name__ == "__main__":
    sys.exit(main())
