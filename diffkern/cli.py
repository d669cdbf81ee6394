"""Command line: `python -m diffkern [info|demo|generate|evaluate|train]` (also installed as the `diffkern`
command). The samplers and their options come from the registry (diffkern.sampling.registry).

Errors in the user's input (an argument, a model that does not fit the shape or the data, a device
that is not there) are one line on stderr and exit status 2."""
from __future__ import annotations

import argparse
import os
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


def _fail(parser: argparse.ArgumentParser, message: str):
    """A mistake in the input found after parsing: one line that names it, exit status 2 (argparse's
    own parser.error prints its usage first)."""
    print(f"{parser.prog}: error: {message}", file=sys.stderr)
    raise SystemExit(2)


class _Parser(argparse.ArgumentParser):
    """argparse's parser with its errors as one line (the usage is a --help away)."""

    def error(self, message):
        _fail(self, f"{message} (see {self.prog} --help)")


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def _seed(text: str) -> int:
    try:
        value = int(text, 0)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an integer, got {text!r}") from None
    if not 0 <= value < 1 << 64:
        raise argparse.ArgumentTypeError(f"must lie in [0, 2^64), got {value}")
    return value


def _writable_folder(path: str) -> str:
    """path, created if missing, after checking that a file can be written there (so a long run does
    not fail at its end)."""
    try:
        os.makedirs(path, exist_ok=True)
        probe = os.path.join(path, f".diffkern-write-test-{os.getpid()}")
        with open(probe, "w"):
            pass
        os.remove(probe)
    except OSError as error:
        raise argparse.ArgumentTypeError(f"cannot write to {path!r}: {error.strerror or error}") from None
    return path


def _demo(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    import torch

    import diffkern as dk
    from diffkern import demo

    samplers = (list(demo.DEFAULT_SAMPLERS) + ["likelihood"] if args.sampler == "all"
                else [s.strip() for s in args.sampler.split(",")])
    unknown = [s for s in samplers if s not in demo.SAMPLERS]
    if unknown:
        _fail(parser, f"unknown sampler {', '.join(unknown)}; choose from {', '.join(demo.SAMPLERS)} or all (the "
                     f"default: {', '.join(demo.DEFAULT_SAMPLERS)}, likelihood)")
    device = _device_of(args.device, parser)
    if device is None:
        device = torch.device("cuda" if torch.cuda.is_available() and dk.cuda_kernels_available() else "cpu")
    if args.data not in demo.DATA:
        _fail(parser, f"--data must be one of {', '.join(demo.DATA)}, got {args.data!r}")
    demo.run(device, args.samples, args.seed, args.out, samplers, quick=args.quick, progress=not args.no_progress,
             high_dim=not args.no_high_dim, data=args.data, digit_samples=args.digit_samples)
    return 0


def _load_model(spec: str, kwargs_json, parser: argparse.ArgumentParser):
    """--model MODULE:ATTR: the model itself, or a factory called with --model-kwargs (or with none when
    it needs no arguments: a class, or a function without required parameters)."""
    import importlib
    import inspect
    import json

    if ":" not in spec:
        _fail(parser, f"--model must be MODULE:ATTR (e.g. diffkern.models:mixture_model), got {spec!r}")
    module_name, attr = spec.split(":", 1)
    try:
        obj = importlib.import_module(module_name)
    except Exception as error:  # noqa: BLE001 (any import failure is the user's spec)
        _fail(parser, f"--model {spec}: cannot import {module_name!r}: {type(error).__name__}: {error}")
    for part in attr.split("."):
        if not hasattr(obj, part):
            _fail(parser, f"--model {spec}: {module_name!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    try:
        kwargs = json.loads(kwargs_json) if kwargs_json else None
    except json.JSONDecodeError as error:
        _fail(parser, f"--model-kwargs is not JSON: {error}")
    if kwargs is not None and not isinstance(kwargs, dict):
        _fail(parser, "--model-kwargs must be a JSON object")
    if not callable(obj):
        _fail(parser, f"--model {spec} is a {type(obj).__name__}, not a model or a factory")
    is_factory = kwargs is not None or inspect.isclass(obj)
    if not is_factory:
        try:
            parameters = inspect.signature(obj).parameters.values()
            is_factory = not any(p.default is p.empty and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
                                 for p in parameters)
        except (TypeError, ValueError):
            is_factory = False
    if is_factory:
        try:
            obj = obj(**(kwargs or {}))
        except Exception as error:  # noqa: BLE001
            _fail(parser, f"--model {spec}: the factory failed: {type(error).__name__}: {error}")
        if not callable(obj):
            _fail(parser, f"--model {spec} returned a {type(obj).__name__}, not a callable model")
    return obj, kwargs


def _process_group(device_arg: str, timeout: float):
    """Join torchrun's process group (gloo on CPU, NCCL on GPU) when launched by it."""
    import datetime
    import os

    import torch
    import torch.distributed as dist

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or dist.is_initialized():
        return False
    cuda = device_arg.startswith("cuda") or (device_arg == "auto" and torch.cuda.is_available())
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count())
    # torchrun keeps one store across restarts (--max-restarts): the keys a killed round left there
    # (its ranks' gloo addresses) would be read by the next round, which then connects to dead
    # processes ("Connection refused"). A prefix per round keeps each round's keys apart.
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    wait = datetime.timedelta(seconds=timeout)
    agent_store = os.environ.get("TORCHELASTIC_USE_AGENT_STORE", "").lower() == "true"
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world,
                          is_master=rank == 0 and not agent_store, timeout=wait)
    store = dist.PrefixStore(f"diffkern/round{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}", store)
    dist.init_process_group("nccl" if cuda else "gloo", store=store, rank=rank, world_size=world, timeout=wait)
    return True


def _device_of(arg: str, parser: argparse.ArgumentParser):
    """--device: None for auto, else a device that is there (cpu, or cuda with a GPU and the CUDA kernels)."""
    import torch

    import diffkern as dk

    if arg == "auto":
        return None
    try:
        device = torch.device(arg)
    except RuntimeError:
        _fail(parser, f"--device: unknown device {arg!r} (auto, cpu, cuda or cuda:N)")
    if device.type not in ("cpu", "cuda"):
        _fail(parser, f"--device: diffkern runs on cpu or cuda, not {device.type}")
    if device.type == "cuda":
        if not (torch.cuda.is_available() and dk.cuda_kernels_available()):
            _fail(parser, "--device cuda needs a GPU and diffkern built with its CUDA kernels "
                         f"(GPU visible: {torch.cuda.is_available()}, CUDA kernels: {dk.cuda_kernels_available()})")
        if device.index is not None and device.index >= torch.cuda.device_count():
            _fail(parser, f"--device {arg}: there are {torch.cuda.device_count()} GPUs")
    return device


def _generate(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from diffkern import distributed
    from diffkern.sampling import registry

    if args.sampler not in registry.SAMPLERS:
        _fail(parser, f"unknown sampler {args.sampler!r}; choose from {', '.join(registry.SAMPLERS)}")
    if args.data is not None and args.data != "digits":
        _fail(parser, f"--data: generate scores its samples against a built-in set's test split, and only digits has "
                      f"one; got {args.data!r}")
    if args.shape is None and args.data is None:
        _fail(parser, "--shape is required (e.g. 3,32,32), unless --data digits gives it")
    try:
        shape = [int(s) for s in (args.shape or "1,8,8").split(",")]
    except ValueError:
        _fail(parser, f"--shape must be comma-separated positive integers, e.g. 3,32,32; got {args.shape!r}")
    if not shape or any(s < 1 for s in shape):
        _fail(parser, f"--shape must be comma-separated positive integers, got {args.shape!r}")
    if args.data == "digits" and shape != [1, 8, 8]:
        _fail(parser, f"--shape {args.shape} is not the digits' 1,8,8")
    if args.dtype not in distributed.DTYPES:
        _fail(parser, f"--dtype must be one of {', '.join(distributed.DTYPES)}")
    options = {name: getattr(args, name) for name in registry.OPTIONS if getattr(args, name) is not None}
    try:
        sampler = registry.make_sampler(args.sampler, steps=args.steps, **options)
    except ValueError as error:
        _fail(parser, _as_flags(str(error)))
    device = _device_of(args.device, parser)
    model, kwargs = _load_model(args.model, args.model_kwargs, parser)

    def work(joined):
        path = distributed.generate(
            model, sampler=sampler, num_samples=args.num_samples, shape=shape, batch_size=args.batch_size,
            seed=args.seed, out=args.out, dtype=distributed.DTYPES[args.dtype], device=device,
            progress=not args.no_progress, timeout=args.timeout, config={"model": args.model, "model_kwargs": kwargs})
        if args.data == "digits" and (not joined or int(os.environ.get("RANK", "0")) == 0):
            _score_digits(path, args.out)

    return _in_process_group("generate", args, work)


def _score_digits(path: str, out: str) -> None:
    """digits-FD, coverage, precision / recall and memorisation of generated digits, printed and
    written to out/digit_metrics.json."""
    import json

    import numpy as np
    import torch

    from diffkern.training import digit_metrics

    with np.load(path) as f:
        samples = torch.from_numpy(f["samples"]).float().clamp(-1, 1)
    scores = digit_metrics.metrics(samples)
    with open(os.path.join(out, "digit_metrics.json"), "w") as f:
        json.dump(scores, f, indent=1)
    print(f"digits: digits-FD {scores['fd']:.2f}, coverage TV {scores['coverage_tv']:.3f}, precision "
          f"{scores['precision']:.2f}, recall {scores['recall']:.2f}, median distance to the nearest training image "
          f"{scores['nearest_train']:.2f} (real test digits: diffkern.training.digit_metrics.floor()); "
          f"{os.path.join(out, 'digit_metrics.json')}")


def _in_process_group(command: str, args: argparse.Namespace, work) -> int:
    """Run work(joined) inside torchrun's process group when launched by it; a ValueError is the
    user's input: printed (by every rank) with exit status 2."""
    joined = _process_group(args.device, args.timeout)
    try:
        work(joined)
    except ValueError as error:
        print(f"diffkern {command}: error: {error}", file=sys.stderr)
        return 2
    finally:
        if joined:
            import torch.distributed as dist

            dist.destroy_process_group()
    return 0


def _likelihood_solvers():
    from diffkern.ode import SOLVERS

    return SOLVERS


def _evaluate(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from diffkern import distributed

    if args.sde not in distributed.SDES:
        _fail(parser, f"--sde must be one of {', '.join(distributed.SDES)}")
    if args.solver not in _likelihood_solvers():
        _fail(parser, f"--solver must be one of {', '.join(_likelihood_solvers())}, got {args.solver!r}")
    bits_offset = args.bits_offset
    if args.data == "digits":  # the test split, dequantized in the bins of its 17 grey levels
        from diffkern.training import cnf_report

        data, offset = cnf_report.digits_test()
        data = data.numpy()
        bits_offset = offset if bits_offset is None else bits_offset
        identity = "digits"
    else:
        try:
            data = distributed.load_data(args.data)
        except (ValueError, OSError) as error:
            _fail(parser, f"--data: {error} (built-in: digits)")
        identity = os.path.abspath(args.data)
    device = _device_of(args.device, parser)
    model, kwargs = _load_model(args.model, args.model_kwargs, parser)

    def work(joined):
        path, mean, stderr = distributed.evaluate(
            model, data, sde=args.sde, steps=args.steps, solver=args.solver, probes=args.probes, trace=args.trace,
            seed=args.seed, batch_size=args.batch_size, out=args.out, device=device,
            bits_offset=0.0 if bits_offset is None else bits_offset,
            progress=not args.no_progress, timeout=args.timeout,
            config={"model": args.model, "model_kwargs": kwargs, "data": identity})
        if not joined or int(os.environ.get("RANK", "0")) == 0:
            print(f"bits/dim: {mean:.6f} +- {stderr:.6f} (standard error over {data.shape[0]} samples); {path}")

    return _in_process_group("evaluate", args, work)


def _json_object(text, flag: str, parser: argparse.ArgumentParser) -> dict:
    import json

    try:
        value = json.loads(text) if text else {}
    except json.JSONDecodeError as error:
        _fail(parser, f"{flag} is not JSON: {error}")
    if not isinstance(value, dict):
        _fail(parser, f"{flag} must be a JSON object")
    return value


def _train(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from diffkern import training

    config = training.TrainConfig(
        data=args.data if args.data in training.BUILTIN else os.path.abspath(args.data),
        objective=args.objective, objective_options=_json_object(args.objective_options, "--objective-options", parser),
        model=args.model, model_kwargs=_json_object(args.model_kwargs, "--model-kwargs", parser), steps=args.steps,
        batch_size=args.batch_size, accumulation=args.accumulation, lr=args.lr, weight_decay=args.weight_decay,
        ema_decay=args.ema_decay, seed=args.seed)
    try:
        config.checked()
    except ValueError as error:
        _fail(parser, str(error))
    device = _device_of(args.device, parser)

    def work(joined):
        import torch

        import diffkern as dk

        run_device = device
        if run_device is None and torch.cuda.is_available() and dk.cuda_kernels_available():
            run_device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count())
        summary = training.train(config, args.out, device=run_device, progress=not args.no_progress,
                                 checkpoint_every=args.checkpoint_every, record_steps=args.record_steps)
        if not joined or int(os.environ.get("RANK", "0")) == 0:
            print(f"trained {summary['steps']} steps (from step {summary['resumed_from']}) in "
                  f"{summary['wall_s']:.1f} s on {summary['world_size']} process(es); final loss "
                  f"{summary['final_loss']:.5g}; {os.path.join(args.out, training.trainer.CHECKPOINT)}")
            if "test_bits_per_dim" in summary:
                print(f"test NLL {summary['test_nll']:.4f} nats, {summary['test_bits_per_dim']:.4f} bits/dim "
                      f"(a Gaussian fit: {summary['gaussian_bits_per_dim']:.4f})")
            elif "test_nll" in summary:
                entropy = summary.get("data_entropy")
                print(f"test NLL {summary['test_nll']:.4f} nats" + (f" (the data's entropy: {entropy:.4f})"
                                                                    if entropy is not None else ""))

    return _in_process_group("train", args, work)


def _as_flags(message: str) -> str:
    """A registry message in the command line's words: a leading option name as its --flag."""
    from diffkern.sampling import registry

    for name in registry.OPTIONS:
        if message.startswith(name + " "):
            return f"--{name.replace('_', '-')}{message[len(name):]}"
    return message


def _sampler_help() -> str:
    from diffkern.sampling import registry

    return "; ".join(f"{name} ({entry.model} model, {entry.default_steps} steps)"
                     for name, entry in registry.ENTRIES.items())


def _add_sampler_options(generate: argparse.ArgumentParser) -> None:
    """--steps and one flag per registry option, each saying which samplers read it."""
    from diffkern.sampling import registry

    generate.add_argument("--steps", type=_positive_int, default=None, help="sampler steps (each sampler's default, "
                          "above)")
    types = {"eta": float, "sigma_min": float, "sigma_max": float, "order": int, "langevin_steps": _positive_int,
             "step_size": float, "z_max": float, "max_radius": float}
    for name, option in registry.OPTIONS.items():
        by_default = {}  # each sampler's own default, grouped
        for reader in registry.readers(name):
            by_default.setdefault(registry.ENTRIES[reader].options[name], []).append(reader)
        if len(by_default) == 1:
            (default, readers), = by_default.items()
            text = ", ".join(readers) + (f"; default {default}" if default is not None else "")
        else:
            text = "; ".join(f"{', '.join(readers)}: default {default}" for default, readers in by_default.items())
        generate.add_argument(f"--{name.replace('_', '-')}", dest=name, type=types.get(name, str), default=None,
                              help=f"{option.help} ({text})")


def main(argv=None) -> int:
    parser = _Parser(prog="diffkern", description="diffkern: fused diffusion-step kernels")
    commands = parser.add_subparsers(dest="command")
    info = commands.add_parser("info", help="what was built and a check of the noise stream (default)")
    parser.add_argument("--seed", type=_seed, default=0, help="seed of the noise values shown (default 0)")
    # SUPPRESS: `diffkern --seed 3 info` must keep 3 rather than take the subcommand's default.
    info.add_argument("--seed", type=_seed, default=argparse.SUPPRESS, help="as above")
    demo = commands.add_parser("demo", help="every sampler on exact Gaussian-mixture models, then the shipped digits "
                                            "models: timings, quality, pictures and a JSON report")
    demo.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda or cuda:N")
    demo.add_argument("--samples", type=_positive_int, default=4096, help="samples per sampler on the mixtures "
                      "(default 4096)")
    demo.add_argument("--seed", type=_seed, default=argparse.SUPPRESS, help="seed of every sampler (default 0)")
    demo.add_argument("--out", default="diffkern-demo", type=_writable_folder,
                      help="folder for demo.png, digits.png and demo.json (default ./diffkern-demo)")
    demo.add_argument("--sampler", default="all",
                      help="comma-separated sampler names (any of `generate --sampler`) and likelihood; default all: "
                           "ddpm, ddim, euler_maruyama, heun, langevin, dpmpp, flow, pfgm, likelihood")
    demo.add_argument("--quick", action="store_true", help="fewer steps, for a smoke test")
    demo.add_argument("--no-high-dim", action="store_true", help="skip the 64-d mixture")
    demo.add_argument("--data", default="all", help="all (default), mixtures (the exact Gaussian mixtures) or digits "
                      "(the shipped models of the 8x8 digits, on the CPU)")
    demo.add_argument("--digit-samples", type=_positive_int, default=None, help="samples per sampler in the digits "
                      "part (default 500; --quick 200)")
    demo.add_argument("--no-progress", action="store_true", help="no progress bars")
    generate = commands.add_parser(
        "generate", help="generate samples, sharded over processes (torchrun), resumable",
        description="Run alone or as `torchrun --nproc_per_node=K -m diffkern generate ...`. Samples are identical "
                    "for any world size and batch size.")
    generate.add_argument("--model", required=True, help="MODULE:ATTR, the model or a factory returning it "
                          "(e.g. diffkern.models:mixture_model)")
    generate.add_argument("--model-kwargs", default=None, help="JSON object for the factory")
    generate.add_argument("--sampler", required=True, help=_sampler_help())
    _add_sampler_options(generate)
    generate.add_argument("--num-samples", type=_positive_int, required=True, help="N, the total")
    generate.add_argument("--shape", default=None, help="per sample, e.g. 3,32,32 or 2 (required unless --data "
                          "gives it)")
    generate.add_argument("--data", default=None, help="digits: samples of the 8x8 digits (shape 1,8,8), scored "
                          "against the test split when done (digits-FD, coverage, precision, recall; "
                          "out/digit_metrics.json)")
    generate.add_argument("--batch-size", type=_positive_int, default=256, help="per process (default 256)")
    generate.add_argument("--dtype", default="float32", help="float32, float64, float16 or bfloat16")
    for sub in (generate,):
        sub.add_argument("--seed", type=_seed, default=argparse.SUPPRESS, help="seed (default 0)")
    evaluate = commands.add_parser(
        "evaluate", help="log-likelihood / bits per dim of a dataset, sharded like generate",
        description="Run alone or under torchrun; writes DIR/likelihood.npz (log_p, bits_per_dim in dataset order).")
    evaluate.add_argument("--model", required=True, help="MODULE:ATTR of a score model(x, t) of --sde, or a factory")
    evaluate.add_argument("--model-kwargs", default=None, help="JSON object for the factory")
    evaluate.add_argument("--data", required=True, help="FILE.npy or FILE.npz ([N, ...] rows), or digits (the 8x8 "
                          "digits' test split, 300 images, uniformly dequantized in their 17 grey levels' bins, with "
                          "--bits-offset log2(17/2) unless given)")
    evaluate.add_argument("--sde", default="vp", help="vp, subvp or ve (default vp)")
    evaluate.add_argument("--steps", type=_positive_int, default=100, help="ODE steps (default 100)")
    evaluate.add_argument("--solver", default="heun", help=f"{', '.join(_likelihood_solvers())} (default heun; the "
                          "adaptive ones on the fixed grid of --steps)")
    evaluate.add_argument("--probes", type=_positive_int, default=1, help="Hutchinson probes (default 1)")
    evaluate.add_argument("--trace", default="hutchinson", help="hutchinson or exact")
    evaluate.add_argument("--bits-offset", type=float, default=None, help="added to bits/dim (e.g. 8 for data in "
                          "[0, 1) scaled from 256 levels: see dk.log_likelihood; default 0, or log2(17/2) for "
                          "--data digits)")
    evaluate.add_argument("--batch-size", type=_positive_int, default=256, help="per process (default 256)")
    evaluate.add_argument("--seed", type=_seed, default=argparse.SUPPRESS, help="probe seed (default 0)")
    train = commands.add_parser(
        "train", help="train a model on a dataset (DDP under torchrun), resumable",
        description="Run alone or as `torchrun --nproc_per_node=K -m diffkern train ...`. Every batch's samples, "
                    "times and noise are the same for any world size and --accumulation. Writes DIR/checkpoint.pt "
                    "(load it with --model diffkern.training:load_checkpoint --model-kwargs "
                    "'{\"path\": \"DIR/checkpoint.pt\"}'), DIR/loss.json and DIR/loss.png.")
    train.add_argument("--data", required=True, help="FILE.npy or FILE.npz ([N, ...] rows), or a built-in set: ring "
                       "(2-d), mixture64d (64-d), FFJORD's 2-d toys 8gaussians, pinwheel, checkerboard, 2spirals, "
                       "rings, or digits (the 8x8 handwritten digits' training split, 1497 x 1 x 8 x 8)")
    train.add_argument("--objective", default="ddpm",
                       help="ddpm, score_matching, edm, flow_matching, pfgm or cnf (a continuous normalizing "
                            "flow by maximum likelihood; writes DIR/density.png for 2-d data) (default ddpm)")
    train.add_argument("--objective-options", default=None, help='JSON object, e.g. \'{"prediction_type": '
                       '"v_prediction", "weighting": "min_snr"}\' or \'{"sde": "ve"}\'')
    train.add_argument("--model", default="mlp", help="mlp (an MLP with a time embedding), unet (diffusers' "
                       "UNet2DModel, for images), convunet (a small UNet in plain PyTorch, for images; no diffusers "
                       "needed) or MODULE:ATTR of a factory(sample_shape=..., **model_kwargs)")
    train.add_argument("--model-kwargs", default=None, help='JSON object, e.g. \'{"hidden": 128, "depth": 3}\'')
    train.add_argument("--steps", type=_positive_int, default=2000, help="optimizer steps (default 2000)")
    train.add_argument("--batch-size", type=_positive_int, default=256, help="the global batch, over all processes "
                       "and micro-batches (default 256)")
    train.add_argument("--accumulation", type=_positive_int, default=1, help="micro-batches per step (default 1)")
    train.add_argument("--lr", type=float, default=1e-3, help="AdamW learning rate (default 1e-3)")
    train.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay (default 0)")
    train.add_argument("--ema-decay", type=float, default=0.999, help="EMA of the weights (default 0.999)")
    train.add_argument("--checkpoint-every", type=_positive_int, default=500, help="steps (default 500)")
    train.add_argument("--record-steps", type=int, default=0, help=argparse.SUPPRESS)  # the reproducibility tests'
    train.add_argument("--seed", type=_seed, default=argparse.SUPPRESS, help="seed (default 0)")
    folders = {generate: "shards, samples.npz, manifest", evaluate: "shards, likelihood.npz, manifest",
               train: "checkpoint.pt, loss.json, loss.png"}
    for sub in (generate, evaluate, train):
        sub.add_argument("--device", default="auto", help="auto (the rank's GPU when present, else CPU), cpu, cuda")
        sub.add_argument("--out", required=True, help=f"the run's folder ({folders[sub]})")
        sub.add_argument("--timeout", type=float, default=1800.0, help="seconds a rank waits for the others")
        sub.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    try:
        if args.command == "demo":
            return _demo(args, demo)
        if args.command == "generate":
            return _generate(args, generate)
        if args.command == "evaluate":
            return _evaluate(args, evaluate)
        if args.command == "train":
            return _train(args, train)
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
