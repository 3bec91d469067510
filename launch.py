"""mgjax: edit an image so that it shows a given motion (Motion Guidance, in JAX).

  # the shipped toy pack (mgjax/toy/pack, the default model): its demo edit, on CPU
  python launch.py --out_dir out/demo
  # the toy pack on a source and motion of your own
  python launch.py --image shapes.png --object_mask shape_mask.png --motion rotate:30 \\
      --out_dir out/mine
  # Stable Diffusion v1.4 and RAFT (raft-things.pth) for real images:
  # a generated source: prompt + seed, then move the object in a box 40 px right
  python launch.py --model CompVis/stable-diffusion-v1-4 --raft_weights raft-things.pth \\
      --prompt "a photo of an apple on a table" --seed 0 \\
      --motion translate:40,0 --object_box 180,200,330,350 --out_dir out/apple
  # a real image (inverted first), rotated 30 degrees inside a mask
  python launch.py --model CompVis/stable-diffusion-v1-4 --image cat.png --motion rotate:30 \\
      --object_mask cat_mask.png ...
  # many edits, batched over the local devices (one JSON object of flags per line)
  python launch.py --jobs jobs.jsonl --out_dir runs/batch --model CompVis/stable-diffusion-v1-4 \\
      --raft_weights raft-things.pth
  # the authors' example folders
  python launch.py --model CompVis/stable-diffusion-v1-4 --data_dir data/apple \\
      --target_flow_name right.pth --edit_mask_name right.mask.pth ...

Guidance flags take their preset's values: --preset auto is toy for the toy pack (scaled for
its 64x64 images, full RAFT gradient) and paper (the reference's values, shown as the flags'
defaults) for real models; --preset fast trades quality for time. Explicit flags override a
preset. Ctrl-C leaves a checkpoint; --resume continues.
"""

import functools
import sys

from absl import app, flags, logging

from flow.errors import UserError, run_cli
from mgjax.edit import PRESETS, Options, default_compilation_cache
from mgjax.levers import ATTENTION, LOOPS, RAFT_GRADIENTS, REMAT_POLICIES

_P = PRESETS["paper"]


class _Group:
    """flags.DEFINE_<kind> bound to a --helpfull group (absl groups flags by module name)."""

    def __init__(self, name: str):
        for kind in ("string", "integer", "float", "bool", "enum"):
            define = getattr(flags, f"DEFINE_{kind}")
            setattr(self, kind, functools.partial(define, module_name=f"launch.py {name}"))


source, models, motion, guidance, run = (
    _Group(g) for g in ("source", "models", "motion", "guidance", "run")
)
# source
source.string("image", None, "Real source image (RGB); it is DDIM-inverted first.")
source.string(
    "prompt",
    "",
    "Prompt: generates the source with --seed when no --image / "
    "--data_dir is given, and conditions the edit.",
)
source.integer(
    "seed", 0, "Seed of the generated source's z_T and of the re-noising (sample n uses seed + n)."
)
source.string(
    "data_dir", None, "A folder in the reference format (pred.png, start_zt.pth, latents/, flows/)."
)
source.string("target_flow_name", None, "With --data_dir: the flow file in flows/.")
source.string("edit_mask_name", None, "With --data_dir: the frozen mask in flows/.")
source.bool("resize", False, "Resize an --image whose size the model cannot take.")
# models
models.string(
    "model",
    "toy",
    "toy (the shipped toy pack in mgjax/toy/pack; with no source and motion flags it runs its "
    "demo edit), a hub id (CompVis/stable-diffusion-v1-4), or a local diffusers folder.",
)
models.string("revision", "flax", "Hub revision (flax or bf16 for SD v1.4).")
models.bool("from_pt", False, "The model folder holds PyTorch weights (read without torch).")
models.enum(
    "dtype",
    "float32",
    ["float32", "bfloat16"],
    "Compute dtype of UNet, VAE and RAFT (the latents and the guidance stay float32).",
)
models.enum(
    "attention",
    "plain",
    list(ATTENTION),
    "UNet attention: plain, or diffusers' memory-efficient chunked version.",
)
models.string(
    "raft_weights",
    None,
    "RAFT checkpoint: raft-things.pth (princeton-vl/RAFT) or a file from python -m flow.convert"
    " (default with --model toy: the pack's RAFT-small).",
)
# motion
motion.string(
    "motion",
    None,
    "translate:dx,dy | rotate:deg[@cx,cy] | scale:s[@cx,cy] | "
    "stretch:s,deg[@cx,cy] | homography:<4 src pts>:<4 dst pts>, joined by '+'.",
)
motion.string(
    "drag",
    None,
    "Drag points instead of --motion: 'x1,y1>X1,Y1; x2,y2>X2,Y2' (one pair: a translation; "
    "two: the rotation and scale they imply; more: a smooth flow through all of them).",
)
motion.string("object_mask", None, "Object mask image (non-zero = object) for --motion.")
motion.string("object_box", None, "Object box x0,y0,x1,y1 (pixels) for --motion.")
motion.string("flow", None, "Target flow file instead of --motion: .npy, .flo, .pth.")
motion.string(
    "frozen_mask",
    "auto",
    "auto (dilated union of where the object is and "
    "goes), none, or a file (.pth/.npy/.png at latent size).",
)
motion.integer("dilate", 2, "Dilation of the automatic frozen mask, in latent pixels.")
# guidance
guidance.enum(
    "preset",
    "auto",
    ["auto", *sorted(PRESETS)],
    "auto: toy with the toy pack (--model toy), else paper. Values: "
    + "; ".join(
        f"{name}: "
        + ", ".join(
            f"{k}={v:g}" if not isinstance(v, str) else f"{k}={v}" for k, v in values.items()
        )
        for name, values in sorted(PRESETS.items())
    ),
)
guidance.integer("steps", _P["steps"], "DDIM steps.")
guidance.integer("recursive_steps", _P["recursive_steps"], "Recursive denoising steps K.")
guidance.float("guidance_weight", _P["guidance_weight"], "lambda_g.")
guidance.float("color_weight", _P["color_weight"], "lambda_color.")
guidance.float("flow_weight", _P["flow_weight"], "lambda_flow.")
guidance.float("clip", _P["clip"], "Max L2 norm of the guidance term per image; 0 = off.")
guidance.float(
    "preserve_weight",
    0.0,
    "Adds this x PreservationEnergy (L1 to the source where nothing should move) to the "
    "paper's energy; 0 = the paper's energy alone.",
)
guidance.float("cfg_scale", _P["cfg_scale"], "Classifier-free guidance scale.")
guidance.float("eta", 0.0, "DDIM eta.")
guidance.bool("occlusion_masking", True, "Mask covered background in the colour loss.")
guidance.bool("oracle", False, "Warp with the target flow in the colour loss.")
guidance.string("schedule", None, "Guidance schedule .npy (one multiplier per step).")
guidance.integer("raft_iters", 5, "RAFT iterations inside the energy.")
guidance.enum(
    "raft_gradient",
    "detached",
    list(RAFT_GRADIENTS),
    "detached: the gradient through RAFT as the reference takes it (the flow estimate detached "
    "at every iteration); full: the exact gradient through all iterations.",
)
guidance.integer("chunk", 10, "DDIM steps per compiled chunk (and per checkpoint).")
guidance.enum(
    "remat",
    "none",
    list(REMAT_POLICIES),
    "Recompute activations in the backward pass, per model (UNet, decoder, RAFT): none; dots "
    "(keep matmul/conv outputs); full (keep only each model's inputs); blocks (keep only the "
    "boundaries of each UNet and VAE block, RAFT as full). Less memory, more time.",
)
guidance.bool(
    "skip_unguided",
    True,
    "Steps whose guidance weight x schedule is 0 run the UNet only (no energy, no backward).",
)
guidance.enum(
    "loops",
    "auto",
    list(LOOPS),
    "scan: each chunk one compiled lax.scan; unrolled: one compiled evaluation per call, RAFT "
    "unrolled (XLA:CPU runs backward convolutions inside loops ~3x slower); auto: unrolled on "
    "CPU, scan on GPU/TPU.",
)
guidance.bool(
    "source_cache",
    False,
    "Encode the source with RAFT once per edit, not in every guided evaluation (the same flow, "
    "less work; it changes the rounding, which guided runs amplify).",
)
# run
run.integer("num_samples", 1, "Edits of the same source, as one batch.")
run.string("out_dir", None, "Output folder.")
run.integer("log_every", 0, "Save the decoded x0 estimate every N steps (0 = never).")
run.bool("resume", False, "Continue the run in --out_dir from its checkpoint.")
run.bool("overwrite", False, "Replace an existing --out_dir.")
run.string(
    "compilation_cache",
    default_compilation_cache(),
    "Persistent XLA compilation cache folder (empty: off); reruns skip compilation.",
)
run.integer("stop_after_chunks", 0, "Testing aid: stop as if interrupted.")
# batch
batch = _Group("batch")
batch.string(
    "jobs",
    None,
    "Jobs file (JSONL, one edit per line, keys = these flag names plus name/preset/points): "
    "edits in batches sharded over the local devices; the other flags are every job's defaults.",
)
batch.integer("batch_size", 0, "Edits per batch with --jobs (0: one per local device).")
batch.string(
    "coordinator",
    None,
    "host:port of process 0, for several processes (hosts) on one --jobs run; automatic on a "
    "Cloud TPU pod slice.",
)
batch.integer("num_processes", 1, "Processes in the run (with --coordinator).")
batch.integer("process_id", 0, "This process's id, 0 .. num_processes - 1 (with --coordinator).")
FLAGS = flags.FLAGS
_BATCH = ["jobs", "batch_size", "coordinator", "num_processes", "process_id"]
for _name in [*Options.__dataclass_fields__, "preset", *_BATCH]:  # --helpshort lists them all
    flags.declare_key_flag(_name)


def options() -> Options:
    """Options from the flags: a preset's values unless the flag was given explicitly."""
    if not FLAGS.out_dir:
        raise UserError("--out_dir is required")
    values = {f.name: getattr(FLAGS, f.name) for f in Options.__dataclass_fields__.values()}
    preset = FLAGS.preset
    if preset == "auto":
        preset = "toy" if FLAGS.model == "toy" else "paper"
    for name, value in PRESETS[preset].items():
        if not FLAGS[name].present:
            values[name] = value
    return Options(**values)


def main(argv: list[str]) -> None:
    logging.set_verbosity(logging.WARNING)

    if len(sys.argv) == 1:  # no flags at all: say what this is and how to ask for more
        print(__doc__.strip())
        print("\nAll flags: python launch.py --helpshort (by group: --helpfull)")
        return

    def edit() -> None:
        if len(argv) > 1:
            raise UserError(f"unexpected arguments {argv[1:]}; see --help")
        log = lambda s: print(s, flush=True)  # noqa: E731
        try:
            if FLAGS.jobs:
                from mgjax import batch

                batch.initialize_distributed(
                    FLAGS.coordinator, FLAGS.num_processes, FLAGS.process_id
                )
                import jax

                rows = batch.run_jobs(
                    FLAGS.jobs,
                    options(),
                    FLAGS.batch_size,
                    log,
                    jax.process_index(),
                    jax.process_count(),
                )
                batch.report(rows, log)
                return
            from mgjax.edit import run as run_edit

            run_edit(options(), log=log)
        except KeyboardInterrupt:
            sys.exit(130)

    run_cli(edit)


if __name__ == "__main__":
    app.run(main)
