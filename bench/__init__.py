"""Benchmark scripts, run from the repository root as python -m bench.<name>."""

import sys

# The scripts that run a PyTorch peer side by side; the others start without it, as mgjax's
# command lines do (mgjax.model.without_torch). tests/test_layout.py keeps the list true.
TORCH_PEERS = ("full_scale", "raft", "sampler")


def started_script() -> str | None:
    """The name of the script `python -m bench.<name>` is starting (Python sets sys.argv[0] to
    "-m" while it locates it), None when bench is imported otherwise."""
    if sys.argv[:1] != ["-m"]:
        return None
    args = sys.orig_argv
    for i, arg in enumerate(args[1:], 1):
        if arg.startswith("-m"):
            module = arg[2:] or (args[i + 1] if i + 1 < len(args) else "")
            return module.removeprefix("bench.")
    return None


if started_script() not in (None, *TORCH_PEERS):
    from mgjax.model import without_torch

    without_torch()
