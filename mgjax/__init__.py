"""mgjax: Motion Guidance (Geng & Owens, ICLR 2024) in JAX/Flax.

The guided sampler lands with the sampler issue; `flow` (RAFT) is the foundation it builds on.
"""

__version__ = "0.1.0"
