"""Train the toy pack's latent diffusion model on the shapes world: a diffusers AutoencoderKL
(VAE factor 4), then a UNet2DConditionModel with a small CLIP text encoder trained jointly,
text-conditionally with prompt dropout (so that classifier-free guidance works). The same Flax
classes the real pipeline loads, built and run through the model seam (mgjax.model.sd); the
result is a diffusers folder that `mgjax.model.sd.load` reads. Seeded, optax, progress lines, loss
curves, a sample grid; each stage stops at its time budget, and a run continues from any folder
it wrote (the shipped pack included) with --init.

  python -m mgjax.toy.train_ldm --out_dir runs/vae --unet_steps 0          # autoencoder only
  python -m mgjax.toy.train_ldm --out_dir runs/vae2 --init runs/vae/sd/vae --unet_steps 0
                                                                  # continue the autoencoder
  python -m mgjax.toy.train_ldm --out_dir runs/ldm --init runs/vae/sd/vae --vae_steps 0
                                                                  # a new UNet on that autoencoder
  python -m mgjax.toy.train_ldm --out_dir runs/ldm2 --init mgjax/toy/pack/sd --vae_steps 0
                                                                  # continue the UNet
  python -m mgjax.toy.train_ldm --out_dir runs/ldm3 --init mgjax/toy/pack/sd --vae_steps 0 \
      --unet_layers 2 --unet_top_attention       # continue it grown: two layers deep per
                                                 # block, text attention at the latent's size

Writes OUT/sd/ (unet/, vae/, text_encoder/, tokenizer/, model_index.json), OUT/vae_losses.png,
OUT/unet_losses.png, OUT/samples.png (prompts x seeds, CFG 7.5, 50 DDIM steps), OUT/log.json.
"""

import functools
import json
import os
import re
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import app, flags

from flow.errors import InputError, run_cli
from mgjax.edit import outputs
from mgjax.method import ddim
from mgjax.model import sd as sdm
from mgjax.toy import quality, shapes
from mgjax.toy.budget import (
    Budget,
    device_description,
    finite,
    parallel_map,
    refuse_unless,
    scheduled,
    seeds_from,
    with_learning_rate,
)
from mgjax.toy.tokenizer import MAX_TOKENS, check_tokenizer, tokenizer_files

FLAGS = flags.FLAGS

SIZE = 64
# The autoencoder: 48 channels at 64x64 and 96 below, two downsamplings (16x16x4 latents).
# GroupNorm in groups of 16 (48 is not a multiple of diffusers' default 32).
TOY_VAE = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D",) * 3,
    up_block_types=("UpDecoderBlock2D",) * 3,
    block_out_channels=(48, 96, 96),
    layers_per_block=1,
    latent_channels=4,
    norm_num_groups=16,
    sample_size=SIZE,
)
TOY_UNET = dict(
    sample_size=SIZE // 4,
    in_channels=4,
    out_channels=4,
    # attention (self and text) at 8x8 and 4x4 only: at 16x16 it took 60% of a training step
    # (1.30 s vs 0.56 s per batch of 32 on 2 cores), and objects span 2-4 cells at 8x8
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    # 4.0 M parameters, 40 GFLOP per training step of 32 (XLA's count; 2.6x the 32/64/64
    # UNet's 15 GFLOP): widths are multiples of 32, diffusers' GroupNorm groups
    block_out_channels=(64, 96, 96),
    layers_per_block=1,
    attention_head_dim=8,
    cross_attention_dim=64,
)
TEXT = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=3,
    num_attention_heads=4,
    projection_dim=64,
)


def new_models(
    folder, seed: int, layers: int | None = None, top_attention: bool = False
) -> sdm.StableDiffusion:
    """The toy models with random weights (TOY_UNET, TOY_VAE, TEXT), built by the seam;
    `layers`: the UNet's layers per block (default TOY_UNET's); `top_attention`: text
    attention at the latent's size too (sdm.top_attention_config)."""
    tokenizer = tokenizer_files(Path(folder) / "tokenizer_build")
    text = dict(TEXT, vocab_size=len(json.loads((tokenizer / "vocab.json").read_text())),
                max_position_embeddings=MAX_TOKENS)  # fmt: skip
    unet = dict(TOY_UNET, layers_per_block=layers or TOY_UNET["layers_per_block"])
    unet = sdm.top_attention_config(unet) if top_attention else unet
    sd = sdm.random_init(unet, TOY_VAE, text, tokenizer, seed=seed)
    ids = sd.tokenizer
    text.update(bos_token_id=ids.bos_token_id, eos_token_id=ids.eos_token_id,
                pad_token_id=ids.pad_token_id)  # fmt: skip
    sd = sdm.random_init(unet, TOY_VAE, text, tokenizer, seed=seed)
    check_tokenizer(sd.tokenizer)
    return sd


def with_params(sd: sdm.StableDiffusion, params: dict, scaling: float | None = None, unet=None):
    """The same models with other parameters (and another latent scaling factor, or another
    UNet config `unet`)."""
    vae = dict(sd.vae.config)
    if scaling is not None:
        vae["scaling_factor"] = scaling
    unet = sd.unet.config if unet is None else unet
    return sdm.build(unet, vae, sd.text_encoder.config, sd.tokenizer, params)


def grown(sd: sdm.StableDiffusion, layers: int, top_attention: bool, seed: int):
    """The models with a UNet `layers` deep per block and, with `top_attention`, text attention
    at the latent's size, that computes what `sd`'s does (new layers start as the identity:
    mgjax.model.grow)."""
    config, unet = sd.unet.config, sd.params["unet"]
    if layers != config["layers_per_block"]:  # deeper_unet refuses a shallower one
        config, unet = sdm.deeper_unet(config, unet, layers, seed)
    if top_attention:
        config, unet = sdm.with_top_attention(config, unet, seed)
    return with_params(sd, dict(sd.params, unet=unet), unet=config)


# ----------------------------------------------------------------------------- data


def render_pool(rng, n: int, supersample: int = 4, log=print, workers: int | None = None):
    """n random scenes (one seed each, drawn from `rng`), rendered in `workers` processes:
    images f32[n,64,64,3] in [-1, 1], the union of their objects' exact masks bool[n,64,64],
    and their prompts."""
    start = time.perf_counter()
    render = functools.partial(shapes.seeded_scene, size=SIZE, supersample=supersample)
    images, masks, prompts = zip(*parallel_map(render, seeds_from(rng, n), workers), strict=True)
    log(f"rendered {n} scenes in {time.perf_counter() - start:.1f} s")
    return (2.0 * np.stack(images) - 1.0).astype(np.float32), np.stack(masks), list(prompts)


def _progress(name, step, budget: Budget, loss, lr, log):
    rate = step / max(budget.elapsed(), 1e-9)
    left = budget.seconds_left(step)
    log(f"{name} step {step}/{budget.steps}  loss {loss:.4f}  lr {lr:.2e}  {rate:.2f} steps/s  "
        f"ETA {left / 60:.1f} min")  # fmt: skip
    if not np.isfinite(loss):
        raise RuntimeError(f"{name} training diverged at step {step} (loss {loss})")


# ----------------------------------------------------------------------------- stages


DECODER = ("decoder", "post_quant_conv")  # the autoencoder's parameters after the latents


def draw_scenes(rng, n: int, last_loss: np.ndarray, hard_share: float) -> np.ndarray:
    """n indices into a pool of scenes whose last measured losses are `last_loss` (inf where
    not measured yet): round(hard_share * n) of them drawn in proportion to the loss (an
    unmeasured scene weighs as much as the worst measured one), the rest uniformly."""
    hard = int(round(hard_share * n))
    idx = rng.integers(0, len(last_loss), n - hard)
    if hard:
        seen = np.isfinite(last_loss)
        worst = last_loss[seen].max() if seen.any() else 1.0
        weight = np.where(seen, last_loss, worst)
        idx = np.concatenate([idx, rng.choice(len(last_loss), hard, p=weight / weight.sum())])
    return idx


def train_vae(sd, rng, minutes, steps, batch, crop, full_share, object_weight, lr, pool,
              log_every, log, workers=None, decoder_only=False, hard_share=0.0,
              scale_weight=0.0):  # fmt: skip
    """The autoencoder, on random `crop` x `crop` crops of a pool of rendered scenes (the
    networks are convolutional; a crop step costs a quarter of a full one), then on full
    images for the last `full_share` of the steps or of the time budget, so that the GroupNorm
    statistics and the mid-block attention see whole 64x64 images. Loss: L1 + L2 of the
    reconstruction, object pixels weighted `object_weight` times (the world's exact masks: the
    objects are what guidance moves and the measures segment). The decoder reads the
    posterior mean, as every user of the model does (inversion, guidance, the benches): a
    latent sampled with the posterior's initial unit std buries the mean in noise, and
    training through it reached 22.7 dB after 1,100 steps (200 held-out scenes). A full-image
    batch holds as many pixels as a crop batch. The learning rate warms up over the first 5%
    and decays (cosine, to a tenth) over the run's steps or minutes, whichever ends first.
    `decoder_only`: the encoder stays as it is, so the latent space a UNet was trained on does
    not move. `hard_share`: that share of each batch is drawn in proportion to each scene's
    last measured loss (every scene starts at the largest), the rest uniformly: the scenes the
    autoencoder still draws worst come round more often. `scale_weight`: weight of the scale
    equivariance term (Skorokhodov et al. 2025, "Improving the diffusability of
    autoencoders"): the latent pooled 2x2 decodes to the image pooled 2x2
    (`autoencoder_loss`), which is meant to take from the latents the high frequencies that the
    image does not have, so that the coarse-to-fine order of denoising holds in the latent."""
    images, masks, _ = render_pool(rng, pool, log=log, workers=workers)
    opt = scheduled(lambda learning_rate: optax.adamw(learning_rate, 1e-4))
    full_batch = max(batch * crop * crop // (SIZE * SIZE), 1)
    params = sd.params
    keys = DECODER if decoder_only else tuple(params["vae"])
    frozen = {k: v for k, v in params["vae"].items() if k not in keys}
    vp = {k: params["vae"][k] for k in keys}
    state = opt.init(vp)

    def loss_fn(trained, fixed, x, m):
        p = dict(params, vae={**fixed, **trained})
        return autoencoder_loss(sd, p, x, m, object_weight, scale_weight)

    @jax.jit
    def step_fn(vp, fixed, s, x, m):
        (loss, each), g = jax.value_and_grad(loss_fn, has_aux=True)(vp, fixed, x, m)
        u, s = opt.update(g, s, vp)
        return optax.apply_updates(vp, u), s, loss, each

    last_loss = np.full(pool, np.inf)  # per scene; inf: not seen yet
    draw = lambda n: draw_scenes(rng, n, last_loss, hard_share)  # noqa: E731

    curve, acc, budget = [], [], Budget(steps, minutes)
    step = 0
    while not budget.done(step):
        step += 1
        full = budget.progress(step) > 1 - full_share
        if full:
            idx = draw(full_batch)
            x, m = images[idx], masks[idx]
        else:
            idx = draw(batch)
            i0, j0 = rng.integers(0, SIZE - crop + 1, 2) // 4 * 4  # on the latent grid
            x = images[idx, i0 : i0 + crop, j0 : j0 + crop]
            m = masks[idx, i0 : i0 + crop, j0 : j0 + crop]
        lr_now = budget.learning_rate(lr, step)
        state = with_learning_rate(state, lr_now)
        x, m = jnp.asarray(x), jnp.asarray(m, jnp.float32)
        vp, state, loss, each = step_fn(vp, frozen, state, x, m)
        if hard_share:
            last_loss[idx] = np.asarray(each)
        acc.append(loss)
        if step % log_every == 0 or budget.done(step):
            curve.append(float(np.mean(jax.device_get(acc))))
            acc = []
            name = "vae" + (" (full images)" if full else "")
            _progress(name, step, budget, curve[-1], lr_now, log)
    log(f"vae: {step} steps in {budget.elapsed() / 60:.1f} min")
    return dict(params, vae={**frozen, **vp}), np.asarray(curve), step


def autoencoder_loss(sd, params, x, m, object_weight: float, scale_weight: float = 0.0):
    """(loss, per image reconstruction error) of the autoencoder on images `x` (N, H, W, 3)
    with object masks `m` (N, H, W): the reconstruction error of the posterior mean's decoding,
    plus `scale_weight` times that of the latent pooled 2x2 against the image pooled 2x2."""
    z = sd.encode(params, x)
    loss, each = reconstruction_error(sd.decode(params, z), x, m, object_weight)
    if scale_weight:
        small = sd.decode(params, pooled(z, 2, first_axis=2))  # latents (N, C, h, w)
        scaled, _ = reconstruction_error(small, pooled(x, 2), pooled(m, 2), object_weight)
        loss = loss + scale_weight * scaled
    return loss, each


def reconstruction_error(rec, x, m, object_weight: float):
    """(mean, per image) of L1 + L2/2 between images `rec` and `x` (N, H, W, 3), the pixels of
    masks `m` (N, H, W, values in [0, 1]) weighing `object_weight`."""
    w = (1.0 + (object_weight - 1.0) * m)[..., None]
    err = jnp.abs(rec - x) + 0.5 * jnp.square(rec - x)
    each = jnp.sum(w * err, axis=(1, 2, 3)) / (3.0 * jnp.sum(w, axis=(1, 2, 3)))
    return jnp.sum(w * err) / (3.0 * jnp.sum(w)), each


def pooled(a, factor: int, first_axis: int = 1):
    """`a` averaged over `factor` x `factor` cells of its axes `first_axis` and the next (the
    two spatial axes, multiples of `factor`)."""
    i = first_axis
    h, w = a.shape[i : i + 2]
    cells = (*a.shape[:i], h // factor, factor, w // factor, factor, *a.shape[i + 2 :])
    return a.reshape(cells).mean((i + 1, i + 3))


def roundtrip_report(sd, seeds, log=print) -> dict:
    """The autoencoder's round trip (posterior mean, decode) of the scenes with these seeds:
    PSNR per scene and, per object, the IoU of its colour mask (quality.segment) in the round
    trip with that in the rendered scene, both within 3 px of the object."""
    encode_decode = jax.jit(lambda p, x: sd.decode(p, sd.encode(p, x)))
    psnrs, ious = [], []
    for chunk in np.array_split(np.asarray(seeds), max(len(seeds) // 50, 1)):
        scenes = [shapes.sample_scene(np.random.default_rng(int(s)), SIZE) for s in chunk]
        outs = [shapes.render(s) for s in scenes]
        x = np.stack([o["image"] for o in outs])
        y = np.clip(np.asarray(encode_decode(sd.params, jnp.asarray(2 * x - 1))) * 0.5 + 0.5, 0, 1)
        for scene, out, a, b in zip(scenes, outs, x, y, strict=True):
            psnrs.append(quality.psnr(b, a, np.ones(a.shape[:2], bool)))
            for k in range(len(scene.objects)):
                ious.append(quality.object_kept(a, b, out["masks"][k]))
    report = {
        "scenes": len(psnrs),
        "psnr_mean": float(np.mean(psnrs)),
        "psnr_min": float(np.min(psnrs)),
        "objects": len(ious),
        "object_iou_min": float(np.min(ious)),
        "object_iou_mean": float(np.mean(ious)),
        "objects_below_0.85": int(np.sum(np.asarray(ious) < 0.85)),
    }
    log("autoencoder round trip: " + ", ".join(f"{k} {v:.4g}" for k, v in report.items()))
    return report


# Noise levels of the denoising report: a tenth, three tenths and half of the schedule.
DENOISE_STRENGTHS = (0.1, 0.3, 0.5)
# Each shape's word and the word it is swapped for in the report's prompt probe.
SHAPE_SWAP = {"circle": "square", "square": "circle", "diamond": "triangle", "triangle": "diamond"}


def swap_shape_words(prompt: str) -> str:
    """The prompt with each shape's word replaced by its SHAPE_SWAP partner's."""
    return re.sub(rf"\b({'|'.join(SHAPE_SWAP)})\b", lambda m: SHAPE_SWAP[m.group(0)], prompt)


def denoise_report(
    sd, seeds, strengths=DENOISE_STRENGTHS, log=print, batch: int = 32, swapped: float | None = 0.3
) -> dict:
    """What the UNet keeps of a scene it redraws: the scenes of these seeds rendered, noised to
    each strength and denoised back with their prompts (source.sdedit: 50 DDIM steps, CFG 1 as
    the toy preset edits, one noise draw per batch), and per object the IoU of its colour mask
    with that in the rendered scene (as roundtrip_report). Guidance redraws a moved object from
    such noise levels, so a UNet that turns squares into blobs here draws blobs in edits.

    `swapped`: at this strength the scenes are also redrawn with each shape's word swapped
    (swap_shape_words: a square asked for as a circle; key "S shape words swapped"), from the
    same noise: a UNet that draws what its prompt names keeps less of the objects so; one that
    keeps as much draws shapes without reading them from the prompt."""
    from mgjax.method import source

    scenes = [shapes.sample_scene(np.random.default_rng(int(s)), SIZE) for s in seeds]
    outs = [shapes.render(s) for s in scenes]
    prompts = [shapes.prompt(s) for s in scenes]
    empty = sd.embed("")

    def conditionings(texts):
        return [jnp.concatenate([sd.embed(t) for t in texts[i : i + batch]])
                for i in range(0, len(texts), batch)]  # fmt: skip

    parts = [  # (renders, images, empty conditionings): the same at every level
        (
            outs[i : i + batch],
            np.stack([o["image"] for o in outs[i : i + batch]]),
            jnp.repeat(empty, len(outs[i : i + batch]), 0),
        )
        for i in range(0, len(outs), batch)
    ]
    named = conditionings(prompts)
    runs = [(f"{s:g}", s, named) for s in strengths]
    if swapped is not None:
        swap = conditionings([swap_shape_words(p) for p in prompts])
        runs.append((f"{swapped:g} shape words swapped", swapped, swap))
    report = {}
    for key, strength, conds in runs:
        ious = []
        for (part, x, uncond), cond in zip(parts, conds, strict=True):
            y = source.sdedit(sd, x, cond, uncond, strength, cfg_scale=1.0)
            for out, a, b in zip(part, x, y, strict=True):
                ious += [quality.object_kept(a, b, m) for m in out["masks"]]
        report[key] = row = {
            "objects": len(ious),
            "object_iou_mean": float(np.mean(ious)),
            "objects_below_0.85": int(np.sum(np.asarray(ious) < 0.85)),
        }
        log(f"UNet redrawing from strength {key}: " +
            ", ".join(f"{k} {v:.4g}" for k, v in row.items()))  # fmt: skip
    return report


def train_unet(sd, rng, minutes, steps, pool, batch, log_every, log, lr=3e-4, ema=0.999,
               snr_gamma=5.0, fresh=True, workers=None, object_weight=1.0, swap_weight=0.0,
               swap_margin=0.1, t_range=(0, 1000), pixel_weight=0.0,
               pixel_batch=8):  # fmt: skip
    """The UNet and text encoder, jointly. The loss is eps-MSE weighted by min(SNR, gamma)/SNR
    (Min-SNR weighting, Hang et al. 2023: it stops the low-noise steps from dominating early
    training); the weights returned are an exponential moving average (decay `ema`), whose
    samples are much cleaner than the last iterate's after a short run. `fresh`: the latent
    scaling factor is measured on the pool (1 / std of the latents) and set in the VAE's config;
    otherwise the model's own is kept (a continued run on the same autoencoder). The learning
    rate follows the run's steps or minutes, whichever ends first (as the autoencoder's).
    `object_weight`: the squared error on latent pixels that hold an object (the world's exact
    masks, over each latent pixel's footprint and one latent pixel around it) weighs that many
    times the background's, each image's loss a weighted mean: a textured background fills most
    of a scene, so the plain loss is mostly about drawing backgrounds.

    `swap_weight`: adds that times the shape-word contrast (`shape_contrast`): the same noisy
    latents are also denoised with each shape's word swapped (swap_shape_words), and the
    squared error on the object's latent pixels is asked to be larger so, by `swap_margin` in
    log ratio (a hinge), so that the prompt's shape word changes what the UNet draws (each
    step then runs the UNet on twice the batch).

    `t_range`: the training timesteps are drawn uniformly from [low, high) (the whole schedule
    by default); a band trains the noise levels an edit redraws objects from.

    `pixel_weight`: adds that times the decoded estimate's error (`decoded_error`): for the
    first `pixel_batch` latents of each step the clean-latent estimate is decoded by the
    (fixed) decoder and compared with the rendered scene, object pixels weighing 5, each
    image's error weighted by abar(t) (an estimate from almost pure noise says little). The
    eps-MSE weighs every latent direction alike; guidance and the edits see the decoded
    image, where some directions (an object's edges) weigh far more than others."""
    log(f"rendering and encoding {pool} training scenes")
    images, masks, prompts = render_pool(rng, pool, supersample=2, log=log, workers=workers)
    latent_w = latent_weights(masks, sd.vae_factor, object_weight)
    near = object_latents(masks, sd.vae_factor).astype(np.float32)
    pixels = (images, masks) if pixel_weight else None
    del masks
    encode = jax.jit(lambda p, x: sd.posterior(p, x)[0])
    latents = np.concatenate(
        [
            np.asarray(encode(sd.params, jnp.asarray(images[i : i + 256])))
            for i in range(0, pool, 256)
        ]
    )
    del images
    vae = sd.params["vae"]
    measured = float(1.0 / latents.std())
    scaling = measured if fresh else sd.scaling_factor
    latents = latents * scaling
    ids = sd.token_ids(prompts)
    swapped_ids = sd.token_ids([swap_shape_words(t) for t in prompts])
    empty = sd.token_ids([""])
    log(f"latent scaling factor {scaling:.5f} (measured {measured:.5f}); prompts like "
        f"{prompts[0]!r}")  # fmt: skip
    params = {"unet": sd.params["unet"], "text": sd.params["text"]}
    opt = scheduled(
        lambda learning_rate: optax.chain(
            optax.clip_by_global_norm(1.0), optax.adamw(learning_rate, 1e-4)
        )
    )
    state = opt.init(params)
    abar = jnp.asarray(ddim.alphas_cumprod())
    snr = abar / (1 - abar)
    weight = jnp.minimum(snr, snr_gamma) / snr if snr_gamma > 0 else jnp.ones_like(snr)

    def loss_fn(p, z0, w, tokens, key, swapped, obj, named, x, m):
        kt, kn = jax.random.split(key)
        b = z0.shape[0]
        t = jax.random.randint(kt, (b,), t_range[0], t_range[1])
        noise = jax.random.normal(kn, z0.shape)
        a = abar[t][:, None, None, None]
        zt = jnp.sqrt(a) * z0 + jnp.sqrt(1 - a) * noise
        if swap_weight:  # one UNet call on [prompts, prompts with their shape words swapped]
            both = sd.eps(p, jnp.concatenate([zt, zt]), jnp.concatenate([t, t]),
                          sd.text_states(p, jnp.concatenate([tokens, swapped])))  # fmt: skip
            eps = both[:b]
            contrast, gap = shape_contrast(both[:b], both[b:], noise, obj, named, swap_margin)
        else:
            eps = sd.eps(p, zt, t, sd.text_states(p, tokens))
            contrast = gap = jnp.zeros(())
        err = jnp.square(eps - noise)
        weighted = (w * err).mean(axis=(1, 2, 3)) / w.mean(axis=(1, 2, 3))
        decoded = jnp.zeros(())
        if pixel_weight:
            k = x.shape[0]
            x0 = ddim.predict_x0(zt[:k], eps[:k], a[:k])
            images = sd.decode({"vae": vae}, x0 * (sd.scaling_factor / scaling))
            decoded = decoded_error(images, x, m, abar[t[:k]])
        loss = (weight[t] * weighted).mean() + swap_weight * contrast + pixel_weight * decoded
        return loss, (err.mean(), gap, decoded)

    @jax.jit
    def step_fn(p, avg, s, z0, w, tokens, key, swapped, obj, named, x, m):
        (_, aux), g = jax.value_and_grad(loss_fn, has_aux=True)(
            p, z0, w, tokens, key, swapped, obj, named, x, m
        )
        u, s = opt.update(g, s, p)
        p = optax.apply_updates(p, u)
        avg = jax.tree.map(lambda a, b: ema * a + (1 - ema) * b, avg, p)
        return p, avg, s, aux

    key = jax.random.PRNGKey(int(rng.integers(2**31)))
    curve, acc, gaps, decodeds, budget, step = [], [], [], [], Budget(steps, minutes), 0
    average = params
    while not budget.done(step):
        step += 1
        idx = rng.integers(0, len(latents), batch)
        dropped = rng.uniform(size=(batch, 1)) < 0.1  # prompt dropout
        tokens = np.where(dropped, empty, ids[idx])
        key, sub = jax.random.split(key)
        lr_now = budget.learning_rate(lr, step)
        state = with_learning_rate(state, lr_now)
        first = idx[:pixel_batch]
        x, m = (pixels[0][first], pixels[1][first]) if pixels else (np.zeros(()), np.zeros(()))
        params, average, state, (loss, gap, decoded) = step_fn(
            params, average, state, latents[idx], latent_w[idx], tokens, sub,
            swapped_ids[idx], near[idx], (~dropped[:, 0]).astype(np.float32), x, m,
        )  # fmt: skip
        acc.append(loss)
        gaps.append(gap)
        decodeds.append(decoded)
        if step % log_every == 0 or budget.done(step):
            curve.append(float(np.mean(jax.device_get(acc))))
            acc = []
            _progress("unet", step, budget, curve[-1], lr_now, log)
            if swap_weight:
                log(f"  shape-word gap (log error ratio, swapped / named) "
                    f"{float(np.mean(jax.device_get(gaps))):.4f}")  # fmt: skip
            if pixel_weight:
                log(f"  decoded estimates' error {float(np.mean(jax.device_get(decodeds))):.4f}")
            gaps, decodeds = [], []
    log(f"unet: {step} steps in {budget.elapsed() / 60:.1f} min")
    trained = with_params(sd, dict(sd.params, **average), scaling)
    return trained, np.asarray(curve), step


def shape_contrast(eps, eps_swapped, noise, obj, named, margin: float):
    """(hinge, mean gap) of the shape-word contrast: per image, the squared noise error on its
    object's latent pixels `obj` f32[B,1,h,w] with its prompt (`eps`) and with the prompt's
    shape words swapped (`eps_swapped`); the gap is log(swapped error / named error), and the
    hinge the mean over the images whose prompt was given (`named` f32[B], 1 or 0) of
    max(0, margin - gap): zero once the wrong shape word costs `margin` more in log error."""

    def error(e):
        return jnp.sum(obj * jnp.square(e - noise), axis=(1, 2, 3)) / (
            e.shape[1] * jnp.sum(obj, axis=(1, 2, 3)) + 1e-8
        )  # fmt: skip

    gap = jnp.log(error(eps_swapped) + 1e-12) - jnp.log(error(eps) + 1e-12)
    count = jnp.maximum(jnp.sum(named), 1.0)
    hinge = jnp.sum(named * jnp.maximum(margin - gap, 0.0)) / count
    return hinge, jnp.sum(named * gap) / count


def decoded_error(images, targets, masks, abar, object_weight: float = 5.0):
    """The decoded estimates' error: images f32[K,H,W,3] against the rendered targets (both
    about [-1, 1]), squared, object pixels (masks bool[K,H,W]) weighing `object_weight`, each
    image's a weighted mean, then the mean over the images weighted by `abar` f32[K]."""
    w = 1.0 + (object_weight - 1.0) * masks[..., None].astype(images.dtype)
    per_image = (w * jnp.square(images - targets)).mean(axis=(1, 2, 3)) / w.mean(axis=(1, 2, 3))
    return (abar * per_image).mean()


def object_latents(masks, factor: int) -> np.ndarray:
    """bool[n,1,h,w] for bool[n,H,W] object masks: the latent pixels whose factor x factor
    footprint, or a neighbouring latent pixel's (8-connected), holds an object pixel."""
    n, h, w = masks.shape
    blocks = masks.reshape(n, h // factor, factor, w // factor, factor).any(axis=(2, 4))
    padded = np.pad(blocks, ((0, 0), (1, 1), (1, 1)))
    near = np.zeros_like(blocks)
    for dy in range(3):
        for dx in range(3):
            near |= padded[:, dy : dy + h // factor, dx : dx + w // factor]
    return near[:, None]


def latent_weights(masks, factor: int, object_weight: float) -> np.ndarray:
    """f32[n,1,h,w] loss weights of latent pixels for bool[n,H,W] object masks: `object_weight`
    on an object's latent pixels (`object_latents`), 1 elsewhere."""
    return np.where(object_latents(masks, factor), np.float32(object_weight), np.float32(1.0))


def sample_grid(sd, prompts, seeds, steps: int = 50) -> np.ndarray:
    """Rows = prompts, columns = seeds: u8 image grid of CFG-7.5 DDIM samples."""
    from mgjax.method import source

    uncond = sd.embed("")
    rows = []
    for p in prompts:
        z_T = np.stack(
            [np.random.default_rng(s).standard_normal((4, SIZE // 4, SIZE // 4)) for s in seeds]
        ).astype(np.float32)
        n = len(seeds)
        traj = source.generate(
            sd, z_T, jnp.repeat(sd.embed(p), n, 0), jnp.repeat(uncond, n, 0), num_steps=steps
        )
        x = np.asarray(sd.decode(sd.params, jnp.asarray(traj.z0))) * 0.5 + 0.5
        rows.append(np.concatenate(list(np.clip(x, 0, 1)), axis=1))
    return outputs.to_uint8(np.concatenate(rows, axis=0))


SETTINGS = ("init", "fresh_unet", "vae_minutes", "vae_steps", "vae_batch", "vae_crop",
            "vae_full_share", "object_weight", "vae_lr", "vae_pool", "unet_minutes", "unet_steps",
            "unet_batch", "unet_lr", "ema", "snr_gamma", "pool", "seed", "workers",
            "measure_scaling", "vae_decoder_only", "vae_hard_share", "vae_scale_weight",
            "unet_object_weight", "unet_layers", "unet_top_attention", "unet_swap_weight",
            "unet_swap_margin", "unet_t_range", "unet_pixel_weight")  # fmt: skip


def timestep_range(values) -> tuple[int, int]:
    """--unet_t_range's LOW,HIGH as integers with 0 <= LOW < HIGH <= 1000; InputError else."""
    try:
        low, high = (int(v) for v in values)
    except ValueError:
        low = high = None
    if low is None or not 0 <= low < high <= 1000:  # ddim.alphas_cumprod's training steps
        raise InputError(
            f"--unet_t_range {','.join(values)}: give LOW,HIGH, two integers with "
            "0 <= LOW < HIGH <= 1000"
        )
    return low, high


def _define_flags():
    """Command-line flags (defined only when run as a script, so that the training modules
    can be imported side by side)."""
    flags.DEFINE_string("out_dir", None, "Output folder.")
    flags.DEFINE_string(
        "init",
        None,
        "Start from this diffusers folder's weights (a run's OUT/sd, or the pack's), "
        "or from this autoencoder folder's (OUT/sd/vae) with a new UNet and text encoder.",
    )
    flags.DEFINE_bool(
        "fresh_unet", False, "With --init: the UNet and text encoder start from random weights "
        "(a new autoencoder's latent space); the latent scaling factor is measured."
    )  # fmt: skip
    flags.DEFINE_bool(
        "measure_scaling", False, "With --init: measure the latent scaling factor again (the "
        "autoencoder was trained since the UNet was)."
    )  # fmt: skip
    flags.DEFINE_bool(
        "vae_decoder_only", False, "Train the autoencoder's decoder alone (the latent space the "
        "UNet knows stays as it is)."
    )  # fmt: skip
    flags.DEFINE_float("vae_minutes", 25.0, "Time budget of the autoencoder.")
    flags.DEFINE_integer(
        "vae_steps", 3000, "Autoencoder step limit (its schedule's length; 0 skips)."
    )
    flags.DEFINE_integer("vae_batch", 16, "Autoencoder crops per step (a quarter on full images).")
    flags.DEFINE_integer("vae_crop", 32, "Side of the autoencoder's training crops (pixels).")
    flags.DEFINE_float("vae_full_share", 0.15, "Share of the autoencoder's steps on full images.")
    flags.DEFINE_float("object_weight", 5.0, "Weight of object pixels in the autoencoder's loss.")
    flags.DEFINE_float(
        "vae_hard_share", 0.0, "Share of each autoencoder batch drawn in proportion to each "
        "scene's last loss (the scenes it draws worst come round more often)."
    )  # fmt: skip
    flags.DEFINE_float(
        "vae_scale_weight", 0.0, "Weight of the scale equivariance term: the latent pooled 2x2 "
        "decodes to the image pooled 2x2, which smooths the latent space for the UNet (0: off)."
    )  # fmt: skip
    flags.DEFINE_float("vae_lr", 1e-3, "Autoencoder peak learning rate.")
    flags.DEFINE_integer("vae_pool", 4000, "Scenes rendered once for the autoencoder stage.")
    flags.DEFINE_float("unet_minutes", 60.0, "Time budget of the UNet + text encoder.")
    flags.DEFINE_integer("unet_steps", 6000, "UNet step limit (its schedule's length; 0 skips).")
    flags.DEFINE_integer("unet_batch", 32, "UNet latents per step.")
    flags.DEFINE_float("unet_lr", 3e-4, "UNet peak learning rate (warm-up, cosine to a tenth).")
    flags.DEFINE_float(
        "unet_object_weight", 1.0, "Weight of the latent pixels that hold an object in the "
        "UNet's loss (1: every latent pixel alike)."
    )  # fmt: skip
    flags.DEFINE_float(
        "unet_swap_weight", 0.0, "Weight of the shape-word contrast in the UNet's loss: the "
        "UNet's error on an object with its prompt's shape words swapped is asked to exceed its "
        "error with the prompt (0: off; each step then runs the UNet on twice the batch)."
    )  # fmt: skip
    flags.DEFINE_float(
        "unet_swap_margin", 0.1, "The log error ratio (swapped / named) at which the shape-word "
        "contrast stops pushing."
    )  # fmt: skip
    flags.DEFINE_list(
        "unet_t_range", ["0", "1000"], "LOW,HIGH: the UNet trains on timesteps drawn from "
        "[LOW, HIGH) of the 1000 (a band of noise levels; default the whole schedule)."
    )  # fmt: skip
    flags.DEFINE_float(
        "unet_pixel_weight", 0.0, "Weight of the decoded estimate's error in the UNet's loss: "
        "a quarter of each batch's clean-latent estimates decoded and compared with the "
        "rendered scenes, object pixels weighing 5 (0: off)."
    )  # fmt: skip
    flags.DEFINE_integer(
        "unet_layers", None, "Layers per UNet block: a new UNet's (default 1), or, with --init, "
        "the UNet made that deep by new layers that start as the identity (training continues "
        "from what it computes)."
    )  # fmt: skip
    flags.DEFINE_bool(
        "unet_top_attention", False, "Text attention (cross-attention only) in the UNet's "
        "blocks at the latent's size too: a new UNet's, or, with --init, added to the UNet as "
        "layers that start as the identity."
    )  # fmt: skip
    flags.DEFINE_float("ema", 0.999, "Decay of the UNet weights' moving average (0: last step).")
    flags.DEFINE_float("snr_gamma", 5.0, "Min-SNR loss weighting's gamma (0: plain eps-MSE).")
    flags.DEFINE_integer("pool", 8192, "Training scenes rendered once for the UNet stage.")
    flags.DEFINE_integer("seed", 0, "Seed of data and weights.")
    flags.DEFINE_integer("log_every", 50, "Steps between progress lines.")
    flags.DEFINE_integer("workers", None, "Processes rendering the scenes (default: every core).")


def main(argv):
    del argv
    if not FLAGS.out_dir:
        raise app.UsageError("--out_dir is required")
    run_cli(_train)


def _check_numbers():
    """Every number the run uses, in its range (NaN and infinities fail), before any work."""
    F = FLAGS
    crop = F.vae_crop
    refuse_unless(
        ("vae_minutes", F.vae_minutes, F.vae_minutes >= 0, "give minutes of 0 or more"),
        ("unet_minutes", F.unet_minutes, F.unet_minutes >= 0, "give minutes of 0 or more"),
        ("vae_steps", F.vae_steps, F.vae_steps >= 0, "give 0 or more steps (0 skips the stage)"),
        ("unet_steps", F.unet_steps, F.unet_steps >= 0, "give 0 or more steps (0 skips)"),
        ("vae_batch", F.vae_batch, F.vae_batch >= 1, "give at least 1 crop per step"),
        ("unet_batch", F.unet_batch, F.unet_batch >= 1, "give at least 1 latent per step"),
        ("vae_crop", crop, 8 <= crop <= SIZE and crop % 4 == 0,
         f"give a side from 8 to {SIZE} pixels, a multiple of 4 (the latent grid)"),
        ("vae_full_share", F.vae_full_share, 0 <= F.vae_full_share <= 1, "give a share 0 to 1"),
        ("object_weight", F.object_weight, F.object_weight > 0 and finite(F.object_weight),
         "give a weight above 0 (1: object pixels count as the others)"),
        ("vae_lr", F.vae_lr, F.vae_lr >= 0 and finite(F.vae_lr), "give a rate of 0 or more"),
        ("unet_lr", F.unet_lr, F.unet_lr >= 0 and finite(F.unet_lr), "give a rate of 0 or more"),
        ("vae_pool", F.vae_pool, F.vae_pool >= 1, "give at least 1 scene"),
        ("pool", F.pool, F.pool >= 1, "give at least 1 scene"),
        ("ema", F.ema, 0 <= F.ema < 1, "give a decay from 0 (the last step's weights) to below 1"),
        ("snr_gamma", F.snr_gamma, F.snr_gamma >= 0 and finite(F.snr_gamma),
         "give 0 (plain eps-MSE) or more"),
        ("seed", F.seed, F.seed >= 0, "give a seed of 0 or more"),
        ("log_every", F.log_every, F.log_every >= 1, "give at least 1 step"),
        ("workers", F.workers, F.workers is None or F.workers >= 1, "give at least 1 process"),
        ("vae_hard_share", F.vae_hard_share, 0 <= F.vae_hard_share <= 1,
         "give a share from 0 to 1"),
        ("unet_object_weight", F.unet_object_weight, F.unet_object_weight > 0,
         "give a weight above 0 (1: none)"),
        ("unet_swap_weight", F.unet_swap_weight, F.unet_swap_weight >= 0,
         "give a weight of 0 or more"),
        ("unet_swap_margin", F.unet_swap_margin, F.unet_swap_margin > 0, "give a margin above 0"),
        ("vae_scale_weight", F.vae_scale_weight, F.vae_scale_weight >= 0,
         "give a weight of 0 or more (0: off)"),
        ("unet_pixel_weight", F.unet_pixel_weight, F.unet_pixel_weight >= 0,
         "give a weight of 0 or more (0: off)"),
        ("unet_layers", F.unet_layers, F.unet_layers is None or F.unet_layers >= 1,
         "give at least 1 layer per block"),
    )  # fmt: skip


def _train():
    _check_numbers()
    t_range = timestep_range(FLAGS.unet_t_range)
    out = Path(FLAGS.out_dir)
    log = lambda s: print(s, flush=True)  # noqa: E731
    t0 = time.perf_counter()
    if FLAGS.init and not Path(FLAGS.init).is_dir():
        raise InputError(f"--init {FLAGS.init}: no such folder; give a model folder or its vae/")
    whole = bool(FLAGS.init) and (Path(FLAGS.init) / "unet").is_dir()
    # the given weights are read before anything is written: a refused run writes nothing
    init_vae = sdm.load_autoencoder(FLAGS.init).params["vae"] if FLAGS.init and not whole else None
    sd = sdm.load(FLAGS.init) if whole else None
    layers = FLAGS.unet_layers
    top = FLAGS.unet_top_attention
    depth = sd.unet.config["layers_per_block"] if whole else None
    grow = whole and not FLAGS.fresh_unet and (layers not in (None, depth) or top)
    if grow:  # before anything is written: a refused growth writes nothing
        try:
            sd = grown(sd, layers or depth, top, FLAGS.seed)
        except ValueError as e:
            raise InputError(
                f"--unet_layers / --unet_top_attention on {FLAGS.init}'s UNet ({depth} layers "
                f"per block): {e}; it is only grown (or --fresh_unet for a new UNet)"
            ) from None
    out.mkdir(parents=True, exist_ok=True)
    if init_vae is not None:  # an autoencoder folder: new UNet and text encoder on it
        fresh = new_models(out, FLAGS.seed, layers, top)
        sd = with_params(fresh, dict(fresh.params, vae=init_vae))
        log(f"autoencoder from {FLAGS.init}; new UNet and text encoder")
    elif FLAGS.init:
        log(f"starting from {FLAGS.init}")
        if FLAGS.fresh_unet:
            fresh = new_models(out, FLAGS.seed, layers, top)
            sd = with_params(fresh, dict(fresh.params, vae=sd.params["vae"]))
        elif grow:
            depth = sd.unet.config["layers_per_block"]
            log(f"UNet grown ({depth} layers per block, text attention at the latent's size: "
                f"{top}); its new layers start as the identity")  # fmt: skip
    else:
        sd = new_models(out, FLAGS.seed, layers, top)
    check_tokenizer(sd.tokenizer)
    # one stream of scenes per stage, so that a stage's data do not depend on the others'
    vae_rng, unet_rng = (np.random.default_rng([FLAGS.seed, i]) for i in (1, 2))
    log_json = {
        "command": "python -m mgjax.toy.train_ldm " + " ".join(sys.argv[1:]),
        "date": time.strftime("%Y-%m-%d"),
        "settings": {k: getattr(FLAGS, k) for k in SETTINGS},
        "device": device_description(),
    }
    log(f"training on {log_json['device']}")
    if FLAGS.vae_steps > 0:
        params, vae_curve, log_json["vae_steps_run"] = train_vae(
            sd, vae_rng, FLAGS.vae_minutes, FLAGS.vae_steps, FLAGS.vae_batch, FLAGS.vae_crop,
            FLAGS.vae_full_share, FLAGS.object_weight, FLAGS.vae_lr, FLAGS.vae_pool,
            FLAGS.log_every, log, FLAGS.workers, FLAGS.vae_decoder_only, FLAGS.vae_hard_share,
            FLAGS.vae_scale_weight,
        )  # fmt: skip
        sd = with_params(sd, params)
        log_json["vae_loss"] = vae_curve.tolist()
        log_json["vae_seconds"] = time.perf_counter() - t0
        plot = outputs.loss_plot({"vae loss": vae_curve}, xlabel=f"steps / {FLAGS.log_every}")
        outputs.save_png(str(out / "vae_losses.png"), plot)
    log_json["roundtrip"] = roundtrip_report(sd, quality.HELDOUT_SEEDS[:200], log)
    if FLAGS.unet_steps > 0:
        t1 = time.perf_counter()
        # the latent scaling factor is measured whenever the latent space is new: a new UNet,
        # or an autoencoder trained in this run or since the UNet was (--measure_scaling)
        sd, unet_curve, log_json["unet_steps_run"] = train_unet(
            sd, unet_rng, FLAGS.unet_minutes, FLAGS.unet_steps, FLAGS.pool, FLAGS.unet_batch,
            FLAGS.log_every, log, FLAGS.unet_lr, FLAGS.ema, FLAGS.snr_gamma,
            fresh=FLAGS.fresh_unet or not whole or FLAGS.vae_steps > 0 or FLAGS.measure_scaling,
            workers=FLAGS.workers, object_weight=FLAGS.unet_object_weight,
            swap_weight=FLAGS.unet_swap_weight, swap_margin=FLAGS.unet_swap_margin,
            t_range=t_range, pixel_weight=FLAGS.unet_pixel_weight,
            pixel_batch=max(FLAGS.unet_batch // 4, 1),
        )  # fmt: skip
        log_json["unet_loss"] = unet_curve.tolist()
        log_json["unet_seconds"] = time.perf_counter() - t1
        plot = outputs.loss_plot({"eps mse": unet_curve}, xlabel=f"steps / {FLAGS.log_every}")
        outputs.save_png(str(out / "unet_losses.png"), plot)
    sdm.save(sd, out / "sd")
    trained_scaling = sd.scaling_factor
    sd = sdm.load(str(out / "sd"))  # through the real loader
    if sd.scaling_factor != trained_scaling:
        raise RuntimeError(f"{out / 'sd'}: saved latent scaling factor {sd.scaling_factor}, "
                           f"trained with {trained_scaling}")  # fmt: skip
    if FLAGS.unet_steps > 0:
        prompts = [shapes.prompt(shapes.sample_scene(np.random.default_rng(i))) for i in range(4)]
        outputs.save_png(str(out / "samples.png"), sample_grid(sd, prompts, [0, 1, 2, 3]))
        log_json["sample_prompts"] = prompts
        # on tuning scenes: runs are compared, and settings chosen, on them
        log_json["denoise"] = denoise_report(sd, quality.TUNING_SEEDS[:64], log=log)
    log_json["seconds"] = time.perf_counter() - t0
    log_json["scaling_factor"] = sd.scaling_factor
    outputs.save_json(str(out / "log.json"), log_json)
    log(f"done in {(time.perf_counter() - t0) / 60:.1f} min: {out / 'sd'}")


if __name__ == "__main__":
    _define_flags()
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    app.run(main)
