"""mgjax.config: one configuration, presets as data, one precedence for flags and job lines."""

import dataclasses
import os
import re
from pathlib import Path

import pytest

from mgjax import config as C
from mgjax.batch.jobs import read_jobs

ROOT = Path(__file__).resolve().parents[1]


def test_defaults_are_the_papers_and_presets_change_only_what_they_name():
    m = C.Method()
    assert (m.steps, m.recursive_steps, m.guidance_weight, m.flow_weight) == (500, 10, 300.0, 3.0)
    assert (m.color_weight, m.clip, m.cfg_scale, m.raft_iters) == (100.0, 200.0, 7.5, 5)
    assert C.resolve(preset="paper").method == m
    fast = C.resolve({"model": "owner/name"}, preset="fast").method
    assert dataclasses.replace(fast, steps=500, recursive_steps=10) == m
    preview = C.resolve({"model": "owner/name"}, preset="preview").method
    assert dataclasses.replace(preview, steps=500, recursive_steps=10) == m
    toy = C.resolve(preset="auto").method  # the toy pack is the default model
    assert toy.guidance_weight == 300.0 / 8 and toy.clip == 50.0 and toy.flow_weight == 48.0
    assert C.resolve({"model": "owner/name"}).method == m  # auto: paper for real models


def test_precedence_default_preset_explicit_job():
    explicit = {"steps": 40, "out_dir": "o", "model": "a/b"}
    c = C.resolve(explicit, "fast")
    assert c.method.steps == 40 and c.method.recursive_steps == 4  # explicit > preset > default
    job = C.resolve(explicit, "fast", {"preset": "paper", "seed": 3})
    # a job's preset replaces the command line's; the explicit flag still wins over it
    assert job.method.steps == 40 and job.method.recursive_steps == 10 and job.source.seed == 3
    assert C.resolve(explicit, "fast", {"steps": 7}).method.steps == 7  # the job line's key wins


def test_values_are_checked_by_type_and_range():
    for values, message in (
        ({"steps": "7"}, "steps: expected int"),
        ({"resize": 1}, "resize: expected bool"),
        ({"colour": 1}, "unknown setting"),
        ({"chunk": 0}, "chunk must be at least 1"),
        ({"clip": -1.0}, "clip must be >= 0"),
        ({"eta": float("nan")}, "eta must be >= 0"),
        ({"cfg_scale": float("inf")}, "cfg_scale must be a finite number"),
        ({"loops": "fast"}, "loops must be one of auto, scan, unrolled"),
        ({"dtype": "float16"}, "dtype must be one of float32, bfloat16"),
    ):
        with pytest.raises(ValueError, match=message):
            C.make(**values)
    assert C.make(guidance_weight=3).method.guidance_weight == 3.0  # JSON ints are floats


def test_every_setting_that_sizes_work_has_an_upper_bound():
    """Each integer that sizes work or memory is refused past its bound, with the range in the
    message; the bounds themselves are accepted (the seed's at both ends)."""
    for values, message in (
        ({"steps": 1001}, r"steps must be from 1 to 1000 \(the schedule's 1000 training"),
        ({"steps": 10**400}, "steps must be from 1 to 1000 .*got a number of 401 digits"),
        ({"seed": 2**32}, "seed must be from 0 to 4294967295"),
        ({"seed": 2**64}, "seed must be from 0 to 4294967295"),
        ({"seed": -1}, "seed must be >= 0"),
        ({"seed": 2**32 - 2, "num_samples": 3}, "uses seeds up to 4294967296"),
        ({"mask_grow": 10**9}, "mask_grow must be from 0 to 4096"),
        ({"dilate": 10**9}, "dilate must be from 0 to 512"),
        ({"paste_band": 513}, "paste_band must be from 0 to 512"),
        ({"raft_iters": 10**6}, "raft_iters must be from 1 to 100"),
        ({"recursive_steps": 101}, "recursive_steps must be from 1 to 100"),
        ({"recursive_phases": "4,99999999999999999999"}, "every K must be from 1 to 100"),
        ({"num_samples": 10**8}, "num_samples must be from 1 to 64"),
        ({"chunk": 10**5}, "chunk must be from 1 to 1000"),
        ({"guide_every": 1001}, "guide_every must be from 1 to 1000"),
        ({"log_every": 1001}, "log_every must be from 0 to 1000"),
        ({"stop_after_chunks": 1001}, "stop_after_chunks must be from 0 to 1000"),
        ({"guidance_weight": 10**400}, "guidance_weight must be a finite number"),
    ):
        with pytest.raises(ValueError, match=message):
            C.make(**values)
    top = dict(steps=1000, chunk=1000, recursive_steps=100, raft_iters=100, num_samples=64)
    top |= dict(mask_grow=4096, dilate=512, paste_band=512, guide_every=1000, log_every=1000)
    assert C.make(**top, recursive_phases="100,1").method.steps == 1000
    assert C.make(seed=0).source.seed == 0
    assert C.make(seed=2**32 - 1).source.seed == 2**32 - 1
    assert C.make(seed=2**32 - 2, num_samples=2).output.num_samples == 2


def test_the_largest_seed_seeds_the_sampler():
    """The seed bounds are what the sampler's PRNG seeding takes: both ends make keys."""
    import jax.numpy as jnp

    from mgjax.method import guidance as G

    class Inputs:
        frozen = jnp.zeros((2, 1, 2, 2), bool)
        source = jnp.zeros((2, 2, 2, 3), jnp.float32)

    state = G.init(Inputs, jnp.zeros((2, 1, 2, 2)), [0, 2**32 - 1])
    assert state.keys.shape[0] == 2
    with pytest.raises(OverflowError):  # one past: why the config refuses it
        G.init(Inputs, jnp.zeros((2, 1, 2, 2)), [2**32 - 1, 2**32])


def test_digest_ignores_run_level_fields_only():
    base = C.make(out_dir="a")
    changed = dict(out_dir="b", log_every=2, resume=True, overwrite=True, stop_after_chunks=1)
    changed["compilation_cache"] = ""
    assert set(changed) == set(C.RUN_LEVEL)
    for name, value in changed.items():
        assert C.digest(C.replace(base, **{name: value})) == C.digest(base), name
    for name, value in (("seed", 1), ("loops", "scan"), ("num_samples", 2), ("steps", 9)):
        assert C.digest(C.replace(base, **{name: value})) != C.digest(base), name


def test_a_job_line_resolves_like_the_command_line(tmp_path):
    path = tmp_path / "jobs.jsonl"
    path.write_text('{"name": "a", "preset": "fast"}\n{"name": "b", "log_every": 2}\n')
    a, b = read_jobs(str(path), {"out_dir": "o", "steps": 30, "model": "x/y"}, "paper")
    assert a.config == C.replace(
        C.resolve({"out_dir": "o", "steps": 30, "model": "x/y"}, "fast"), out_dir="o/a"
    )
    assert b.status == "invalid" and "belong to the whole run" in b.error


def test_each_paper_default_is_written_once():
    """The paper's values appear as a default in mgjax.config alone: every other module reads
    them from there."""
    files = [*ROOT.glob("mgjax/**/*.py"), *ROOT.glob("flow/**/*.py"), ROOT / "launch.py"]
    for name, value in (
        ("steps", "500"),
        ("recursive_steps", "10"),
        ("guidance_weight", "300"),
        ("flow_weight", "3"),
        ("color_weight", "100"),
        ("clip", "200"),
        ("cfg_scale", "7.5"),
        ("raft_iters", "5"),
    ):
        pattern = re.compile(rf"\b{name}\b[^#\n]*[=:(,]\s*{re.escape(value)}(\.0)?\b")
        hits = [
            f"{f.relative_to(ROOT)}:{n}"
            for f in files
            for n, line in enumerate(f.read_text().splitlines(), 1)
            if pattern.search(line)
        ]
        assert len(hits) == 1 and hits[0].startswith("mgjax/config.py"), (name, hits)


def test_the_default_compilation_cache_is_the_test_runs_own():
    """Tests never read or write the user's compilation cache: XDG_CACHE_HOME points into the
    test run's temporary folder (tests/conftest.py), for this process and the commands it starts."""
    default = C.make().speed.compilation_cache
    assert default == os.path.join(os.environ["XDG_CACHE_HOME"], "mgjax", "xla")
    assert not default.startswith(os.path.join(os.path.expanduser("~"), ".cache"))
