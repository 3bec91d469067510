"""Train the toy pack's RAFT-small (flow/, small configuration) on moving-shape pairs with
exact flow. Seeded, optax, progress and a loss curve; CPU-sized (64x64 images).

  python -m mgjax.toy.train_raft --out_dir runs/raft [--minutes 50] [--seed 0]
  # fine-tune on the autoencoder's round trips of the second image (what guidance compares)
  python -m mgjax.toy.train_raft --out_dir runs/raft2 --init runs/raft/raft-small.mgjax \\
      --autoencoder runs/ldm/sd/vae

Writes OUT/raft-small.mgjax (read by flow.checkpoint.load_raft, like any converted RAFT),
OUT/losses.png, OUT/log.json. The loss is RAFT's sequence loss (gamma 0.8) over the training
iterations; the validation EPE (fixed 64 pairs, 5 iterations as in guidance) is printed.

The refinement loop is unrolled: on XLA:CPU the weight gradients of RAFT's `lax.scan` take ~7x
longer than the unrolled loop's (2.35 s vs 0.31 s per step of 8 pairs, 4 iterations, one core).
A gradient with respect to the images only, as in guidance, is not slowed (271 ms per toy
guided evaluation either way), so the sampler keeps the scan.
"""

import functools
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import app, flags

from flow import checkpoint
from flow.errors import InputError, run_cli
from flow.raft import RaftConfig, init_raft, raft_forward
from mgjax.edit import outputs
from mgjax.toy import shapes
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

FLAGS = flags.FLAGS


def raft_config(input_scale: int = 2) -> RaftConfig:
    """The toy RAFT-small. At 64x64 its 1/8-resolution grid is 8x8 cells, each about as wide
    as a toy object's radius; input_scale 2 runs it on 2x upsampled images (a 16x16 grid)."""
    return RaftConfig(small=True, context_norm="batch", input_scale=input_scale)


def batch_of_pairs(rng, n: int, size: int, local_share: float = 0.0):
    pairs = (shapes.flow_pair(rng, size, local_share=local_share) for _ in range(n))
    a, b, f = zip(*pairs, strict=True)
    return 255.0 * np.stack(a), 255.0 * np.stack(b), np.stack(f)


def pool_of_pairs(rng, n: int, size: int, workers: int | None = None, local_share: float = 0.0):
    """n pairs rendered once in worker processes (one seed each, drawn from `rng`), in u8 to
    keep a large pool small; the flows f32. Drawn from at random, as `batch_of_pairs` would be."""
    render = functools.partial(shapes.seeded_flow_pair, size=size, local_share=local_share)
    pairs = parallel_map(render, seeds_from(rng, n), workers)
    a, b, f = zip(*pairs, strict=True)
    u8 = lambda x: np.round(255.0 * np.stack(x)).astype(np.uint8)  # noqa: E731
    return u8(a), u8(b), np.stack(f)


def sequence_loss(flows, target, gamma: float = 0.8):
    n = flows.shape[0]
    weights = gamma ** jnp.arange(n - 1, -1, -1, dtype=jnp.float32)
    err = jnp.abs(flows - target[None]).mean(axis=(1, 2, 3, 4))
    return jnp.sum(weights * err)


def make_step(config, optimizer, iters: int):
    def loss_fn(params, img1, img2, flow):
        flows = raft_forward(
            config, {"params": params}, img1, img2, iters, unroll=True, sequence=True
        )
        epe = jnp.linalg.norm(flows[-1] - flow, axis=-1).mean()
        return sequence_loss(flows, flow), epe

    @jax.jit
    def step(params, opt_state, img1, img2, flow):
        (loss, epe), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, img1, img2, flow)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss, epe

    return step


@functools.partial(jax.jit, static_argnums=0)
def _val_epe(config, params, img1, img2, flow):
    pred = raft_forward(config, {"params": params}, img1, img2, 5, unroll=True)
    return jnp.linalg.norm(pred - flow, axis=-1).mean()


def validate(config, params, val) -> float:
    """Mean EPE over the validation pairs, in batches of 16."""
    n = len(val[0])
    return float(np.mean([_val_epe(config, params, *(x[i : i + 16] for x in val))
                          for i in range(0, n, 16)]))  # fmt: skip


def autoencoder_roundtrip(folder: str):
    """images f[B,H,W,3] in [0, 255] -> the same through a diffusers AutoencoderKL (posterior
    mean, decode), as guidance sees a decoded estimate."""
    from mgjax.model import sd as sdm

    vae = sdm.load_autoencoder(folder)

    @jax.jit
    def roundtrip(params, images):
        y = vae.decode(params, vae.encode(params, images / 127.5 - 1.0))
        return jnp.clip(y * 127.5 + 127.5, 0.0, 255.0)

    return lambda images: np.asarray(roundtrip(vae.params, jnp.asarray(images, jnp.float32)))


def train(out_dir: str, minutes: float, max_steps: int, batch: int, iters: int, lr: float,
          seed: int, size: int, log_every: int, input_scale: int = 2,
          log=print, init: str | None = None, autoencoder: str | None = None,
          roundtrip_p: float = 0.5, pool: int = 0, workers: int | None = None,
          local_share: float = 0.0) -> dict:  # fmt: skip
    """`init`: start from these weights (RAFT-small; its weights are convolutions, so they
    may start a run at another input_scale, on objects drawn larger); `autoencoder`: a diffusers
    AutoencoderKL folder whose round trip replaces the second image of a pair with probability
    `roundtrip_p` (guidance compares a rendered source with a decoded estimate); `pool`: draw
    the pairs from this many rendered once (in `workers` processes) instead of rendering each
    batch (0), which keeps a GPU busy; `local_share`: that share of the training pairs turns or
    scales objects about their own centres with the view still (shapes.flow_pair; the
    validation pairs stay the usual ones). The learning rate warms up over the first 5% of the run
    and decays to a tenth over its steps or minutes, whichever ends first."""
    refuse_unless(
        ("minutes", minutes, minutes >= 0, "give minutes of 0 or more"),
        ("max_steps", max_steps, max_steps >= 1, "give at least 1 step"),
        ("batch", batch, batch >= 1, "give at least 1 pair per step"),
        ("iters", iters, iters >= 1, "give at least 1 RAFT iteration"),
        ("lr", lr, lr >= 0 and finite(lr), "give a learning rate of 0 or more"),
        ("seed", seed, seed >= 0, "give a seed of 0 or more"),
        ("size", size, size >= 32 and size % 8 == 0, "give a side of 32 or more, a multiple of 8"),
        ("log_every", log_every, log_every >= 1, "give at least 1 step"),
        ("input_scale", input_scale, input_scale in (1, 2, 4), "give 1, 2 or 4"),
        ("roundtrip_p", roundtrip_p, 0 <= roundtrip_p <= 1, "give a share from 0 to 1"),
        ("pool", pool, pool >= 0, "give 0 (render each batch) or more pairs"),
        ("workers", workers, workers is None or workers >= 1, "give at least 1 process"),
        ("local_share", local_share, 0 <= local_share <= 1, "give a share from 0 to 1"),
    )  # fmt: skip
    if autoencoder and not os.path.isfile(os.path.join(autoencoder, "config.json")):
        raise InputError(f"--autoencoder {autoencoder}: no diffusers AutoencoderKL folder there")
    rng = np.random.default_rng(seed)
    val = batch_of_pairs(np.random.default_rng(10_000 + seed), 64, size)
    config = raft_config(input_scale)
    if init:
        try:
            variables, init_config = checkpoint.load_variables(init)
        except InputError as e:
            raise InputError(f"--init: {e}") from None
        if not init_config.small:
            raise InputError(f"--init {init}: not a RAFT-small; give RAFT-small weights")
        params = variables["params"]
        rescaled = ""
        if init_config.input_scale != input_scale:
            rescaled = f" (trained at input_scale {init_config.input_scale}, now {input_scale})"
        log(f"starting from {init}{rescaled}")
    else:
        params = init_raft(config, jax.random.PRNGKey(seed), (size, size))["params"]
    roundtrip = autoencoder_roundtrip(autoencoder) if autoencoder else None
    os.makedirs(out_dir, exist_ok=True)  # after every check: a refused run writes nothing
    val_rt = (val[0], roundtrip(val[1]), val[2]) if roundtrip else None
    optimizer = scheduled(
        lambda learning_rate: optax.chain(
            optax.clip_by_global_norm(1.0), optax.adamw(learning_rate, 1e-4)
        )
    )
    opt_state = optimizer.init(params)
    pairs = pool_of_pairs(rng, pool, size, workers, local_share) if pool > 0 else None
    if pairs is not None:
        log(f"rendered {pool} training pairs")
    step_fn = make_step(config, optimizer, iters)
    history = {"step": [], "loss": [], "train_epe": [], "val_epe": [], "val_step": []}
    budget = Budget(max_steps, minutes)
    losses, epes, step = [], [], 0
    while not budget.done(step):
        step += 1
        if pairs is None:
            img1, img2, flow = batch_of_pairs(rng, batch, size, local_share)
        else:
            idx = rng.integers(0, pool, batch)
            img1, img2, flow = (np.asarray(x[idx], np.float32) for x in pairs)
        if roundtrip is not None:
            pick = rng.uniform(size=batch) < roundtrip_p
            img2 = np.where(pick[:, None, None, None], roundtrip(img2), img2)
        opt_state = with_learning_rate(opt_state, budget.learning_rate(lr, step))
        params, opt_state, loss, epe = step_fn(params, opt_state, img1, img2, flow)
        losses.append(loss)
        epes.append(epe)
        if step % log_every == 0 or budget.done(step):
            losses, epes = (list(map(float, jax.device_get(x))) for x in (losses, epes))
            if not np.isfinite(losses[-1]):
                raise RuntimeError(f"training diverged at step {step} (loss {losses[-1]})")
            elapsed = budget.elapsed()
            history["step"].append(step)
            history["loss"].append(float(np.mean(losses)))
            history["train_epe"].append(float(np.mean(epes)))
            losses, epes = [], []
            if step % (log_every * 10) == 0:
                history["val_epe"].append(validate(config, params, val))
                history["val_step"].append(step)
                if val_rt is not None:
                    history.setdefault("val_epe_roundtrip", []).append(
                        validate(config, params, val_rt)
                    )
                    log(f"val EPE, second image through the autoencoder "
                        f"{history['val_epe_roundtrip'][-1]:.3f}")  # fmt: skip
            rate = step / elapsed
            log(
                f"step {step}  loss {history['loss'][-1]:.3f}  train EPE "
                f"{history['train_epe'][-1]:.3f}  val EPE "
                f"{history['val_epe'][-1] if history['val_epe'] else float('nan'):.3f}  "
                f"{rate:.2f} steps/s  ETA {budget.seconds_left(step) / 60:.1f} min"
            )
    v = validate(config, params, val)
    history["final_val_epe"] = v
    if val_rt is not None:
        history["final_val_epe_roundtrip"] = validate(config, params, val_rt)
        log(f"final validation EPE, second image through the autoencoder "
            f"{history['final_val_epe_roundtrip']:.3f} px")  # fmt: skip
    history["steps"] = step
    history["settings"] = dict(batch=batch, iters=iters, lr=lr, seed=seed, size=size,
                               max_steps=max_steps, minutes=minutes,
                               input_scale=input_scale, init=init, autoencoder=autoencoder,
                               roundtrip_p=roundtrip_p, pool=pool,
                               local_share=local_share)  # fmt: skip
    history["seconds"] = budget.elapsed()
    history["device"] = device_description()
    history["command"] = "python -m mgjax.toy.train_raft " + " ".join(sys.argv[1:])
    history["date"] = time.strftime("%Y-%m-%d")
    zero = float(np.linalg.norm(val[2], axis=-1).mean())
    history["zero_flow_val_epe"] = zero
    log(f"final validation EPE {v:.3f} px (zero flow: {zero:.3f} px)")
    variables = jax.tree_util.tree_map(np.asarray, {"params": params})
    checkpoint.save(
        os.path.join(out_dir, "raft-small.mgjax"), variables, config, "mgjax.toy.train_raft"
    )
    curves = {k: np.asarray(history[v]) for k, v in (("loss", "loss"), ("EPE", "train_epe"))}
    plot = outputs.loss_plot(curves, xlabel=f"steps / {log_every}")
    outputs.save_png(os.path.join(out_dir, "losses.png"), plot)
    outputs.save_json(os.path.join(out_dir, "log.json"), history)
    return history


def _define_flags():
    """Command-line flags (defined only when run as a script, so that the training modules
    can be imported side by side)."""
    flags.DEFINE_string("out_dir", None, "Output folder.")
    flags.DEFINE_float("minutes", 30.0, "Training time budget (the run stops at the next log).")
    flags.DEFINE_integer("max_steps", 4000, "Step limit (the learning-rate schedule's length).")
    flags.DEFINE_integer("batch", 8, "Pairs per step.")
    flags.DEFINE_integer("iters", 4, "RAFT iterations while training.")
    flags.DEFINE_float("lr", 5e-4, "Peak learning rate (warm-up, then cosine decay to a tenth).")
    flags.DEFINE_integer("seed", 0, "Seed of the data and the initial weights.")
    flags.DEFINE_integer("size", 64, "Image size.")
    flags.DEFINE_integer("log_every", 50, "Steps between progress lines.")
    flags.DEFINE_integer("input_scale", 2, "RAFT runs on images upsampled by this factor.")
    flags.DEFINE_string("init", None, "Start from these RAFT-small weights (fine-tuning).")
    flags.DEFINE_string(
        "autoencoder", None, "AutoencoderKL folder: train on its round trips of the second image."
    )
    flags.DEFINE_float("roundtrip_p", 0.5, "Share of pairs whose second image is round-tripped.")
    flags.DEFINE_integer("pool", 0, "Pairs rendered once to draw from (0: render each batch).")
    flags.DEFINE_integer("workers", None, "Processes rendering the pool (default: every core).")
    flags.DEFINE_float(
        "local_share",
        0.0,
        "Share of training pairs whose objects turn or scale about their own centres, the view "
        "still (the small motions of rotation and scaling edits).",
    )


def main(argv):
    del argv
    if not FLAGS.out_dir:
        raise app.UsageError("--out_dir is required")
    run_cli(lambda: train(
        FLAGS.out_dir, FLAGS.minutes, FLAGS.max_steps, FLAGS.batch, FLAGS.iters, FLAGS.lr,
        FLAGS.seed, FLAGS.size, FLAGS.log_every, FLAGS.input_scale,
        log=lambda s: print(s, flush=True), init=FLAGS.init, autoencoder=FLAGS.autoencoder,
        roundtrip_p=FLAGS.roundtrip_p, pool=FLAGS.pool, workers=FLAGS.workers,
        local_share=FLAGS.local_share,
    ))  # fmt: skip


if __name__ == "__main__":
    _define_flags()
    app.run(main)
