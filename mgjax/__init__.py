"""mgjax: Motion Guidance (Geng & Owens, ICLR 2024) in JAX/Flax.

`mgjax` is the guided sampler and the editing workflow; `flow` (RAFT) is what it builds on.
"""

import sys

__version__ = "0.1.0"

if sys.argv[:1] == ["-m"]:  # Python is locating `python -m mgjax.<command>`: a command line
    from mgjax.model import without_torch

    without_torch()
