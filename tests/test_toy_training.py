"""The toy training scripts' shared parts: the run length that drives the learning rate, and
data rendered in worker processes."""

import functools
import json

import jax
import numpy as np
import optax
import pytest

from mgjax.toy import budget, shapes


def test_the_learning_rate_follows_steps_or_minutes_whichever_ends_first():
    b = budget.Budget(steps=100, minutes=60.0)
    assert b.progress(0) == pytest.approx(0.0, abs=1e-6)  # by time: a moment of the hour
    assert b.progress(50) == pytest.approx(0.5, abs=1e-3)
    assert b.learning_rate(1.0, 0) == pytest.approx(0.0, abs=1e-4)  # warm-up starts at zero
    assert b.learning_rate(1.0, 5) == pytest.approx(1.0, abs=1e-3)  # the peak after 5%
    assert b.learning_rate(1.0, 100) == pytest.approx(0.1)  # a tenth at the end
    lrs = [b.learning_rate(1.0, s) for s in range(5, 101)]
    assert all(x >= y for x, y in zip(lrs, lrs[1:], strict=False))  # decays monotonically
    assert not b.done(99) and b.done(100)
    assert 0.0 < b.seconds_left(50) <= 3600.0 and b.seconds_left(100) == 0.0
    short = budget.Budget(steps=10**9, minutes=0.0)  # the time budget is spent at once
    assert short.done(1) and short.progress(1) == 1.0
    assert short.seconds_left(1) == 0.0
    assert short.learning_rate(1.0, 1) == pytest.approx(0.1)


def test_a_scheduled_optimizer_takes_the_learning_rate_it_is_given():
    opt = budget.scheduled(lambda learning_rate: optax.sgd(learning_rate))
    params = {"w": np.ones(3, np.float32)}
    state = opt.init(params)
    for lr in (0.5, 0.0):
        state = budget.with_learning_rate(state, lr)
        updates, state = opt.update({"w": np.ones(3, np.float32)}, state, params)
        np.testing.assert_allclose(updates["w"], -lr)


def _render(seed: int, size: int):
    return shapes.render(shapes.sample_scene(np.random.default_rng(seed), size), supersample=1)[
        "image"
    ]


def test_rendering_in_workers_gives_the_data_of_rendering_in_one_process():
    seeds = budget.seeds_from(np.random.default_rng(0), 12)
    assert len(set(seeds.tolist())) == 12
    render = functools.partial(_render, size=16)
    alone = budget.parallel_map(render, seeds, workers=1)
    spread = budget.parallel_map(render, seeds, workers=2, chunksize=2)
    for a, b in zip(alone, spread, strict=True):
        np.testing.assert_array_equal(a, b)


def test_the_pack_rebuilds_from_itself_with_its_history_and_a_new_run(tmp_path):
    """The pack is the training checkpoint: rebuilt from its own models with its own pack.json
    as the history, a new run's log is appended to that history; a history file without a
    list of runs is refused in one line."""
    from mgjax.toy import pack

    log = tmp_path / "ldm" / "log.json"
    log.parent.mkdir()
    log.write_text(json.dumps({"command": "train", "seconds": 60.0, "unet_loss": [0.2, 0.1]}))
    out = tmp_path / "pack"
    shipped = pack.info()["training"]
    pack.build(pack.sd_folder(), pack.raft_file(), str(pack.PACK / "pack.json"), (str(log),), out)
    meta = json.loads((out / "pack.json").read_text())
    assert meta["training"][:-1] == shipped
    assert meta["training"][-1] == {
        "run": "ldm",
        "command": "train",
        "seconds": 60.0,
        "unet_loss_first_last": [0.2, 0.1],
    }
    assert (out / "demo.png").is_file() and (out / "sd" / "unet").is_dir()
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"runs": "none"}))
    with pytest.raises(SystemExit, match="no list of runs"):
        pack.build(pack.sd_folder(), pack.raft_file(), str(bad), (), tmp_path / "other")
    assert not list(tmp_path.glob("other*"))  # nothing half-written


def test_hard_scenes_are_drawn_in_proportion_to_their_last_loss():
    from mgjax.toy.train_ldm import draw_scenes

    rng = np.random.default_rng(0)
    loss = np.full(10, 1.0)
    loss[3] = 9.0  # 9 of the 18 units of loss: half of the hard draws
    loss[7] = np.inf  # not measured yet: weighs as the worst measured scene (another 9)
    idx = draw_scenes(rng, 20_000, loss, 1.0)
    share = np.bincount(idx, minlength=10) / idx.size
    np.testing.assert_allclose(share[[3, 7]], [9 / 26, 9 / 26], atol=0.015)
    np.testing.assert_allclose(share[[0, 1, 2]], [1 / 26] * 3, atol=0.01)
    # a share of 0 draws uniformly, and a half share mixes the two
    assert draw_scenes(rng, 7, loss, 0.0).shape == (7,)
    uniform = np.bincount(draw_scenes(rng, 20_000, loss, 0.0), minlength=10) / 20_000
    np.testing.assert_allclose(uniform, 0.1, atol=0.015)
    half = np.bincount(draw_scenes(rng, 20_000, loss, 0.5), minlength=10) / 20_000
    np.testing.assert_allclose(half[3], 0.5 * 0.1 + 0.5 * 9 / 26, atol=0.015)


def test_the_unet_loss_weights_latent_pixels_near_an_object():
    from scipy import ndimage

    from mgjax.toy.train_ldm import latent_weights

    rng = np.random.default_rng(1)
    masks = np.zeros((3, 64, 64), bool)
    masks[0, 20:27, 33:41] = True  # a box across latent-pixel borders
    masks[1, 0, 63] = True  # one pixel in a corner
    masks[2] = rng.uniform(size=(64, 64)) < 0.002  # scattered pixels
    w = latent_weights(masks, 4, 5.0)
    assert w.shape == (3, 1, 16, 16) and w.dtype == np.float32
    for m, wi in zip(masks, w[:, 0], strict=True):
        # a latent pixel is an object's when its 4x4 footprint holds one, then grown by one
        # latent pixel in all 8 directions (scipy's dilation with a full 3x3 structure)
        blocks = np.array([[m[4 * y : 4 * y + 4, 4 * x : 4 * x + 4].any() for x in range(16)]
                           for y in range(16)])  # fmt: skip
        near = ndimage.binary_dilation(blocks, np.ones((3, 3), bool))
        np.testing.assert_array_equal(wi, np.where(near, 5.0, 1.0))
    assert w[1, 0, 0, 14:].tolist() == [5.0, 5.0] and w[1, 0, 2, 15] == 1.0
    # weight 1 weighs every latent pixel alike: the plain loss
    np.testing.assert_array_equal(latent_weights(masks, 4, 1.0), 1.0)


def test_the_shape_words_swap_in_pairs_and_nothing_else_changes():
    from mgjax.toy.train_ldm import SHAPE_SWAP, swap_shape_words

    assert set(SHAPE_SWAP) == set(SHAPE_SWAP.values()) == set(shapes.SHAPES)
    rng = np.random.default_rng(3)
    for _ in range(50):
        scene = shapes.sample_scene(rng, 64)
        prompt = shapes.prompt(scene)
        swapped = swap_shape_words(prompt)
        assert swap_shape_words(swapped) == prompt
        words, new = prompt.split(), swapped.split()
        assert len(words) == len(new)
        for a, b in zip(words, new, strict=True):
            assert b == SHAPE_SWAP.get(a, a)
        assert sum(a != b for a, b in zip(words, new, strict=True)) == len(scene.objects)


def test_the_shape_word_contrast_is_a_hinge_on_the_objects_log_error_ratio():
    from mgjax.toy.train_ldm import shape_contrast

    rng = np.random.default_rng(4)
    noise = rng.standard_normal((3, 4, 16, 16)).astype(np.float32)
    obj = np.zeros((3, 1, 16, 16), np.float32)
    obj[:, :, 5:9, 6:10] = 1.0
    named_err = np.where(obj > 0, 0.3, 5.0).astype(np.float32)  # the background's is not counted
    eps = noise + named_err
    eps_swapped = noise + np.where(obj > 0, 0.3 * np.array([1.0, 1.2, 2.0])[:, None, None, None],
                                   0.1).astype(np.float32)  # fmt: skip
    # per image the squared error on the object: 0.09 named; 0.09, 0.1296, 0.36 swapped
    gaps = np.log([1.0, 1.44, 4.0])
    hinge, gap = shape_contrast(eps, eps_swapped, noise, obj, np.ones(3, np.float32), 0.5)
    np.testing.assert_allclose(gap, gaps.mean(), rtol=1e-5)
    np.testing.assert_allclose(hinge, np.maximum(0.5 - gaps, 0).mean(), rtol=1e-5)
    # an image whose prompt was dropped counts neither in the hinge nor in the gap
    named = np.array([0.0, 1.0, 1.0], np.float32)
    hinge, gap = shape_contrast(eps, eps_swapped, noise, obj, named, 0.5)
    np.testing.assert_allclose(gap, gaps[1:].mean(), rtol=1e-5)
    np.testing.assert_allclose(hinge, np.maximum(0.5 - gaps[1:], 0).mean(), rtol=1e-5)
    # past the margin it does not push: zero hinge and zero gradient
    import jax

    last = np.array([0, 0, 1], np.float32)
    hinge, _ = shape_contrast(eps, eps_swapped, noise, obj, last, 1.0)
    grad = jax.grad(lambda e: shape_contrast(e, eps_swapped, noise, obj, last, 1.0)[0])(eps)
    assert float(hinge) == 0.0 and not np.asarray(grad).any()


def test_the_decoded_error_weighs_object_pixels_and_each_estimate_by_its_abar():
    from mgjax.toy.train_ldm import decoded_error

    rng = np.random.default_rng(5)
    images = rng.uniform(-1, 1, (2, 8, 8, 3)).astype(np.float32)
    targets = rng.uniform(-1, 1, (2, 8, 8, 3)).astype(np.float32)
    masks = np.zeros((2, 8, 8), bool)
    masks[0, 2:5, 3:6] = True
    abar = np.array([0.9, 0.2], np.float32)
    expected = []
    for k in range(2):  # per image a weighted mean: object pixels 5, the others 1
        w = np.where(masks[k], 5.0, 1.0)[..., None].repeat(3, -1)
        expected.append(abar[k] * (w * (images[k] - targets[k]) ** 2).sum() / w.sum())
    np.testing.assert_allclose(decoded_error(images, targets, masks, abar), np.mean(expected),
                               rtol=1e-5)  # fmt: skip
    assert float(decoded_error(targets, targets, masks, abar)) == 0.0


@pytest.mark.slow
def test_the_scale_term_decodes_the_pooled_latent_against_the_pooled_image():
    import torch

    from mgjax.toy.train_ldm import autoencoder_loss
    from tests.tiny_models import tiny

    sd = tiny(seed=2)
    rng = np.random.default_rng(6)
    x = rng.uniform(-1, 1, (2, 32, 32, 3)).astype(np.float32)
    m = np.zeros((2, 32, 32), np.float32)
    m[1, 4:15, 9:20] = 1.0

    def error(rec, target, mask):  # L1 + L2/2, object pixels weighing 5, over all images
        w = np.where(mask > 0, 1.0 + 4.0 * mask, 1.0)[..., None].repeat(3, -1)
        return (w * (np.abs(rec - target) + 0.5 * (rec - target) ** 2)).sum() / w.sum()

    def avg2(a):  # torch's 2x2 average pooling of (N, C, H, W)
        return torch.nn.functional.avg_pool2d(torch.from_numpy(np.array(a)), 2).numpy()

    z = np.asarray(sd.encode(sd.params, x))
    plain = error(np.asarray(sd.decode(sd.params, z)), x, m)
    small_x = avg2(x.transpose(0, 3, 1, 2)).transpose(0, 2, 3, 1)
    small_m = avg2(m[:, None])[:, 0]
    scaled = error(np.asarray(sd.decode(sd.params, avg2(z))), small_x, small_m)
    assert small_x.shape == (2, 16, 16, 3) and scaled > 0
    loss, each = autoencoder_loss(sd, sd.params, x, m, 5.0)
    np.testing.assert_allclose(float(loss), plain, rtol=1e-5)
    loss, each_too = autoencoder_loss(sd, sd.params, x, m, 5.0, scale_weight=0.5)
    np.testing.assert_allclose(float(loss), plain + 0.5 * scaled, rtol=1e-5)
    np.testing.assert_allclose(each_too, each)  # per image: the reconstruction alone


def test_the_timestep_band_is_two_integers_inside_the_schedule():
    from flow.errors import InputError
    from mgjax.toy.train_ldm import timestep_range

    assert timestep_range(["0", "1000"]) == (0, 1000)
    assert timestep_range(["150", "550"]) == (150, 550)
    for bad in (["550", "150"], ["5", "5"], ["-1", "10"], ["0", "1001"], ["1"], ["a", "b"],
                ["1", "2", "3"], ["0.5", "10"]):  # fmt: skip
        with pytest.raises(InputError, match="give LOW,HIGH"):
            timestep_range(bad)


@pytest.mark.slow
def test_a_new_model_keeps_the_latent_scaling_factor_it_is_given(tmp_path):
    # a model built in memory leaves scaling_factor at its default; the measured one replaces it
    from mgjax.model import sd as sdm
    from mgjax.toy.train_ldm import with_params
    from tests.tiny_models import tiny

    fresh = tiny()
    assert fresh.scaling_factor == 0.18215
    scaled = with_params(fresh, fresh.params, scaling=0.2236)
    assert scaled.scaling_factor == pytest.approx(0.2236)
    z = np.ones((1, 4, 8, 8), np.float32)
    np.testing.assert_allclose(  # decode divides by the factor it holds
        scaled.decode(scaled.params, z * 0.2236), fresh.decode(fresh.params, z * 0.18215), atol=1e-5
    )
    sdm.save(scaled, tmp_path / "sd")
    assert sdm.load(str(tmp_path / "sd")).scaling_factor == pytest.approx(0.2236)


@pytest.mark.slow
def test_the_autoencoder_trains_on_crops_then_whole_images_with_the_scale_term():
    from mgjax.toy.train_ldm import train_vae
    from tests.tiny_models import tiny

    sd = tiny(seed=1)
    lines = []
    params, curve, steps = train_vae(
        sd, np.random.default_rng(4), minutes=5.0, steps=4, batch=4, crop=32, full_share=0.5,
        object_weight=5.0, lr=1e-3, pool=6, log_every=1, log=lines.append, workers=1,
        scale_weight=0.5,
    )  # fmt: skip
    assert steps == 4 and len(curve) == 4 and np.isfinite(curve).all()
    assert sum("full images" in line for line in lines) == 2  # the last half on whole images
    moved = [
        not np.array_equal(a, b)
        for a, b in zip(
            jax.tree.leaves(params["vae"]), jax.tree.leaves(sd.params["vae"]), strict=True
        )
    ]
    assert all(moved)  # encoder and decoder alike
    assert params["unet"] is sd.params["unet"]
