"""How much a guided toy edit depends on rounding: the same held-out edits (bench.toy_quality,
toy preset) run at batch 1 and 4, with XLA on 1 and 2 CPU threads, and the spread of each
edit's placement and IoU between runs that differ in one of the two.

  python -m bench.toy_stability [--edits 8] [--out runs/toy_stability] [--cpus 0,1]

Guided sampling feeds each step's gradient into the next, so a last-bit difference (the order
of a reduction, which XLA picks by thread count and batch size) can grow into a different
edit. Each condition is one `python -m bench.toy_quality --methods toy` process, pinned with
`taskset` to one core or to two (XLA sizes its thread pool by the cores a process may use);
a finished condition is reused on a rerun. Prints, per edit, the placement (px) and IoU under
each condition, then the mean and the largest difference between conditions that differ in the
batch size (at either thread count) or in the thread count (at either batch size); writes
OUT/stability.md and OUT/stability.json.
"""

import argparse
import itertools
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np

from mgjax.toy.quality import HELDOUT_SEEDS

BATCHES = (1, 4)
MEASURES = ("placement_px", "iou")


def condition_name(batch: int, threads: int) -> str:
    return f"batch{batch}_threads{threads}"


def run_condition(out: Path, edits: int, batch: int, cpus: list[str]) -> list[dict]:
    """The toy method's per-edit results of one condition, running it unless already done."""
    folder = out / condition_name(batch, len(cpus))
    results = folder / "results.json"
    if not results.exists():
        cmd = ["taskset", "-c", ",".join(cpus), sys.executable, "-m", "bench.toy_quality"]
        cmd += ["--edits", str(edits), "--methods", "toy", "--batch", str(batch)]
        cmd += ["--no_models_report"]  # the models do not change between the conditions
        cmd += ["--out", str(folder)] + (["--resume"] if folder.exists() else [])
        print("$", " ".join(cmd), flush=True)
        done = subprocess.run(cmd)
        if done.returncode != 0:  # its own message is above; --resume-able where it stopped
            raise SystemExit(
                f"{folder.name}: bench.toy_quality exited with status {done.returncode}"
            )
    return json.loads(results.read_text())["results"]["toy"]


def spreads(runs: dict, pairs: list) -> dict:
    """For each measure: the mean and the largest |a - b| over edits and over `pairs` of
    conditions (an object lost in either run counts as not comparable)."""
    out = {}
    for key in MEASURES:
        diffs = []
        for a, b in pairs:
            for ra, rb in zip(runs[a], runs[b], strict=True):
                assert ra["edit"] == rb["edit"]
                if ra[key] is not None and rb[key] is not None:
                    diffs.append(abs(ra[key] - rb[key]))
        out[key] = {"mean": float(np.mean(diffs)), "max": float(np.max(diffs)), "n": len(diffs)}
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--edits", type=int, default=8)
    parser.add_argument("--out", default="runs/toy_stability")
    parser.add_argument("--cpus", default="0,1", help="the two cores of the 2-thread runs")
    args = parser.parse_args(argv)
    cpus = args.cpus.split(",")
    usable = {str(c) for c in os.sched_getaffinity(0)}
    if len(cpus) != 2 or cpus[0] == cpus[1] or not set(cpus) <= usable:
        raise SystemExit(
            f"--cpus {args.cpus}: give two of this process's cores "
            f"({','.join(sorted(usable, key=int))}), e.g. 0,1"
        )
    scenes = len(HELDOUT_SEEDS)
    if not 1 <= args.edits <= scenes:
        raise SystemExit(f"--edits {args.edits}: give 1 to {scenes} held-out edits")
    if shutil.which("taskset") is None:
        raise SystemExit("taskset not found: it pins each run's threads (util-linux)")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    runs = {}
    for batch, threads in itertools.product(BATCHES, (1, 2)):
        runs[(batch, threads)] = run_condition(out, args.edits, batch, cpus[:threads])
    by_batch = spreads(runs, [((1, t), (4, t)) for t in (1, 2)])
    by_threads = spreads(runs, [((b, 1), (b, 2)) for b in BATCHES])
    conds = list(runs)
    head = "| edit | motion | " + " | ".join(f"b{b} t{t}: px, IoU" for b, t in conds) + " |"
    lines = [head, "|" + " --- |" * (len(conds) + 2)]
    for n, first in enumerate(runs[conds[0]]):
        cells = []
        for c in conds:
            r = runs[c][n]
            px = "lost" if r["placement_px"] is None else f"{r['placement_px']:.2f}"
            cells.append(f"{px}, {r['iou']:.2f}")
        lines.append(f"| {first['edit']} | {first['motion']} | " + " | ".join(cells) + " |")
    lines += ["", "| runs differing in | placement: mean, max px | IoU: mean, max |"]
    lines.append("| --- | --- | --- |")
    for name, s in (("batch size (1 vs 4)", by_batch), ("threads (1 vs 2)", by_threads)):
        p, i = s["placement_px"], s["iou"]
        cells = f"{p['mean']:.2f}, {p['max']:.2f} | {i['mean']:.3f}, {i['max']:.3f}"
        lines.append(f"| {name} | {cells} |")
    text = "\n".join(lines)
    print(text)
    (out / "stability.md").write_text(text + "\n")
    summary = {
        "edits": args.edits,
        "conditions": {condition_name(b, t): runs[(b, t)] for b, t in conds},
        "spread_batch": by_batch,
        "spread_threads": by_threads,
    }
    (out / "stability.json").write_text(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
