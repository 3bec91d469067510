"""The gradient through RAFT that guidance follows: detached (upstream RAFT, the reference) vs full.

  python -m bench.raft_gradient [--raft FILE] [--steps 100]

On the toy pack's demo edit (its object asked to move 10 px right), with the toy preset's energy
weights:
  1. gradient of the energy w.r.t. the edited image (the source plus a little noise), with
     RAFT's flow estimate detached at every refinement iteration or not: its norm, and the slope
     of the energy along the normalised gradient measured by a central finite difference;
     a correct gradient has slope = norm;
  2. the energy minimised directly over the autoencoder latent (normalised gradient steps,
     no diffusion model): flow loss and the object's shift (centroid of its colour) every
     `--steps / 5` steps, per gradient;
  3. the energy of the exact answer: the scene rendered with the object moved d px right
     (d = 0 is the source, 10 the target), as rendered and after the autoencoder's round trip
     (what guidance sees). Guidance can only find the edit if the energy falls towards d = 10.
Prints the figures (BENCHMARKS.md, "RAFT").
"""

import argparse

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

from flow.checkpoint import load_raft
from mgjax import config as C
from mgjax.method import source as src_lib
from mgjax.method.energy import EnergyWeights, motion_energy, occlusion_mask
from mgjax.model import sd as sdm
from mgjax.toy import pack, quality, shapes


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--raft", default=None, help="RAFT weights (default: the toy pack's)")
    parser.add_argument("--steps", type=int, default=100, help="latent optimisation steps")
    parser.add_argument("--step_size", type=float, default=1.0, help="latent L2 step length")
    args = parser.parse_args()
    detached = load_raft(args.raft or pack.raft_file())
    nets = {"detached": detached, "full": detached.replace_config(detach=False)}
    sd = sdm.load(pack.sd_folder())
    files = pack.demo_files()
    image = np.asarray(Image.open(files["image"]), np.float32) / 255.0
    mask = np.asarray(Image.open(files["object_mask"])) > 127
    color, c0 = np.median(image[mask], axis=0), quality.centroid(mask)
    flow = np.zeros(image.shape[:2] + (2,), np.float32)
    flow[mask, 0] = 10.0
    src, target = jnp.asarray(image[None]), jnp.asarray(flow[None])
    occ = occlusion_mask(target)
    toy = C.make(**C.PRESETS["toy"]).method
    weights = EnergyWeights(toy.flow_weight, toy.color_weight)

    def energy(net, x):
        e, logs = motion_energy(
            x, src, target, occ, lambda a, b, iters: net(a, b, iters=iters), weights, 5, False
        )
        return e.sum(), logs

    x = src + 0.02 * jax.random.normal(jax.random.PRNGKey(0), src.shape)
    print("1. gradient w.r.t. the image (source + N(0, 0.02^2)), toy preset energy")
    print("| gradient | norm | finite-difference slope along it (h = 1e-3) |")
    print("| --- | ---: | ---: |")
    for name, net in nets.items():
        value = jax.jit(lambda x, net=net: energy(net, x)[0])
        g = jax.jit(jax.grad(lambda x, net=net: energy(net, x)[0]))(x)
        norm = float(jnp.linalg.norm(g))
        u, h = g / norm, 1e-3
        slope = float(value(x + h * u) - value(x - h * u)) / (2 * h)
        print(f"| {name} | {norm:.3g} | {slope:.3g} |", flush=True)

    print(
        f"\n2. energy minimised over the latent ({args.steps} normalised steps of "
        f"{args.step_size}); flow loss and object shift (dx, dy) px, target (+10, 0)"
    )
    z0 = jnp.asarray(src_lib.encode(sd, image[None]))
    every = max(args.steps // 5, 1)
    for name, net in nets.items():

        def latent_energy(z, net=net):
            e, logs = energy(net, sd.decode(sd.params, z) * 0.5 + 0.5)
            return e, logs

        grad = jax.jit(jax.value_and_grad(latent_energy, has_aux=True))
        z, cells = z0, []
        for i in range(args.steps + 1):
            (_, logs), g = grad(z)
            if i % every == 0:
                x = np.clip(np.asarray(sd.decode(sd.params, z))[0] * 0.5 + 0.5, 0, 1)
                c = quality.centroid(quality.segment(x, color))
                shift = "lost" if c is None else "({:+.1f}, {:+.1f})".format(*(c - c0))
                cells.append(f"{float(logs['flow_loss'][0]):.3f} {shift}")
            z = z - args.step_size * g / (jnp.linalg.norm(g) + 1e-12)
        print(f"{name}: " + " | ".join(cells), flush=True)

    print("\n3. energy (flow loss, colour loss) of the scene with the object moved d px right")
    print("| d px | rendered | after the autoencoder |")
    print("| ---: | --- | --- |")
    scene, rendered, _ = pack.demo_scene(image.shape[0])
    assert np.abs(rendered - image).max() < 1 / 255 + 1e-6, "the pack's demo.png is another scene"
    value = jax.jit(lambda x: energy(detached, x))
    for d in range(0, 13, 2):
        moved = shapes.render(scene, {0: shapes.affine_about((0, 0), (d, 0))})["image"][None]
        cells = []
        for x in (jnp.asarray(moved), jnp.asarray(src_lib.roundtrip(sd, moved))):
            e, logs = value(x)
            cells.append(
                f"{float(e):.2f} ({float(logs['flow_loss'][0]):.3f}, "
                f"{float(logs['color_loss'][0]):.3f})"
            )
        print(f"| {d} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
