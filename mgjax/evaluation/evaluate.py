"""The paper's evaluation of edits written by launch.py (single runs or --jobs runs).

  python -m mgjax.evaluation.evaluate runs/apple runs/batch [--raft_weights raft-things.pth]
      [--clip_model openai/clip-vit-base-patch32] [--no_clip] [--json eval.json]

Per sample folder (one with source.png, edited.png and target_flow.npy):
- flow loss: mean L1 between RAFT(source, edit) and the target flow (the energy's flow term),
  and the end-point error inside and outside the object (object_mask.png, else where the target
  flow is non-zero);
- CLIP visual similarity: cosine of the CLIP image embeddings of source and edit (transformers'
  Flax CLIP; its own image processor);
- for drag edits (config.json `drag`): where RAFT tracks each handle point in the edit (handle +
  the flow there, bilinear) and its mean distance to the target point.
Then the mean of each over all samples. RAFT is --raft_weights, else the run's own (config.json).
"""

import functools
import glob
import json
import os
import sys

import numpy as np

from flow.errors import InputError, run_cli
from flow.files import load_npy, read_image, read_rgb, write_atomic
from flow.schema import Optional, check
from mgjax.model.clip import Clip

DEFAULT_CLIP = "openai/clip-vit-base-patch32"
METRICS = (
    "flow_l1",
    "flow_epe_inside",
    "flow_epe_outside",
    "clip_similarity",
    "drag_distance",
)


def sample_folders(run_dirs: list[str]) -> list[str]:
    """Every folder under the given ones that holds an edit with its target flow."""
    found = []
    for run in run_dirs:
        if not os.path.isdir(run):
            raise InputError(f"{run}: no such run folder (give folders written by launch.py)")
        for edited in glob.glob(os.path.join(run, "**", "edited.png"), recursive=True):
            folder = os.path.dirname(edited)
            if os.path.isfile(os.path.join(folder, "target_flow.npy")):
                found.append(folder)
    if not found:
        raise InputError(
            f"no edits with target_flow.npy under {', '.join(run_dirs)} (runs written by "
            "launch.py keep the target flow there)"
        )
    return sorted(set(found))


@functools.cache
def _raft(path: str):
    import jax

    from flow.checkpoint import load_raft

    if not os.path.isfile(path):
        raise InputError(f"{path}: no such RAFT weights file; give --raft_weights")
    raft = load_raft(path, context_norm="batch")
    return raft, jax.jit(lambda r, a, b, iters: r(a, b, iters=iters), static_argnums=3)


def bilinear(field: np.ndarray, x: float, y: float) -> np.ndarray:
    """field[H,W,C] at (x, y), bilinear, clamped to the border."""
    h, w = field.shape[:2]
    x, y = min(max(x, 0.0), w - 1.0), min(max(y, 0.0), h - 1.0)
    x0, y0 = int(np.floor(x)), int(np.floor(y))
    x1, y1 = min(x0 + 1, w - 1), min(y0 + 1, h - 1)
    fx, fy = x - x0, y - y0
    top = field[y0, x0] * (1 - fx) + field[y0, x1] * fx
    bottom = field[y1, x0] * (1 - fx) + field[y1, x1] * fx
    return top * (1 - fy) + bottom * fy


def drag_distance(flow: np.ndarray, handles: np.ndarray, targets: np.ndarray) -> float:
    """Mean distance between where the flow carries each handle and its target."""
    tracked = np.array([h + bilinear(flow, *h) for h in handles])
    return float(np.linalg.norm(tracked - targets, axis=-1).mean())


def evaluate_sample(folder: str, raft_weights: str | None, clip: Clip | None, iters: int) -> dict:

    config = {}
    path = os.path.join(folder, "config.json")
    if os.path.isfile(path):
        try:
            with open(path) as f:
                config = json.load(f)
        except (OSError, UnicodeDecodeError, ValueError, RecursionError) as e:
            raise InputError(f"{path}: not a readable config.json ({e})") from None
        if not isinstance(config, dict):
            raise InputError(f"{path}: not a config.json written by launch.py (not an object)")
        fix = "give run folders written by launch.py"
        check(config, {"raft_weights": Optional(str), "drag": Optional(str)}, path, fix)
    weights = raft_weights or config.get("raft_weights")
    if not weights:
        raise InputError(f"{folder}: its config.json names no RAFT weights; give --raft_weights")
    src = read_rgb(os.path.join(folder, "source.png"))
    edit = read_rgb(os.path.join(folder, "edited.png"))
    target = load_npy(os.path.join(folder, "target_flow.npy"), "target flow")
    if target.shape != src.shape[:2] + (2,) or edit.shape != src.shape:
        raise InputError(f"{folder}: source, edit and target flow sizes differ")
    mask_path = os.path.join(folder, "object_mask.png")
    if os.path.isfile(mask_path):
        obj = read_image(mask_path, "mask image", "L") > 127
    else:
        obj = np.any(target != 0, axis=-1)
    raft, fn = _raft(weights)
    flow = np.asarray(fn(raft, src[None].astype(np.float32), edit[None].astype(np.float32), iters))
    flow = flow[0]
    epe = np.linalg.norm(flow - target, axis=-1)
    row = {
        "sample": folder,
        "flow_l1": float(np.abs(flow - target).mean()),
        "flow_epe_inside": float(epe[obj].mean()) if obj.any() else None,
        "flow_epe_outside": float(epe[~obj].mean()) if (~obj).any() else None,
        "clip_similarity": (
            clip.similarity(src.astype(np.uint8), edit.astype(np.uint8)) if clip else None
        ),
        "drag_distance": None,
    }
    if config.get("drag"):
        from mgjax.edit.drag import parse_drag

        handles, targets = parse_drag(config["drag"])
        row["drag_distance"] = drag_distance(flow, handles, targets)
    return row


def aggregate(rows: list[dict]) -> dict:
    out = {"samples": len(rows)}
    for k in METRICS:
        values = [r[k] for r in rows if r.get(k) is not None]
        out[k] = float(np.mean(values)) if values else None
    return out


def main(argv: list[str]) -> None:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("runs", nargs="+", help="folders written by launch.py")
    parser.add_argument("--raft_weights", default=None, help="RAFT for the flow metrics")
    parser.add_argument("--raft_iters", type=int, default=12)
    parser.add_argument("--clip_model", default=DEFAULT_CLIP, help="hub id or local folder")
    parser.add_argument("--clip_revision", default=None)
    parser.add_argument("--no_clip", action="store_true", help="skip CLIP similarity")
    parser.add_argument("--json", default=None, help="write per-sample rows and the means")
    args = parser.parse_args(argv)
    if args.raft_iters < 1:
        raise InputError("--raft_iters must be at least 1")
    folders = sample_folders(args.runs)
    clip = None if args.no_clip else Clip(args.clip_model, args.clip_revision)
    rows = [evaluate_sample(f, args.raft_weights, clip, args.raft_iters) for f in folders]
    summary = aggregate(rows)
    fmt = lambda v: "-" if v is None else f"{v:.4f}"  # noqa: E731
    print("| sample | " + " | ".join(METRICS) + " |")
    print("|---" * (len(METRICS) + 1) + "|")
    for r in rows + [dict(summary, sample=f"mean of {len(rows)}")]:
        print(f"| {r['sample']} | " + " | ".join(fmt(r[k]) for k in METRICS) + " |")
    if args.json:
        text = json.dumps({"samples": rows, "mean": summary}, indent=2) + "\n"

        def write(tmp):
            with open(tmp, "w") as f:
                f.write(text)

        write_atomic(args.json, write)


if __name__ == "__main__":
    run_cli(lambda: main(sys.argv[1:]))
