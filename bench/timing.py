"""Timing and cost functions shared by the benchmark scripts."""

import statistics
import time


def median_time(fn, repeats: int) -> float:
    """Median wall time of fn() over `repeats` calls, after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def xla_flops(compiled) -> float | None:
    """XLA's FLOP count of a compiled computation (a loop body counted once), or None where
    the backend has no cost analysis."""
    try:
        cost = compiled.cost_analysis()
    except Exception:  # not every backend implements it
        return None
    cost = cost[0] if isinstance(cost, list | tuple) else cost
    return float(cost["flops"]) if cost and "flops" in cost else None


def memory_row(name: str, batch: int, compiled, compile_s: float) -> dict:
    """XLA's memory analysis of a compiled program (arguments and temporaries, GiB) as a row,
    printed as one JSON line."""
    import json

    mem = compiled.memory_analysis()
    row = dict(
        name=name,
        batch=batch,
        compile_s=compile_s,
        arg_gib=mem.argument_size_in_bytes / 2**30,
        temp_gib=mem.temp_size_in_bytes / 2**30,
    )
    print(json.dumps(row), flush=True)
    return row
