"""Which energy term steers the guidance? Each term's gradient on toy edits, step by step.

  python -m bench.guidance_terms [--split tuning|heldout] [--edits 8] [--preset toy]
      [--at 0,10,25,50,90] [--model SD_FOLDER --raft RAFT_FILE] [--set KEY=VALUE] [--steps N]

For each edit of bench.toy_quality (the same scenes, sources, motions and frozen masks) and
each DDIM step named in --at, one guided evaluation at the unedited source's latent of that
step (its DDIM trajectory: what the sampler sees before the edit departs from it), with the
preset's weights, then once per term with the other terms' weights set to 0 (the weights are
data: the same compiled program). Per term and step, over the edits:

  norm         |s lambda_g lambda_term dE_term/dz_t|, the guidance term before the clip (the
               median: one edit's RAFT gradient can be a hundred times the others')
  on frozen    share of its squared norm on frozen latents (they are reset to the source
               trajectory at every evaluation, so that share moves nothing but counts
               against the clip)
  cos          cosine between the term's gradient and the whole energy's
  clip scale   (whole energy) the factor the clip multiplies the term by (1: not clipped)

Terms: flow (lambda_flow L_flow, through RAFT), colour (lambda_color L_color), keep
(preserve_weight x the preservation term, where the preset has one), all (their sum).
"""

import argparse
import sys

import jax
import jax.numpy as jnp
import numpy as np

from bench import toy_quality as tq
from flow.checkpoint import load_raft
from mgjax import config as C
from mgjax.edit.motion import auto_frozen_mask
from mgjax.method import guidance as G
from mgjax.method import numeric as N
from mgjax.method.sampler import Sampler
from mgjax.model import sd as sdm
from mgjax.toy import pack

TERMS = {
    "flow": ("color_weight", "preserve_weight"),
    "colour": ("flow_weight", "preserve_weight"),
    "keep": ("flow_weight", "color_weight"),
}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--split", choices=("tuning", "heldout"), default="tuning")
    parser.add_argument("--edits", type=int, default=8, help="the bench's first N edits")
    parser.add_argument("--preset", default="toy", choices=sorted(C.PRESETS))
    parser.add_argument("--at", default="0,10,25,50,90", help="DDIM steps (0 = noisiest)")
    parser.add_argument("--model", default=None, help="diffusers folder (default: the pack's)")
    parser.add_argument("--raft", default=None, help="RAFT file (default: the pack's)")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a preset number (e.g. --set flow_weight=24); repeatable",
    )
    parser.add_argument(
        "--steps", type=int, default=0, help="override the preset's DDIM steps (smoke runs)"
    )
    args = parser.parse_args()
    preset = dict(tq.preset_values(args.preset))
    for item in args.set:
        key, _, value = item.partition("=")
        if key not in N.FIELDS or not value:
            sys.exit(f"--set {item}: give KEY=VALUE with KEY one of {', '.join(N.FIELDS)}")
        try:
            preset[key] = float(value)
        except ValueError:
            sys.exit(f"--set {item}: {key} takes a number")
    if args.steps < 0:
        sys.exit(f"--steps {args.steps}: give a positive number of DDIM steps")
    if args.steps:
        preset["steps"] = args.steps
    try:
        at = sorted({int(a) for a in args.at.split(",")})
    except ValueError:
        sys.exit(f"--at {args.at}: give DDIM step numbers, e.g. 0,10,50")
    if not at or at[0] < 0 or at[-1] >= preset["steps"]:
        sys.exit(f"--at {args.at}: steps from 0 to {preset['steps'] - 1}")
    if args.edits < 1:
        sys.exit("--edits must be at least 1")
    method = C.Method(**preset)
    sd = sdm.load(args.model or pack.sd_folder())
    raft = load_raft(args.raft or pack.raft_file())
    cases = [tq.Case(n, sd.unet.config.sample_size * sd.vae_factor, tq.split_seeds(args.split))
             for n in range(args.edits)]  # fmt: skip
    part = tq.prepare(cases, sd, preset, lambda *a: 0.0)
    b = len(part)
    flows = np.stack([p["flow"] for p in part])
    frozen = np.concatenate(
        [auto_frozen_mask(f, sd.vae_factor, tq.preset_dilate(args.preset)) for f in flows]
    )  # the frozen masks the bench's guided batches use
    sampler = Sampler(sd, raft, method, C.Speed(chunk=tq.CHUNK))
    inputs = sampler.prepare(
        np.stack([p["image"] for p in part]),
        flows,
        jnp.concatenate([sd.embed(p["case"].prompt) for p in part]),
        jnp.repeat(sd.embed(""), b, 0),
        frozen=frozen,
        trajectory=np.concatenate([p["traj"].latents for p in part], axis=1),
    )
    g = sampler.guidance
    keys = jax.random.split(jax.random.PRNGKey(0), b)
    names = ["all", "flow", "colour"] + (["keep"] if preset["preserve_weight"] > 0 else [])
    edited = 1.0 - np.asarray(inputs.frozen, np.float32)
    print(f"{b} edits ({args.split}), {args.preset} preset, {method.steps} DDIM steps")
    print("| step | term | norm | on frozen | cos | clip scale |")
    print("| ---: | --- | ---: | ---: | ---: | ---: |")
    for i in at:
        grads = term_gradients(g, sd.params, raft, inputs, inputs.trajectory[i], i, keys, names)
        s = float(np.sqrt(1.0 - np.asarray(g.schedule.abar)[i]))
        for name, row in term_table(grads, edited, s, inputs.numeric).items():
            shown = f"{row['clip_scale']:.2f}" if name == "all" else "-"
            print(f"| {i} | {name} | {row['norm']:.3g} | {row['on_frozen']:.2f} | "
                  f"{row['cos']:.2f} | {shown} |")  # fmt: skip


_evaluate = jax.jit(G.evaluate, static_argnums=0, static_argnames="mode")


def term_gradients(g, params, raft, inputs, z, i: int, keys, names) -> dict:
    """name -> f64[B,C,h,w]: dE/dz_t of one guided evaluation at step i from z, for the whole
    energy ("all") and for each term alone (the others' weights set to 0 in the inputs'
    numbers, which the compiled program reads as data)."""
    grads = {}
    for name in names:
        off = () if name == "all" else TERMS[name]
        num = N.replace(inputs.numeric, **{k: 0.0 for k in off})
        ev = _evaluate(g, params, raft, inputs.replace(numeric=num), z, i, 0, keys)
        grads[name] = np.asarray(ev.grad, np.float64)
    return grads


def term_table(grads: dict, edited, s: float, numeric) -> dict:
    """name -> means over the batch of: norm (the guidance term before the clip, s lambda_g
    |grad|), on_frozen (share of |grad|^2 where `edited` is 0), cos (with grads["all"]) and
    clip_scale (what the clip multiplies that term by)."""
    weight = np.asarray(numeric.guidance_weight, np.float64)
    clip = np.asarray(numeric.clip, np.float64)
    whole = grads["all"]
    axes = tuple(range(1, whole.ndim))

    def sq(a):
        return (a**2).sum(axes)

    rows = {}
    for name, grad in grads.items():
        norm = s * weight * np.sqrt(sq(grad))
        scale = np.where(clip > 0, np.minimum(1.0, clip / np.maximum(norm, 1e-30)), 1.0)
        rows[name] = dict(
            norm=float(np.median(norm)),
            on_frozen=float((sq(grad * (1 - edited)) / np.maximum(sq(grad), 1e-30)).mean()),
            cos=float(
                ((grad * whole).sum(axes) / np.maximum(np.sqrt(sq(grad) * sq(whole)), 1e-30)).mean()
            ),
            clip_scale=float(scale.mean()),
        )
    return rows


if __name__ == "__main__":
    main()
