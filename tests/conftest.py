"""Test-wide numerics: fp32 everywhere, JAX matmuls at "highest", torch TF32 off."""

import os
import sys

import jax
import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
jax.config.update("jax_default_matmul_precision", "highest")

try:
    import torch

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.set_num_threads(2)
except ImportError:  # torch is a test reference only; tests that need it import it themselves
    torch = None


@pytest.fixture
def repo_root() -> str:
    return os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
