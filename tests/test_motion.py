"""Motion primitives vs their analytic formulas, composition, masks, the automatic frozen mask."""

import warnings

import numpy as np
import pytest

from flow.errors import InputError
from mgjax.edit.motion import (
    auto_frozen_mask,
    box_mask,
    centroid,
    dilate_mask,
    grow_mask,
    in_frame,
    landing,
    motion_flow,
    parse_motion,
)

H, W = 48, 64
YS, XS = np.mgrid[0:H, 0:W].astype(np.float64)


def _flow(spec, center=(0.0, 0.0), mask=None):
    return motion_flow(parse_motion(spec, center), H, W, mask).astype(np.float64)


def test_translate():
    f = _flow("translate:5,-3.5")
    np.testing.assert_allclose(f[..., 0], 5.0)
    np.testing.assert_allclose(f[..., 1], -3.5)


@pytest.mark.parametrize("deg", [30.0, -90.0, 180.0])
def test_rotate_is_the_true_displacement(deg):
    """f = (R - I)(p - c), R counter-clockwise on screen (y down): not the GUI's R(p - c)."""
    cx, cy = 20.0, 10.0
    f = _flow(f"rotate:{deg}@{cx},{cy}")
    t = np.deg2rad(deg)
    dx, dy = XS - cx, YS - cy
    # counter-clockwise on screen = clockwise in y-down maths coordinates
    ex = np.cos(t) * dx + np.sin(t) * dy - dx
    ey = -np.sin(t) * dx + np.cos(t) * dy - dy
    np.testing.assert_allclose(f[..., 0], ex, atol=1e-4)
    np.testing.assert_allclose(f[..., 1], ey, atol=1e-4)
    assert np.abs(f[int(cy), int(cx)]).max() < 1e-4  # the centre stays


def test_rotate_90_moves_right_of_centre_to_above():
    f = _flow("rotate:90@10,10")
    np.testing.assert_allclose(f[10, 20], [-10.0, -10.0], atol=1e-4)  # (20,10) -> (10,0)


def test_scale_and_default_centre():
    f = _flow("scale:1.5", center=(30.0, 20.0))
    np.testing.assert_allclose(f[..., 0], 0.5 * (XS - 30.0), atol=1e-4)
    np.testing.assert_allclose(f[..., 1], 0.5 * (YS - 20.0), atol=1e-4)


def test_stretch_along_direction():
    s, deg, c = 1.3, 30.0, np.array([32.0, 24.0])
    f = _flow(f"stretch:{s},{deg}@32,24")
    d = np.array([np.cos(np.deg2rad(deg)), -np.sin(np.deg2rad(deg))])
    proj = (XS - c[0]) * d[0] + (YS - c[1]) * d[1]
    np.testing.assert_allclose(f[..., 0], (s - 1) * proj * d[0], atol=1e-4)
    np.testing.assert_allclose(f[..., 1], (s - 1) * proj * d[1], atol=1e-4)


def test_homography_maps_the_four_points():
    src = [(10, 10), (50, 10), (50, 40), (10, 40)]
    dst = [(12, 14), (48, 8), (52, 44), (6, 38)]
    spec = "homography:" + ",".join(f"{x},{y}" for x, y in src) + ":"
    spec += ",".join(f"{x},{y}" for x, y in dst)
    f = _flow(spec)
    for (x, y), (u, v) in zip(src, dst, strict=True):
        np.testing.assert_allclose(f[y, x], [u - x, v - y], atol=1e-3)
    # a pure translation written as a homography is that translation everywhere
    g = _flow("homography:0,0,10,0,10,10,0,10:3,4,13,4,13,14,3,14")
    np.testing.assert_allclose(g, _flow("translate:3,4"), atol=1e-4)


def test_composition_applies_left_to_right():
    f = _flow("rotate:90@0,0+translate:10,0")
    # p -> R p -> R p + (10, 0)
    ex = YS + 10.0 - XS  # R(x, y) = (y, -x) for 90 deg counter-clockwise on screen
    ey = -XS - YS
    np.testing.assert_allclose(f[..., 0], ex, atol=1e-4)
    np.testing.assert_allclose(f[..., 1], ey, atol=1e-4)
    other = _flow("translate:10,0+rotate:90@0,0")
    assert np.abs(other - f).max() > 1.0  # order matters


def test_mask_and_box():
    mask = box_mask("8,4,24,20", H, W)
    assert mask.sum() == 16 * 16 and mask[4, 8] and not mask[20, 24]
    assert centroid(mask) == (15.5, 11.5)
    f = _flow("translate:3,0", mask=mask)
    assert (f[mask] == [3.0, 0.0]).all() and (f[~mask] == 0).all()


@pytest.mark.parametrize(
    "spec, message",
    [
        ("translate:1", "needs 2 numbers"),
        ("rotate:abc", "not a list of numbers"),
        ("twist:3", "unknown motion 'twist'"),
        ("scale:-1", "must be > 0"),
        ("homography:0,0,1,1,2,2,3,3:0,0,1,1,2,2,3,3", "collinear"),
        ("homography:0,0,1,0,1,1,0,1", "needs source and target"),
        ("", "empty"),
    ],
)
def test_syntax_errors_show_an_example(spec, message):
    with pytest.raises(InputError, match=message):
        parse_motion(spec, (0.0, 0.0))
    if "numbers" in message or "unknown" in message:
        with pytest.raises(InputError, match="e.g. rotate:30"):
            parse_motion(spec, (0.0, 0.0))


def test_box_errors():
    with pytest.raises(InputError, match="needs 0 <= x0 < x1"):
        box_mask("10,10,5,20", H, W)


def test_auto_frozen_mask_known_case():
    """A 16x16 square at (16..32, 16..32) moved 8 px right, factor 8 latents, dilation 1."""
    mask = box_mask("16,16,32,32", H, W)
    flow = _flow("translate:8,0", mask=mask).astype(np.float32)
    frozen = auto_frozen_mask(flow, factor=8, dilate=1)
    assert frozen.shape == (1, 1, 6, 8) and frozen.dtype == bool
    editable = ~frozen[0, 0]
    expected = np.zeros((6, 8), bool)
    expected[2:4, 2:5] = True  # source cells x 2..3, landing x 3..4 (pixels 24..39), y 2..3
    expected[1:5, 1:6] = True  # dilated by one latent pixel
    np.testing.assert_array_equal(editable, expected)


def test_auto_frozen_mask_edge_cases():
    zero = np.zeros((H, W, 2), np.float32)
    assert not auto_frozen_mask(zero, 8).any()  # nothing moves: nothing frozen
    mask = box_mask("0,0,16,16", H, W)
    away = _flow("translate:-100,0", mask=mask).astype(np.float32)
    with pytest.raises(InputError, match="entirely out of the frame"):
        auto_frozen_mask(away, 8)


@pytest.mark.parametrize("px", [0, 1, 2, 5])
def test_grow_mask_is_a_four_connected_dilation(px):
    from scipy import ndimage

    rng = np.random.default_rng(px)
    mask = rng.uniform(size=(H, W)) > 0.97
    mask[0, 5] = mask[H - 1, W - 1] = True  # pixels on the frame's edge
    want = ndimage.binary_dilation(mask, iterations=px) if px else mask
    np.testing.assert_array_equal(grow_mask(mask, px), want)


@pytest.mark.parametrize("radius", [0, 1, 3, 7])
def test_dilate_mask_is_a_square_dilation(radius):
    from scipy import ndimage

    rng = np.random.default_rng(radius)
    mask = rng.uniform(size=(H, W)) > 0.98
    mask[0, 5] = mask[H - 1, W - 1] = True
    square = np.ones((2 * radius + 1, 2 * radius + 1), bool)
    want = ndimage.binary_dilation(mask, square) if radius else mask
    np.testing.assert_array_equal(dilate_mask(mask, radius), want)


def test_growing_and_dilating_stop_once_nothing_changes():
    """A radius far past the frame costs no more than the frame's size: the loops stop once
    the mask fills the frame (or, empty, never changes)."""
    import time

    mask = np.zeros((H, W), bool)
    mask[10:12, 20:22] = True
    t = time.perf_counter()
    assert grow_mask(mask, 10**12).all() and dilate_mask(mask, 10**12).all()
    assert not grow_mask(~np.ones((H, W), bool), 10**12).any()
    assert not dilate_mask(np.zeros((H, W), bool), 10**12).any()
    assert time.perf_counter() - t < 2.0


def test_mask_grow_widens_the_flow_and_keeps_the_motion_and_its_centre():
    from mgjax import config as C
    from mgjax.edit.workflow import target

    box = "20,12,36,28"
    plain, obj = target(C.make(out_dir="o", motion="rotate:30", object_box=box), None, H, W)
    config = C.make(out_dir="o", motion="rotate:30", object_box=box, mask_grow=3)
    grown, obj_grown = target(config, None, H, W)
    np.testing.assert_array_equal(obj_grown, obj)  # the object is still the one given
    region = grow_mask(obj, 3)
    # the same rotation about the object's centre, now over the object and 3 px around it
    want = _flow("rotate:30", centroid(obj), region)
    np.testing.assert_allclose(grown, want, atol=1e-5)
    np.testing.assert_array_equal(grown[obj], plain[obj])
    assert np.any(grown[region & ~obj] != 0) and not np.any(grown[~region])
    with pytest.raises(ValueError, match="mask_grow must be >= 0"):
        C.make(out_dir="o", mask_grow=-1)


@pytest.mark.parametrize("shift", [1e30, -1e30, 3e38])
def test_a_motion_far_out_of_the_frame_is_refused_without_warnings(shift):
    """Landing positions are compared with the frame in floating point, so a shift of any
    size is refused with the out-of-frame message alone (no cast of a huge value)."""
    flow = np.zeros((16, 16, 2), np.float32)
    flow[4:8, 4:8, 0] = shift
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert not landing(flow, np.any(flow != 0, axis=-1)).any()
        with pytest.raises(InputError, match="entirely out of the frame"):
            in_frame(flow)
    flow[4:8, 4:8, 0] = 3.0  # a small motion lands where it should
    assert landing(flow, np.any(flow != 0, axis=-1))[4:8, 7:11].all()
