"""Batch editing throughput: edits/hour against the number of devices and the batch size, with
the scaling efficiency, in one run (tiny random models; one process per device count, since
JAX fixes the device count when it starts).

  python -m bench.batch                          # 1, 2, 4, 8 simulated CPU devices
  python -m bench.batch --devices 1 2 --batches 1 2 4 --steps 4 --size 64

On CPU the devices are simulated (XLA_FLAGS=--xla_force_host_platform_device_count=N) and
share the machine's cores, so this measures the sharding's overhead more than a speed-up. On a
multi-GPU host or a TPU VM, `--real` uses the actual local devices (one process, every batch
size that the device counts divide). An edit is `--steps` DDIM steps x K=2 guided evaluations
through mgjax.batch.sharding (shard_edit / shard_state) on tiny random UNet/VAE/RAFT-small;
the time is the median of 3 full edits after a compile and a warm-up, per batch.
Efficiency = (edits/hour) / (edits/hour of 1 device at batch 1 x devices).
"""

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def measure(batch: int, steps: int, size: int) -> dict:
    import jax
    import numpy as np

    from flow.raft import Raft, RaftConfig, init_raft
    from mgjax.batch import sharding as bt
    from mgjax.method.sampler import Sampler
    from tests.tiny_models import tiny

    mesh = bt.local_mesh(batch)
    sd = tiny(seed=0)
    sd.params = bt.replicate(sd.params, mesh)
    rcfg = RaftConfig(small=True)
    raft = bt.replicate(Raft(init_raft(rcfg, jax.random.PRNGKey(1)), rcfg), mesh)
    settings = dict(steps=steps, recursive_steps=2, chunk=steps, clip=10.0)
    sampler = Sampler.of(sd, raft, **settings)
    rng = np.random.default_rng(0)
    lat = size // sd.vae_factor
    flow = np.zeros((batch, size, size, 2), np.float32)
    flow[:, size // 4 : size // 2, size // 4 : size // 2] = (4.0, 0.0)
    cond = np.asarray(sd.embed("a toy"))
    edit = sampler.prepare(
        rng.uniform(size=(batch, size, size, 3)).astype(np.float32),
        flow,
        cond,
        np.asarray(sd.embed("")),
        trajectory=rng.standard_normal((steps, batch, 4, lat, lat)).astype(np.float32),
    )
    edit = bt.shard_inputs(edit, mesh)
    z_T = rng.standard_normal((batch, 4, lat, lat)).astype(np.float32)

    def one():
        state = bt.shard_state(sampler.init(edit, z_T, seeds=list(range(batch))), mesh)
        t = time.perf_counter()
        state, _, _ = sampler.run_chunk(edit, state)
        jax.block_until_ready(state.z)
        return time.perf_counter() - t

    one()  # compile
    compile_s = sampler.compile_seconds
    one()  # warm-up
    edit_s = sorted(one() for _ in range(3))[1]
    return dict(
        devices=mesh.size,
        batch=batch,
        edit_s=edit_s,
        edits_per_hour=batch * 3600 / edit_s,
        compile_s=compile_s,
        backend=jax.default_backend(),
        kind=jax.devices()[0].device_kind,
    )


def _child(devices: int, args) -> list[dict]:
    env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
    batches = [b for b in args.batches if b % devices == 0] or [devices]  # all devices busy
    cmd = [sys.executable, "-m", "bench.batch", "--one", str(devices), "--steps", str(args.steps)]
    cmd += ["--size", str(args.size), "--batches", *map(str, batches)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
    rows = [json.loads(ln[7:]) for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode or not rows:
        print(f"{devices} devices: failed: {proc.stderr.strip().splitlines()[-3:]}", flush=True)
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--devices", nargs="+", type=int, default=[1, 2, 4, 8])
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 2, 4, 8, 16])
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--real", action="store_true", help="the actual local devices")
    parser.add_argument("--one", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one is not None or args.real:
        import jax

        for b in args.batches:
            if args.real and b % jax.local_device_count():
                continue  # every device busy
            print("RESULT " + json.dumps(measure(b, args.steps, args.size)), flush=True)
        return
    print(
        f"tiny models, {args.size}x{args.size}, {args.steps} steps x K=2 per edit; simulated CPU "
        f"devices on {os.cpu_count()} cores",
        flush=True,
    )
    rows = []
    for d in args.devices:
        for r in _child(d, args):
            print(f"  {json.dumps(r)}", flush=True)
            rows.append(r)
    base = next((r for r in rows if r["devices"] == 1 and r["batch"] == 1), None)
    print("\n| devices | batch | s / edit batch | edits / hour | scaling efficiency | compile s |")
    print("|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        eff = r["edits_per_hour"] / (base["edits_per_hour"] * r["devices"]) if base else None
        print(
            f"| {r['devices']} | {r['batch']} | {r['edit_s']:.2f} | {r['edits_per_hour']:.0f} | "
            f"{'-' if eff is None else f'{eff:.0%}'} | {r['compile_s']:.1f} |"
        )


if __name__ == "__main__":
    main()
