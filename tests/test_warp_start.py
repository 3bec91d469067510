"""The warped start (mgjax.method.start, Method.warp_start): the source's z_T moved by the target
flow, against exact shifts and a cell-by-cell reference of the documented rule."""

import numpy as np
import pytest

from mgjax import config as C
from mgjax.method import start
from mgjax.toy import shapes


def reference_cells(flow, factor):
    """The rule of start.source_cells written out cell by cell, with dicts and loops."""
    big_h, big_w, _ = flow.shape
    h, w = big_h // factor, big_w // factor
    votes, sources, targets = {}, set(), set()
    for y in range(big_h):
        for x in range(big_w):
            fx, fy = flow[y, x]
            if fx == 0 and fy == 0:
                continue
            sources.add((y // factor, x // factor))
            tx, ty = int(np.rint(x + fx)), int(np.rint(y + fy))
            if 0 <= tx < big_w and 0 <= ty < big_h:
                q = (ty // factor, tx // factor)
                targets.add(q)
                cell = votes.setdefault(q, {})
                cell[(y // factor, x // factor)] = cell.get((y // factor, x // factor), 0) + 1
    out = {}
    covered = set()
    for q, cell in votes.items():
        if 2 * sum(cell.values()) >= factor * factor:
            most = max(cell.values())
            out[q] = min(s for s, n in cell.items() if n == most)  # the first of a tie
            covered.add(q)
    free = [(a, b) for a in range(h) for b in range(w) if (a, b) not in sources | targets]
    for c in sorted(sources - covered):
        if free:
            dist = [(a - c[0]) ** 2 + (b - c[1]) ** 2 for a, b in free]
            out[c] = free[int(np.argmin(dist))]  # the first of a tie, row-major
    flat = np.arange(h * w)
    for (a, b), (sa, sb) in out.items():
        flat[a * w + b] = sa * w + sb
    return flat


def test_a_whole_cell_translation_moves_the_noise_exactly():
    z = np.random.default_rng(0).standard_normal((2, 4, 16, 16)).astype(np.float32)
    flow = np.zeros((2, 64, 64, 2), np.float32)
    flow[0, 16:32, 8:24, 0] = 8  # 4x4 latent pixels moved 2 to the right
    flow[1, 40:48, 40:52, 1] = -12  # 2x3 moved 3 up
    out = start.warped(z, flow, 4)
    np.testing.assert_array_equal(out[0, :, 4:8, 4:8], z[0, :, 4:8, 2:6])
    np.testing.assert_array_equal(out[1, :, 7:9, 10:13], z[1, :, 10:12, 10:13])
    # the latent pixels the object leaves hold background noise: none of the object's
    left = out[0, :, 4:8, 2:4].reshape(4, -1).T
    object_noise = z[0, :, 4:8, 2:6].reshape(4, -1).T
    assert not any((np.abs(object_noise - v).max(axis=1) == 0).any() for v in left)
    # outside what moves and where it lands, z_T is untouched
    keep = np.ones((16, 16), bool)
    keep[4:8, 2:8] = False
    np.testing.assert_array_equal(out[0][:, keep], z[0][:, keep])


@pytest.mark.parametrize("kind", ["translate", "rotate", "scale"])
@pytest.mark.parametrize("seed", [1, 2, 3])
def test_source_cells_follow_the_rule_on_exact_motions(kind, seed):
    rng = np.random.default_rng(seed)
    scene = shapes.sample_scene(rng, 64)
    center = np.argwhere(shapes.render(scene)["masks"][0]).mean(axis=0)[::-1]
    matrix = {
        "translate": shapes.affine_about(center, shift=(rng.uniform(-12, 12), rng.uniform(-9, 9))),
        "rotate": shapes.affine_about(center, degrees=rng.uniform(20, 35)),
        "scale": shapes.affine_about(center, scale=rng.uniform(1.2, 1.35)),
    }[kind]
    flow = shapes.object_flow(scene, 0, matrix)
    np.testing.assert_array_equal(start.source_cells(flow, 4), reference_cells(flow, 4))


def test_no_motion_and_the_default_keep_z_T():
    z = np.random.default_rng(4).standard_normal((1, 4, 16, 16)).astype(np.float32)
    still = np.zeros((1, 64, 64, 2), np.float32)
    np.testing.assert_array_equal(start.warped(z, still, 4), z)
    moving = still.copy()
    moving[0, 8:24, 8:24] = 6.0
    assert not np.array_equal(start.warped(z, moving, 4), z)
    np.testing.assert_array_equal(start.initial(C.Method(), z, moving, 4), z)
    np.testing.assert_array_equal(
        start.initial(C.Method(warp_start=True), z, moving, 4), start.warped(z, moving, 4)
    )


def test_a_flow_of_another_size_is_refused():
    z = np.zeros((1, 4, 16, 16), np.float32)
    with pytest.raises(ValueError, match="does not match"):
        start.warped(z, np.zeros((1, 32, 32, 2), np.float32), 4)


class _Sampler:
    """What workflow.start asks of a sampler, keeping what it is given."""

    sd = type("Seam", (), {"latent_channels": 4, "vae_factor": 4})()
    dtype = np.float32

    def prepare(self, *args, **kwargs):
        return "inputs"

    def init(self, inputs, z_T, seeds):
        return np.asarray(z_T)


@pytest.mark.parametrize("warp", [False, True])
def test_an_edit_starts_from_the_latent_its_method_names(warp):
    from mgjax.edit import workflow

    rng = np.random.default_rng(5)
    flow = np.zeros((64, 64, 2), np.float32)
    flow[20:36, 12:28] = (10.0, -3.0)
    files = workflow.EditFiles(64, 64, None, None, flow, None, np.zeros((1, 1, 16, 16), bool), None)
    z_T = rng.standard_normal((1, 4, 16, 16)).astype(np.float32)
    latents = np.repeat(z_T[None], 3, axis=0)
    config = C.make(warp_start=warp, num_samples=2)
    _, first = workflow.start(config, _Sampler(), files, (None, None), (None, z_T, latents))
    want = start.warped(z_T, flow[None], 4) if warp else z_T
    np.testing.assert_array_equal(first, np.repeat(want, 2, axis=0))
