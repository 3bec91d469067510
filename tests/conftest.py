"""Test-wide numerics: fp32 everywhere, JAX matmuls at "highest", torch TF32 off. One
persistent XLA compilation cache per pytest run (a fresh temporary folder, shared by xdist's
workers): tests that compile the same program (the same sampler configuration, a resumed run)
compile it once. It is also mgjax's default `--compilation_cache` in the tests and in the
commands they start (XDG_CACHE_HOME points into it), so no test reads or writes the user's own
cache and a run here starts as cold as on a fresh machine."""

import atexit
import os
import shutil
import tempfile

import jax
import pytest

jax.config.update("jax_default_matmul_precision", "highest")
if "MGJAX_TESTS_CACHE_HOME" not in os.environ:  # pytest's first process: xdist's workers
    os.environ["MGJAX_TESTS_CACHE_HOME"] = tempfile.mkdtemp(prefix="mgjax-tests-cache-")
    atexit.register(shutil.rmtree, os.environ["MGJAX_TESTS_CACHE_HOME"], ignore_errors=True)
_CACHE_HOME = os.environ["MGJAX_TESTS_CACHE_HOME"]  # inherited by xdist's workers: one cache
os.environ["XDG_CACHE_HOME"] = _CACHE_HOME  # read by mgjax.config, imported after this
_XLA_CACHE = os.path.join(_CACHE_HOME, "mgjax", "xla")  # mgjax.config.default_compilation_cache
os.makedirs(_XLA_CACHE, exist_ok=True)
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
