"""The shipped toy pack: it loads through the real loaders, and the embedded default (launch.py
with no model, source or motion flags) moves the demo object the requested way while the same
run without guidance leaves it in place."""

import json
import shutil

import numpy as np
import pytest
from diffusers import FlaxAutoencoderKL, FlaxUNet2DConditionModel
from PIL import Image
from transformers import CLIPTokenizer, FlaxCLIPTextModel

from flow.checkpoint import load_raft
from flow.errors import InputError
from mgjax import config as C
from mgjax.edit.workflow import run
from mgjax.model import sd as sdm
from mgjax.toy import pack, quality


def test_pack_loads_through_the_real_loaders_within_budget():
    sd, raft = sdm.load(pack.sd_folder()), load_raft(pack.raft_file())
    assert isinstance(sd.unet, FlaxUNet2DConditionModel)
    assert isinstance(sd.vae, FlaxAutoencoderKL)
    assert isinstance(sd.text_encoder, FlaxCLIPTextModel)
    assert isinstance(sd.tokenizer, CLIPTokenizer)
    assert raft.config.small
    meta = pack.info()
    size = meta["image_size"]
    assert sd.unet.config.sample_size * sd.vae_factor == size
    ids = sd.tokenizer(meta["demo"]["prompt"]).input_ids
    assert len(ids) == len(meta["demo"]["prompt"].split()) + 2  # one token per world word
    total = sum(f.stat().st_size for f in pack.PACK.rglob("*") if f.is_file())
    assert total <= 30 * 2**20, f"toy pack is {total / 2**20:.1f} MiB"
    demo = pack.demo_files()
    mask = np.asarray(Image.open(demo["object_mask"])) > 127
    _, image, truth = pack.demo_scene(size)  # the shipped demo is the seeded scene
    np.testing.assert_array_equal(mask, truth)
    shipped = np.asarray(Image.open(demo["image"]), np.float32) / 255.0
    assert np.abs(shipped - image).max() <= 0.5 / 255 + 1e-6
    json.dumps(meta)  # provenance is plain JSON


def _object_shift(path, color, before) -> np.ndarray:
    found = quality.segment(np.asarray(Image.open(path), np.float32) / 255.0, color)
    assert found.sum() > 0.5 * before.sum(), "the object is gone from the edit"
    return np.asarray(quality.centroid(found)) - np.asarray(quality.centroid(before))


@pytest.mark.slow
def test_embedded_default_moves_the_object_unguided_does_not(tmp_path):
    """The embedded default (the toy pack's demo: its object asked to move 10 px right, with the
    toy preset): guidance moves the object at least half way, within 45 degrees of the
    requested direction, more than half its pixels kept; the same run with lambda_g = 0 leaves
    it where it was. Guided runs amplify rounding: at the preset's 100 steps, runs that differ
    only in XLA's thread count and loop form ended at (+6.5, -0.1) to (+9.3, -0.1) px with 328
    to 405 of the 424 pixels; at 50 steps one CPU kept only 207 (docs/toy.md: rounding)."""
    meta = pack.info()
    assert meta["demo"]["motion"] == "translate:10,0"
    image = np.asarray(Image.open(pack.demo_files()["image"]), np.float32) / 255.0
    mask = np.asarray(Image.open(pack.demo_files()["object_mask"])) > 127
    color = np.median(image[mask], axis=0)
    toy = dict(C.PRESETS["toy"])
    shifts = {}
    for weight in (toy["guidance_weight"], 0.0):
        out = tmp_path / f"w{weight:g}"
        run(C.make(out_dir=str(out), **dict(toy, guidance_weight=weight)), log=lambda s: None)
        shifts[weight] = _object_shift(out / "sample_00" / "edited.png", color, mask)
        config = json.loads((out / "sample_00" / "config.json").read_text())
        assert config["model"] == pack.sd_folder() and config["raft_weights"] == pack.raft_file()
    dx, dy = shifts[toy["guidance_weight"]]
    assert dx >= 5.0 and abs(dy) < dx, shifts  # half way at least, within 45 degrees
    assert np.hypot(*shifts[0.0]) < 1.5, shifts


def test_a_model_without_text_encoder_loads_for_given_embeddings(tmp_path):
    """text_encoder=False loads UNet and VAE alone (a folder without text_encoder/ and
    tokenizer/ too); embed then refuses in one line. With it, a missing part is named."""
    folder = tmp_path / "sd"
    shutil.copytree(pack.sd_folder(), folder)
    shutil.rmtree(folder / "tokenizer")
    shutil.rmtree(folder / "text_encoder")
    with pytest.raises(InputError, match="no text_encoder/ subfolder"):
        sdm.load(str(folder), revision=None)
    sd = sdm.load(str(folder), revision=None, text_encoder=False)
    assert sd.text_encoder is None and sorted(sd.params) == ["unet", "vae"]
    with pytest.raises(ValueError, match="without its text encoder"):
        sd.embed("a green diamond")
    z = np.zeros((1, sd.latent_channels, 16, 16), np.float32)
    assert sd.decode(sd.params, z).shape == (1, 64, 64, 3)
    assert sd.configure(dtype="bfloat16").text_encoder is None
