"""Benchmark scripts, run from the repository root as python -m bench.<name>."""

import sys

if sys.argv[:1] == ["-m"]:  # Python is locating `python -m bench.<name>`: a command line
    from mgjax.model import without_torch

    without_torch()
