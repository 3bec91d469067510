"""The one sampling loop: a guided run from a state to the end, chunk by chunk, with hooks.

Every entry point (launch.py's edit, --jobs batches, bench/toy_quality) runs its edits through
`run`; what differs between them (where checkpoints go, how progress is shown, when to stop) is
passed in as callbacks.
"""

import dataclasses
import time
from collections.abc import Callable

import numpy as np


@dataclasses.dataclass
class Result:
    state: object  # mgjax.method.guidance.SamplerState where the run stopped
    logs: dict  # name -> f32[S,K,B], every chunk so far (a resumed run's earlier ones too)
    finished: bool  # False: `should_stop` ended it early
    seconds: float  # sampling time of this call, compilation included


def run(
    sampler,
    inputs,
    state,
    logs: dict | None = None,
    checkpoint: Callable | None = None,
    on_snapshots: Callable | None = None,
    progress: Callable | None = None,
    should_stop: Callable[[], bool] | None = None,
    log: Callable[[str], None] | None = None,
) -> Result:
    """Advance `state` with `sampler` (mgjax.method.sampler.Sampler) to its last DDIM step.

    After each chunk, in this order: checkpoint(state, logs name -> list of chunks),
    on_snapshots({step: f32[B,H,W,3]}), progress(state, chunk logs name -> f32[L,K,B]), then
    should_stop() (True ends the run here, with finished False, unless that was the last
    chunk). `logs`: the chunks of an earlier part of the run (name -> list), continued.
    DivergenceError propagates; the last checkpoint stays as it was.
    """
    logs = {k: list(v) for k, v in (logs or {}).items()}
    total = sampler.method.steps
    t0, compiled_before, first = time.perf_counter(), sampler.compile_seconds, True
    while int(state.step) < total:
        state, chunk_logs, snapshots = sampler.advance(inputs, state)
        for k, v in chunk_logs.items():
            logs.setdefault(k, []).append(v)
        if checkpoint is not None:
            checkpoint(state, logs)
        if on_snapshots is not None and snapshots:
            on_snapshots(snapshots)
        if first and log is not None and sampler.compile_seconds > compiled_before:
            took = sampler.compile_seconds - compiled_before
            log(f"compiled the guided sampler ({sampler.loops}) in {took:.1f} s")
        first = False
        if progress is not None:
            progress(state, chunk_logs)
        if should_stop is not None and should_stop() and int(state.step) < total:
            break  # asked after every chunk, the last one too
    joined = {k: np.concatenate(v) for k, v in logs.items()}
    finished = int(state.step) >= total
    return Result(state, joined, finished, time.perf_counter() - t0)
