"""The guided sampler vs a PyTorch transcription of the reference loop, on identical tiny weights
(created in torch, read by our from_pt path) and identical noise; plus DDIM, frozen-mask,
tracing, batching, inversion and bad-input checks."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from flow import load_raft
from flow.convert import convert
from flow.errors import InputError
from mgjax import config as C
from mgjax.edit.progress import Progress
from mgjax.method import ddim, loop, source
from mgjax.method.energy import Energy, PreservationEnergy
from mgjax.method.sampler import DivergenceError, Sampler
from mgjax.model import libraries, loading, modelinfo
from mgjax.model import sd as sdm
from tests import tiny_models, xla
from tests.ddim_oracle import ddim_oracle as _oracle
from tests.parity import LOG_PAIRS, PARITY, H, W, reference_run, run_ours, scene, to_torch
from tests.torch_raft import random_torchvision_raft


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """Torch UNet/VAE/CLIP/RAFT with seeded random weights, and our loads of the same files."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    folder = tmp_path_factory.mktemp("tiny_sd_pt")
    torch.manual_seed(0)
    unet = UNet2DConditionModel(**tiny_models.TINY_UNET).eval()
    vae = AutoencoderKL(**tiny_models.TINY_VAE).eval()
    text = CLIPTextModel(CLIPTextConfig(**tiny_models.TINY_CLIP)).eval()
    unet.save_pretrained(folder / "unet")  # safetensors
    vae.save_pretrained(folder / "vae", safe_serialization=False)  # torch pickle (.bin)
    text.save_pretrained(folder / "text_encoder", safe_serialization=False)
    tiny_models.tiny_tokenizer(folder / "tokenizer")
    raft_t = random_torchvision_raft(small=True, seed=3)
    torch.save(raft_t.state_dict(), folder / "raft.pth")
    convert(str(folder / "raft.pth"), str(folder / "raft.mgjax"))
    ours = sdm.load(str(folder), from_pt=True)
    raft = load_raft(str(folder / "raft.mgjax"), context_norm="batch")
    return dict(unet=unet, vae=vae, text=text, raft_t=raft_t, sd=ours, raft=raft, folder=folder)


@pytest.mark.slow
def test_seam_matches_torch_models(models):
    sd = models["sd"]
    rng = np.random.default_rng(0)
    z = rng.standard_normal((2, 4, 32, 32)).astype(np.float32)
    t = np.array([999, 21])
    ids = sd.tokenizer(
        ["a photo of a cat", ""], padding="max_length", max_length=77, return_tensors="np"
    ).input_ids
    with torch.no_grad():
        ctx = models["text"](to_torch(ids))[0].numpy()
        eps = models["unet"](
            to_torch(z), to_torch(t), encoder_hidden_states=to_torch(ctx)
        ).sample.numpy()
        img = models["vae"].decode(to_torch(z) / 0.18215).sample.numpy().transpose(0, 2, 3, 1)
        x = to_torch(img).permute(0, 3, 1, 2).clamp(-1, 1)
        mean = models["vae"].encode(x).latent_dist.mean.numpy() * 0.18215
    ours_ctx = np.asarray(sd.embed(["a photo of a cat", ""]))
    np.testing.assert_allclose(ours_ctx, ctx, atol=1e-5)
    np.testing.assert_allclose(np.asarray(sd.eps(sd.params, z, t, ctx)), eps, atol=2e-4)
    np.testing.assert_allclose(np.asarray(sd.decode(sd.params, z)), img, atol=1e-4)
    got = np.asarray(sd.encode(sd.params, np.clip(img, -1, 1)))
    np.testing.assert_allclose(got, mean, atol=1e-4)
    assert np.abs(eps).max() > 0.1 and np.abs(img).max() > 0.1  # not comparing zeros


def test_prompt_embedding_computed_once(models, monkeypatch):
    sd = sdm.load(str(models["folder"]), from_pt=True)
    calls = []
    real = sd.text_encoder.__call__
    monkeypatch.setattr(
        type(sd.text_encoder),
        "__call__",
        lambda self, ids, **kw: calls.append(len(ids)) or real(ids, **kw),
    )
    a = sd.embed(["x", "y", "x"])
    b = sd.embed("y")
    assert calls == [2]
    np.testing.assert_array_equal(a[1], b[0])


def test_hub_id_and_revision_are_passed_through(monkeypatch, tmp_path):
    """No network here: the hub loaders are replaced by recorders that serve a local folder."""
    tiny = tiny_models.tiny(seed=2)
    sdm.save(tiny, tmp_path)
    calls = []

    def recorder(cls_method):
        def load(where, *args, subfolder=None, revision=None, **kw):
            calls.append((where, subfolder, revision))
            return cls_method(str(tmp_path), *args, subfolder=subfolder, **kw)

        return load

    for cls in (
        libraries.CLIPTokenizer,
        libraries.FlaxUNet2DConditionModel,
        libraries.FlaxAutoencoderKL,
        libraries.FlaxCLIPTextModel,
    ):
        monkeypatch.setattr(cls, "from_pretrained", recorder(cls.from_pretrained))
    for cls in (loading.FlaxDDIMScheduler, loading.FlaxDiffusionPipeline):  # configs read too
        monkeypatch.setattr(cls, "load_config", recorder(cls.load_config))
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "cache"))  # not cached here
    monkeypatch.setattr(loading, "hub_reachable", lambda: True)  # as if online
    sd = sdm.load("CompVis/stable-diffusion-v1-4", revision="bf16")
    assert sorted(calls, key=str) == sorted(
        (("CompVis/stable-diffusion-v1-4", sub, "bf16")
         for sub in ("tokenizer", "unet", "vae", "text_encoder", "scheduler", None)),
        key=str,
    )  # fmt: skip
    assert sd.latent_channels == 4 and sd.vae_factor == 4
    with pytest.raises(InputError, match="no such folder"):
        sdm.load(str(tmp_path / "missing"))


def test_loaded_weights_are_not_pinned_to_the_host(tmp_path):
    """diffusers' and transformers' Flax loaders commit every weight to the host's CPU, where a
    jitted edit or training step given them runs even on a GPU host; the seam's loaders hand
    them over uncommitted, for jit to place."""
    sdm.save(tiny_models.tiny(seed=2), tmp_path)
    with libraries.quiet():
        _, raw = libraries.FlaxAutoencoderKL.from_pretrained(str(tmp_path), subfolder="vae")
    assert all(x.committed for x in jax.tree_util.tree_leaves(raw))  # what the library does
    loaded = (
        sdm.load(str(tmp_path)),
        sdm.load(str(tmp_path), dtype="bfloat16"),
        sdm.load_autoencoder(tmp_path / "vae"),
    )
    for sd in loaded:
        leaves = jax.tree_util.tree_leaves(sd.params)
        assert leaves and not any(x.committed for x in leaves)


def test_a_hub_id_offline_fails_at_once_with_what_to_do(monkeypatch, tmp_path):
    """With the hub's offline setting on and the model not in the local cache: one line naming
    the model and the two ways out, in well under a second (no retries)."""
    import time

    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    t = time.perf_counter()
    with pytest.raises(InputError, match="not in the local hub cache and the hub cannot be") as e:
        sdm.load("CompVis/stable-diffusion-v1-4", revision="flax")
    assert time.perf_counter() - t < 1.0
    assert "--model" in str(e.value) and "huggingface-cli download" in str(e.value)
    assert not modelinfo.hub_reachable()


@pytest.mark.slow
def test_flax_folder_roundtrip_and_bf16(tmp_path):
    tiny = tiny_models.tiny(seed=5)
    sdm.save(tiny, tmp_path)
    again = sdm.load(str(tmp_path))
    z = jnp.ones((1, 4, 16, 16))
    ctx = tiny.embed("")
    np.testing.assert_array_equal(
        np.asarray(again.eps(again.params, z, jnp.array([5]), ctx)),
        np.asarray(tiny.eps(tiny.params, z, jnp.array([5]), ctx)),
    )
    half = sdm.load(str(tmp_path), dtype="bfloat16")
    dtypes = {x.dtype for x in jax.tree_util.tree_leaves(half.params)}
    assert dtypes == {jnp.dtype(jnp.bfloat16)}
    with pytest.raises(InputError, match="dtype must be float32 or bfloat16"):
        sdm.load(str(tmp_path), dtype="float16")
    with pytest.raises(InputError, match="not a diffusers-format folder"):
        sdm.load(str(tmp_path / "unet"))
    (tmp_path / "vae" / "diffusion_flax_model.msgpack").write_bytes(b"garbage")
    with pytest.raises(InputError, match="cannot load Stable Diffusion from"):
        sdm.load(str(tmp_path))


def _parity_inputs(sd):
    img, flow = scene()
    rng = np.random.default_rng(1)
    traj = rng.standard_normal((500, 1, 4, 32, 32)).astype(np.float32)
    frozen = np.ones((1, 4, 32, 32), bool)
    frozen[..., 6:26, 6:26] = False
    cond, uncond = np.asarray(sd.embed("a cat")), np.asarray(sd.embed(""))
    return img, flow, traj, frozen, cond, uncond


def _sample(sampler, inputs, state, **hooks):
    """(state, logs, snapshots) of a run to the end through mgjax.method.loop.run."""
    snapshots = {}
    result = loop.run(sampler, inputs, state, on_snapshots=snapshots.update, **hooks)
    return result.state, result.logs, snapshots


@pytest.mark.slow
def test_guided_steps_match_reference_transcription(models):
    """3 DDIM steps x 2 recursive steps of the 500-step schedule, a frozen mask, clipping on some
    evaluations, fp32 on both sides: final latents within 1e-3 relative (seen ~1e-4; our own
    sampler with the source image moved by 1e-6 lands ~7e-5 away, the fp32 noise floor)."""
    sd, cfg = models["sd"], PARITY
    img, flow, traj, frozen, cond, uncond = _parity_inputs(sd)
    ours, logs, edit, state = run_ours(
        sd, models["raft"], cfg, img, flow, traj, frozen, cond, uncond
    )
    ref, rlogs, energy, _ = reference_run(
        models, cfg, img, flow, frozen, traj, cond, uncond, traj[0], np.asarray(state.keys), 3
    )
    # the occlusion masks agree (ours: scatter of landings; reference: gradient trick)
    np.testing.assert_array_equal(np.asarray(edit.occlusion)[..., 0], energy.mask_occ[:, 0])
    assert (np.asarray(edit.occlusion) == 0).any()
    clipped = rlogs["guidance_norms"] >= cfg["clip"] * (1 - 1e-6)
    assert clipped.any() and not clipped.all(), rlogs["guidance_norms"]  # clipping active
    rel = np.linalg.norm(ours - ref) / np.linalg.norm(ref)
    nudged, *_ = run_ours(sd, models["raft"], cfg, img + 1e-6, flow, traj, frozen, cond, uncond)
    floor = np.linalg.norm(ours - nudged) / np.linalg.norm(ours)
    print(f"guided parity (fp32): vs torch {rel:.2e}; vs itself, source moved 1e-6: {floor:.2e}")
    assert rel < 1e-3, rel
    # the scan chunk (the GPU/TPU default; this run is loops "auto" = unrolled on CPU) too
    scan, *_ = run_ours(
        sd, models["raft"], cfg | dict(loops="scan"), img, flow, traj, frozen,
        cond, uncond,
    )  # fmt: skip
    rel_scan = np.linalg.norm(scan - ref) / np.linalg.norm(ref)
    print(f"guided parity, loops scan: vs torch {rel_scan:.2e}")
    assert rel_scan < 1e-3, rel_scan
    for ours_name, ref_name in LOG_PAIRS:
        # an unclipped gradient norm is the most rounding-sensitive log: RAFT's fp32 gradient
        # moves ~0.7% under 1e-6 input noise (tests/test_raft.py), so it gets 1e-2
        rtol = 1e-2 if ours_name == "guidance_norm" else 1e-3
        np.testing.assert_allclose(logs[ours_name], rlogs[ref_name], rtol=rtol, err_msg=ours_name)
    # the guidance moved the latents: the comparison is not between two plain DDIM runs
    plain = cfg | dict(guidance_weight=0.0)
    zp, *_ = run_ours(sd, models["raft"], plain, img, flow, traj, frozen, cond, uncond)
    moved = np.linalg.norm(zp - ref) / np.linalg.norm(ref)
    assert moved > 30 * rel, (moved, rel)


@pytest.mark.slow
def test_full_raft_gradient_changes_the_gradient_not_the_energy(models):
    """--raft_gradient full: the first evaluation's energy is the detached run's (the same
    forward pass), its guidance differs (the gradient through RAFT's refinement is added), and
    a bad value is refused."""
    sd = models["sd"]
    img, flow, traj, frozen, cond, uncond = _parity_inputs(sd)
    cfg = PARITY | dict(clip=0.0, recursive_steps=1, chunk=1)
    logs = {
        g: run_ours(sd, models["raft"], cfg | dict(raft_gradient=g), img, flow,
                 traj, frozen, cond, uncond, steps=1)[1]
        for g in ("detached", "full")
    }  # fmt: skip
    np.testing.assert_allclose(logs["full"]["energy"], logs["detached"]["energy"], rtol=1e-6)
    a, b = logs["full"]["guidance_norm"], logs["detached"]["guidance_norm"]
    assert abs(a - b) > 1e-2 * b, (a, b)
    with pytest.raises(ValueError, match="raft_gradient must be one of"):
        C.Method(raft_gradient="exact")


class Recording:
    """The seam with every UNet input latent recorded (host callback under jit)."""

    def __init__(self, sd):
        self._sd, self.seen = sd, []

    def __getattr__(self, name):
        return getattr(self._sd, name)

    def eps(self, params, z, t, context):
        jax.debug.callback(lambda v: self.seen.append(np.asarray(v)), z)
        return self._sd.eps(params, z, t, context)


@pytest.mark.slow
def test_frozen_latents_before_every_unet_call_and_traces_once(models):
    sd = Recording(models["sd"])
    cfg = C.make(steps=6, recursive_steps=2, chunk=2, clip=0.0).method
    img, flow = scene(seed=3)
    rng = np.random.default_rng(2)
    traj = rng.standard_normal((6, 1, 4, 32, 32)).astype(np.float32)
    frozen = np.zeros((1, 1, 32, 32), bool)
    frozen[..., :, :10] = True
    cond, uncond = sd.embed("a dog"), sd.embed("")
    sampler = Sampler.of(sd, models["raft"], snapshot_every=4, steps=6, recursive_steps=2,
                         chunk=2, clip=0.0)  # fmt: skip
    edit = sampler.prepare(img, flow, cond, uncond, frozen=frozen, trajectory=traj)
    z_T = rng.standard_normal((1, 4, 32, 32)).astype(np.float32)
    lines = []
    state, logs, snaps = _sample(
        sampler, edit, sampler.init(edit, z_T, seeds=0), progress=Progress(6, 2, log=lines.append)
    )
    assert int(state.step) == 6 and logs["energy"].shape == (6, 2, 1)
    assert len(lines) == 3 and "evals/s" in lines[-1] and "ETA" in lines[-1], lines
    assert sorted(snaps) == [0, 4] and snaps[4].shape == (1, H, W, 3)
    # the snapshot is the first evaluation's decoded x0 estimate of that step
    base, i = models["sd"], 4
    z_in = jnp.asarray(sd.seen[2 * i])  # [z, z] for [uncond, cond]
    t = jnp.full((2,), sampler.guidance.schedule.timesteps[i])
    e = base.eps(base.params, z_in, t, jnp.concatenate([edit.uncond, edit.cond]))
    eps = e[:1] + cfg.cfg_scale * (e[1:] - e[:1])
    x0 = base.decode(base.params, ddim.predict_x0(z_in[:1], eps, sampler.guidance.schedule.abar[i]))
    x0 = x0 * 0.5 + 0.5
    np.testing.assert_allclose(snaps[4], np.asarray(x0), atol=1e-4)
    assert len(sd.seen) == 6 * 2
    mask = np.broadcast_to(frozen, (1, 4, 32, 32))
    for n, z in enumerate(sd.seen):
        i = n // 2
        np.testing.assert_array_equal(z[:1][mask], traj[i][mask])  # uncond half
        np.testing.assert_array_equal(z[1:][mask], traj[i][mask])  # cond half
        assert not np.array_equal(z[:1][~mask], traj[i][~mask])
    # a second edit of the same shapes reuses the compiled chunk
    edit2 = sampler.prepare(1 - img, -flow, cond, uncond, frozen=frozen, trajectory=traj * 0.5)
    _sample(sampler, edit2, sampler.init(edit2, z_T, seeds=1))
    # divergence is noticed and named, not returned as an image
    huge = np.ones(6, np.float32)
    huge[3] = 1e38
    edit3 = sampler.prepare(img, flow, cond, uncond, frozen=frozen, trajectory=traj, schedule=huge)
    with pytest.raises(DivergenceError, match=r"DDIM steps 2\.\.3"):
        _sample(sampler, edit3, sampler.init(edit3, z_T, seeds=0))
    assert sampler.traces == 1


@dataclasses.dataclass(frozen=True)
class _Brightness(Energy):
    """A user-defined energy: pull each image's mean towards its own target, given per edit as
    an extra array (the docstring example of mgjax/method/energy.py, with the target and a weight in
    extras)."""

    log_names = ("brightness_loss",)

    def __call__(self, x, ctx):
        loss = ctx.extras["weight"] * jnp.abs(x.mean(axis=(1, 2, 3)) - ctx.extras["target"])
        return loss, {"brightness_loss": loss}


@pytest.mark.slow
def test_user_energy_runs_in_the_jitted_sampler_without_retracing(models):
    """Three edits of one source, the same seed and z_T: brightness targets 0 and 1, and a third
    with weight 0 (unguided). The guided decodes order around the unguided one as asked; the
    paper energy's terms are not computed (not logged); two chunks and a second batch with new
    extras values compile once."""
    sd = models["sd"]
    cfg = dict(steps=4, recursive_steps=2, chunk=2, guidance_weight=3e5, clip=0)
    img, flow = scene(seed=1)
    img, flow = np.repeat(img, 3, axis=0), np.repeat(flow, 3, axis=0)
    cond, uncond = sd.embed("a lamp"), sd.embed("")
    rng = np.random.default_rng(5)
    z0 = np.repeat(rng.standard_normal((1, 4, 32, 32)).astype(np.float32), 3, axis=0)
    z_T = np.repeat(rng.standard_normal((1, 4, 32, 32)).astype(np.float32), 3, axis=0)
    energy = 0.0 * PreservationEnergy() + _Brightness()  # composition with a built-in
    sampler = Sampler.of(sd, models["raft"], energy=energy, **cfg)
    assert sampler.log_names == (
        "energy", "keep_loss", "brightness_loss", "noise_norm", "guidance_norm"
    )  # fmt: skip
    extras = {"target": np.array([0.0, 1.0, 0.0], np.float32), "weight": np.array([1.0, 1, 0])}
    edit = sampler.prepare(img, flow, cond, uncond, z0=z0, extras=extras)
    state, logs, _ = _sample(sampler, edit, sampler.init(edit, z_T, seeds=[3, 3, 3]))
    assert set(logs) == set(sampler.log_names) and sampler.traces == 1
    np.testing.assert_allclose(logs["energy"], logs["brightness_loss"], rtol=1e-6)
    dark, bright, base = sampler.decode(state.z).mean(axis=(1, 2, 3))
    print(f"mean brightness: target 0 -> {dark:.4f}, 1 -> {bright:.4f}, unguided {base:.4f}")
    # seen with 6 steps: 0.506 < 0.525 < 0.533 (lambda_g 3e5: the gradient of a mean over 49k
    # values is small)
    assert dark < base < bright and bright - dark > 0.01, (dark, base, bright)
    # new values of the extras are arguments of the compiled chunk: no retrace
    extras2 = {k: v[::-1].copy() for k, v in extras.items()}
    edit2 = sampler.prepare(img, flow, cond, uncond, z0=z0, extras=extras2)
    _sample(sampler, edit2, sampler.init(edit2, z_T, seeds=[3, 3, 3]))
    assert sampler.traces == 1
    with pytest.raises(InputError, match="batch"):
        sampler.prepare(img, flow, cond, uncond, z0=z0, extras={"target": np.zeros(2)})
    with pytest.raises(TypeError, match="Energy"):
        Sampler.of(sd, models["raft"], energy=lambda x, ctx: x.sum(), **cfg)


@pytest.mark.slow
def test_zero_guidance_is_plain_ddim_and_diffusers_scheduler(models):
    sd, steps = models["sd"], 8
    img, flow = scene()
    cond, uncond = sd.embed("a red ball"), sd.embed("")
    z_T = np.random.default_rng(3).standard_normal((1, 4, 32, 32)).astype(np.float32)
    cfg = C.make(steps=steps, recursive_steps=1, guidance_weight=0.0, chunk=4).method
    sampler = Sampler.of(sd, models["raft"], steps=steps, recursive_steps=1, guidance_weight=0.0,
                         chunk=4)  # fmt: skip
    traj = source.generate(sd, z_T, cond, uncond, num_steps=steps, chunk=3)
    edit = sampler.prepare(img, flow, cond, uncond, z0=np.zeros_like(z_T))
    state, _, _ = _sample(sampler, edit, sampler.init(edit, z_T, seeds=0))
    np.testing.assert_allclose(np.asarray(state.z), traj.z0, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(traj.latents[0], z_T)

    sched, st = _oracle(steps)
    z = jnp.asarray(z_T)
    for n, t in enumerate(np.asarray(st.timesteps)):
        np.testing.assert_allclose(np.asarray(z), traj.latents[n], rtol=1e-4, atol=1e-4)
        eps = source.cfg_eps(sd, sd.params, z, t, edit.cond, edit.uncond, cfg.cfg_scale, True)
        z = sched.step(st, eps, int(t), z).prev_sample
    np.testing.assert_allclose(np.asarray(z), traj.z0, rtol=1e-4, atol=1e-4)
    assert np.abs(traj.z0 - z_T).max() > 0.1


@pytest.mark.slow
def test_sdedit_is_diffusers_add_noise_then_ddim(models):
    """source.sdedit against diffusers' FlaxDDIMScheduler: the encoded image noised to the
    step its strength names (add_noise), then the scheduler's steps from there, decoded."""
    sd, steps, strength = models["sd"], 8, 0.5
    img, _ = scene()
    cond, uncond = sd.embed("a red ball"), sd.embed("")
    out = source.sdedit(sd, img, cond, uncond, strength, num_steps=steps, cfg_scale=2.0, seed=7)

    sched, st = _oracle(steps)
    start = 4  # (1 - 0.5) x 8 steps skipped
    z0 = jnp.asarray(source.encode(sd, img))
    noise = jax.random.normal(jax.random.PRNGKey(7), z0.shape)
    z = sched.add_noise(st, z0, noise, st.timesteps[start : start + 1])
    for t in np.asarray(st.timesteps)[start:]:
        eps = source.cfg_eps(sd, sd.params, z, t, cond, uncond, 2.0)
        z = sched.step(st, eps, int(t), z).prev_sample
    ref = np.clip(np.asarray(sd.decode(sd.params, z)) * 0.5 + 0.5, 0, 1)
    np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-4)
    assert np.abs(out - source.roundtrip(sd, img)).max() > 1e-2  # the steps did something
    # strength 0 is the autoencoder's round trip; a strength outside 0-1 is refused
    np.testing.assert_array_equal(
        source.sdedit(sd, img, cond, uncond, 0.0), source.roundtrip(sd, img)
    )
    with pytest.raises(InputError, match="strength"):
        source.sdedit(sd, img, cond, uncond, 1.5)


@pytest.mark.slow
def test_batch_equals_single_images_and_seeds(models):
    sd = models["sd"]
    # lambda_g 10: larger weights amplify batched-vs-single rounding (1e-7) chaotically. The
    # clip bites on some evaluations; it must act per image for a batch to equal its singles.
    cfg = dict(steps=4, recursive_steps=2, chunk=2, guidance_weight=10.0, clip=1.0)
    img0, flow0 = scene(seed=0)
    img1, flow1 = scene(seed=5)
    flow1 = -flow1
    cond, uncond = sd.embed("a tree"), sd.embed("")
    rng = np.random.default_rng(4)
    z0 = rng.standard_normal((2, 4, 32, 32)).astype(np.float32)
    z_T = rng.standard_normal((2, 4, 32, 32)).astype(np.float32)
    sampler = Sampler.of(sd, models["raft"], **cfg)
    both = sampler.prepare(
        np.concatenate([img0, img1]), np.concatenate([flow0, flow1]), cond, uncond, z0=z0
    )
    st, logs, _ = _sample(sampler, both, sampler.init(both, z_T, seeds=[11, 12]))
    zb = np.asarray(st.z)
    norms = logs["guidance_norm"]  # unclipped they run 2.7, 1.8, 0.7, ... per image
    assert (norms >= 1.0 - 1e-6).any() and (norms < 0.99).any()
    for n, (img, flow) in enumerate(((img0, flow0), (img1, flow1))):
        one = sampler.prepare(img, flow, cond, uncond, z0=z0[n : n + 1])
        zs = np.asarray(_sample(sampler, one, sampler.init(one, z_T[n : n + 1], [11 + n]))[0].z)
        # relative L2 as in the parity test: guided runs amplify 1e-7 differences (batched vs
        # single convolutions sum in another order) to ~1e-4
        assert np.linalg.norm(zb[n : n + 1] - zs) / np.linalg.norm(zs) < 1e-3
    again = np.asarray(_sample(sampler, both, sampler.init(both, z_T, seeds=[11, 12]))[0].z)
    np.testing.assert_array_equal(again, zb)  # deterministic for a seed
    other = np.asarray(_sample(sampler, both, sampler.init(both, z_T, seeds=[13, 12]))[0].z)
    assert np.abs(other[0] - zb[0]).max() > 1e-3  # the seed drives the re-noising
    assert np.linalg.norm(other[1] - zb[1]) / np.linalg.norm(zb[1]) < 1e-3


@pytest.mark.slow
def test_cfg_one_skips_the_unconditional_branch(models):
    """At CFG 1, uncond + 1 (cond - uncond) = cond: one UNet call at batch B instead of 2B, the
    same noise estimate up to rounding, and about half the FLOPs (XLA's count). The guided
    sampler asks for it (skip_at_one); inversion keeps both halves."""
    sd = models["sd"]
    z = jnp.asarray(np.random.default_rng(2).standard_normal((1, 4, 32, 32)), jnp.float32)
    cond, uncond = sd.embed("a tree"), sd.embed("")

    skipped = jax.jit(
        lambda p, z, s: source.cfg_eps(sd, p, z, 500, cond, uncond, s, skip_at_one=True),
        static_argnums=2,
    )
    both = jax.jit(
        lambda p, z, s: source.cfg_eps(sd, p, z, 500, cond, uncond, s, skip_at_one=True)
    )  # a traced scale: both halves
    np.testing.assert_allclose(
        skipped(sd.params, z, 1.0), both(sd.params, z, jnp.float32(1.0)), rtol=0, atol=1e-5
    )
    flops = [
        xla.flops(f.lower(sd.params, z, s).compile())
        for f, s in ((skipped, 1.0), (both, jnp.float32(1.0)))
    ]
    assert 0.4 < flops[0] / flops[1] < 0.6, flops


@pytest.mark.slow
@pytest.mark.parametrize("coupling, bound", [(0.0, 1e-4), (0.01, 5e-2)])
def test_inversion_then_sampling_reconstructs(models, coupling, bound):
    """Invert a generated image, sample back from the inverted z_T: the clean latent returns.

    DDIM inversion is exact when eps does not depend on z, and its error grows with how much eps
    changes between neighbouring steps. A random UNet's eps swings by O(1) for small moves of z
    (the un-tamed tiny model ends 20x off), so its output layer is replaced: kernel scaled by
    `coupling`, bias a fixed non-zero eps. coupling 0 checks the bookkeeping exactly (the
    affine steps with a non-zero eps do not commute, so a wrong pairing or order shows);
    coupling 0.01 checks a z-dependent eps (error measured ~2e-2, linear in the coupling)."""
    base, steps = models["sd"], 50
    params = jax.tree_util.tree_map(lambda x: x, base.params)
    kernel = params["unet"]["conv_out"]["kernel"]
    params["unet"]["conv_out"] = {
        "kernel": coupling * kernel,
        "bias": jnp.asarray([0.8, 0.3, -0.2, 0.4]),
    }
    sd = dataclasses.replace(base, params=params)
    uncond = sd.embed("")
    z_T = np.random.default_rng(5).standard_normal((1, 4, 32, 32)).astype(np.float32)
    gen = source.generate(sd, z_T, uncond, uncond, num_steps=steps, cfg_scale=1.0)
    image = np.clip(np.asarray(sd.decode(sd.params, gen.z0)) * 0.5 + 0.5, 0, 1)
    inv = source.invert(sd, image, uncond, uncond, num_steps=steps, cfg_scale=1.0)
    assert inv.latents.shape == (steps, 1, 4, 32, 32)
    np.testing.assert_array_equal(inv.latents[0], inv.z_T)
    back = source.generate(sd, inv.z_T, uncond, uncond, num_steps=steps, cfg_scale=1.0)
    rel = lambda a, b: float(np.linalg.norm(a - b) / np.linalg.norm(b))  # noqa: E731
    err = rel(back.z0, inv.z0)
    # every cached latent of the inversion is where sampling from its z_T passes (sampling order)
    traj_err = max(rel(back.latents[n], inv.latents[n]) for n in range(steps))
    print(f"inversion (coupling {coupling}): z0 rel err {err:.2e}, worst step {traj_err:.2e}")
    assert err < bound and traj_err < bound, (err, traj_err)
    # ... and the check can fail: the un-reversed list does not line up
    assert rel(back.latents[1], inv.latents[-2]) > 0.1


def test_bad_inputs_rejected_before_compute(models):
    sd = models["sd"]
    sampler = Sampler.of(sd, models["raft"], steps=4)
    img, flow = scene()
    cond = uncond = np.zeros((1, 77, 32), np.float32)
    z0 = np.zeros((1, 4, 32, 32), np.float32)
    cases = [
        (dict(target_flow=flow[:, :32]), "does not match the image"),
        (dict(target_flow=np.where(flow > 2, np.nan, flow)), "NaN or inf"),
        (dict(frozen=np.zeros((1, 4, 16, 16), bool)), "frozen mask shape"),
        (dict(schedule=np.ones(5)), "guidance schedule has 5 entries"),
        (dict(schedule=np.full(4, np.inf)), "schedule contains NaN"),
        (dict(z0=None, trajectory=np.zeros((3, 1, 4, 32, 32))), "has 3 steps"),
        (dict(source=img[:, :112, :112], target_flow=flow[:, :112, :112]), "not a multiple of 32"),
        (dict(z0=None), "exactly one of"),
    ]
    for change, message in cases:
        kw = dict(source=img, target_flow=flow, cond=cond, uncond=uncond, z0=z0) | change
        with pytest.raises(InputError, match=message):
            sampler.prepare(**kw)
    edit = sampler.prepare(img, flow, cond, uncond, z0=z0)
    with pytest.raises(ValueError, match="initial latent"):
        sampler.init(edit, np.zeros((1, 4, 16, 16)), 0)
    with pytest.raises(ValueError, match="recursive_steps"):
        C.Method(recursive_steps=0)
    assert sampler.traces == 0


def test_ddim_schedule_indices_match_reference():
    steps, alphas, alphas_prev, _ = __import__(
        "tests.torch_reference", fromlist=["reference_schedule"]
    ).reference_schedule(500)
    sch = ddim.make_schedule(500)
    np.testing.assert_array_equal(np.asarray(sch.timesteps), steps[::-1])
    np.testing.assert_allclose(np.asarray(sch.abar), alphas.numpy()[::-1], rtol=1e-6)
    np.testing.assert_allclose(np.asarray(sch.abar_prev), alphas_prev.numpy()[::-1], rtol=1e-6)
