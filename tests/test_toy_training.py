"""The toy training scripts' shared parts: the run length that drives the learning rate, and
data rendered in worker processes."""

import functools

import numpy as np
import optax
import pytest

from mgjax.toy import budget, shapes


def test_the_learning_rate_follows_steps_or_minutes_whichever_ends_first():
    b = budget.Budget(steps=100, minutes=60.0)
    assert b.progress(0) == pytest.approx(0.0, abs=1e-6)  # by time: a moment of the hour
    assert b.progress(50) == pytest.approx(0.5, abs=1e-3)
    assert b.learning_rate(1.0, 0) == pytest.approx(0.0, abs=1e-4)  # warm-up starts at zero
    assert b.learning_rate(1.0, 5) == pytest.approx(1.0, abs=1e-3)  # the peak after 5%
    assert b.learning_rate(1.0, 100) == pytest.approx(0.1)  # a tenth at the end
    lrs = [b.learning_rate(1.0, s) for s in range(5, 101)]
    assert all(x >= y for x, y in zip(lrs, lrs[1:], strict=False))  # decays monotonically
    assert not b.done(99) and b.done(100)
    assert 0.0 < b.seconds_left(50) <= 3600.0 and b.seconds_left(100) == 0.0
    short = budget.Budget(steps=10**9, minutes=0.0)  # the time budget is spent at once
    assert short.done(1) and short.progress(1) == 1.0
    assert short.seconds_left(1) == 0.0
    assert short.learning_rate(1.0, 1) == pytest.approx(0.1)


def test_a_scheduled_optimizer_takes_the_learning_rate_it_is_given():
    opt = budget.scheduled(lambda learning_rate: optax.sgd(learning_rate))
    params = {"w": np.ones(3, np.float32)}
    state = opt.init(params)
    for lr in (0.5, 0.0):
        state = budget.with_learning_rate(state, lr)
        updates, state = opt.update({"w": np.ones(3, np.float32)}, state, params)
        np.testing.assert_allclose(updates["w"], -lr)


def _render(seed: int, size: int):
    return shapes.render(shapes.sample_scene(np.random.default_rng(seed), size), supersample=1)[
        "image"
    ]


def test_rendering_in_workers_gives_the_data_of_rendering_in_one_process():
    seeds = budget.seeds_from(np.random.default_rng(0), 12)
    assert len(set(seeds.tolist())) == 12
    render = functools.partial(_render, size=16)
    alone = budget.parallel_map(render, seeds, workers=1)
    spread = budget.parallel_map(render, seeds, workers=2, chunksize=2)
    for a, b in zip(alone, spread, strict=True):
        np.testing.assert_array_equal(a, b)
