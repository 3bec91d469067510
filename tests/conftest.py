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


# The files whose tests take longest on two CPU cores, longest first. They are collected before
# the others, so that `-n 2 --dist loadfile` (one file a work unit, handed out in collection
# order) starts them early and ends on short files, and both workers finish together.
LONGEST_FIRST = (
    "test_docs.py",
    "test_sampler.py",
    "test_levers.py",
    "test_batch.py",
    "test_launch.py",
    "test_raft.py",
    "test_backbones.py",
    "test_grow.py",
    "test_toy_bench.py",
    "test_editor_run.py",
    "test_cost_levers.py",
    "test_toy.py",
    "test_toy_pack.py",
    "test_editor_browser.py",
)


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable within a file
