"""Numerical effect and cost of each performance lever on the tiny parity case.

  python -m bench.levers [--steps 3] [--recursive 2] [--size 128]

The case of tests/test_sampler.py's parity test: random SD-class tiny UNet/VAE
(tests.tiny_models.tiny) and a random RAFT-small, 128x128 images, lambda_g = 30, clip 7.7, 3
DDIM steps x K = 2, a frozen border. Each lever runs the same edit with the same noise; printed
per lever: the final latent's relative L2 distance from the fp32 / no-lever run and its max abs
difference, XLA's temporary memory of the compiled chunk, compile time and time per guided
evaluation. The first row is the noise floor: the baseline with the source image moved by 1e-6,
which a guided run amplifies through RAFT's ill-conditioned gradient at random weights.
`skip_unguided` is timed with every other step's guidance set to 0 (it is exact by construction:
compare with the row that computes those steps in full). "source cache" encodes each edit's
source with RAFT once (GuidanceInputs.raft_source), not in every evaluation: compare it with
the "loops unrolled" row.
"""

import argparse

import jax
import numpy as np

from bench.timing import median_time
from flow.raft import Raft, RaftConfig, init_raft
from mgjax.method.sampler import Sampler
from tests.tiny_models import tiny

PARITY = dict(recursive_steps=2, guidance_weight=30.0, clip=7.7, loops="scan")


def _measure(sampler, inputs, steps, repeats):
    """(final latent, XLA temporaries MiB, compile s, run s) of one chunk of `steps`, through
    the sampler's own run_chunk (compile time apart; with loops "unrolled" the temporaries are
    the largest of its compiled evaluations')."""
    source, flow, cond, uncond, frozen, traj, schedule = inputs
    edit = sampler.prepare(
        source, flow, cond, uncond, frozen=frozen, trajectory=traj, schedule=schedule
    )
    make_state = lambda: sampler.init(edit, traj[0], seeds=7)  # noqa: E731
    run = lambda: sampler.run_chunk(edit, make_state(), steps)[0].z  # noqa: E731
    z = np.asarray(run())
    run_s = median_time(lambda: jax.block_until_ready(run()), repeats)
    temp = max(c.memory_analysis().temp_size_in_bytes for c in sampler.programs)
    return z, temp / 2**20, sampler.compile_seconds, run_s


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--recursive", type=int, default=2)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    sd32 = tiny(seed=0)
    rc = RaftConfig(small=True, context_norm="batch")
    raft32 = Raft(init_raft(rc, jax.random.PRNGKey(3)), rc)
    n, lat = args.size, args.size // 4
    rng = np.random.default_rng(1)
    img = rng.uniform(size=(1, n, n, 3)).astype(np.float32)
    flow = np.zeros((1, n, n, 2), np.float32)
    flow[:, n * 5 // 16 : n * 11 // 16, n // 4 : n * 5 // 8] = (6.0, 4.0)
    traj = rng.standard_normal((500, 1, 4, lat, lat)).astype(np.float32)
    frozen = np.ones((1, 4, lat, lat), bool)
    frozen[..., 3:-3, 3:-3] = False
    cond, uncond = np.asarray(sd32.embed("a cat")), np.asarray(sd32.embed(""))
    half = np.ones(500, np.float32)
    half[1::2] = 0.0

    rows = [
        ("fp32, no lever (baseline, loops scan)", {}, "float32", "plain", None, img),
        ("noise floor: source moved 1e-6", {}, "float32", "plain", None, img * (1 + 1e-6)),
        ("loops unrolled", dict(loops="unrolled"), "float32", "plain", None, img),
        ("loops unrolled + source cache", dict(loops="unrolled", source_cache=True), "float32",
         "plain", None, img),
        ("remat dots", dict(remat="dots"), "float32", "plain", None, img),
        ("remat full", dict(remat="full"), "float32", "plain", None, img),
        ("memory-efficient attention", {}, "float32", "memory_efficient", None, img),
        ("bf16 UNet + VAE + RAFT", {}, "bfloat16", "plain", None, img),
        ("bf16 + remat full", dict(remat="full"), "bfloat16", "plain", None, img),
        ("every other step unguided, computed", dict(skip_unguided=False), "float32", "plain",
         half, img),
        ("every other step unguided, skipped", {}, "float32", "plain", half, img),
    ]  # fmt: skip
    print(
        f"tiny parity case: {n}x{n}, {args.steps} DDIM steps x K={args.recursive}, "
        f"lambda_g {PARITY['guidance_weight']:g}, backend {jax.default_backend()}"
    )
    print(
        "| lever | rel. L2 vs baseline | max abs | XLA temp MiB | compile s | ms / eval |\n"
        "|---|---:|---:|---:|---:|---:|"
    )
    base = {}
    for name, extra, dtype, attention, schedule, source in rows:
        sd = sd32.configure(dtype=dtype, attention=attention)
        raft = raft32.replace_config(dtype=dtype)
        settings = dict(**(PARITY | dict(recursive_steps=args.recursive, chunk=args.steps) | extra))
        z, temp, compile_s, run_s = _measure(
            Sampler.of(sd, raft, **settings), (source, flow, cond, uncond, frozen, traj, schedule),
            args.steps, args.repeats,
        )  # fmt: skip
        key = "schedule" if schedule is not None else "plain"
        ref = base.setdefault(key, z)
        rel = np.linalg.norm(z - ref) / np.linalg.norm(ref)
        print(
            f"| {name} | {rel:.2e} | {np.abs(z - ref).max():.2e} | {temp:.1f} | "
            f"{compile_s:.1f} | {run_s / (args.steps * args.recursive) * 1e3:.0f} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
