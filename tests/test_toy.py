"""The shapes world: masks against analytic areas, exact flows, ground-truth edits, measures."""

import dataclasses

import numpy as np
import pytest

from mgjax.edit.motion import dilate_mask
from mgjax.toy import quality, shapes


def _scene(**kw):
    base = dict(shape="circle", color="red", fill="solid", cx=30.0, cy=26.0, radius=12.0, angle=0.3)
    obj = shapes.Obj(**(base | kw))
    return shapes.Scene(64, "blue", "striped", 0.12, 0.4, 1.0, (obj,))


def test_scenes_are_seeded_and_prompts_describe_them():
    a = shapes.sample_scene(np.random.default_rng(5))
    b = shapes.sample_scene(np.random.default_rng(5))
    assert a == b
    np.testing.assert_array_equal(shapes.render(a)["image"], shapes.render(b)["image"])
    assert shapes.prompt(_scene()) == "a red circle on a striped blue background"
    objects = (
        shapes.Obj("square", "orange", "dotted", 20, 20, 8, 0),
        shapes.Obj("triangle", "white", "solid", 44, 44, 8, 0),
    )
    two = shapes.Scene(64, "green", "wavy", 0.1, 0.0, 0.0, objects)
    assert shapes.prompt(two) == (
        "a dotted orange square and a white triangle on a wavy green background"
    )
    for seed in range(20):  # objects inside the frame, apart, distinct from the background
        s = shapes.sample_scene(np.random.default_rng(seed))
        for o in s.objects:
            assert o.radius < o.cx < 64 - o.radius and o.color != s.color


@pytest.mark.parametrize(
    "shape, area", [("circle", np.pi), ("square", 2.0), ("diamond", 2.0), ("triangle", 1.299)]
)
def test_masks_match_analytic_areas(shape, area):
    r = 12.0
    mask = shapes.render(_scene(shape=shape, radius=r))["masks"][0]
    assert mask.sum() == pytest.approx(area * r * r, rel=0.04)


def test_flow_pair_flow_is_exact():
    """image2 sampled at p + flow(p) gives image1 back wherever p stays visible."""
    rng = np.random.default_rng(0)
    for _ in range(3):
        a, b, flow = shapes.flow_pair(rng, 64)
        h, w, _ = a.shape
        ys, xs = np.mgrid[0:h, 0:w]
        tx, ty = xs + flow[..., 0], ys + flow[..., 1]
        inside = (tx >= 1) & (tx <= w - 2) & (ty >= 1) & (ty <= h - 2)
        x0, y0 = np.floor(tx).astype(int), np.floor(ty).astype(int)
        x0, y0 = np.clip(x0, 0, w - 2), np.clip(y0, 0, h - 2)
        fx, fy = (tx - x0)[..., None], (ty - y0)[..., None]
        back = (
            b[y0, x0] * (1 - fx) * (1 - fy)
            + b[y0, x0 + 1] * fx * (1 - fy)
            + b[y0 + 1, x0] * (1 - fx) * fy
            + b[y0 + 1, x0 + 1] * fx * fy
        )
        err = np.abs(back - a).max(axis=-1)[inside]
        # edges and occlusions break it on a few pixels; the rest matches to interpolation error
        assert np.median(err) < 0.02 and np.mean(err < 0.1) > 0.85


def test_local_flow_pairs_turn_or_scale_each_object_about_its_centre():
    """local_share 1: the view is still (zero flow off the objects) and each object's flow is
    a similarity about its centre: an affine field whose linear part is a rotation of 10-35
    degrees or a scaling of x0.75-0.85 / x1.2-1.35, shifted by at most 2 px; the pair is exact."""
    rng = np.random.default_rng(1)
    kinds = set()
    for _ in range(6):
        seed = int(rng.integers(2**31))
        scene = shapes.sample_scene(np.random.default_rng(seed), 64)
        a, b, flow = shapes.flow_pair(np.random.default_rng(seed), 64, local_share=1.0)
        masks = shapes.render(scene, {}, (0, 0), 2)["masks"]
        assert np.all(flow[~masks.any(axis=0)] == 0)
        for o, mask in zip(scene.objects, masks, strict=True):
            ys, xs = np.nonzero(mask)
            design = np.stack([xs - o.cx, ys - o.cy, np.ones_like(xs, float)], axis=1)
            fit, *_ = np.linalg.lstsq(design, flow[ys, xs], rcond=None)
            linear = fit[:2].T + np.eye(2)  # the motion's matrix about the centre
            scale = np.sqrt(abs(np.linalg.det(linear)))
            angle = np.degrees(np.arctan2(linear[1, 0], linear[0, 0]))
            np.testing.assert_allclose(design @ fit, flow[ys, xs], atol=1e-3)  # affine
            assert np.all(np.abs(fit[2]) <= 2.0 + 1e-6)
            if abs(angle) > 1e-3:
                kinds.add("turn")
                assert 10 - 1e-3 <= abs(angle) <= 35 + 1e-3 and np.isclose(scale, 1.0)
            else:
                kinds.add("scale")
                assert 0.75 - 1e-6 <= scale <= 0.85 + 1e-6 or 1.2 - 1e-6 <= scale <= 1.35 + 1e-6
    assert kinds == {"turn", "scale"}


def test_ground_truth_edit_and_measures():
    s = _scene(fill="dotted")
    m = shapes.affine_about((30.0, 26.0), shift=(8.0, 5.0))
    flow = shapes.object_flow(s, 0, m)
    mask = shapes.render(s)["masks"][0]
    np.testing.assert_allclose(flow[mask], np.broadcast_to([8.0, 5.0], flow[mask].shape), atol=1e-5)
    assert not flow[~mask].any()
    gt = shapes.render(s, {0: m})
    np.testing.assert_array_equal(gt["masks"][0], np.roll(mask, (5, 8), axis=(0, 1)))
    src = shapes.render(s)["image"]
    perfect = quality.edit_scores(gt["image"], s, 0, m)
    assert perfect["placement_px"] < 0.5 and perfect["iou"] > 0.9
    assert perfect["psnr_unchanged"] == 60 and perfect["psnr_disoccluded"] == 60  # exact: capped
    assert perfect["found"] == 1.0 and perfect["displacement_share"] == pytest.approx(1.0, abs=0.05)
    assert perfect["color_error"] < 3.0  # /255: the same object, sampled 1 px in from its edge
    unmoved = quality.edit_scores(src, s, 0, m)
    assert unmoved["placement_px"] == pytest.approx(np.hypot(8, 5), abs=0.5)
    assert unmoved["psnr_unchanged"] == 60 and unmoved["psnr_disoccluded"] < 20
    assert unmoved["displacement_share"] == pytest.approx(0.0, abs=0.05)
    # a grey blob where the object should be: found nowhere, and its colour far off
    blob = np.where(gt["masks"][0][..., None], 0.5, gt["image"])
    grey = quality.edit_scores(blob, s, 0, m)
    assert grey["found"] == 0.0 and grey["color_error"] > 30
    np.testing.assert_array_equal(quality.move_mask(mask, m), gt["masks"][0])
    turn = shapes.affine_about((30.0, 26.0), degrees=35.0, scale=1.2)
    moved, truth = quality.move_mask(mask, turn), shapes.render(s, {0: turn})["masks"][0]
    assert (moved & truth).sum() / (moved | truth).sum() > 0.9  # nearest vs area coverage
    warped, holes = quality.forward_warp(src, flow, mask)
    # an integer shift lands exactly (inside the object: anti-aliased edges carry the old
    # background), and the uncovered part is a hole
    inner = ~dilate_mask(~gt["masks"][0], 1)
    np.testing.assert_allclose(warped[inner], gt["image"][inner], atol=1e-5)
    np.testing.assert_array_equal(holes, mask & ~gt["masks"][0])
    assert (warped[holes] == 0).all()


def test_toy_tokenizer_makes_each_word_one_token(tmp_path):
    from transformers import CLIPTokenizer

    from mgjax.toy.tokenizer import MAX_TOKENS, _words, check_tokenizer, tokenizer_files

    tok = CLIPTokenizer.from_pretrained(str(tokenizer_files(tmp_path)))
    check_tokenizer(tok)
    prompt = "a dotted yellow diamond and an orange circle on a checkered purple background"
    assert tok.tokenize(prompt) == [w + "</w>" for w in prompt.split()]
    assert all(len(tok.tokenize(w)) == 1 for w in _words())
    assert tok.tokenize("zebra")  # other text still tokenizes (byte-level fallback)
    assert tok.model_max_length == MAX_TOKENS and tok.pad_token == "<|endoftext|>"


@pytest.mark.slow
def test_raft_training_roundtrip_is_the_seams_encode_decode(tmp_path):
    """train_raft --autoencoder: the second image through the autoencoder's posterior mean and
    decoder, read back from a written folder by the seam (mgjax.model.sd.load_autoencoder) and
    the same as the written model's encode/decode (tested against diffusers' torch models)."""
    import jax.numpy as jnp

    from mgjax.method import source
    from mgjax.model import sd as sdm
    from mgjax.toy.train_raft import autoencoder_roundtrip
    from tests.tiny_models import tiny

    sd = tiny(seed=3)
    sdm.save(sd, tmp_path / "sd")
    images = 255.0 * np.random.default_rng(0).uniform(size=(2, 32, 32, 3)).astype(np.float32)
    ours = autoencoder_roundtrip(str(tmp_path / "sd" / "vae"))(images)
    x = sd.decode(sd.params, sd.encode(sd.params, jnp.asarray(images) / 127.5 - 1.0))
    ref = np.clip(np.asarray(x) * 127.5 + 127.5, 0.0, 255.0)
    assert ours.shape == images.shape
    assert np.abs(ref - images).max() > 10.0  # a random autoencoder changes the images
    # compiled (the round trip) against op by op (the reference): fp32 rounding of ~1e-5
    # relative on a 0-255 scale
    np.testing.assert_allclose(ours, ref, atol=255 * 1e-5)
    # the benches' source.roundtrip: the same on [0, 1] images
    np.testing.assert_allclose(source.roundtrip(sd, images / 255.0), ref / 255.0, atol=1e-5)


def test_an_object_is_told_from_a_background_of_its_own_colour():
    # a green square on a green background: its colour alone also takes much of the background
    obj = shapes.Obj("square", "green", "solid", 30.0, 26.0, 10.0, 0.2)
    s = shapes.Scene(64, "green", "wavy", 0.1, 0.4, 1.0, (obj,))
    m = shapes.affine_about((30.0, 26.0), shift=(8.0, 5.0))
    before, gt = shapes.render(s), shapes.render(s, {0: m})
    color = np.median(before["image"][before["masks"][0]], axis=0)
    assert quality.segment(gt["image"], color).sum() > 2 * gt["masks"][0].sum()
    perfect = quality.edit_scores(gt["image"], s, 0, m)
    assert perfect["placement_px"] < 0.5 and perfect["iou"] > 0.9
    assert perfect["displacement_share"] == pytest.approx(1.0, abs=0.05)
    unmoved = quality.edit_scores(before["image"], s, 0, m)
    assert unmoved["displacement_share"] == pytest.approx(0.0, abs=0.05)
    assert unmoved["placement_px"] == pytest.approx(np.hypot(8, 5), abs=0.5)
    # a forward warp's holes (black) are not the object, even where the object is black
    dark = dataclasses.replace(s, objects=(dataclasses.replace(obj, color="black"),))
    src = shapes.render(dark)
    flow = shapes.object_flow(dark, 0, m)
    warped, holes = quality.forward_warp(src["image"], flow, src["masks"][0])
    before_k, after_k = src["masks"][0], shapes.render(dark, {0: m})["masks"][0]
    color = np.median(src["image"][before_k], axis=0)
    plate = quality.plate_of(dark, 0)
    args = (warped, warped, before_k, after_k, color)
    assert quality.scores(*args, plate=plate)["displacement_share"] < 0.8  # the holes count
    fair = quality.scores(*args, plate=plate, exclude=holes)
    assert fair["displacement_share"] == pytest.approx(1.0, abs=0.05)


def test_the_silhouette_is_the_object_a_colour_mask_shows():
    # a ring-shaped colour mask (a textured object whose middle is off-colour), notched at its
    # edge, touching the frame, and a stray speck of the same colour elsewhere
    ys, xs = np.mgrid[0:64, 0:64]
    disc = np.hypot(xs - 10, ys - 30) <= 12  # reaches past the left edge of the frame
    ring = disc & (np.hypot(xs - 10, ys - 30) > 5)
    notched = ring & ~((ys == 30) & (xs > 15) & (xs < 20))  # a 1 px cut across the ring
    speck = (np.abs(xs - 50) <= 2) & (np.abs(ys - 50) <= 2)
    found = notched | speck
    sil = quality.silhouette(found)
    np.testing.assert_array_equal(sil, disc)  # the frame's edge does not erode it
    assert not (sil & speck).any()
    # a mask that is already whole is kept as it is; an empty one gives an empty silhouette
    np.testing.assert_array_equal(quality.silhouette(disc), disc)
    assert not quality.silhouette(np.zeros((8, 8), bool)).any()
    # a dotted rendered object whose dots its colour misses: the silhouette is the object
    s = shapes.sample_scene(np.random.default_rng(3), 64, n_objects=1)
    assert s.objects[0].fill == "dotted"
    out = shapes.render(s)
    colour = quality.segment(out["image"], shapes.COLORS[s.objects[0].color], 0.25)
    assert quality.iou(colour, out["masks"][0]) < 0.7
    assert quality.iou(quality.silhouette(colour), out["masks"][0]) > 0.9


def test_the_soft_edge_is_the_rim_that_blends_object_and_background():
    # an object of colour c on a background b whose rim is 1 px of a half blend and 1 px of a
    # tenth; to its right, a patch of another colour touches it
    ys, xs = np.mgrid[0:48, 0:48]
    r = np.hypot(xs - 20, ys - 24)
    c, b, other = np.array([0.9, 0.2, 0.1]), np.array([0.1, 0.3, 0.8]), np.array([0.2, 0.8, 0.2])
    image = np.broadcast_to(b, (48, 48, 3)).copy()
    image[(r > 8) & (r <= 9)] = 0.5 * c + 0.5 * b
    image[(r > 9) & (r <= 10)] = 0.1 * c + 0.9 * b
    image[r <= 8] = c
    patch = (xs >= 29) & (np.abs(ys - 24) <= 3) & (r > 8)
    image[patch] = other
    sil = r <= 8
    grown = quality.soft_edge(image, sil, c, 2)
    assert (grown & sil).sum() == sil.sum()
    half = (r > 8) & (r <= 9) & ~patch
    np.testing.assert_array_equal(grown & ~sil, half)  # the half blend, not the tenth or patch
    # the reach bounds the growth; a share of 0.05 takes the tenth too; no reach, no growth
    assert not (quality.soft_edge(image, sil, c, 1) & (r > 9)).any()
    assert (quality.soft_edge(image, sil, c, 2, share=0.05) & (r > 9) & (r <= 10) & ~patch).any()
    np.testing.assert_array_equal(quality.soft_edge(image, sil, c, 0), sil)


@pytest.mark.slow
def test_train_raft_starts_another_input_scale_from_the_given_weights(tmp_path):
    """--init with weights trained at input_scale 2 starts a run at input_scale 4: the same
    convolutions (at learning rate 0 the written weights are the given ones, bit for bit), the
    file's header saying the new scale."""
    import jax

    from flow import checkpoint
    from flow.raft import RaftConfig, init_raft
    from mgjax.toy.train_raft import train

    init = str(tmp_path / "init.mgjax")
    config = RaftConfig(small=True, context_norm="batch", input_scale=2)
    checkpoint.save(init, init_raft(config, jax.random.PRNGKey(1), (64, 64)), config)
    lines = []
    train(str(tmp_path / "out"), minutes=5, max_steps=1, batch=1, iters=1, lr=0.0, seed=0,
          size=64, log_every=1, input_scale=4, log=lines.append, init=init)  # fmt: skip
    assert any("trained at input_scale 2, now 4" in line for line in lines)
    got, got_config = checkpoint.load_variables(str(tmp_path / "out" / "raft-small.mgjax"))
    want, _ = checkpoint.load_variables(init)
    assert got_config.input_scale == 4 and got_config.small
    jax.tree_util.tree_map(np.testing.assert_array_equal, got, want)


@pytest.mark.slow
def test_the_denoising_report_measures_what_the_unet_keeps_of_a_redrawn_scene():
    """train_ldm.denoise_report: at strength 0 it is the autoencoder's round trip (the same IoUs
    as roundtrip_report), it counts every object of the scenes, a UNet whose noise estimate
    is wrong keeps less of the objects than the pack's, and one blind to its prompt keeps
    exactly as much with the shape words swapped."""
    import dataclasses as dc

    import jax
    from flax.traverse_util import flatten_dict, unflatten_dict

    from mgjax.model import sd as sdm
    from mgjax.toy import pack
    from mgjax.toy.train_ldm import denoise_report, roundtrip_report

    sd = sdm.load(pack.sd_folder())
    seeds = quality.TUNING_SEEDS[:4]
    objects = sum(len(shapes.sample_scene(np.random.default_rng(s), 64).objects) for s in seeds)
    report = denoise_report(sd, seeds, strengths=(0.0, 0.5), log=lambda s: None, batch=4,
                            swapped=0.5)  # fmt: skip
    assert set(report) == {"0", "0.5", "0.5 shape words swapped"}
    assert {r["objects"] for r in report.values()} == {objects}
    # the text's values in every cross-attention zeroed: the prompt changes nothing
    flat = flatten_dict(sd.params["unet"])
    blind = {k: (0 * v if "attn2" in k and "to_v" in k else v) for k, v in flat.items()}
    assert sum("attn2" in k and "to_v" in k for k in flat) >= 5
    blind_sd = dc.replace(sd, params=dict(sd.params, unet=unflatten_dict(blind)))
    blind_report = denoise_report(blind_sd, seeds, strengths=(0.5,), log=lambda s: None,
                                  batch=4, swapped=0.5)  # fmt: skip
    assert blind_report["0.5"] == blind_report["0.5 shape words swapped"]
    roundtrip = roundtrip_report(sd, seeds, log=lambda s: None)
    assert report["0"]["object_iou_mean"] == pytest.approx(roundtrip["object_iou_mean"], abs=1e-6)
    # the noise estimate negated: DDIM walks away from the scene instead of back to it
    params = dict(sd.params, unet=jax.tree.map(lambda x: x, sd.params["unet"]))
    conv = params["unet"]["conv_out"]
    params["unet"]["conv_out"] = {"kernel": -conv["kernel"], "bias": -conv["bias"]}
    wrong = denoise_report(dc.replace(sd, params=params), seeds, strengths=(0.5,),
                           log=lambda s: None, batch=4, swapped=None)  # fmt: skip
    assert wrong["0.5"]["object_iou_mean"] < report["0.5"]["object_iou_mean"] - 0.2
