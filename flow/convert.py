"""Converts a PyTorch RAFT checkpoint to mgjax's torch-free weights file.

  python -m flow.convert SRC.pth DST

SRC: princeton-vl/RAFT (raft-things/sintel/kitti/chairs/small.pth) or torchvision
(raft_large_*/raft_small_*.pth); layout and model size are detected. DST is written exactly as
given, atomically. The .pth is read without torch and without executing pickled code.
"""

import sys

from absl import app

from flow import checkpoint
from flow.errors import InputError, run_cli


def convert(src: str, dst: str) -> str:
    """Converts src to dst; returns a one-line summary."""
    variables, config, layout = checkpoint.read_torch_checkpoint(src)
    checkpoint.save(dst, variables, config, source=f"{layout}:{src}")
    n = sum(v.size for v in checkpoint.flatten(variables).values())
    model = "RAFT-small" if config.small else "RAFT-large"
    return f"{src} ({layout} layout, {model}, {n:,} values) -> {dst}"


def main(argv: list[str]) -> None:
    def run() -> None:
        if len(argv) != 3:
            raise InputError("usage: python -m flow.convert SRC.pth DST")
        print(convert(argv[1], argv[2]))

    run_cli(run)


if __name__ == "__main__":
    app.run(main, argv=sys.argv)
