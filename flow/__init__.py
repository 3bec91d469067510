"""RAFT optical flow in JAX/Flax, differentiable w.r.t. both images, plus flow utilities.

This package never imports mgjax.
"""

from flow.checkpoint import load_raft
from flow.raft import Raft, RaftConfig, init_raft

__all__ = ["Raft", "RaftConfig", "init_raft", "load_raft"]
