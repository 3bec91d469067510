"""The toy demo (`python launch.py`, the toy pack's embedded default) on one and two cores, in
both loop forms, and without guidance: per run the demo object's pixels found, its shift, and
the scores against the exactly moved object (mgjax.toy.pack.demo_measures), with the
sampler's evaluations per second and the wall time.

  python -m bench.toy_demo [--out runs/toy_demo] [--runs two-auto,two-scan,...]

Each run is `taskset -c CPUS python launch.py --out_dir OUT/<run> ...` in its own process,
one after another, so the rows differ only in what the run names.
"""

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

# name -> (cores for taskset, extra launch.py flags, the row's label)
RUNS = {
    "two-auto": ("0,1", [], "two cores, `--loops auto` (unrolled on CPU), the default"),
    "two-scan": ("0,1", ["--loops", "scan"], "two cores, `--loops scan`"),
    "one-auto": ("0", [], "one core, `--loops auto`"),
    "one-scan": ("0", ["--loops", "scan"], "one core, `--loops scan`"),
    "two-unguided": (
        "0,1",
        ["--guidance_weight", "0", "--warp_start=false"],
        "two cores, `--guidance_weight 0 --warp_start=false`",
    ),
}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="runs/toy_demo")
    parser.add_argument("--runs", default=",".join(RUNS), help="a comma list of " + ", ".join(RUNS))
    args = parser.parse_args()
    names = [n.strip() for n in args.runs.split(",") if n.strip()]
    unknown = [n for n in names if n not in RUNS]
    if unknown or not names:
        sys.exit(f"--runs {args.runs!r}: name runs from {', '.join(RUNS)}")
    if not hasattr(os, "sched_getaffinity") or len(os.sched_getaffinity(0)) < 2:
        sys.exit("this bench needs taskset and two cores")

    from mgjax.toy import pack

    rows = []
    for name in names:
        cores, flags, label = RUNS[name]
        out = Path(args.out) / name
        command = ["taskset", "-c", cores, sys.executable, "launch.py", "--out_dir", str(out)]
        command += ["--overwrite", *flags]
        start = time.perf_counter()
        done = subprocess.run(command, capture_output=True, text=True)
        wall = time.perf_counter() - start
        if done.returncode != 0:
            sys.exit(f"{name} failed:\n{done.stderr[-2000:]}")
        sample = out / "sample_00"
        metrics = json.loads((sample / "metrics.json").read_text())
        edited = np.asarray(Image.open(sample / "edited.png"), np.float32) / 255.0
        m = pack.demo_measures(edited)
        evals = metrics["guided_evaluations"] + metrics["unguided_evaluations"]
        rows.append(
            f"| {label} | {m['object_px']} | ({m['shift'][0]:+.2f}, {m['shift'][1]:+.2f}) "
            f"| {m['placement_px']:.2f} | {m['iou']:.3f} | {m['psnr_unchanged']:.1f} "
            f"| {evals / metrics['sampling_seconds']:.2f} | {wall:.0f} |"
        )
        print(rows[-1], flush=True)
    print(f"\nobject pixels of {m['source_px']} in the source; asked shift {pack.DEMO_SHIFT}\n")
    print("| run | object px | shift px | placement px | IoU | PSNR unchanged | evaluations/s "
          "| wall s |")  # fmt: skip
    print("| --- | ---: | --- | ---: | ---: | ---: | ---: | ---: |")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
