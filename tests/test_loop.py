"""mgjax.method.loop (the one sampling loop) and mgjax.edit.checkpoint, with a stand-in sampler."""

import dataclasses

import jax.numpy as jnp
import numpy as np
import pytest

from flow.errors import InputError
from mgjax.edit.checkpoint import Checkpoint
from mgjax.method import loop
from mgjax.method.guidance import SamplerState
from mgjax.method.sampler import DivergenceError


@dataclasses.dataclass
class Steps:
    steps: int


class Counting:
    """Adds 1 to z per DDIM step, chunks of 2; logs the step index; diverges at `bad`."""

    loops = "scan"

    def __init__(self, steps=5, bad=None):
        self.method, self.bad, self.compile_seconds = Steps(steps), bad, 0.0

    def advance(self, inputs, state):
        start = int(state.step)
        n = min(2, self.method.steps - start)
        if self.bad is not None and start <= self.bad < start + n:
            raise DivergenceError("diverged", (0,))
        self.compile_seconds += 1.0 if start == 0 else 0.0
        logs = {"energy": np.arange(start, start + n, dtype=np.float32).reshape(n, 1, 1)}
        new = state.replace(z=state.z + n, step=state.step + n)
        return new, logs, {start: np.zeros((1, 2, 2, 3))}


def _state():
    return SamplerState(z=jnp.zeros((1, 1)), step=jnp.asarray(0), keys=jnp.zeros((1, 2)))


def test_hooks_run_in_order_and_logs_join():
    calls = []
    result = loop.run(
        Counting(),
        None,
        _state(),
        checkpoint=lambda s, logs: calls.append(("checkpoint", int(s.step), len(logs["energy"]))),
        on_snapshots=lambda snaps: calls.append(("snapshots", sorted(snaps))),
        progress=lambda s, logs: calls.append(("progress", int(s.step))),
        log=lambda line: calls.append(("log", line)),
    )
    assert result.finished and int(result.state.step) == 5 and float(result.state.z[0, 0]) == 5
    np.testing.assert_array_equal(result.logs["energy"].ravel(), np.arange(5))
    assert calls[:4] == [
        ("checkpoint", 2, 1),
        ("snapshots", [0]),
        ("log", "compiled the guided sampler (scan) in 1.0 s"),
        ("progress", 2),
    ]
    assert [c[1] for c in calls if c[0] == "checkpoint"] == [2, 4, 5]


def test_stop_continue_and_divergence():
    sampler = Counting()
    part = loop.run(sampler, None, _state(), should_stop=lambda: True)
    assert not part.finished and int(part.state.step) == 2
    rest = loop.run(sampler, None, part.state, logs={"energy": [part.logs["energy"]]})
    np.testing.assert_array_equal(rest.logs["energy"].ravel(), np.arange(5))
    saved = []
    with pytest.raises(DivergenceError):
        loop.run(Counting(bad=3), None, _state(), checkpoint=lambda s, _: saved.append(int(s.step)))
    assert saved == [2]  # the last checkpoint is the one before the diverged chunk


def test_checkpoint_roundtrip_and_other_settings_refused(tmp_path):
    state = SamplerState(
        z=jnp.arange(4.0).reshape(1, 4), step=jnp.asarray(3), keys=jnp.ones((1, 2), jnp.uint32)
    )
    ckpt = Checkpoint(tmp_path / "c.npz", "abc")
    assert not ckpt.exists()
    ckpt.save(state, {"energy": [np.ones((3, 1, 1))]}, seconds=np.float64(2.5))
    template = SamplerState(
        z=jnp.zeros((1, 4)), step=jnp.asarray(0), keys=jnp.zeros((1, 2), jnp.uint32)
    )
    back, logs, extra = ckpt.load(template)
    np.testing.assert_array_equal(back.z, state.z)
    assert int(back.step) == 3 and float(extra["seconds"]) == 2.5
    assert logs["energy"][0].shape == (3, 1, 1)
    with pytest.raises(InputError, match="other settings"):
        Checkpoint(tmp_path / "c.npz", "xyz").load(template)
    with pytest.raises(InputError, match=r"has shape \(1, 4\), want \(1, 1\)"):
        ckpt.load(_state())  # a state of another shape than the run's
    ckpt.remove()
    assert not ckpt.exists() and list(tmp_path.iterdir()) == []
