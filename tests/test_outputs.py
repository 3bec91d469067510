"""Loss curves (mgjax.edit.outputs.loss_plot): size, a drawn curve, NaN entries, determinism;
the panel and toggle GIF show small images enlarged pixel for pixel."""

import numpy as np
import pytest

from mgjax.edit import outputs


def _curve_pixels(image: np.ndarray) -> np.ndarray:
    """bool[H,W]: the curves' red (matplotlib's tab:red), not text, grid or axes."""
    r, g, b = (image[..., c].astype(int) for c in range(3))
    return (r > 150) & (g < 110) & (b < 110)


def _decay(n: int) -> np.ndarray:
    return np.exp(-np.arange(n) / (n / 4)) + 0.1


@pytest.mark.parametrize("size", [(640, 420), (333, 211)])
def test_size_and_dtype(size):
    image = outputs.loss_plot({"energy": _decay(50), "flow_loss": _decay(50) / 2}, size=size)
    assert image.shape == (size[1], size[0], 3) and image.dtype == np.uint8


def test_draws_one_falling_curve_per_term():
    terms = ["energy", "flow_loss", "color_loss", "keep_loss"]
    image = outputs.loss_plot({k: _decay(100) * (n + 1) for n, k in enumerate(terms)})
    red = _curve_pixels(image)
    h, w = red.shape
    # Four terms: a 2 x 2 grid of panels, each with its curve.
    for rows in (slice(0, h // 2), slice(h // 2, h)):
        for cols in (slice(0, w // 2), slice(w // 2, w)):
            ys, xs = np.nonzero(red[rows, cols])
            assert xs.size > 100
            # The curve falls: its left end sits higher (a smaller row) than its right end
            # (the legend's red sample lies between the two, left of its label).
            assert ys[xs == xs.min()].mean() < ys[xs == xs.max()].mean()
    assert (image > 250).all(-1).mean() > 0.5  # mostly white background, not a blank fill


def test_nan_entries_are_left_out():
    """Unguided evaluations log NaN: the finite entries are drawn where they are, and the NaN
    tail stays empty across the whole x range."""
    y = _decay(200)
    y[1::2] = np.nan  # guided every other evaluation
    y[100:] = np.nan  # no guidance in the second half

    def span(image):
        """First and last column of the curve: its start at the top left, its end in the
        lower half (below the legend's red sample)."""
        red = _curve_pixels(image)
        return np.nonzero(red.any(0))[0].min(), np.nonzero(red[red.shape[0] // 2 :].any(0))[0].max()

    image = outputs.loss_plot({"energy": y})
    assert _curve_pixels(image).sum() > 200  # alternate NaNs do not leave isolated dots
    first, last = span(image)
    full_first, full_last = span(outputs.loss_plot({"energy": _decay(200)}))
    # Same x range, half the curve: it ends about halfway along the full curve's span.
    assert abs(first - full_first) <= 2
    assert 0.4 < (last - first) / (full_last - full_first) < 0.6


def test_curve_without_finite_entries_and_no_curves():
    for curves in ({"energy": np.full(30, np.nan)}, {"energy": np.zeros(0)}, {}):
        image = outputs.loss_plot(curves)
        assert image.shape == (420, 640, 3)
        assert not _curve_pixels(image).any()
        assert (image < 100).all(-1).any()  # axes and the panel's note are drawn


def test_deterministic():
    y = _decay(80)
    y[::3] = np.nan
    curves = {"energy": y, "flow_loss": y * 2}
    np.testing.assert_array_equal(outputs.loss_plot(curves), outputs.loss_plot(curves))


@pytest.mark.parametrize("size, zoom", [(64, 3), (100, 2), (192, 1), (512, 1)])
def test_panel_shows_small_images_enlarged_pixel_for_pixel(size, zoom, tmp_path):
    from PIL import Image

    rng = np.random.default_rng(size)
    source = rng.random((size, size, 3)).astype(np.float32)
    edited = rng.random((size, size, 3)).astype(np.float32)
    flow = rng.normal(size=(size, size, 2))
    assert outputs.view_zoom(size) == zoom
    image = outputs.panel(source, flow, edited, flow)
    view = size * zoom
    assert image.shape == (view + 14, 5 * view, 3)
    shown = image[14:, 2 * view : 3 * view]  # the edit's tile, below the label bar
    want = outputs.to_uint8(edited)
    for dy in range(zoom):
        for dx in range(zoom):
            np.testing.assert_array_equal(shown[dy::zoom, dx::zoom], want)
    outputs.save_toggle_gif(str(tmp_path / "t.gif"), outputs.to_uint8(source), want)
    gif = Image.open(tmp_path / "t.gif")
    assert gif.size == (view, view) and gif.n_frames == 2
