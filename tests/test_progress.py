"""mgjax.edit.progress.Progress: plain log lines off a terminal, a tqdm bar on one."""

import io
import types

import numpy as np
import pytest

from mgjax.edit.progress import Progress


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def _clock(times):
    ticks = iter(times)
    return lambda: next(ticks)


def _state(step: int):
    return types.SimpleNamespace(step=step)


def _energy(value: float, steps: int = 10, k: int = 2, batch: int = 3) -> dict:
    return {"energy": np.full((steps, k, batch), value, np.float32)}


def test_plain_lines_count_the_rate_from_the_first_chunk():
    lines, stream = [], io.StringIO()
    # 100 steps of K = 2 in chunks of 30, 30, 40 after a first chunk of 10 (compilation):
    # 60 steps in 20 s after the first chunk = 3 steps/s = 6 evaluations/s.
    progress = Progress(100, 2, log=lines.append, stream=stream, clock=_clock([5, 15, 25, 35]))
    for step, value in ((10, 0.5), (40, 0.25), (70, 0.125), (100, 0.0625)):
        progress(_state(step), _energy(value))
    progress.close()
    assert lines == [
        "[steps] 10/100 steps  -- evals/s  ETA --  energy 0.5",
        "[steps] 40/100 steps  6.00 evals/s  ETA 0m20.0s  energy 0.25",
        "[steps] 70/100 steps  6.00 evals/s  ETA 0m10.0s  energy 0.125",
        "[steps] 100/100 steps  6.00 evals/s  ETA 0m00.0s  energy 0.0625",
    ]
    assert stream.getvalue() == ""  # off a terminal nothing is drawn on the stream


def test_plain_energy_of_the_last_guided_step():
    """Unguided steps log NaN energies: the line shows the last finite one, or -- if none."""
    lines = []
    progress = Progress(20, 1, log=lines.append, stream=io.StringIO(), clock=_clock([0, 1]))
    logs = _energy(0.0)
    logs["energy"][:6] = 2.0
    logs["energy"][6, :, 0] = 3.0  # step 6: one image of three finite
    logs["energy"][6, :, 1:] = np.nan
    logs["energy"][7:] = np.nan
    progress(_state(10), logs)
    progress(_state(20), _energy(np.nan))
    assert lines[0].endswith("energy 3") and lines[1].endswith("energy --")
    assert "ETA 0m00.0s" in lines[1] and "10.00 evals/s" in lines[1]


def test_plain_resumed_run_counts_from_where_it_resumed():
    lines = []
    progress = Progress(100, 4, log=lines.append, stream=io.StringIO(), clock=_clock([0, 2]))
    progress(_state(60), _energy(1.0))  # resumed at 50, first chunk of 10
    progress(_state(80), _energy(1.0))  # 20 steps in 2 s: 10 steps/s, 40 evaluations/s
    assert lines[1] == "[steps] 80/100 steps  40.00 evals/s  ETA 0m02.0s  energy 1"


def test_terminal_draws_a_tqdm_bar_to_the_final_count():
    lines, stream = [], _Terminal()
    progress = Progress(50, 2, log=lines.append, stream=stream, clock=_clock([0, 4, 8]))
    assert progress.bar is not None
    for step in (10, 30, 50):
        progress(_state(step), _energy(0.75))
    assert progress.bar.n == 50 and progress.bar.total == 50
    progress.close()
    assert lines == []  # the bar replaces the log lines
    last = stream.getvalue().rstrip("\n").split("\r")[-1]
    assert "50/50 steps" in last and "100%" in last
    assert "10.00 evals/s" in last and "energy 0.75" in last


def test_terminal_first_chunk_has_no_rate():
    stream = _Terminal()
    with Progress(40, 3, stream=stream, clock=_clock([0])) as progress:
        progress(_state(8), _energy(0.5))
        assert progress.bar.n == 8
    last = stream.getvalue().rstrip("\n").split("\r")[-1]
    assert "8/40 steps" in last and "-- evals/s" in last and "ETA --" in last


@pytest.mark.parametrize("stream", [io.StringIO(), object()])
def test_streams_that_are_not_terminals_get_plain_lines(stream):
    lines = []
    progress = Progress(10, 1, log=lines.append, stream=stream, clock=_clock([0]))
    progress(_state(10), _energy(1.0))
    progress.close()
    assert progress.bar is None and lines == ["[steps] 10/10 steps  -- evals/s  ETA --  energy 1"]
