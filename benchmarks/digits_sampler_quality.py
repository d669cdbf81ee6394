"""Sample quality against model evaluations on the 8x8 digits: every sampler of
diffkern.training.sampler_table with the shipped models at 5, 10, 20, 50, 100 and 1000 evaluations
where it takes them, 1000 samples each (seed 0), digits-FD / coverage / precision / recall against the
test split, and wall time on this machine's CPU. Writes a markdown table, the rows as JSON and the plot
(digits-FD against evaluations), and checks the published ordering: DPM-Solver++ and UniPC reach at
10-20 evaluations what DDIM needs many more for.

    python benchmarks/digits_sampler_quality.py [OUT_PREFIX]   # default benchmarks/results/DATE-cpu-digits-samplers
    python benchmarks/digits_sampler_quality.py OUT_PREFIX --only "PFGM, Euler" "PFGM, Heun"

``--only`` runs the samplers named and puts their rows into the table already at OUT_PREFIX (its other
rows kept as they were measured), then writes the markdown, JSON and plot again.
"""
import datetime
import json
import os
import platform
import sys

import torch

from diffkern import sampler_table
from diffkern.training import digit_metrics
from diffkern.training.data import digits

SAMPLES = 1000


def ordering(rows) -> list:
    """For each fast solver at 10 and 20 evaluations: the fewest DDIM evaluations with a digits-FD at
    least as good (None: no DDIM budget of the table gets there)."""
    ddim = sorted((r.evals, r.fd) for r in rows if r.sampler == "DDIM")
    found = []
    for name in ("DPM-Solver++ 2M", "DPM-Solver++ 3M", "UniPC (drop-in)", "DPM++ 2M (k-diffusion)"):
        for r in (r for r in rows if r.sampler == name and r.evals in (10, 20)):
            match = next((e for e, fd in ddim if fd <= r.fd), None)
            found.append({"sampler": name, "evals": r.evals, "fd": r.fd, "ddim_evals_to_match": match,
                          "ddim_fd_at_same_evals": next((fd for e, fd in ddim if e == r.evals), None)})
    return found


def main(prefix: str, only=None) -> None:
    torch.manual_seed(0)
    rows = sampler_table.run(sampler_table.plan(names=only), samples=SAMPLES, seed=0, progress=True)
    added = ""
    if only:
        with open(prefix + ".json") as f:
            kept = [sampler_table.Row(**r) for r in json.load(f)["rows"] if r["sampler"] not in only]
        rows = kept + rows
        added = f" Rows of {', '.join(only)} added on {datetime.date.today()} (the others as measured before)."
    floor = digit_metrics.metrics(digits("train")[:SAMPLES])  # real digits, as many as the samplers give
    claims = ordering(rows)
    cpu = platform.processor() or platform.machine()
    lines = [f"# Digits: sample quality against model evaluations ({datetime.date.today()}, CPU: {cpu}, "
             f"{torch.get_num_threads()} threads, torch {torch.__version__})",
             "", f"{SAMPLES} samples per run, seed 0, the shipped models (diffkern/datasets/models); real digits "
             f"({SAMPLES} training images against the test split): digits-FD {floor['fd']:.1f}, coverage TV "
             f"{floor['coverage_tv']:.3f}, precision {floor['precision']:.2f}, recall {floor['recall']:.2f}."
             + added, "",
             sampler_table.markdown(rows), "", "## DPM-Solver++ and UniPC against DDIM", ""]
    for c in claims:
        match = (f"DDIM matches it at {c['ddim_evals_to_match']} evaluations" if c["ddim_evals_to_match"]
                 else "no DDIM budget up to 1000 matches it")
        lines.append(f"- {c['sampler']} at {c['evals']} evaluations: digits-FD {c['fd']:.1f} (DDIM at "
                     f"{c['evals']}: {c['ddim_fd_at_same_evals']:.1f}); {match}")
    with open(prefix + ".md", "w") as f:
        f.write("\n".join(lines) + "\n")
    with open(prefix + ".json", "w") as f:
        json.dump({"samples": SAMPLES, "floor": {k: v for k, v in floor.items() if k != "class_shares"},
                   "rows": sampler_table.as_dicts(rows), "ordering": claims}, f, indent=1)
    sampler_table.plot(rows, prefix + ".png", floor["fd"])
    print("\n".join(lines))


if __name__ == "__main__":
    default = os.path.join("benchmarks", "results", f"{datetime.date.today()}-cpu-digits-samplers")
    args = sys.argv[1:]
    names = args[args.index("--only") + 1:] if "--only" in args else None
    args = args[:args.index("--only")] if "--only" in args else args
    main(args[0] if args else default, names)
