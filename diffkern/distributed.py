"""Sample generation and likelihood evaluation over many processes (torch.distributed, torchrun).

diffkern's noise is a function of the global sample index, so a run split into batches
[i, i + b) sampled with ``sample_offset=i`` gives exactly the samples of one big call, whatever the
world size and batch size (given a model that computes each sample independently and
deterministically). This module turns that into a resumable job:

- the index range [0, N) is cut into batches of ``batch_size``; batch k goes to rank k % world_size;
- each finished batch is written atomically as a shard ``DIR/shards/<start>-<stop>-<sha256>.npy``
  (temporary name, fsync, rename; the checksum of the file's bytes is in its name);
- a rerun verifies the shards, keeps the complete ones, deletes truncated or corrupt ones and
  regenerates what is missing; a rerun with another configuration in the same DIR is refused before
  anything is written;
- rank 0 shows one progress bar over all samples (it counts the shards in DIR, so it sees every
  rank's progress), then merges the shards into ``DIR/samples.npz`` (or ``likelihood.npz``) and
  writes ``DIR/manifest.json``.

It works alone (no process group: world size 1) or inside one (``torchrun``: gloo on CPU, NCCL on
GPU). The only collectives are barriers, bounded by ``timeout``; a rank that fails leaves a note in
DIR that the others report instead of waiting for it.
"""
from __future__ import annotations

import datetime
import hashlib
import io
import json
import math
import os
import re
import time
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

SAMPLERS = ("ddpm", "ddim", "euler_maruyama", "ode", "pc", "euler", "heun", "euler_ancestral", "langevin", "dpmpp",
            "flow", "pfgm")
SDES = ("vp", "subvp", "ve")
DTYPES = {"float32": torch.float32, "float64": torch.float64, "float16": torch.float16, "bfloat16": torch.bfloat16}
_SHARD = re.compile(r"^(\d{12})-(\d{12})-([0-9a-f]{64})\.npy$")


# ---- the samplers, as functions of (model, shape, seed, sample_offset, device, dtype) ----

def make_sde(name: str, sigma_min: Optional[float] = None, sigma_max: Optional[float] = None):
    from .sde import SubVPSDE, VESDE, VPSDE

    if name not in SDES:
        raise ValueError(f"sde must be one of {SDES}, got {name!r}")
    if name == "ve":
        return VESDE(**{k: v for k, v in (("sigma_min", sigma_min), ("sigma_max", sigma_max)) if v is not None})
    return VPSDE() if name == "vp" else SubVPSDE()


def make_sampler(sampler: str, *, steps: Optional[int] = None, eta: float = 0.0, prediction_type: str = "epsilon",
                 sde: str = "vp", sigma_min: Optional[float] = None, sigma_max: Optional[float] = None,
                 parameterization: str = "score", solver: Optional[str] = None, order: int = 2,
                 langevin_steps: int = 10, step_size: float = 2e-3, z_max: float = 40.0) -> Callable:
    """One of SAMPLERS with its options, as ``fn(model, shape, seed, sample_offset, device, dtype)``.
    The model is what that sampler takes: an epsilon (or ``prediction_type``) model(x, t) for ddpm /
    ddim, a score model (``parameterization``) of ``sde`` for euler_maruyama / ode / pc, a denoiser
    D(x, sigma) for euler / heun / euler_ancestral / dpmpp (Karras sigmas from sigma_max to
    sigma_min), a noise-level score for langevin, a velocity for flow and a field for pfgm."""
    import diffkern as dk

    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}; choose from {', '.join(SAMPLERS)}")
    if steps is not None and (isinstance(steps, bool) or not isinstance(steps, int) or steps < 1):
        raise ValueError(f"steps must be a positive integer, got {steps!r}")
    default_steps = {"ddpm": None, "ddim": 50, "euler_maruyama": 1000, "ode": 100, "pc": 1000, "euler": 50,
                     "heun": 18, "euler_ancestral": 50, "langevin": 10, "dpmpp": 20, "flow": 50, "pfgm": 100}
    n = steps if steps is not None else default_steps[sampler]
    if sampler in ("ddpm", "ddim"):
        sched = dk.DDPMSchedule()
        extra = {"eta": eta} if sampler == "ddim" else {}
        fn = dk.sample_ddpm if sampler == "ddpm" else dk.sample_ddim
        return lambda model, shape, **kw: fn(model, shape, sched, num_inference_steps=n, prediction_type=prediction_type,
                                             **extra, **kw)
    if sampler in ("euler_maruyama", "ode", "pc"):
        the_sde = make_sde(sde, sigma_min, sigma_max)
        fn = {"euler_maruyama": dk.sample_euler_maruyama, "ode": dk.sample_ode, "pc": dk.sample_pc}[sampler]
        extra = {"solver": solver} if sampler == "ode" and solver is not None else {}
        return lambda model, shape, **kw: fn(model, shape, the_sde, n, parameterization=parameterization, **extra,
                                             **kw)
    low = 0.002 if sigma_min is None else sigma_min
    high = 80.0 if sigma_max is None else sigma_max
    if sampler in ("euler", "heun", "euler_ancestral", "dpmpp"):
        sigmas = dk.karras_sigmas(n, low, high)
        if sampler == "dpmpp":
            return lambda model, shape, **kw: dk.sample_dpmpp(model, shape, sigmas, order=order, eta=eta, **kw)
        fn = {"euler": dk.sample_euler, "heun": dk.sample_heun, "euler_ancestral": dk.sample_euler_ancestral}[sampler]
        return lambda model, shape, **kw: fn(model, shape, sigmas, **kw)
    if sampler == "langevin":
        sigmas = torch.logspace(math.log10(high), math.log10(low), n, dtype=torch.float64)
        return lambda model, shape, **kw: dk.sample_langevin(model, shape, sigmas, langevin_steps, step_size=step_size,
                                                             **kw)
    if sampler == "flow":
        return lambda model, shape, **kw: dk.sample_flow(model, shape, num_steps=n, solver=solver or "euler", **kw)
    return lambda model, shape, **kw: dk.sample_pfgm(model, shape, num_steps=n, z_max=z_max, solver=solver or "heun",
                                                     **kw)


# ---- the process group ----

class _Group:
    """rank / world size and bounded barriers; world size 1 without an initialised process group."""

    def __init__(self, timeout: float):
        import torch.distributed as dist

        self.dist = dist if dist.is_available() and dist.is_initialized() else None
        self.rank = self.dist.get_rank() if self.dist else 0
        self.world = self.dist.get_world_size() if self.dist else 1
        self.timeout = datetime.timedelta(seconds=timeout)

    def barrier(self):
        if self.dist is None:
            return
        if self.dist.get_backend() == "gloo":
            # monitored: a rank that died or hangs is named after `timeout` instead of a silent wait
            self.dist.monitored_barrier(timeout=self.timeout, wait_all_ranks=True)
        else:
            self.dist.barrier()


# ---- files ----

def _fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _atomic_write(path: str, data: bytes) -> None:
    """Write to a temporary name beside path, fsync, rename over path, fsync the folder."""
    folder = os.path.dirname(path) or "."
    tmp = os.path.join(folder, f".tmp-{os.getpid()}-{os.path.basename(path)}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(folder)


def _npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


def _write_shard(shard_dir: str, start: int, stop: int, array: np.ndarray) -> str:
    data = _npy_bytes(array)
    name = f"{start:012d}-{stop:012d}-{hashlib.sha256(data).hexdigest()}.npy"
    _atomic_write(os.path.join(shard_dir, name), data)
    return name


def _shard_names(shard_dir: str, total: int) -> Dict[Tuple[int, int], str]:
    """The shards present by name (not verified): (start, stop) -> file name."""
    found = {}
    for name in os.listdir(shard_dir):
        m = _SHARD.match(name)
        if m:
            start, stop = int(m.group(1)), int(m.group(2))
            if 0 <= start < stop <= total:
                found[(start, stop)] = name
    return found


def _verify_shards(shard_dir: str, total: int, row_shape: Tuple[int, ...]) -> List[str]:
    """Delete every shard that is truncated, corrupt (checksum), of the wrong shape, or unnamed, and
    every temporary left by a killed writer; returns what was removed."""
    removed = []
    for name in sorted(os.listdir(shard_dir)):
        path = os.path.join(shard_dir, name)
        m = _SHARD.match(name)
        if not m and not name.startswith(".tmp-"):
            continue  # not ours (e.g. another rank's write probe)
        ok = False
        if m:
            start, stop = int(m.group(1)), int(m.group(2))
            with open(path, "rb") as f:
                data = f.read()
            if hashlib.sha256(data).hexdigest() == m.group(3) and 0 <= start < stop <= total:
                try:
                    array = np.load(io.BytesIO(data), allow_pickle=False)
                    ok = tuple(array.shape) == (stop - start, *row_shape)
                except (ValueError, OSError):
                    ok = False
        if not ok:
            try:
                os.remove(path)
            except FileNotFoundError:
                pass
            if m:
                removed.append(name)
    return removed


def _cover(found: Dict[Tuple[int, int], str], total: int) -> Tuple[List[Tuple[int, int]], List[Tuple[int, int]]]:
    """(shards that tile part of [0, total) without overlap, chosen greedily from the left; the gaps)."""
    chosen, gaps, position = [], [], 0
    while position < total:
        longest = max((stop for start, stop in found if start == position), default=None)
        if longest is not None:
            chosen.append((position, longest))
            position = longest
            continue
        end = min((start for start, _ in found if start > position), default=total)
        gaps.append((position, end))
        position = end
    return chosen, gaps


def _batches(gaps: Sequence[Tuple[int, int]], batch_size: int) -> List[Tuple[int, int]]:
    return [(s, min(s + batch_size, stop)) for start, stop in gaps for s in range(start, stop, batch_size)]


def _check_out(out: str) -> str:
    if not isinstance(out, (str, os.PathLike)) or not str(out):
        raise ValueError(f"out must be a folder path, got {out!r}")
    out = os.fspath(out)
    try:
        os.makedirs(os.path.join(out, "shards"), exist_ok=True)
        probe = os.path.join(out, "shards", f".probe-{os.uname().nodename}-{os.getpid()}")
        with open(probe, "wb") as f:
            f.write(b"")
        os.remove(probe)
    except OSError as error:
        raise ValueError(f"out={out!r} is not a writable folder: {error}") from None
    return out


def _check_config(out: str, config: dict) -> None:
    """Refuse a DIR that holds another run's configuration (before anything is written)."""
    path = os.path.join(out, "config.json")
    if not os.path.exists(path):
        return
    with open(path) as f:
        try:
            existing = json.load(f)
        except json.JSONDecodeError:
            raise ValueError(f"{path} is not readable JSON; remove it or use another folder") from None
    if existing != config:
        keys = sorted(k for k in set(existing) | set(config) if existing.get(k) != config.get(k))
        detail = "; ".join(f"{k}: {existing.get(k)!r} there, {config.get(k)!r} now" for k in keys)
        raise ValueError(f"{out} holds a run with another configuration ({detail}); nothing was changed. Rerun with "
                         "the same settings to resume, or use another --out folder")


def _failure_path(out: str, rank: int) -> str:
    return os.path.join(out, f"failed-rank{rank}.txt")


def _run_sharded(kind: str, out: str, config: dict, total: int, row_shape: Tuple[int, ...], batch_size: int,
                 compute: Callable[[int, int], np.ndarray], merge: Callable[[np.ndarray], Dict[str, np.ndarray]],
                 result_name: str, progress: bool, timeout: float, extra_manifest: dict) -> str:
    group = _Group(timeout)
    out = _check_out(out)
    _check_config(out, config)
    shard_dir = os.path.join(out, "shards")
    started = time.perf_counter()
    removed: List[str] = []
    if group.rank == 0:
        config_path = os.path.join(out, "config.json")
        if not os.path.exists(config_path):
            _atomic_write(config_path, json.dumps(config, indent=2, sort_keys=True).encode())
        for name in os.listdir(out):
            if name.startswith("failed-rank"):
                os.remove(os.path.join(out, name))
        removed = _verify_shards(shard_dir, total, row_shape)
    group.barrier()
    chosen, gaps = _cover(_shard_names(shard_dir, total), total)
    work = _batches(gaps, batch_size)
    mine = work[group.rank::group.world]
    bar = None
    if progress and group.rank == 0:
        from tqdm.auto import tqdm

        bar = tqdm(total=total, initial=total - sum(b - a for a, b in gaps), desc=f"{kind} ({group.world} "
                   f"process{'es' if group.world > 1 else ''})", unit="sample")

    def done_count():
        missing = _cover(_shard_names(shard_dir, total), total)[1]
        return total - sum(b - a for a, b in missing)

    try:
        for start, stop in mine:
            _write_shard(shard_dir, start, stop, compute(start, stop))
            if bar is not None:
                bar.update(done_count() - bar.n)
        if group.rank == 0:
            # wait for the others' shards (the bar follows them), reporting a rank that failed
            deadline = time.monotonic() + timeout
            while done_count() < total:
                failed = [n for n in os.listdir(out) if n.startswith("failed-rank")]
                if failed:
                    with open(os.path.join(out, failed[0])) as f:
                        raise RuntimeError(f"{failed[0][:-4]} failed: {f.read().strip()}")
                if time.monotonic() > deadline:
                    raise RuntimeError(f"timed out after {timeout:.0f} s waiting for the other ranks' shards")
                time.sleep(0.05)
                if bar is not None:
                    bar.update(done_count() - bar.n)
    except BaseException as error:
        if group.world > 1:
            with open(_failure_path(out, group.rank), "w") as f:
                f.write(f"{type(error).__name__}: {error}")
        raise
    finally:
        if bar is not None:
            bar.close()
    group.barrier()
    result_path = os.path.join(out, result_name)
    if group.rank == 0:
        chosen, gaps = _cover(_shard_names(shard_dir, total), total)
        if gaps:
            raise RuntimeError(f"shards missing for {gaps} after every rank finished")
        names = _shard_names(shard_dir, total)
        parts = [np.load(os.path.join(shard_dir, names[r]), allow_pickle=False) for r in chosen]
        merged = np.concatenate(parts, axis=0)
        buffer = io.BytesIO()
        np.savez(buffer, **merge(merged))
        _atomic_write(result_path, buffer.getvalue())
        wall = time.perf_counter() - started
        generated = sum(b - a for a, b in work)
        import diffkern as dk

        manifest = {
            "config": config, "diffkern": dk.__version__, "torch": torch.__version__, "world_size": group.world,
            "batch_size": batch_size, "result": result_name,
            "shards": [{"start": r[0], "stop": r[1], "file": names[r], "sha256": names[r].split("-")[2][:-4]}
                       for r in chosen],
            "regenerated_corrupt_shards": removed, "samples_computed_this_run": generated,
            "wall_s": wall, "samples_per_s": generated / wall if wall > 0 else None, **extra_manifest,
        }
        _atomic_write(os.path.join(out, "manifest.json"), json.dumps(manifest, indent=2).encode())
        print(f"{kind}: {total} samples in {result_path} ({generated} computed now by {group.world} "
              f"process{'es' if group.world > 1 else ''} in {wall:.1f} s, {total - generated} kept from earlier "
              f"shards{f', {len(removed)} corrupt shard(s) regenerated' if removed else ''})", flush=True)
    group.barrier()
    return result_path


def _storage_dtype(dtype: torch.dtype) -> torch.dtype:
    # numpy has no bfloat16: half types are stored as float32 (exactly representable)
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def _default_device(device):
    if device is not None:
        return torch.device(device)
    import diffkern as dk

    if torch.cuda.is_available() and dk.cuda_kernels_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count())
    return torch.device("cpu")


def _check_count(name, value):
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return value


def generate(model, *, sampler, num_samples: int, shape: Sequence[int], batch_size: int, seed: int = 0, out: str,
             dtype: torch.dtype = torch.float32, device=None, progress: bool = True, timeout: float = 1800.0,
             config: Optional[dict] = None) -> str:
    """Generate ``num_samples`` samples of per-sample ``shape`` into ``out/samples.npz`` (array
    ``samples`` [N, *shape], in global-index order), sharded over the ranks of the current process
    group (or alone). ``sampler`` is a name of SAMPLERS (its options through ``make_sampler``) or a
    function from ``make_sampler``; ``batch_size`` is per process. ``config`` (JSON-serialisable)
    identifies the run for resuming, together with the sampler, N, shape, seed and dtype: pass the
    model's identity there (the CLI passes --model and --model-kwargs). Returns the path of
    samples.npz. Identical results for any world size and batch size, given a model that computes
    each sample on its own, deterministically."""
    num_samples = _check_count("num_samples", num_samples)
    batch_size = _check_count("batch_size", batch_size)
    entries = list(shape) if isinstance(shape, (tuple, list, torch.Size)) else [shape]
    if not entries or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 1 for s in entries):
        raise ValueError(f"shape must be per-sample sizes (positive ints), e.g. (3, 32, 32); got {shape!r}")
    row_shape = tuple(entries)
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not timeout > 0:
        raise ValueError(f"timeout must be a positive number of seconds, got {timeout!r}")
    if dtype not in DTYPES.values():
        raise ValueError(f"dtype must be one of {tuple(DTYPES)}, got {dtype}")
    if not callable(model):
        raise ValueError(f"model must be callable, got {type(model).__name__}")
    sampler_name = sampler if isinstance(sampler, str) else getattr(sampler, "__name__", "custom")
    fn = make_sampler(sampler) if isinstance(sampler, str) else sampler
    device = _default_device(device)
    storage = _storage_dtype(dtype)
    full_config = {"kind": "generate", "sampler": sampler_name, "num_samples": num_samples, "shape": list(row_shape),
                   "seed": seed, "dtype": str(dtype).replace("torch.", ""), **(config or {})}

    def compute(start, stop):
        with torch.no_grad():
            x = fn(model, (stop - start, *row_shape), seed=seed, sample_offset=start, device=device, dtype=dtype)
        if tuple(x.shape) != (stop - start, *row_shape):
            raise ValueError(f"the sampler returned shape {tuple(x.shape)} for a batch of {stop - start}")
        return x.detach().to("cpu", storage).numpy()

    return _run_sharded("generate", out, full_config, num_samples, row_shape, batch_size, compute,
                        lambda merged: {"samples": merged}, "samples.npz", progress, timeout,
                        {"device": str(device)})


def load_data(path: str) -> np.ndarray:
    """A dataset from .npy, or from .npz (its array ``data``, ``samples`` or ``x``, or its only array)."""
    if not isinstance(path, (str, os.PathLike)) or not os.path.isfile(path):
        raise ValueError(f"data file {path!r} does not exist")
    loaded = np.load(path, allow_pickle=False)
    if isinstance(loaded, np.ndarray):
        return loaded
    keys = list(loaded.keys())
    for key in ("data", "samples", "x"):
        if key in keys:
            return loaded[key]
    if len(keys) == 1:
        return loaded[keys[0]]
    raise ValueError(f"{path} holds arrays {keys}; name the data 'data', 'samples' or 'x'")


def evaluate(model, data, *, sde="vp", steps: int = 100, solver: str = "heun", probes: int = 1, trace: str = "hutchinson",
             seed: int = 0, batch_size: int = 256, out: str, bits_offset: float = 0.0, device=None, progress: bool = True,
             timeout: float = 1800.0, config: Optional[dict] = None) -> Tuple[str, float, float]:
    """Log-likelihoods (probability-flow ODE, ``dk.log_likelihood``) of every row of ``data`` [N, ...]
    under the score ``model`` of ``sde``, sharded as ``generate``; writes ``out/likelihood.npz``
    (``log_p`` and ``bits_per_dim``, float64, in dataset order). Hutchinson probes of sample n come
    from the noise stream at its index, so at a given ``batch_size`` the result is bitwise the same
    for any world size. Across batch sizes it is the same up to how the model's Jacobian products
    round: autograd through batched matrix products need not give bitwise batch-independent
    gradients (the built-in mixture: 1e-15 on log p). Returns (path, mean bits/dim, its standard
    error)."""
    import diffkern as dk

    if isinstance(data, (str, os.PathLike)):
        data = load_data(data)
    data = np.asarray(data)
    if data.ndim < 2 or data.shape[0] < 1 or not np.issubdtype(data.dtype, np.floating):
        raise ValueError(f"data must be a floating-point array [N, ...] with N >= 1, got {data.dtype} {data.shape}")
    if not np.isfinite(data).all():
        raise ValueError("data holds non-finite values")
    batch_size = _check_count("batch_size", batch_size)
    steps = _check_count("steps", steps)
    probes = _check_count("probes", probes)
    if not callable(model):
        raise ValueError(f"model must be callable, got {type(model).__name__}")
    the_sde = make_sde(sde) if isinstance(sde, str) else sde
    device = _default_device(device)
    total = data.shape[0]
    digest = hashlib.sha256(np.ascontiguousarray(data).tobytes()).hexdigest()
    full_config = {"kind": "evaluate", "sde": sde if isinstance(sde, str) else repr(sde), "steps": steps,
                   "solver": solver, "probes": probes, "trace": trace, "seed": seed, "bits_offset": bits_offset,
                   "data_sha256": digest, "data_shape": list(data.shape), **(config or {})}

    def compute(start, stop):
        x = torch.from_numpy(np.ascontiguousarray(data[start:stop])).to(device=device, dtype=torch.float64)
        result = dk.log_likelihood(model, x, the_sde, steps, solver=solver, num_probes=probes, seed=seed,
                                   trace=trace, bits_offset=bits_offset, sample_offset=start)
        return torch.stack([result.log_p, result.bits_per_dim], 1).detach().to("cpu", torch.float64).numpy()

    path = _run_sharded("evaluate", out, full_config, total, (2,), batch_size, compute,
                        lambda merged: {"log_p": merged[:, 0], "bits_per_dim": merged[:, 1]}, "likelihood.npz",
                        progress, timeout, {"device": str(device)})
    with np.load(path) as result:
        bpd = result["bits_per_dim"]
    mean, stderr = float(bpd.mean()), float(bpd.std(ddof=1) / math.sqrt(len(bpd))) if len(bpd) > 1 else float("nan")
    return path, mean, stderr
