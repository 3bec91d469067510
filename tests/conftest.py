"""Test-wide numerics: fp32 everywhere, JAX matmuls at "highest", torch TF32 off. One
persistent XLA compilation cache per pytest run (a fresh temporary folder): tests that
compile the same program (the same sampler configuration, a resumed run) compile it once."""

import atexit
import os
import shutil
import tempfile

import jax
import pytest

jax.config.update("jax_default_matmul_precision", "highest")
_XLA_CACHE = tempfile.mkdtemp(prefix="mgjax-tests-xla-")
atexit.register(shutil.rmtree, _XLA_CACHE, ignore_errors=True)
jax.config.update("jax_compilation_cache_dir", _XLA_CACHE)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)

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
