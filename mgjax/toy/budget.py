"""What the toy training scripts share: a training length given as steps and minutes (whichever
ends first drives the learning-rate schedule, so that a run cut by its time budget still ends
on a decayed learning rate, on 2 CPU cores or on a GPU alike), and scenes rendered in worker
processes (rendering is numpy on one core; on a GPU machine it would otherwise starve the
accelerator).

  budget = Budget(steps=4000, minutes=30)
  opt = scheduled(lambda lr: optax.adamw(lr, 1e-4))
  state = opt.init(params)
  while not budget.done(step):
      state = with_learning_rate(state, budget.learning_rate(peak, step))
      ...
  images = parallel_map(render_one, seeds_from(rng, n))
"""

import concurrent.futures
import multiprocessing
import os
import time

import numpy as np
import optax

from flow.errors import InputError


class Budget:
    """A training run's length: at most `steps` steps and at most `minutes` of wall time,
    counted from construction (compilation included)."""

    def __init__(self, steps: int, minutes: float):
        self.steps = max(int(steps), 1)
        self.seconds = max(float(minutes), 0.0) * 60.0
        self.start = time.perf_counter()

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def progress(self, step: int) -> float:
        """Share of the run done after `step` steps: the larger of the step and time shares."""
        by_time = self.elapsed() / self.seconds if self.seconds > 0 else 1.0
        return float(min(max(step / self.steps, by_time), 1.0))

    def seconds_left(self, step: int) -> float:
        """The run's remaining wall time at its rate so far: the sooner of its step and time
        limits."""
        elapsed = self.elapsed()
        rate = step / max(elapsed, 1e-9)
        return max(min((self.steps - step) / max(rate, 1e-9), self.seconds - elapsed), 0.0)

    def done(self, step: int) -> bool:
        return step >= self.steps or self.elapsed() >= self.seconds

    def learning_rate(self, peak: float, step: int, warmup: float = 0.05, end: float = 0.1):
        """Linear warm-up over the first `warmup` of the run, then cosine decay to
        `end` x peak at its end."""
        p = self.progress(step)
        if p < warmup:
            return peak * p / warmup
        q = (p - warmup) / max(1.0 - warmup, 1e-9)
        return peak * (end + (1.0 - end) * 0.5 * (1.0 + np.cos(np.pi * q)))


def finite(value: float) -> bool:
    """Whether a number is finite (False for NaN and the infinities), for refuse_unless."""
    return abs(value) < float("inf")


def refuse_unless(*rules: tuple[str, object, bool, str]) -> None:
    """Each rule: (flag, value, whether the value is one the run can use, the fix). The first
    that fails is one InputError naming the flag, its value and the fix, before any work; the
    callers write each test as a comparison that NaN fails."""
    for flag, value, ok, fix in rules:
        if not ok:
            raise InputError(f"--{flag} {value}: {fix}")


def device_description() -> str:
    """What a training log records as its device: JAX's first device and the host's cores."""
    import jax

    device = jax.devices()[0]
    return f"{device.platform}: {device.device_kind}, {os.cpu_count()} cores"


def scheduled(make) -> optax.GradientTransformation:
    """An optimizer `make(learning_rate)` whose learning rate is set at each step
    (`with_learning_rate`), outside the compiled step."""
    return optax.inject_hyperparams(make)(learning_rate=0.0)


def with_learning_rate(state, lr: float):
    state.hyperparams["learning_rate"] = np.asarray(lr, np.float32)
    return state


def seeds_from(rng: np.random.Generator, n: int) -> np.ndarray:
    """n independent seeds drawn from `rng`: one per rendered item, so that the data do not
    depend on how many workers render them."""
    return rng.integers(0, 2**62, n)


def parallel_map(fn, seeds, workers: int | None = None, chunksize: int = 64) -> list:
    """[fn(seed) for seed in seeds] in `workers` processes (default: every core). `fn` is a
    module-level function. Processes are spawned, never forked: the parent holds a JAX runtime."""
    seeds = [int(s) for s in seeds]
    workers = workers or os.cpu_count() or 1
    if workers <= 1 or len(seeds) < 2 * chunksize:
        return [fn(s) for s in seeds]
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(workers, mp_context=context) as pool:
        return list(pool.map(fn, seeds, chunksize=chunksize))
