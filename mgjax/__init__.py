"""mgjax: Motion Guidance (Geng & Owens, ICLR 2024) in JAX/Flax.

`mgjax` is the guided sampler and the editing workflow; `flow` (RAFT) is what it builds on.
"""

__version__ = "0.1.0"
