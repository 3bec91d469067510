"""Occlusion mask on hand-made flows; the energy's terms against direct numpy formulas."""

import dataclasses

import jax
import numpy as np
import pytest

from flow import Raft, RaftConfig, init_raft
from mgjax.method.energy import EnergyWeights, motion_energy, occlusion_mask


def _square_flow(dx: float, dy: float = 0.0, size: int = 32) -> np.ndarray:
    f = np.zeros((1, size, size, 2), np.float32)
    f[0, 8:16, 8:16] = (dx, dy)
    return f


def test_translated_square_integer_shift():
    m = np.asarray(occlusion_mask(_square_flow(4.0)))[0, ..., 0]
    assert m[8:16, 8:16].min() == 1  # pixels with non-zero flow keep 1 (incl. disoccluded 8..11)
    assert m[8:16, 16:20].max() == 0  # background the square lands on
    assert m[8:16, 20:].min() == 1 and m[:8].min() == 1 and m[16:].min() == 1
    assert (m == 0).sum() == 8 * 4


def test_translated_square_fractional_shift_covers_both_neighbours():
    m = np.asarray(occlusion_mask(_square_flow(4.5, 2.0)))[0, ..., 0]
    covered = np.zeros_like(m)
    covered[10:18, 12:21] = 1  # x in 12.5..19.5 -> columns 12..20; y integer -> rows 10..17
    covered[8:16, 8:16] = 0  # moving pixels are never masked
    np.testing.assert_array_equal(m, 1 - covered)


def test_no_motion_no_mask_and_out_of_frame_ignored():
    assert np.asarray(occlusion_mask(np.zeros((2, 16, 16, 2), np.float32))).min() == 1
    m = np.asarray(occlusion_mask(_square_flow(100.0)))  # lands outside the frame
    assert m.min() == 1


def _case(b: int, seed: int):
    """A random RAFT-small, b random source/edit pairs at 64x64, a square moved 3 px right."""
    cfg = RaftConfig(small=True)
    raft = Raft(init_raft(cfg, jax.random.PRNGKey(0)), cfg)
    rng = np.random.default_rng(seed)
    src = rng.uniform(size=(b, 64, 64, 3)).astype(np.float32)
    edit = rng.uniform(size=(b, 64, 64, 3)).astype(np.float32)
    f = np.zeros((b, 64, 64, 2), np.float32)
    f[:, 20:40, 20:40, 0] = 3.0
    return raft, src, edit, f


@pytest.mark.slow
@pytest.mark.parametrize("oracle", [False, True])
def test_energy_terms_match_numpy(oracle):
    raft, src, edit, f = _case(1, 0)
    mask = occlusion_mask(f)
    energy, logs = motion_energy(edit, src, f, mask, raft, EnergyWeights(2.0, 10.0), 3, oracle)
    flow = np.asarray(raft(255 * src, 255 * edit, iters=3))
    want_flow = np.abs(flow - f).mean()
    np.testing.assert_allclose(logs["flow_loss"][0], want_flow, rtol=1e-5)
    used = f if oracle else flow
    # Backward warp by numpy bilinear sampling with reflection (all flows here stay in-frame or
    # reflect once), compared through the colour loss.
    ys, xs = np.mgrid[0:64, 0:64].astype(np.float64)
    sx, sy = xs + used[0, ..., 0], ys + used[0, ..., 1]
    sx, sy = np.abs(sx), np.abs(sy)
    sx, sy = np.where(sx > 63, 126 - sx, sx), np.where(sy > 63, 126 - sy, sy)
    sx, sy = np.clip(sx, 0, 63), np.clip(sy, 0, 63)
    x0, y0 = np.floor(sx).astype(int), np.floor(sy).astype(int)
    x1, y1 = np.minimum(x0 + 1, 63), np.minimum(y0 + 1, 63)
    ax, ay = (sx - x0)[..., None], (sy - y0)[..., None]
    e = edit[0]
    warped = (
        e[y0, x0] * (1 - ax) * (1 - ay)
        + e[y0, x1] * ax * (1 - ay)
        + e[y1, x0] * (1 - ax) * ay
        + e[y1, x1] * ax * ay
    )
    m = np.asarray(mask)[0]
    want_color = np.abs(m * src[0] - m * warped).mean()
    np.testing.assert_allclose(logs["color_loss"][0], want_color, rtol=1e-4)
    np.testing.assert_allclose(energy, 2.0 * want_flow + 10.0 * want_color, rtol=1e-4)


def _context(f, src, raft=None):
    from mgjax.method.energy import Context

    flow_net = (lambda a, b, iters: raft(a, b, iters=iters)) if raft else None
    return Context(source=src, target_flow=f, occlusion=occlusion_mask(f), flow=flow_net)


def test_still_region_excludes_object_landing_and_uncovered():
    from mgjax.method.energy import still_region

    f = _square_flow(4.0)
    keep = np.asarray(still_region(f, occlusion_mask(f)))[0, ..., 0]
    want = np.ones((32, 32))
    want[8:16, 8:20] = 0  # the square (its old place included) and where it lands
    np.testing.assert_array_equal(keep, want)


@pytest.mark.slow
def test_weighted_sum_of_built_ins_matches_its_parts():
    from mgjax.method.energy import MotionEnergy, PreservationEnergy

    raft, src, x, f = _case(2, 1)
    ctx = _context(f, src, raft)
    energy = 2.0 * MotionEnergy(1.5, 7.0, 3) + 0.5 * PreservationEnergy()
    assert energy.log_names == ("flow_loss", "color_loss", "keep_loss")
    total, logs = energy(x, ctx)
    _, paper = motion_energy(x, src, f, occlusion_mask(f), raft, EnergyWeights(1.5, 7.0), 3)
    keep = np.ones((2, 64, 64, 1))
    keep[:, 20:40, 20:43] = 0
    want_keep = np.abs(keep * (x - src)).mean(axis=(1, 2, 3))
    np.testing.assert_allclose(logs["keep_loss"], want_keep, rtol=1e-5)
    np.testing.assert_allclose(logs["flow_loss"], paper["flow_loss"], rtol=1e-6)
    np.testing.assert_allclose(total, 2.0 * paper["energy"] + 0.5 * want_keep, rtol=1e-5)
    # an explicit keep region replaces the derived one
    ctx2 = dataclasses.replace(ctx, extras={"keep": np.ones((2, 64, 64, 1), np.float32)})
    _, logs2 = PreservationEnergy()(x, ctx2)
    np.testing.assert_allclose(logs2["keep_loss"], np.abs(x - src).mean(axis=(1, 2, 3)), rtol=1e-5)


def test_energy_terms_with_the_same_names_are_refused():
    from flow.errors import InputError
    from mgjax.method.energy import MotionEnergy

    with pytest.raises(InputError, match="same names"):
        MotionEnergy() + 2.0 * MotionEnergy(oracle=True)
