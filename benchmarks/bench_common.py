"""Shared helpers for the benchmarks: device-synchronised timing, effective bandwidth, and a
summary table (median time, GB/s, ratio to the tensor copy and to the peers) after the run.

Run with `pytest benchmarks --benchmark-only`; add `--benchmark-json=FILE` to keep the raw numbers.
"""
import time

import torch

import diffkern as dk

CUDA = torch.cuda.is_available() and dk.cuda_kernels_available()
DEVICES = ["cpu"] + (["cuda"] if CUDA else [])


def run(benchmark, fn, *, group: str, name: str, nbytes: int, device: str):
    """Time fn (synchronising CUDA) and record the bytes a memory-bound version must move."""
    if device == "cuda":
        def timed():
            out = fn()
            torch.cuda.synchronize()
            return out
    else:
        timed = fn
    timed()  # warm-up (allocator, lazy init, compilation)
    benchmark.group = group
    benchmark.name = name
    benchmark.extra_info.update(nbytes=nbytes, device=device, label=name)
    return benchmark(timed)


def interleaved(ways: dict, device: str, per: int = 1):
    """(one_round, times): one_round() runs every way of ``ways`` ({name: fn}) once, in an order that
    rotates from round to round (this machine's speed drifts by up to 2x over minutes, which separate
    benchmarks one after another would charge to whichever ran at the slow time), and appends each
    way's seconds / ``per`` to times[name]. Put times in extra_info["ways_s"]: the summary prints
    their medians."""
    names = list(ways)
    times = {name: [] for name in names}
    rounds = [0]

    def one_round():
        start = rounds[0] % len(names)
        for name in names[start:] + names[:start]:
            if device == "cuda":
                torch.cuda.synchronize()
            began = time.perf_counter()
            ways[name]()
            if device == "cuda":
                torch.cuda.synchronize()
            times[name].append((time.perf_counter() - began) / per)
        rounds[0] += 1
    return one_round, times


def _write_ways(write, ways):
    """Interleaved ways of one benchmark (extra_info["ways_s"]: {way: [seconds per round]}): min and
    median of each, and its median relative to the fastest way's median."""
    if not ways or not all(ways.values()):
        return
    medians = {name: sorted(t)[len(t) // 2] for name, t in ways.items()}
    fastest = min(medians.values())
    for name in sorted(ways, key=medians.get):
        write(f"      {name:<26} {min(ways[name]) * 1e3:10.3f} {medians[name] * 1e3:10.3f} ms  "
              f"{medians[name] / fastest:5.2f}x the fastest")


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    session = getattr(config, "_benchmarksession", None)
    if session is None or not session.benchmarks:
        return
    groups = {}
    for bench in session.benchmarks:
        if bench.stats is None or not bench.extra_info.get("label"):
            continue
        groups.setdefault(bench.group, []).append(bench)
    write = terminalreporter.write_line
    write("")
    write("diffkern summary: min and median time, effective GB/s at the median (bytes that must move / time), "
          "time relative to a copy of the same bytes (lower is better), by median and by min")
    noisy_rows = 0
    for group, benches in groups.items():
        copy = next((b for b in benches if b.extra_info["label"] == "copy"), None)
        write(f"  {group}")
        for b in sorted(benches, key=lambda b: b.stats.median):
            stats = b.stats
            gbps = b.extra_info["nbytes"] / stats.median / 1e9
            vs_copy = ""
            if copy:
                vs_copy = f"{stats.median / copy.stats.median:7.2f}x copy ({stats.min / copy.stats.min:.2f}x by min)"
            # a median far above the minimum, or a wide spread, means the machine was busy: the
            # median then measures the other load (e.g. OpenMP threads waiting for a time slice)
            noisy = stats.median > 1.5 * stats.min or stats.iqr > 0.25 * stats.median
            noisy_rows += noisy
            kept = b.extra_info.get("kept_for_backward")
            kept = f"  adds {kept / 1e6:.3f} MB kept for backward" if kept is not None else ""
            write(f"    {b.extra_info['label']:<28} {stats.min * 1e3:10.3f} {stats.median * 1e3:10.3f} ms "
                  f"{gbps:9.2f} GB/s  {vs_copy}{kept}{'  NOISY' if noisy else ''}")
            _write_ways(write, b.extra_info.get("ways_s"))
    if noisy_rows:
        write(f"  {noisy_rows} row(s) marked NOISY: their median is over 1.5x their minimum or their spread over "
              "25% of the median; rerun on an idle machine (see the README, 'Speed') and trust the minimum meanwhile")
