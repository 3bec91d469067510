"""SDXL and v-prediction backbones through the one seam: tiny PyTorch models of the real classes
(diffusers' UNet2DConditionModel with text_time conditioning, CLIPTextModel +
CLIPTextModelWithProjection; a v-prediction scheduler), saved as PyTorch weights and read by the
from_pt path, against diffusers' own PyTorch pipeline and scheduler, and the guided sampler
against the PyTorch transcription of the reference loop extended to these conditionings."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from flow import load_raft
from flow.convert import convert
from flow.errors import InputError
from mgjax.method import ddim
from mgjax.model import sd as sdm
from tests import tiny_models
from tests.parity import LOG_PAIRS, PARITY, H, W, reference_run, run_ours, scene, to_torch
from tests.torch_raft import random_torchvision_raft


@pytest.fixture(scope="module")
def raft(tmp_path_factory):
    folder = tmp_path_factory.mktemp("raft")
    raft_t = random_torchvision_raft(small=True, seed=3)
    torch.save(raft_t.state_dict(), folder / "raft.pth")
    convert(str(folder / "raft.pth"), str(folder / "raft.mgjax"))
    raft = load_raft(str(folder / "raft.mgjax"), context_norm="batch")
    return dict(raft_t=raft_t, raft=raft, raft_pth=folder / "raft.pth")


def _backbone(tmp_path_factory, raft, kind):
    folder = tmp_path_factory.mktemp(f"tiny_{kind}_pt")
    models = tiny_models.torch_folder(folder, kind)
    models.update(raft, folder=folder)
    models["sd"] = sdm.load(str(folder), from_pt=True)
    return models


@pytest.fixture(scope="module")
def sdxl(tmp_path_factory, raft):
    return _backbone(tmp_path_factory, raft, "sdxl")


@pytest.fixture(scope="module")
def vpred(tmp_path_factory, raft):
    return _backbone(tmp_path_factory, raft, "v")


def test_kind_read_from_the_configs(sdxl, vpred):
    xl, v = sdxl["sd"], vpred["sd"]
    assert xl.text_time and xl.prediction_type == "epsilon" and xl.zero_uncond
    assert not v.text_time and v.prediction_type == "v_prediction" and not v.zero_uncond
    assert xl.scaling_factor == 0.13025 and v.scaling_factor == 0.18215
    assert xl.default_size == 32 * 4 and set(xl.params) == {"unet", "vae", "text", "text_2"}


def _pipeline(m, sd):
    from diffusers import StableDiffusionXLPipeline

    return StableDiffusionXLPipeline(
        vae=m["vae"],
        text_encoder=m["text_encoder"],
        text_encoder_2=m["text_encoder_2"],
        tokenizer=sd.tokenizer,
        tokenizer_2=sd.tokenizer_2,
        unet=m["unet"],
        scheduler=m["scheduler"],
    )


@pytest.mark.slow
def test_sdxl_seam_matches_diffusers_pytorch_pipeline(sdxl):
    """Embeddings against StableDiffusionXLPipeline.encode_prompt (both encoders' penultimate
    states, the pooled projection, zeros for the empty negative prompt), the UNet with the
    added conditions at a non-square size, and the VAE with SDXL's scaling factor."""
    sd, m = sdxl["sd"], sdxl
    ours = sd.embed(["a photo of a cat", ""], size=(96, 160))
    with torch.no_grad():
        pe, npe, pooled, npooled = _pipeline(m, sd).encode_prompt(
            "a photo of a cat", device="cpu", do_classifier_free_guidance=True
        )
    np.testing.assert_allclose(ours["text"][:1], pe.numpy(), atol=1e-5)
    np.testing.assert_allclose(ours["pooled"][:1], pooled.numpy(), atol=1e-5)
    assert not np.asarray(ours["text"][1]).any() and not npe.numpy().any()  # zeros, both
    assert not np.asarray(ours["pooled"][1]).any() and not npooled.numpy().any()
    np.testing.assert_array_equal(ours["time_ids"], [[96, 160, 0, 0, 96, 160]] * 2)
    rng = np.random.default_rng(0)
    z = rng.standard_normal((2, 4, 24, 40)).astype(np.float32)
    t = np.array([999, 21])
    ids = torch.tensor([[96, 160, 0, 0, 96, 160]] * 2, dtype=torch.float32)
    with torch.no_grad():
        eps = m["unet"](
            to_torch(z),
            to_torch(t),
            encoder_hidden_states=torch.cat([pe, npe]),
            added_cond_kwargs={"text_embeds": torch.cat([pooled, npooled]), "time_ids": ids},
        ).sample.numpy()
        img = m["vae"].decode(to_torch(z) / 0.13025).sample.numpy().transpose(0, 2, 3, 1)
        x = to_torch(img).permute(0, 3, 1, 2).clamp(-1, 1)
        mean = m["vae"].encode(x).latent_dist.mean.numpy() * 0.13025
    got = np.asarray(sd.eps(sd.params, z, t, ours))
    print(f"SDXL eps: max abs {np.abs(got - eps).max():.1e} of max {np.abs(eps).max():.2f}")
    np.testing.assert_allclose(got, eps, atol=2e-4)
    np.testing.assert_allclose(np.asarray(sd.decode(sd.params, z)), img, atol=1e-4)
    got = np.asarray(sd.encode(sd.params, np.clip(img, -1, 1)))
    np.testing.assert_allclose(got, mean, atol=1e-4)
    assert np.abs(eps).max() > 0.1 and np.abs(img).max() > 0.1  # not comparing zeros
    # the time ids reach the UNet: another size, another noise estimate
    other = sd.embed(["a photo of a cat", ""], size=(160, 96))
    assert np.abs(np.asarray(sd.eps(sd.params, z, t, other)) - got).max() > 1e-3


@pytest.mark.slow
def test_v_prediction_seam_matches_diffusers_scheduler(vpred):
    """Our noise estimate of a v-prediction UNet gives the clean-latent estimate that diffusers'
    PyTorch DDIMScheduler computes from the same UNet output (its v_prediction branch)."""
    sd, m = vpred["sd"], vpred
    rng = np.random.default_rng(0)
    z = rng.standard_normal((1, 4, 32, 32)).astype(np.float32)
    cond = sd.embed("a photo of a cat")
    sched = m["scheduler"]
    sched.set_timesteps(500)
    for t in (999, 501, 21):
        with torch.no_grad():
            v = m["unet"](to_torch(z), t, encoder_hidden_states=to_torch(cond)).sample
            x0 = sched.step(v, t, to_torch(z)).pred_original_sample.numpy()
        eps = sd.eps(sd.params, z, np.array([t]), cond)
        got = np.asarray(ddim.predict_x0(z, eps, ddim.alphas_cumprod()[t]))
        np.testing.assert_allclose(got, x0, atol=2e-4, err_msg=f"t={t}")
        assert np.abs(x0).max() > 0.1


def _parity(m, cond, uncond, cfg=PARITY):
    """Our guided sampler and the torch transcription, same weights and noise: relative
    distances of the final latents (ours to the reference's; ours to itself with the source
    image moved by 1e-6, the fp32 rounding floor of this tiny model; our run with no guidance to
    the reference), and both runs' logs."""
    sd = m["sd"]
    img, flow = scene()
    rng = np.random.default_rng(1)
    traj = rng.standard_normal((500, 1, 4, H // 4, W // 4)).astype(np.float32)
    frozen = np.ones((1, 4, H // 4, W // 4), bool)
    frozen[..., 6:26, 6:26] = False
    args = (img, flow, traj, frozen, cond, uncond)
    ours, logs, _, state = run_ours(sd, m["raft"], cfg, *args)
    ref, rlogs, _, _ = reference_run(
        m, cfg, img, flow, frozen, traj, cond, uncond, traj[0], np.asarray(state.keys), 3,
        prediction_type=sd.prediction_type, scaling_factor=sd.scaling_factor,
    )  # fmt: skip

    def dist(a, b):
        return np.linalg.norm(a - b) / np.linalg.norm(b)

    nudged, *_ = run_ours(sd, m["raft"], cfg, img + 1e-6, *args[1:])
    plain, *_ = run_ours(sd, m["raft"], cfg | dict(guidance_weight=0.0), *args)
    d = dict(rel=dist(ours, ref), floor=dist(nudged, ours), moved=dist(plain, ref))
    print(
        f"guided parity (fp32, {sd.prediction_type}, text_time {sd.text_time}): max abs "
        f"{np.abs(ours - ref).max():.2e}, " + ", ".join(f"{k} {v:.2e}" for k, v in d.items())
    )
    return d, logs, rlogs


def _check(d, logs, rlogs):
    assert d["rel"] < 1e-3, d
    for ours_name, ref_name in LOG_PAIRS:
        rtol = 1e-2 if ours_name == "guidance_norm" else 1e-3  # as tests/test_sampler.py
        np.testing.assert_allclose(logs[ours_name], rlogs[ref_name], rtol=rtol, err_msg=ours_name)
    # The two samplers differ by rounding: no more than a 1e-6 nudge of the source moves ours
    # (within 3x; the tiny v-prediction UNet amplifies rounding ~200x over these 6 evaluations,
    # to 2-3e-4 depending on the nudge, and the samplers sit 1.3-1.6 floors apart). This is the
    # check that catches a wrong guidance term: one missing, or off by half, puts the samplers
    # about moved / 2 apart or more, which the last line makes over 3 floors (the guidance moves
    # the latents 58 floors for SDXL, 16 for v-prediction).
    assert d["rel"] < 3 * d["floor"], d
    assert d["moved"] > 6 * d["floor"], d


@pytest.mark.slow
def test_guided_sdxl_matches_reference_transcription(sdxl):
    """3 DDIM steps x 2 recursive steps with SDXL's conditioning (hidden states, pooled, time
    ids; zeros as the unconditional input) and its VAE scaling factor."""
    sd = sdxl["sd"]
    cond, uncond = (sd.embed(p, size=(H, W)) for p in ("a cat", ""))
    _check(*_parity(sdxl, cond, uncond))


@pytest.mark.slow
def test_guided_v_prediction_matches_reference_transcription(vpred):
    sd = vpred["sd"]
    _check(*_parity(vpred, sd.embed("a cat"), sd.embed("")))


def test_sdxl_folder_without_second_encoder_is_one_error(sdxl, tmp_path):
    for part in ("unet", "vae", "text_encoder", "tokenizer", "scheduler"):
        (tmp_path / part).symlink_to(sdxl["folder"] / part)
    with pytest.raises(InputError, match="no text_encoder_2/ subfolder"):
        sdm.load(str(tmp_path), from_pt=True)


def test_scheduler_with_other_betas_is_refused(vpred, tmp_path):
    for part in ("unet", "vae", "text_encoder", "tokenizer"):
        (tmp_path / part).symlink_to(vpred["folder"] / part)
    (tmp_path / "scheduler").mkdir()
    config = dict(tiny_models.SCHEDULER, beta_schedule="linear", beta_end=0.02)
    (tmp_path / "scheduler" / "scheduler_config.json").write_text(json.dumps(config))
    with pytest.raises(InputError, match="not Stable Diffusion's"):
        sdm.load(str(tmp_path), from_pt=True)
    config = dict(tiny_models.SCHEDULER, prediction_type="sample")
    (tmp_path / "scheduler" / "scheduler_config.json").write_text(json.dumps(config))
    with pytest.raises(InputError, match="prediction_type 'sample' is not supported"):
        sdm.load(str(tmp_path), from_pt=True)


ROOT = Path(__file__).resolve().parents[1]
FAST = ["--steps=2", "--recursive_steps=1", "--chunk=1", "--guidance_weight=30", "--clip=10"]


def _launch(args, cwd):
    cmd = [sys.executable, str(ROOT / "launch.py"), *args, *FAST]
    res = subprocess.run(cmd, capture_output=True, text=True, cwd=cwd, timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]
    return res.stdout


def _outputs(folder: Path, size: tuple[int, int]):
    """The files of an edit, each of the image's (width, height)."""
    for name in ("edited.png", "source.png", "target_flow.png", "achieved_flow.png"):
        assert Image.open(folder / name).size == size, name
    metrics = json.loads((folder / "metrics.json").read_text())
    assert metrics["guided_evaluations"] == 2 and "flow_epe_inside_object" in metrics
    assert np.asarray(Image.open(folder / "edited.png")).std() > 0


@pytest.mark.slow
def test_launch_edits_with_an_sdxl_folder_from_pytorch_weights(sdxl, tmp_path):
    """launch.py --model <SDXL folder> --from_pt for a generated source (at the model's native
    size), and a --jobs file with an inverted real image (of another size: its own time ids)
    and a generated source; the outputs have the form SD v1's have."""
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (128, 192, 3), np.uint8)).save(tmp_path / "image.png")
    for w in (128, 192):
        mask = np.zeros((128, w), np.uint8)
        mask[40:90, 30:80] = 255
        Image.fromarray(mask).save(tmp_path / f"mask{w}.png")
    model = [f"--model={sdxl['folder']}", "--from_pt", f"--raft_weights={sdxl['raft_pth']}"]
    common = [*model, "--motion=translate:6,0", f"--object_mask={tmp_path / 'mask128.png'}"]
    _launch([*common, f"--out_dir={tmp_path / 'gen'}", "--prompt=a cat"], tmp_path)
    _outputs(tmp_path / "gen" / "sample_00", (128, 128))
    real = {"image": str(tmp_path / "image.png"), "object_mask": str(tmp_path / "mask192.png")}
    jobs = [{"name": "real", **real}, {"name": "made", "prompt": "a dog", "seed": 3}]
    (tmp_path / "jobs.jsonl").write_text("\n".join(json.dumps(j) for j in jobs) + "\n")
    out = _launch([*common, f"--out_dir={tmp_path / 'jobs'}", "--jobs=jobs.jsonl"], tmp_path)
    assert "jobs: 2 done" in out, out
    _outputs(tmp_path / "jobs" / "real" / "sample_00", (192, 128))
    _outputs(tmp_path / "jobs" / "made" / "sample_00", (128, 128))


def test_conditioning_pytrees_pass_through_inputs_untouched():
    """SDXL's dict conditioning is broadcast to the batch, kept leaf by leaf and mapped per image
    (what sharding does) by the backbone-free inputs code; a wrong batch is one error."""
    from types import SimpleNamespace

    from mgjax import config as C
    from mgjax.method.inputs import map_images, prepare

    b, h = 3, 64
    cond = {
        "text": np.ones((1, 77, 64)),
        "pooled": np.arange(32.0)[None],
        "time_ids": np.full((1, 6), h),
    }
    sd = SimpleNamespace(vae_factor=8, latent_channels=4)
    method = C.Method(steps=2)
    args = (np.zeros((b, h, h, 3)), np.zeros((b, h, h, 2)))
    inputs = prepare(sd, method, *args, cond, cond, z0=np.zeros((b, 4, 8, 8)))
    assert {k: v.shape for k, v in inputs.cond.items()} == {
        "text": (b, 77, 64),
        "pooled": (b, 32),
        "time_ids": (b, 6),
    }
    np.testing.assert_array_equal(inputs.uncond["pooled"][2], np.arange(32.0))
    first = map_images(inputs, lambda x, axis: np.take(x, [0], axis=axis))
    assert first.cond["time_ids"].shape == (1, 6) and first.source.shape == (1, h, h, 3)
    bad = dict(cond, pooled=np.zeros((2, 32)))
    with pytest.raises(InputError, match=r"first axis must be 1 or the batch \(3\)"):
        prepare(sd, method, *args, bad, cond, z0=np.zeros((b, 4, 8, 8)))


@pytest.mark.slow
def test_sdxl_flax_folder_roundtrip(sdxl, vpred, tmp_path):
    """A model loaded from PyTorch weights, saved as a Flax diffusers folder and loaded from it
    (the hub's Flax path): the same kind, parameters and embeddings."""
    import jax

    for name, m in (("xl", sdxl), ("v", vpred)):
        sd = m["sd"]
        sdm.save(sd, tmp_path / name)
        back = sdm.load(str(tmp_path / name))
        assert (back.text_time, back.prediction_type, back.zero_uncond) == (
            sd.text_time,
            sd.prediction_type,
            sd.zero_uncond,
        )
        assert jax.tree_util.tree_structure(back.params) == jax.tree_util.tree_structure(sd.params)
        for a, b in zip(*map(jax.tree_util.tree_leaves, (back.params, sd.params)), strict=True):
            np.testing.assert_array_equal(a, b)
        # the parameters are equal bit for bit (above); two compilations of the encoders may sum
        # in another order on a busy CPU, so the embeddings agree to float32 rounding
        embeddings = (jax.tree_util.tree_leaves(x.embed(["a cat", ""])) for x in (back, sd))
        for a, b in zip(*embeddings, strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
