"""Train the toy pack's latent diffusion model on the shapes world: a diffusers AutoencoderKL
(VAE factor 4), then a UNet2DConditionModel with a small CLIP text encoder trained jointly,
text-conditionally with prompt dropout (so that classifier-free guidance works). The same Flax
classes the real pipeline loads; the result is written as a diffusers folder that
`mgjax.sd.load` reads. Seeded, optax, progress lines, loss curves, a sample grid.

  python -m mgjax.toy.train_ldm --out_dir runs/ldm [--vae_minutes 15] [--unet_minutes 40]
  python -m mgjax.toy.train_ldm --out_dir runs/ldm2 --vae_from runs/ldm/sd/vae  # UNet only

Writes OUT/sd/ (unet/, vae/, text_encoder/, tokenizer/, model_index.json), OUT/vae_losses.png,
OUT/unet_losses.png, OUT/samples.png (prompts x seeds, CFG 7.5, 50 DDIM steps), OUT/log.json.
"""

import itertools
import json
import os
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import app, flags

from mgjax import ddim, outputs
from mgjax import sd as sdm
from mgjax.toy import shapes

FLAGS = flags.FLAGS

SIZE = 64
TOY_VAE = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D",) * 3,
    up_block_types=("UpDecoderBlock2D",) * 3,
    block_out_channels=(32, 64, 64),
    layers_per_block=1,
    latent_channels=4,
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
    block_out_channels=(32, 64, 64),
    layers_per_block=1,
    attention_head_dim=8,
    cross_attention_dim=64,
)
MAX_TOKENS = 24


# ----------------------------------------------------------------------------- tokenizer


def _words() -> list[str]:
    fixed = ["a", "an", "and", "on", "background", "dotted"]
    return fixed + list(shapes.COLORS) + list(shapes.SHAPES) + list(shapes.PATTERNS)


def _bpe(word: str, ranks: dict) -> list[str]:
    """CLIP's BPE on one lower-case word (a copy of its merge loop, to search merge orders)."""
    parts = list(word[:-1]) + [word[-1] + "</w>"]
    while len(parts) > 1:
        pairs = [(ranks.get((a, b), 1e9), i) for i, (a, b) in enumerate(itertools.pairwise(parts))]
        rank, i = min(pairs)
        if rank == 1e9:
            break
        parts[i : i + 2] = [parts[i] + parts[i + 1]]
    return parts


def toy_tokenizer(folder):
    """A real CLIPTokenizer whose merges make each shapes-world word one token (the byte-level
    alphabet stays, so any text still tokenizes). Merge chains are built word by word, left to
    right; an order in which no word's chain is cut by another's is searched and then checked
    with the tokenizer itself."""
    from transformers import CLIPTokenizer
    from transformers.models.clip.tokenization_clip import bytes_to_unicode

    chars = list(bytes_to_unicode().values())
    words = _words()
    rng = np.random.default_rng(0)
    for _ in range(500):
        merges, seen = [], set()
        for w in words:
            parts = list(w[:-1]) + [w[-1] + "</w>"]
            left = parts[0]
            for p in parts[1:]:
                if (left, p) not in seen:
                    seen.add((left, p))
                    merges.append((left, p))
                left += p
        ranks = {m: i for i, m in enumerate(merges)}
        if all(_bpe(w, ranks) == [w + "</w>"] for w in words):
            break
        words = list(rng.permutation(words))
    else:
        raise RuntimeError("no merge order makes every word one token")
    vocab = chars + [c + "</w>" for c in chars]
    vocab += [a + b for a, b in merges if a + b not in vocab]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    tok = CLIPTokenizer(
        str(folder / "vocab.json"), str(folder / "merges.txt"), pad_token="<|endoftext|>"
    )
    tok.model_max_length = MAX_TOKENS
    for w in _words():
        assert tok.tokenize(w) == [w + "</w>"], (w, tok.tokenize(w))
    tok.save_pretrained(str(folder))
    return tok


def text_config(tokenizer):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=3,
        num_attention_heads=4,
        max_position_embeddings=MAX_TOKENS,
        projection_dim=64,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


# ----------------------------------------------------------------------------- data


def render_batch(rng, n: int, supersample: int = 2):
    """n random scenes: images f32[n,64,64,3] in [-1, 1] and their prompts."""
    scenes = [shapes.sample_scene(rng, SIZE) for _ in range(n)]
    images = np.stack([shapes.render(s, supersample=supersample)["image"] for s in scenes])
    return 2.0 * images - 1.0, [shapes.prompt(s) for s in scenes]


def _progress(name, step, steps, start, minutes, loss, log):
    elapsed = time.perf_counter() - start
    rate = step / max(elapsed, 1e-9)
    left = min((steps - step) / rate, max(minutes * 60 - elapsed, 0.0))
    log(f"{name} step {step}/{steps}  loss {loss:.4f}  {rate:.2f} steps/s  ETA {left / 60:.1f} min")
    if not np.isfinite(loss):
        raise RuntimeError(f"{name} training diverged at step {step} (loss {loss})")
    return elapsed > minutes * 60


# ----------------------------------------------------------------------------- stages


def train_vae(rng, minutes, steps, batch, log_every, log):
    from diffusers import FlaxAutoencoderKL

    vae = FlaxAutoencoderKL(**TOY_VAE)
    params = vae.init_weights(jax.random.PRNGKey(int(rng.integers(2**31))))
    opt = optax.adamw(optax.warmup_cosine_decay_schedule(0.0, 1e-3, steps // 20, steps), 1e-4)
    state = opt.init(params)

    def loss_fn(p, x, key):
        x = jnp.transpose(x, (0, 3, 1, 2))
        dist = vae.apply({"params": p}, x, method=vae.encode).latent_dist
        z = jnp.transpose(dist.sample(key), (0, 3, 1, 2))
        rec = vae.apply({"params": p}, z, method=vae.decode).sample
        kl = dist.kl().mean()
        return jnp.abs(rec - x).mean() + 0.5 * jnp.square(rec - x).mean() + 1e-5 * kl

    @jax.jit
    def step_fn(p, s, x, key):
        loss, g = jax.value_and_grad(loss_fn)(p, x, key)
        u, s = opt.update(g, s, p)
        return optax.apply_updates(p, u), s, loss

    key, curve, start, acc = jax.random.PRNGKey(0), [], time.perf_counter(), []
    for step in range(1, steps + 1):
        key, sub = jax.random.split(key)
        params, state, loss = step_fn(params, state, jnp.asarray(render_batch(rng, batch)[0]), sub)
        acc.append(float(loss))
        if step % log_every == 0 or step == steps:
            curve.append(float(np.mean(acc)))
            acc = []
            if _progress("vae", step, steps, start, minutes, curve[-1], log):
                break
    return vae, params, np.asarray(curve)


def train_unet(
    rng, vae, vae_params, tokenizer, minutes, steps, pool, log_every, log, lr=3e-4, ema=0.999,
    snr_gamma=5.0,
):  # fmt: skip
    """The UNet and text encoder, jointly. The loss is eps-MSE weighted by min(SNR, gamma)/SNR
    (Min-SNR weighting, Hang et al. 2023: it stops the low-noise steps from dominating early
    training); the weights returned are an exponential moving average (decay `ema`), whose
    samples are much cleaner than the last iterate's after a short run."""
    from diffusers import FlaxAutoencoderKL, FlaxUNet2DConditionModel
    from transformers import FlaxCLIPTextModel

    log(f"rendering and encoding {pool} training scenes")
    encode = jax.jit(
        lambda p, x: (
            vae.apply(
                {"params": p}, jnp.transpose(x, (0, 3, 1, 2)), method=vae.encode
            ).latent_dist.mean
        )
    )
    latents, prompts = [], []
    for _ in range(pool // 256):
        x, ps = render_batch(rng, 256)
        latents.append(np.transpose(np.asarray(encode(vae_params, jnp.asarray(x))), (0, 3, 1, 2)))
        prompts += ps
    latents = np.concatenate(latents)
    scaling = float(1.0 / latents.std())
    vae = FlaxAutoencoderKL(**TOY_VAE, scaling_factor=scaling)
    latents = latents * scaling
    ids = tokenizer(prompts, padding="max_length", max_length=MAX_TOKENS, truncation=True)
    ids = np.asarray(ids.input_ids, np.int32)
    empty = np.asarray(
        tokenizer([""], padding="max_length", max_length=MAX_TOKENS).input_ids, np.int32
    )
    log(f"latent scaling factor {scaling:.4f}; prompts like {prompts[0]!r}")

    unet = FlaxUNet2DConditionModel(**TOY_UNET)
    text = FlaxCLIPTextModel(text_config(tokenizer), _do_init=False)
    k1, k2 = jax.random.split(jax.random.PRNGKey(int(rng.integers(2**31))))
    params = {"unet": unet.init_weights(k1), "text": text.init_weights(k2, (1, MAX_TOKENS))}
    opt = optax.chain(
        optax.clip_by_global_norm(1.0),
        optax.adamw(optax.warmup_cosine_decay_schedule(0.0, lr, steps // 20, steps, lr / 10), 1e-4),
    )
    state = opt.init(params)
    abar = jnp.asarray(ddim.alphas_cumprod())
    snr = abar / (1 - abar)
    weight = jnp.minimum(snr, snr_gamma) / snr if snr_gamma > 0 else jnp.ones_like(snr)

    def loss_fn(p, z0, tokens, key):
        kt, kn = jax.random.split(key)
        t = jax.random.randint(kt, (z0.shape[0],), 0, 1000)
        noise = jax.random.normal(kn, z0.shape)
        a = abar[t][:, None, None, None]
        zt = jnp.sqrt(a) * z0 + jnp.sqrt(1 - a) * noise
        ctx = text(tokens, params=p["text"])[0]
        eps = unet.apply({"params": p["unet"]}, zt, t, ctx).sample
        mse = jnp.square(eps - noise).mean(axis=(1, 2, 3))
        return (weight[t] * mse).mean(), mse.mean()

    @jax.jit
    def step_fn(p, avg, s, z0, tokens, key):
        (_, mse), g = jax.value_and_grad(loss_fn, has_aux=True)(p, z0, tokens, key)
        u, s = opt.update(g, s, p)
        p = optax.apply_updates(p, u)
        avg = jax.tree.map(lambda a, b: ema * a + (1 - ema) * b, avg, p)
        return p, avg, s, mse

    key, curve, start, acc = jax.random.PRNGKey(1), [], time.perf_counter(), []
    average = params
    for step in range(1, steps + 1):
        idx = rng.integers(0, len(latents), 32)
        tokens = np.where(rng.uniform(size=(32, 1)) < 0.1, empty, ids[idx])  # prompt dropout
        key, sub = jax.random.split(key)
        params, average, state, loss = step_fn(params, average, state, latents[idx], tokens, sub)
        acc.append(float(loss))
        if step % log_every == 0 or step == steps:
            curve.append(float(np.mean(acc)))
            acc = []
            if _progress("unet", step, steps, start, minutes, curve[-1], log):
                break
    return unet, vae, text, average, np.asarray(curve)


def sample_grid(sd, prompts, seeds, steps: int = 50) -> np.ndarray:
    """Rows = prompts, columns = seeds: u8 image grid of CFG-7.5 DDIM samples."""
    from mgjax import source

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


def _define_flags():
    """Command-line flags (defined only when run as a script, so that the training modules
    can be imported side by side)."""
    flags.DEFINE_string("out_dir", None, "Output folder.")
    flags.DEFINE_float("vae_minutes", 15.0, "Time budget of the autoencoder.")
    flags.DEFINE_float("unet_minutes", 40.0, "Time budget of the UNet + text encoder.")
    flags.DEFINE_integer("vae_batch", 8, "Autoencoder images per step.")
    flags.DEFINE_integer("vae_steps", 800, "Autoencoder step limit (its schedule's length).")
    flags.DEFINE_integer("unet_steps", 1500, "UNet step limit (its schedule's length).")
    flags.DEFINE_float("unet_lr", 3e-4, "UNet peak learning rate (warm-up, cosine to a tenth).")
    flags.DEFINE_float("ema", 0.999, "Decay of the UNet weights' moving average (0: last step).")
    flags.DEFINE_float("snr_gamma", 5.0, "Min-SNR loss weighting's gamma (0: plain eps-MSE).")
    flags.DEFINE_integer("pool", 8192, "Training scenes rendered once for the UNet stage.")
    flags.DEFINE_integer("seed", 0, "Seed of data and weights.")
    flags.DEFINE_integer("log_every", 50, "Steps between progress lines.")
    flags.DEFINE_string(
        "vae_from", None, "Skip the autoencoder stage: a trained one's folder (OUT/sd/vae)."
    )


def main(argv):
    del argv
    if not FLAGS.out_dir:
        raise app.UsageError("--out_dir is required")
    out = Path(FLAGS.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    log = lambda s: print(s, flush=True)  # noqa: E731
    rng = np.random.default_rng(FLAGS.seed)
    t0 = time.perf_counter()
    if FLAGS.vae_from:  # an autoencoder trained before (its own run): the UNet stage only
        from diffusers import FlaxAutoencoderKL

        vae, vae_params = FlaxAutoencoderKL.from_pretrained(FLAGS.vae_from)
        vae_curve = np.zeros(0)
        log(f"autoencoder from {FLAGS.vae_from}")
    else:
        vae, vae_params, vae_curve = train_vae(
            rng, FLAGS.vae_minutes, FLAGS.vae_steps, FLAGS.vae_batch, FLAGS.log_every, log
        )
        plot = outputs.loss_plot({"vae loss": vae_curve}, xlabel=f"steps / {FLAGS.log_every}")
        outputs.save_png(str(out / "vae_losses.png"), plot)
    tokenizer = toy_tokenizer(out / "tokenizer_build")
    unet, vae, text, params, unet_curve = train_unet(
        rng, vae, vae_params, tokenizer, FLAGS.unet_minutes, FLAGS.unet_steps, FLAGS.pool,
        FLAGS.log_every, log, FLAGS.unet_lr, FLAGS.ema, FLAGS.snr_gamma,
    )  # fmt: skip
    plot = outputs.loss_plot({"eps mse": unet_curve}, xlabel=f"steps / {FLAGS.log_every}")
    outputs.save_png(str(out / "unet_losses.png"), plot)
    sd = sdm.StableDiffusion(
        unet, vae, text, tokenizer, {"unet": params["unet"], "vae": vae_params,
                                     "text": params["text"]}
    )  # fmt: skip
    sdm.save(sd, out / "sd")
    sd = sdm.load(str(out / "sd"))  # through the real loader
    prompts = [shapes.prompt(shapes.sample_scene(np.random.default_rng(i))) for i in range(4)]
    outputs.save_png(str(out / "samples.png"), sample_grid(sd, prompts, [0, 1, 2, 3]))
    outputs.save_json(
        str(out / "log.json"),
        {
            "vae_loss": vae_curve.tolist(),
            "unet_loss": unet_curve.tolist(),
            "sample_prompts": prompts,
            "seconds": time.perf_counter() - t0,
            "scaling_factor": float(vae.config.scaling_factor),
            "settings": {
                k: getattr(FLAGS, k)
                for k in (
                    "vae_minutes",
                    "unet_minutes",
                    "vae_batch",
                    "vae_steps",
                    "unet_steps",
                    "pool",
                    "seed",
                    "unet_lr",
                    "ema",
                    "snr_gamma",
                    "vae_from",
                )
            },  # fmt: skip
        },
    )
    log(f"done in {(time.perf_counter() - t0) / 60:.1f} min: {out / 'sd'}, samples.png")


if __name__ == "__main__":
    _define_flags()
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    app.run(main)
