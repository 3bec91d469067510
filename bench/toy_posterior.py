"""How much of an object any denoiser could keep from a noise level, against what the toy UNet
keeps: the exact posterior over a family of scenes that differ only in that object.

  python -m bench.toy_posterior [--scenes 24] [--strengths 0.3,0.5] [--draws 2]
      [--split tuning|heldout] [--model SD_FOLDER] [--json OUT.json]

For each object of the first --scenes scenes, the candidates are the scene with that object as
each of the world's four shapes, shifted by -1, 0 or +1 px on each axis, turned by -12, 0 or +12
degrees and sized 0.88, 1 or 1.12 (324 scenes, the true one among them), each encoded to its
posterior-mean latent z_c. The true latent is noised to a strength's step of the 50-step DDIM
schedule, z_t = sqrt(abar) z + sqrt(1 - abar) n, and the posterior over the candidates is exact
for that family: uniform prior, p(c | z_t) proportional to exp(-|z_t - sqrt(abar) z_c|^2 /
(2 (1 - abar))). Decoded and compared with the rendered object (`quality.object_kept`, each
object's IoU with itself, as the round trip and `train_ldm.denoise_report` measure it):

- the posterior mean, sum_c p(c | z_t) z_c: the least-squares estimate of the clean latent
  given that the scene is one of the family, the best a one-step estimate can do there;
- the most probable candidate (a sharp draw, what a sampler that knew the family would give);
- the UNet's one-step estimate from the same z_t with the scene's prompt (what guidance
  differentiates through, and what a 50-step redraw from that level comes close to).

The family is narrow: a real posterior also spreads over finer shifts, turns and sizes (and
over the rest of the scene), and its mean blurs a little more (a family of half the steps keeps
about 0.01 less of an object from 0.3 of the noise). So the family's mean is what a denoiser
could come close to, not a strict bound, and the gap to the UNet's what a better UNet could
still gain.
Prints one line per strength: the three IoUs (mean over objects and draws), and the posterior's
mass on the true candidate and on the true shape.
"""

import argparse
import dataclasses
import itertools
import math
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from bench.toy_quality import split_seeds
from flow.errors import InputError, run_cli
from mgjax.edit import outputs
from mgjax.method import ddim, source
from mgjax.model import sd as sdm
from mgjax.toy import pack, quality, shapes

SHIFTS = (-1.0, 0.0, 1.0)  # px, each axis
TURNS = (-12.0, 0.0, 12.0)  # degrees
SIZES = (0.88, 1.0, 1.12)
STEPS = 50


def candidates(scene: shapes.Scene, k: int) -> tuple[list[shapes.Scene], list[str], int]:
    """(scenes, each one's shape, index of the true scene): `scene` with object k replaced by
    each shape, shift, turn and size of the family; every other object as it is."""
    o = scene.objects[k]
    out, names, true = [], [], None
    for shape, dx, dy, turn, size in itertools.product(shapes.SHAPES, SHIFTS, SHIFTS, TURNS, SIZES):
        if (shape, dx, dy, turn, size) == (o.shape, 0.0, 0.0, 0.0, 1.0):
            true = len(out)
        new = dataclasses.replace(
            o,
            shape=shape,
            cx=o.cx + dx,
            cy=o.cy + dy,
            angle=o.angle + math.radians(turn),
            radius=o.radius * size,
        )
        objects = scene.objects[:k] + (new,) + scene.objects[k + 1 :]
        out.append(dataclasses.replace(scene, objects=objects))
        names.append(shape)
    return out, names, true


def posterior(z_t, latents, abar: float) -> np.ndarray:
    """p(c | z_t) over candidate latents (C, ...) for z_t = sqrt(abar) z_c + sqrt(1 - abar) n,
    n standard normal, with a uniform prior."""
    z_t, latents = np.asarray(z_t, np.float64), np.asarray(latents, np.float64)
    sq = np.square(z_t[None] - math.sqrt(abar) * latents).reshape(len(latents), -1).sum(1)
    log_p = -sq / (2.0 * (1.0 - abar))
    w = np.exp(log_p - log_p.max())
    return w / w.sum()


def measure(sd, seeds, strengths, draws: int, seed: int = 0) -> dict:
    """{strength: {"posterior_mean", "most_probable", "unet", "p_true", "p_shape": per object
    and draw}} on the objects of the scenes `seeds`."""
    sch = ddim.make_schedule(STEPS)
    encode = (
        lambda images: np.concatenate(  # noqa: E731
            [np.asarray(source.encode(sd, images[i : i + 128])) for i in range(0, len(images), 128)]
        )
    )
    eps = jax.jit(lambda z, t, c: sd.eps(sd.params, z, t, c))
    key = jax.random.PRNGKey(seed)
    rows = {s: {k: [] for k in ("posterior_mean", "most_probable", "unet", "p_true", "p_shape")}
            for s in strengths}  # fmt: skip
    for scene_seed in seeds:
        scene = shapes.sample_scene(np.random.default_rng(int(scene_seed)), 64)
        rendered = shapes.render(scene)
        cond = sd.embed(shapes.prompt(scene))
        for k in range(len(scene.objects)):
            family, names, true = candidates(scene, k)
            latents = encode(np.stack([shapes.render(c)["image"] for c in family]))
            same_shape = np.array([n == names[true] for n in names])
            for s in strengths:
                i = int(round(STEPS * (1.0 - s)))
                abar, t = float(sch.abar[i]), int(sch.timesteps[i])
                for _ in range(draws):
                    key, sub = jax.random.split(key)
                    noise = np.asarray(jax.random.normal(sub, latents[true].shape))
                    z_t = math.sqrt(abar) * latents[true] + math.sqrt(1.0 - abar) * noise
                    p = posterior(z_t, latents, abar)
                    e = eps(jnp.asarray(z_t[None], jnp.float32), jnp.full((1,), t), cond)
                    x0 = np.asarray(ddim.predict_x0(z_t[None], np.asarray(e), abar))[0]
                    mean = np.tensordot(p, latents, axes=1)
                    decoded = source.decode_images(
                        sd, jnp.asarray(np.stack([mean, latents[np.argmax(p)], x0]), jnp.float32)
                    )
                    r = rows[s]
                    kinds = ("posterior_mean", "most_probable", "unet")
                    for name, image in zip(kinds, decoded, strict=True):
                        kept = quality.object_kept(rendered["image"], image, rendered["masks"][k])
                        r[name].append(kept)
                    r["p_true"].append(float(p[true]))
                    r["p_shape"].append(float(p[same_shape].sum()))
    return rows


def strengths_arg(text: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",")]
    except ValueError:
        values = []
    if not values or not all(0.0 < v < 1.0 for v in values):  # NaN too
        raise argparse.ArgumentTypeError(
            f"{text!r}: give noise levels between 0 and 1, comma-separated (e.g. 0.3,0.5)"
        )
    return values


def positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: give a whole number of at least 1")
    return value


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--scenes", type=positive, default=24)
    parser.add_argument("--strengths", type=strengths_arg, default=[0.3, 0.5])
    parser.add_argument("--draws", type=positive, default=2, help="noise draws per object")
    parser.add_argument("--split", choices=("tuning", "heldout"), default="tuning")
    parser.add_argument("--model", default=None, help="a diffusers folder (default: the pack's)")
    parser.add_argument("--json", default=None, help="write the per-object figures here")
    args = parser.parse_args()

    def run():
        if args.json and not Path(args.json).resolve().parent.is_dir():
            raise InputError(f"--json {args.json}: no such folder; give a path in one")
        model = args.model or pack.sd_folder()
        sd = sdm.load(model)  # a folder that is not a model fails here, before any work
        rows = measure(sd, split_seeds(args.split)[: args.scenes], args.strengths, args.draws)
        for s, r in rows.items():
            m = {k: np.mean(v) for k, v in r.items()}
            print(
                f"strength {s}: {len(r['unet'])} objects x draws; object IoU: posterior mean "
                f"{m['posterior_mean']:.3f}, most probable {m['most_probable']:.3f}, UNet "
                f"one-step {m['unet']:.3f}; posterior on the true candidate {m['p_true']:.3f}, "
                f"on the true shape {m['p_shape']:.3f}"
            )
        if args.json:
            rows_out = {str(s): r for s, r in rows.items()}
            outputs.save_json(
                args.json, {"model": str(model), "split": args.split, "rows": rows_out}
            )

    run_cli(run)


if __name__ == "__main__":
    main()
