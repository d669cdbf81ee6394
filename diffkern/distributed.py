"""Sample generation and likelihood evaluation over many processes (torch.distributed, torchrun).

diffkern's noise is a function of the global sample index, so a run split into batches
[i, i + b) sampled with ``sample_offset=i`` gives exactly the samples of one big call, whatever the
world size and batch size (given a model that computes each sample independently and
deterministically). This module turns that into a resumable job:

- the index range [0, N) is cut into batches of ``batch_size``; batch k goes to rank k % world_size;
- each finished batch is written atomically as a shard
  ``DIR/shards/<start>-<stop>-<configuration>-<sha256>.npy`` (temporary name, fsync, rename; the
  checksum of the file's bytes and a fingerprint of the run's configuration are in its name, so a
  shard of another configuration is never taken for this one's, even when config.json is gone);
- a rerun verifies the shards, keeps the complete ones, deletes truncated or corrupt ones and
  regenerates what is missing; a rerun with another configuration in the same DIR is refused before
  anything is written, and the model is tried on a tiny batch before anything is written, so a run
  that fails on its input leaves no configuration behind;
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
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from ._validate import check_positive_int
from .ode import resolve_solver
from .sampling import registry as _registry
from .sampling.registry import SAMPLERS, SDES, Sampler, make_sampler, probe_model  # noqa: F401 (public names)
from .training import data as _data

DTYPES = {"float32": torch.float32, "float64": torch.float64, "float16": torch.float16, "bfloat16": torch.bfloat16}
_SHARD = re.compile(r"^(\d{12})-(\d{12})-([0-9a-f]{16})-([0-9a-f]{64})\.npy$")


def make_sde(name: str, sigma_min: Optional[float] = None, sigma_max: Optional[float] = None):
    """The SDE of a name of SDES (vp, subvp, ve), with the VE SDE's noise levels."""
    if name not in SDES:
        raise ValueError(f"sde must be one of {tuple(SDES)}, got {name!r}")
    levels = {k: v for k, v in (("sigma_min", sigma_min), ("sigma_max", sigma_max)) if v is not None}
    return SDES[name](**levels)


def fingerprint(config: dict) -> str:
    """16 hex digits of the sha256 of a configuration's canonical JSON: what keys shards to a run."""
    return hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:16]


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


def _write_shard(shard_dir: str, span: Tuple[int, int], key: str, array: np.ndarray) -> str:
    data = _npy_bytes(array)
    name = f"{span[0]:012d}-{span[1]:012d}-{key}-{hashlib.sha256(data).hexdigest()}.npy"
    _atomic_write(os.path.join(shard_dir, name), data)
    return name


def _shard_names(shard_dir: str, total: int, key: str) -> Dict[Tuple[int, int], str]:
    """The shards of the configuration ``key`` present by name (not verified): (start, stop) -> file name."""
    found = {}
    for name in os.listdir(shard_dir):
        m = _SHARD.match(name)
        if m and m.group(3) == key:
            start, stop = int(m.group(1)), int(m.group(2))
            if 0 <= start < stop <= total:
                found[(start, stop)] = name
    return found


def _verify_shards(shard_dir: str, total: int, row_shape: Tuple[int, ...], key: str) -> List[str]:
    """Delete every shard of the configuration ``key`` that is truncated, corrupt (checksum) or of the
    wrong shape, and every temporary left by a killed writer; returns what was removed. Shards of
    another configuration are left alone (and never read)."""
    removed = []
    for name in sorted(os.listdir(shard_dir)):
        path = os.path.join(shard_dir, name)
        m = _SHARD.match(name)
        if (not m or m.group(3) != key) and not name.startswith(".tmp-"):
            continue  # not this run's (another configuration's shard, another rank's write probe)
        ok = False
        if m:
            start, stop = int(m.group(1)), int(m.group(2))
            with open(path, "rb") as f:
                data = f.read()
            if hashlib.sha256(data).hexdigest() == m.group(4) and 0 <= start < stop <= total:
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


@dataclass(frozen=True)
class _Job:
    """One sharded job: ``total`` rows of ``row_shape``, computed ``batch_size`` at a time by
    compute(start, stop), merged by merge(rows) into the arrays of ``result_name``."""

    kind: str
    config: dict
    total: int
    row_shape: Tuple[int, ...]
    batch_size: int
    compute: Callable[[int, int], np.ndarray]
    merge: Callable[[np.ndarray], Dict[str, np.ndarray]]
    result_name: str
    extra_manifest: dict


def _run_sharded(job: _Job, out: str, *, progress: bool, timeout: float) -> str:
    group = _Group(timeout)
    out = _check_out(out)
    _check_config(out, job.config)
    shard_dir = os.path.join(out, "shards")
    key = fingerprint(job.config)
    total = job.total
    started = time.perf_counter()
    removed: List[str] = []
    config_path = os.path.join(out, "config.json")
    wrote_config = False
    if group.rank == 0:
        if not os.path.exists(config_path):
            _atomic_write(config_path, json.dumps(job.config, indent=2, sort_keys=True).encode())
            wrote_config = True
        for name in os.listdir(out):
            if name.startswith("failed-rank"):
                os.remove(os.path.join(out, name))
        removed = _verify_shards(shard_dir, total, job.row_shape, key)
    group.barrier()
    chosen, gaps = _cover(_shard_names(shard_dir, total, key), total)
    work = _batches(gaps, job.batch_size)
    mine = work[group.rank::group.world]
    bar = None
    if progress and group.rank == 0:
        from tqdm.auto import tqdm

        bar = tqdm(total=total, initial=total - sum(b - a for a, b in gaps), desc=f"{job.kind} ({group.world} "
                   f"process{'es' if group.world > 1 else ''})", unit="sample")

    def done_count():
        missing = _cover(_shard_names(shard_dir, total, key), total)[1]
        return total - sum(b - a for a, b in missing)

    try:
        for start, stop in mine:
            _write_shard(shard_dir, (start, stop), key, job.compute(start, stop))
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
        if wrote_config and not _shard_names(shard_dir, total, key):
            # nothing of this configuration exists yet: leave no configuration that would refuse a corrected rerun
            os.remove(config_path)
        raise
    finally:
        if bar is not None:
            bar.close()
    group.barrier()
    result_path = os.path.join(out, job.result_name)
    if group.rank == 0:
        _merge(job, out, key, (started, work, removed, group.world))
    group.barrier()
    return result_path


def _merge(job: _Job, out: str, key: str, run: tuple) -> None:
    """Rank 0, after every rank finished: the result file, the manifest and the summary line."""
    started, work, removed, world = run
    shard_dir, total = os.path.join(out, "shards"), job.total
    result_path = os.path.join(out, job.result_name)
    chosen, gaps = _cover(_shard_names(shard_dir, total, key), total)
    if gaps:
        raise RuntimeError(f"shards missing for {gaps} after every rank finished")
    names = _shard_names(shard_dir, total, key)
    parts = [np.load(os.path.join(shard_dir, names[r]), allow_pickle=False) for r in chosen]
    merged = np.concatenate(parts, axis=0)
    buffer = io.BytesIO()
    np.savez(buffer, **job.merge(merged))
    _atomic_write(result_path, buffer.getvalue())
    wall = time.perf_counter() - started
    generated = sum(b - a for a, b in work)
    foreign = sorted(n for n in os.listdir(shard_dir) if _SHARD.match(n) and _SHARD.match(n).group(3) != key)
    from . import __version__

    manifest = {
        "config": job.config, "configuration_key": key, "diffkern": __version__, "torch": torch.__version__,
        "world_size": world, "batch_size": job.batch_size, "result": job.result_name,
        "shards": [{"start": r[0], "stop": r[1], "file": names[r], "sha256": _SHARD.match(names[r]).group(4)}
                   for r in chosen],
        "regenerated_corrupt_shards": removed, "ignored_shards_of_other_configurations": foreign,
        "samples_computed_this_run": generated, "wall_s": wall,
        "samples_per_s": generated / wall if wall > 0 else None, **job.extra_manifest,
    }
    _atomic_write(os.path.join(out, "manifest.json"), json.dumps(manifest, indent=2).encode())
    print(f"{job.kind}: {total} samples in {result_path} ({generated} computed now by {world} "
          f"process{'es' if world > 1 else ''} in {wall:.1f} s, {total - generated} kept from earlier "
          f"shards{f', {len(removed)} corrupt shard(s) regenerated' if removed else ''}"
          f"{f', {len(foreign)} shard(s) of another configuration ignored' if foreign else ''})", flush=True)


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


def _on_device(model, device: torch.device):
    """A torch module whose parameters all lie on another device, moved to the run's device (a
    checkpoint loads on the CPU; the run may be on a GPU); any other model as it is."""
    if isinstance(model, torch.nn.Module):
        devices = {p.device for p in model.parameters()}
        if devices and device not in devices:
            return model.to(device)
    return model


def generate(model, *, sampler, num_samples: int, shape: Sequence[int], batch_size: int, seed: int = 0, out: str,
             dtype: torch.dtype = torch.float32, device=None, progress: bool = True, timeout: float = 1800.0,
             config: Optional[dict] = None) -> str:
    """Generate ``num_samples`` samples of per-sample ``shape`` into ``out/samples.npz`` (array
    ``samples`` [N, *shape], in global-index order), sharded over the ranks of the current process
    group (or alone). ``sampler`` is a name of SAMPLERS (with its default options) or a sampler from
    ``make_sampler`` (name, steps and options, all recorded in the run's configuration);
    ``batch_size`` is per process. ``config`` (JSON-serialisable) identifies the run for resuming,
    together with the sampler, N, shape, seed and dtype: pass the model's identity there (the CLI
    passes --model and --model-kwargs). The model is tried once on two samples before anything is
    written. Returns the path of samples.npz. Identical results for any world size and batch size,
    given a model that computes each sample on its own, deterministically; for "pc" (whose corrector
    steps by batch-mean norms, as score_sde's) for any world size at one batch size, which is then part
    of the configuration."""
    num_samples = check_positive_int("num_samples", num_samples)
    batch_size = check_positive_int("batch_size", batch_size)
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
    if isinstance(sampler, str):
        sampler = make_sampler(sampler)
    if not isinstance(sampler, Sampler):
        raise ValueError(f"sampler must be a name of {SAMPLERS} or a make_sampler(...) result, got "
                         f"{type(sampler).__name__}: a plain function's options cannot be recorded, so a rerun could "
                         "not tell another configuration from this one")
    device = _default_device(device)
    model = _on_device(model, device)
    sampler.probe(model, row_shape, device=device, dtype=dtype)
    storage = _storage_dtype(dtype)
    full_config = {"kind": "generate", **sampler.config(), "num_samples": num_samples, "shape": list(row_shape),
                   "seed": seed, "dtype": str(dtype).replace("torch.", ""), **(config or {})}
    if not sampler.entry.batch_invariant:  # its samples depend on the batch: another batch size is another run
        full_config["batch_size"] = batch_size

    def compute(start, stop):
        with torch.no_grad():
            x = sampler(model, (stop - start, *row_shape), seed=seed, sample_offset=start, device=device,
                        dtype=dtype)
        if tuple(x.shape) != (stop - start, *row_shape):
            raise ValueError(f"the sampler returned shape {tuple(x.shape)} for a batch of {stop - start}")
        return x.detach().to("cpu", storage).numpy()

    job = _Job("generate", full_config, num_samples, row_shape, batch_size, compute,
               lambda merged: {"samples": merged}, "samples.npz", {"device": str(device)})
    return _run_sharded(job, out, progress=progress, timeout=timeout)


def load_data(path: str) -> np.ndarray:
    """A dataset from .npy, or from .npz (its array ``data``, ``samples`` or ``x``, or its only array)."""
    return _data.load_array(path)


def evaluate(model, data, *, sde="vp", steps: int = 100, solver: str = "heun", probes: int = 1,
             trace: str = "hutchinson",
             seed: int = 0, batch_size: int = 256, out: str, bits_offset: float = 0.0, device=None,
             progress: bool = True,
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
    batch_size = check_positive_int("batch_size", batch_size)
    steps = check_positive_int("steps", steps)
    probes = check_positive_int("probes", probes)
    if not callable(model):
        raise ValueError(f"model must be callable, got {type(model).__name__}")
    resolve_solver(solver, steps, None, None, None, max_num_evals=10000)  # checks solver before anything is written
    the_sde = make_sde(sde) if isinstance(sde, str) else sde
    device = _default_device(device)
    model = _on_device(model, device)
    trained = getattr(model, "diffkern_trained", None)
    if isinstance(trained, dict):
        _registry.check_trained(trained, "score", {"sde": sde} if isinstance(sde, str) else {}, "evaluate")
    probe_model("score", model, data.shape[1:], device=device, dtype=torch.float64)
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

    job = _Job("evaluate", full_config, total, (2,), batch_size, compute,
               lambda merged: {"log_p": merged[:, 0], "bits_per_dim": merged[:, 1]}, "likelihood.npz",
               {"device": str(device)})
    path = _run_sharded(job, out, progress=progress, timeout=timeout)
    with np.load(path) as result:
        bpd = result["bits_per_dim"]
    mean, stderr = float(bpd.mean()), float(bpd.std(ddof=1) / math.sqrt(len(bpd))) if len(bpd) > 1 else float("nan")
    return path, mean, stderr
