"""Sampling progress, reported after each chunk: a live tqdm bar on a terminal, one plain log
line per chunk anywhere else (a log file, a pipe, a batch job's output).

The rate counts from the end of the first chunk: that chunk includes compilation, so until a
second chunk has run the rate and the ETA are unknown ("--").
"""

import math
import sys
import time
from collections.abc import Callable
from typing import Protocol, TextIO

import numpy as np
from tqdm import tqdm


class _HasStep(Protocol):
    step: int  # DDIM steps done so far


def _last_energy(logs: dict) -> float:
    """Mean energy of the chunk's last step that has a finite one (unguided steps log NaN)."""
    if "energy" not in logs:
        return math.nan
    energy = np.asarray(logs["energy"], np.float64)  # f[L,K,B]
    rows = energy.reshape(energy.shape[0], -1)
    for row in rows[::-1]:
        finite = row[np.isfinite(row)]
        if finite.size:
            return float(finite.mean())
    return math.nan


def _duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "--"
    return f"{math.floor(seconds / 60):d}m{seconds % 60:04.1f}s"


def _number(value: float, spec: str) -> str:
    return "--" if not math.isfinite(value) else format(value, spec)


class Progress:
    """Sampling progress, reported by calling `progress(state, logs)` after each chunk.

    Args:
      total_steps: DDIM steps of the whole run.
      recursive_steps: evaluations per step (K, or the mean under the cost levers:
        mgjax.method.cost.evaluations_per_step); evals/s = steps/s x K.
      log: where the plain lines go (one per chunk) when `stream` is not a terminal.
      stream: whose isatty() picks the mode, and where the bar is drawn (default sys.stderr).
      clock: monotonic seconds.

    `state.step` is the DDIM steps done so far; `logs["energy"]` is f32[L,K,B] for the chunk's
    L steps (NaN where a step ran unguided). Call `close()` at the end, or use a `with` block.
    """

    def __init__(
        self,
        total_steps: int,
        recursive_steps: float,
        log: Callable[[str], object] = print,
        stream: TextIO | None = None,
        *,
        clock: Callable[[], float] = time.perf_counter,
    ):
        self.total, self.k, self.log, self.clock = total_steps, recursive_steps, log, clock
        self.stream = sys.stderr if stream is None else stream
        self.start: tuple[int, float] | None = None  # (steps, time) at the first chunk's end
        self.bar = None
        isatty = getattr(self.stream, "isatty", None)
        if isatty is not None and isatty():
            self.bar = tqdm(
                total=total_steps,
                unit="step",
                file=self.stream,
                dynamic_ncols=True,
                mininterval=0,  # chunks are seconds apart: draw every one
                bar_format="{l_bar}{bar}| {n_fmt}/{total_fmt} steps [{elapsed}{postfix}]",
                postfix="first chunk",
            )

    def measure(self, state: _HasStep, logs: dict) -> dict:
        """The figures after a chunk: steps done and total, steps/s, evals/s, ETA (s) and the
        chunk's last finite energy (NaN while unknown)."""
        done, now = int(state.step), self.clock()
        if self.start is None:
            self.start = (done, now)
            rate = math.nan  # steps/s
        else:
            rate = (done - self.start[0]) / max(now - self.start[1], 1e-9)
        eta = (self.total - done) / rate if rate > 0 else math.nan
        return dict(
            done=done,
            total=self.total,
            steps_per_s=rate,
            evals_per_s=rate * self.k,
            eta_s=eta,
            energy=_last_energy(logs),
        )

    def __call__(self, state: _HasStep, logs: dict) -> None:
        f = self.measure(state, logs)
        done, eta = f["done"], f["eta_s"]
        evals = _number(f["evals_per_s"], ".2f")
        energy = _number(f["energy"], ".4g")
        if self.bar is not None:
            text = f"{evals} evals/s, ETA {_duration(eta)}, energy {energy}"
            self.bar.set_postfix_str(text, refresh=False)
            if done != self.bar.n:
                self.bar.update(done - self.bar.n)  # redraws: no minimum interval
            else:
                self.bar.refresh()
        else:
            self.log(
                f"[steps] {done}/{self.total} steps  {evals} evals/s  ETA {_duration(eta)}  "
                f"energy {energy}"
            )

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
