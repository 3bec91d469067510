"""Estimates optical flow between two images with RAFT.

  python -m flow.estimate --weights W --image1 A.png --image2 B.png [--iters N]
      [--context_norm running|batch] --out flow.npy [--viz flow.png]

--out takes .npy (f32[H,W,2], channel 0 = dx, 1 = dy, pixels) or .flo (Middlebury).
"""

import os

import numpy as np
from absl import app, flags, logging

from flow.errors import InputError, run_cli
from flow.files import read_rgb, write_atomic
from flow.flo import write_flo
from flow.raft import check_images
from flow.viz import save_flow_png

flags.DEFINE_string("weights", None, "RAFT weights: from python -m flow.convert, or a .pth.")
flags.DEFINE_string("image1", None, "Source image (RGB, H and W multiples of 8).")
flags.DEFINE_string("image2", None, "Target image, same size as image1.")
flags.DEFINE_integer(
    "iters", 12, "Refinement iterations (RAFT's default 12; Motion Guidance uses 5)."
)
flags.DEFINE_enum(
    "context_norm",
    "running",
    ["running", "batch"],
    "Context-encoder BatchNorm statistics: 'running' (eval mode, standard RAFT) or "
    "'batch' (per-image statistics, as the Motion Guidance reference).",
)
flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Compute dtype.")
flags.DEFINE_string("out", None, "Output flow file: .npy or .flo.")
flags.DEFINE_string("viz", None, "Optional colour-wheel PNG of the flow.")
FLAGS = flags.FLAGS


def estimate() -> None:
    """Validates every input before computing; writes outputs only when all succeeded."""
    for name in ("weights", "image1", "image2", "out"):
        if not getattr(FLAGS, name):
            raise InputError(f"--{name} is required (see --help)")
    if not FLAGS.out.endswith((".npy", ".flo")):
        raise InputError(f"--out must end in .npy or .flo, got {FLAGS.out}")
    if FLAGS.viz and not FLAGS.viz.lower().endswith(".png"):
        raise InputError(f"--viz must end in .png, got {FLAGS.viz}")
    if FLAGS.iters < 1:
        raise InputError(f"--iters must be at least 1, got {FLAGS.iters}")
    for path in filter(None, (FLAGS.out, FLAGS.viz)):
        folder = os.path.dirname(os.path.abspath(path))
        if not os.path.isdir(folder):
            raise InputError(f"{path}: folder {folder} does not exist; create it first")
    im1, im2 = read_rgb(FLAGS.image1), read_rgb(FLAGS.image2)
    check_images(im1[None], im2[None])

    from flow.checkpoint import load_raft

    net = load_raft(FLAGS.weights, context_norm=FLAGS.context_norm, dtype=FLAGS.dtype)
    flow = np.asarray(net(im1[None], im2[None], iters=FLAGS.iters)[0], np.float32)
    if not np.isfinite(flow).all():
        raise InputError("RAFT produced non-finite flow (NaN/inf); check the weights file")

    def write_flow(tmp: str) -> None:
        if FLAGS.out.endswith(".flo"):
            write_flo(tmp, flow)
        else:
            with open(tmp, "wb") as f:
                np.save(f, flow)

    write_atomic(FLAGS.out, write_flow)
    if FLAGS.viz:
        write_atomic(FLAGS.viz, lambda tmp: save_flow_png(tmp, flow))
    mag = np.linalg.norm(flow, axis=-1)
    print(
        f"flow {flow.shape[1]}x{flow.shape[0]}: mean |f| {mag.mean():.3f}px, "
        f"max {mag.max():.3f}px -> {FLAGS.out}"
    )


def main(argv: list[str]) -> None:
    logging.set_verbosity(logging.WARNING)  # keep stderr to our one-line errors

    def run() -> None:
        if len(argv) > 1:
            raise InputError(f"unexpected arguments {argv[1:]}; see --help")
        estimate()

    run_cli(run)


if __name__ == "__main__":
    app.run(main)
