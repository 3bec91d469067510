"""The toy model pack: the self-trained tiny Stable Diffusion and RAFT-small shipped in
`mgjax/toy/pack/`, in the formats the real loaders read, plus the demo edit that
`python launch.py --model toy --out_dir DIR` runs when no source or motion is given.

  pack/sd/           diffusers folder (model_index.json; unet/, vae/, text_encoder/ with Flax
                     msgpack weights and config.json; tokenizer/ with vocab.json, merges.txt)
  pack/raft-small.mgjax   RAFT-small weights (flow.checkpoint format, as python -m flow.convert)
  pack/demo.png, pack/demo_mask.png   a rendered shapes-world scene and its object's mask
  pack/pack.json     demo prompt and motion, and every training run that led to the weights
                     (command, date, device, wall time, losses, round trip, EPE)

The pack is also the training checkpoint: a training run continues from it (--init
mgjax/toy/pack/sd, --init mgjax/toy/pack/raft-small.mgjax), and the pack is rebuilt from the
runs with the history of the runs before them (the pack's own pack.json, or a runs.json
{"runs": [...]}, oldest first; each new run's log.json is appended to it):

  python -m mgjax.toy.pack --ldm runs/ldm/sd --raft runs/raft/raft-small.mgjax \\
      --runs mgjax/toy/pack/pack.json --log runs/ldm/log.json --log runs/raft/log.json
"""

import json
import os
import shutil
from pathlib import Path

import numpy as np

PACK = Path(__file__).resolve().parent / "pack"
TOY = "toy"  # --model value (the default) that names this pack
DEMO_SEED = 8  # shapes.sample_scene seed of the demo scene
DEMO_OBJECT = 0
DEMO_SHIFT = (10.0, 0.0)  # the demo motion: the object 10 px to the right


def sd_folder() -> str:
    return str(PACK / "sd")


def raft_file() -> str:
    return str(PACK / "raft-small.mgjax")


def info() -> dict:
    """pack.json: demo prompt/motion and how the weights were trained."""
    return json.loads((PACK / "pack.json").read_text())


def demo_files() -> dict:
    """The demo edit's inputs: {"image", "object_mask", "prompt", "motion"}."""
    meta = info()["demo"]
    return {
        "image": str(PACK / "demo.png"),
        "object_mask": str(PACK / "demo_mask.png"),
        "prompt": meta["prompt"],
        "motion": meta["motion"],
    }


def demo_scene(size: int = 64):
    """(scene, image, object mask) of the demo edit."""
    from mgjax.toy import shapes

    scene = shapes.sample_scene(np.random.default_rng(DEMO_SEED), size, n_objects=1)
    out = shapes.render(scene)
    return scene, out["image"], out["masks"][DEMO_OBJECT]


def demo_measures(edited: np.ndarray) -> dict:
    """The demo edit (f32[H,W,3] in [0, 1]) scored against the demo object moved exactly as
    asked (quality.edit_scores), with the object's pixels found in the edit (object_px, of
    source_px in the source) and their centroid's shift from the source object's (px, x and y;
    NaN where none is found)."""
    from mgjax.toy import quality, shapes

    scene, image, before = demo_scene(edited.shape[0])
    matrix = shapes.affine_about((0.0, 0.0), shift=DEMO_SHIFT)
    after = shapes.render(scene, {DEMO_OBJECT: matrix})["masks"][DEMO_OBJECT]
    scores = quality.edit_scores(edited, scene, DEMO_OBJECT, matrix)
    color = np.median(image[before], axis=0)
    region = quality.dilate_mask(before | after, quality.SEARCH)
    found = quality.object_pixels(edited, color, quality.plate_of(scene, DEMO_OBJECT), region)
    shift = (
        quality.centroid(found) - quality.centroid(before) if found.any() else np.full(2, np.nan)
    )
    return dict(scores, object_px=int(found.sum()), source_px=int(before.sum()), shift=shift)


# what a run's log.json keeps in the pack's history (the loss curves are in the logs)
RUN_KEYS = ("command", "date", "device", "seconds", "settings", "vae_steps_run", "unet_steps_run",
            "steps", "roundtrip", "scaling_factor", "final_val_epe", "final_val_epe_roundtrip",
            "zero_flow_val_epe")  # fmt: skip


def run_entry(log: dict, name: str) -> dict:
    """A training run's log.json as one entry of the pack's history: its command, device,
    time and results, with each loss curve's first and last values."""
    entry = {"run": name, **{k: log[k] for k in RUN_KEYS if k in log}}
    for key in ("vae_loss", "unet_loss", "loss"):
        if log.get(key):
            entry[key + "_first_last"] = [log[key][0], log[key][-1]]
    return entry


def read_history(path: str) -> list:
    """The training runs recorded in a pack.json ("training") or a runs.json ("runs")."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise SystemExit(f"--runs {path}: cannot read it as JSON ({e})") from None
    runs = data.get("training", data.get("runs")) if isinstance(data, dict) else None
    if not isinstance(runs, list) or not all(isinstance(r, dict) for r in runs):
        raise SystemExit(
            f"--runs {path}: no list of runs in it; give a pack.json ('training') or a "
            "runs.json ({'runs': [...]})"
        )
    return runs


def build(ldm: str, raft: str, runs: str | None = None, logs: tuple = (), out: Path = PACK):
    """Copy trained weights into `out` and write the demo and pack.json, whose "training" is
    the history in `runs` followed by each of `logs` (the runs that wrote the weights)."""
    from mgjax.edit import outputs
    from mgjax.toy import shapes

    if not (Path(ldm) / "unet").is_dir():
        raise SystemExit(f"{ldm}: not a diffusers folder (no unet/)")
    history = read_history(runs) if runs else []  # read before anything is written
    tmp = Path(str(out) + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    shutil.copytree(ldm, tmp / "sd")
    shutil.copyfile(raft, tmp / "raft-small.mgjax")
    unet_cfg = json.loads((tmp / "sd" / "unet" / "config.json").read_text())
    vae_cfg = json.loads((tmp / "sd" / "vae" / "config.json").read_text())
    size = unet_cfg["sample_size"] * 2 ** (len(vae_cfg["block_out_channels"]) - 1)
    scene, image, mask = demo_scene(size)
    outputs.save_png(str(tmp / "demo.png"), outputs.to_uint8(image))
    outputs.save_png(str(tmp / "demo_mask.png"), (mask * 255).astype(np.uint8))
    for path in logs:
        history.append(run_entry(json.loads(Path(path).read_text()), Path(path).parent.name))
    meta = {
        "demo": {
            "prompt": shapes.prompt(scene),
            "motion": f"translate:{DEMO_SHIFT[0]:g},{DEMO_SHIFT[1]:g}",
            "scene_seed": DEMO_SEED,
        },
        "image_size": size,
        "training": history,
    }
    (tmp / "pack.json").write_text(json.dumps(meta, indent=1))
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    total = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    print(f"wrote {out} ({total / 2**20:.1f} MiB)")


def main():
    import argparse

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ldm", required=True, help="diffusers folder written by train_ldm (OUT/sd)")
    p.add_argument("--raft", required=True, help="raft-small.mgjax written by train_raft")
    p.add_argument("--runs", help="the runs before these: a pack.json or a runs.json")
    p.add_argument("--log", action="append", default=[], help="a run's log.json (repeatable)")
    p.add_argument("--out", default=str(PACK))
    a = p.parse_args()
    build(a.ldm, a.raft, a.runs, tuple(a.log), Path(a.out))


if __name__ == "__main__":
    main()
