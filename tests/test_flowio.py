"""Middlebury .flo I/O, colour-wheel rendering and end-point error."""

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from flow.errors import InputError
from flow.flo import read_flo, write_flo
from flow.metrics import epe
from flow.viz import color_wheel, flow_to_color, save_flow_png

jax.config.update("jax_default_matmul_precision", "highest")


def test_flo_round_trip(tmp_path: Path) -> None:
    flow = np.random.default_rng(0).normal(size=(5, 7, 2)).astype(np.float32)
    path = tmp_path / "a.flo"
    write_flo(path, flow)
    back = read_flo(path)
    assert back.dtype == np.float32 and back.shape == (5, 7, 2)
    np.testing.assert_array_equal(back, flow)
    assert [p.name for p in tmp_path.iterdir()] == ["a.flo"]  # no temp file left behind


def test_flo_layout_is_middlebury(tmp_path: Path) -> None:
    flow = np.arange(2 * 3 * 2, dtype=np.float32).reshape(2, 3, 2)
    path = tmp_path / "b.flo"
    write_flo(path, flow)
    data = path.read_bytes()
    assert np.frombuffer(data[:4], "<f4")[0] == np.float32(202021.25)
    assert list(np.frombuffer(data[4:12], "<i4")) == [3, 2]  # width, then height
    np.testing.assert_array_equal(np.frombuffer(data[12:], "<f4"), np.arange(12))


def test_write_flo_replaces_existing_file(tmp_path: Path) -> None:
    path = tmp_path / "c.flo"
    write_flo(path, np.zeros((4, 4, 2), np.float32))
    write_flo(path, np.ones((2, 3, 2), np.float32))
    np.testing.assert_array_equal(read_flo(path), np.ones((2, 3, 2), np.float32))


def test_flo_bad_magic(tmp_path: Path) -> None:
    path = tmp_path / "bad.flo"
    path.write_bytes(
        np.array([1.0], "<f4").tobytes() + np.array([1, 1], "<i4").tobytes() + bytes(8)
    )
    with pytest.raises(InputError, match="not a .flo file"):
        read_flo(path)


@pytest.mark.parametrize("keep", [3, 12, 12 + 8 * 6 - 4])
def test_flo_truncated(tmp_path: Path, keep: int) -> None:
    path = tmp_path / "t.flo"
    write_flo(path, np.ones((2, 3, 2), np.float32))
    path.write_bytes(path.read_bytes()[:keep])
    with pytest.raises(InputError, match="truncated"):
        read_flo(path)


def test_flo_missing_file(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="no such"):
        read_flo(tmp_path / "missing.flo")


def test_write_flo_into_missing_directory(tmp_path: Path) -> None:
    with pytest.raises(InputError):
        write_flo(tmp_path / "nope" / "x.flo", np.zeros((1, 1, 2), np.float32))


def test_color_wheel_segments() -> None:
    wheel = color_wheel()
    assert wheel.shape == (55, 3)
    assert tuple(wheel[0]) == (255, 0, 0)  # red, start of red -> yellow
    assert tuple(wheel[15]) == (255, 255, 0)  # yellow
    assert tuple(wheel[21]) == (0, 255, 0)  # green
    assert tuple(wheel[25]) == (0, 255, 255)  # cyan
    assert tuple(wheel[36]) == (0, 0, 255)  # blue
    assert tuple(wheel[49]) == (255, 0, 255)  # magenta
    assert tuple(wheel[54]) == (255, 0, 255 - 212)  # last magenta -> red step


def _color(u: float, v: float, max_norm: float | None = None) -> tuple[int, ...]:
    return tuple(int(c) for c in flow_to_color(np.array([[[u, v]]], np.float32), max_norm)[0, 0])


def test_zero_flow_is_white() -> None:
    out = flow_to_color(np.zeros((3, 4, 2), np.float32))
    assert out.dtype == np.uint8 and out.shape == (3, 4, 3)
    assert (out == 255).all()


def test_flow_directions() -> None:
    # (+1, 0): atan2(-0, -1) = -pi -> column 0 of the wheel, pure red.
    assert _color(1.0, 0.0) == (255, 0, 0)
    assert _color(1.0, -0.0) == (255, 0, 0)
    # (0, +1): angle -1/2 -> fk = 13.5, halfway between (255, 221, 0) and (255, 238, 0).
    assert _color(0.0, 1.0) == (255, 229, 0)
    # (-1, 0): angle 0 -> fk = 27, the third cyan -> blue step: (0, 255 - 46, 255).
    assert _color(-1.0, 0.0) == (0, 209, 255)
    # (0, -1): angle 1/2 -> fk = 40.5, halfway between (78, 0, 255) and (98, 0, 255).
    assert _color(0.0, -1.0) == (88, 0, 255)


def test_saturation_and_dimming_with_max_norm() -> None:
    assert _color(0.5, 0.0, max_norm=1.0) == (255, 127, 127)  # half saturation
    assert _color(2.0, 0.0, max_norm=1.0) == (191, 0, 0)  # beyond radius 1: dimmed by 0.75
    # Without max_norm the largest vector is fully saturated.
    field = np.array([[[2.0, 0.0], [1.0, 0.0]]], np.float32)
    out = flow_to_color(field)
    assert tuple(out[0, 0]) == (255, 0, 0) and tuple(out[0, 1]) == (255, 127, 127)


def test_save_flow_png(tmp_path: Path) -> None:
    flow = np.random.default_rng(1).normal(size=(6, 9, 2)).astype(np.float32)
    path = tmp_path / "f.png"
    save_flow_png(path, flow)
    np.testing.assert_array_equal(np.asarray(Image.open(path)), flow_to_color(flow))


def test_epe_analytic() -> None:
    pred = np.zeros((2, 3, 2), np.float32)
    target = np.zeros((2, 3, 2), np.float32)
    target[..., 0], target[..., 1] = 3.0, 4.0
    assert float(epe(pred, target)) == pytest.approx(5.0)
    assert float(epe(target, target)) == 0.0
    target[0] = 0.0  # first row now exact: mean of 0 and 5
    assert float(epe(pred, target)) == pytest.approx(2.5)
    mask = np.array([[0, 0, 0], [1, 1, 0]], np.float32)
    assert float(epe(pred, target, mask)) == pytest.approx(5.0)
    assert float(epe(pred, target, np.zeros((2, 3)))) == 0.0


def test_epe_gradient_is_finite_at_zero_error() -> None:
    target = jnp.array([[1.0, 2.0], [3.0, 4.0]])
    pred = target.at[1].add(jnp.array([0.6, 0.8]))
    grad = jax.grad(epe)(pred, target)
    np.testing.assert_allclose(np.asarray(grad), [[0.0, 0.0], [0.3, 0.4]], atol=1e-6)
