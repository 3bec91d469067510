"""What a 4-value guidance-weight sweep compiles: the number of compiled guided programs and
their compile seconds, on the toy pack through `launch.py --jobs` and on tiny random models of
the SD v1.x classes (tests/tiny_models.py) through Samplers kept as the editor keeps them.

  python -m bench.numeric_sweep                    # this checkout
  PYTHONPATH=/path/to/other/checkout python bench/numeric_sweep.py   # another one, to compare

Toy pack: four jobs of the demo edit that differ only in guidance_weight (0, 18.75, 30, 45),
--steps 4 --chunk 2, in batches of 4 and of 1; the figures are the "compiled the guided
sampler" lines of the run. Tiny models: one edit per weight, each on the Sampler kept for its
method's structure (mgjax.method.numeric.structure; a checkout without it keys Samplers by the whole
method, as its editor and --jobs do); the figures are the Samplers' traces and compile seconds.
Compile seconds on a busy CPU vary by tens of percent; the counts are exact.
"""

import json
import os
import re
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.append(str(ROOT))  # tests.tiny_models; mgjax itself comes from PYTHONPATH first

WEIGHTS = (0.0, 18.75, 30.0, 45.0)


def toy_sweep(batch_size: int) -> dict:
    from mgjax.batch.run import run_jobs

    with tempfile.TemporaryDirectory() as tmp:
        jobs = Path(tmp) / "jobs.jsonl"
        jobs.write_text("".join(json.dumps({"guidance_weight": w}) + "\n" for w in WEIGHTS))
        lines: list[str] = []
        explicit = dict(out_dir=str(Path(tmp) / "out"), steps=4, chunk=2, compilation_cache="")
        t = time.perf_counter()
        rows = run_jobs(str(jobs), explicit, batch_size, lines.append)
        wall = time.perf_counter() - t
    pattern = re.compile(r"compiled the guided .* in ([\d.]+) s")
    compiles = [float(m) for s in lines for m in pattern.findall(s)]
    batches = {s.split(":")[0] for s in lines if s.startswith("batch ")}
    assert all(r["status"] == "done" for r in rows), rows
    return dict(
        case=f"toy pack, --jobs, batch {batch_size}",
        batches=len(batches),
        compiles=len(compiles),
        compile_s=round(sum(compiles), 1),
        wall_s=round(wall, 1),
    )


def tiny_sweep(size: int = 64, steps: int = 2) -> dict:
    import jax
    import numpy as np

    from flow.raft import Raft, RaftConfig, init_raft
    from mgjax import config as C
    from mgjax.method.sampler import Sampler
    from tests.tiny_models import tiny

    try:
        from mgjax.method import numeric as N

        key_of, numbers = N.structure, lambda m, b: dict(numeric=N.of(m, b))
    except ImportError:  # a checkout where the numbers are part of the program
        key_of, numbers = (lambda m: m), (lambda m, b: {})
    sd = tiny(seed=0)
    rcfg = RaftConfig(small=True)
    raft = Raft(init_raft(rcfg, jax.random.PRNGKey(1)), rcfg)
    rng = np.random.default_rng(0)
    lat = size // sd.vae_factor
    flow = np.zeros((1, size, size, 2), np.float32)
    flow[:, size // 4 : size // 2, size // 4 : size // 2] = (4.0, 0.0)
    image = rng.uniform(size=(1, size, size, 3)).astype(np.float32)
    traj = rng.standard_normal((steps, 1, 4, lat, lat)).astype(np.float32)
    z_T = rng.standard_normal((1, 4, lat, lat)).astype(np.float32)
    cond, uncond = np.asarray(sd.embed("a toy")), np.asarray(sd.embed(""))
    samplers: dict = {}
    t = time.perf_counter()
    for w in WEIGHTS:
        config = C.make(steps=steps, recursive_steps=2, chunk=steps, clip=10.0, guidance_weight=w)
        m = config.method
        if key_of(m) not in samplers:
            samplers[key_of(m)] = Sampler(sd, raft, m, config.speed)
        sampler = samplers[key_of(m)]
        edit = sampler.prepare(image, flow, cond, uncond, trajectory=traj, **numbers(m, 1))
        state, _, _ = sampler.run_chunk(edit, sampler.init(edit, z_T, seeds=0))
        jax.block_until_ready(state.z)
    wall = time.perf_counter() - t
    return dict(
        case=f"tiny SD v1.x classes {size}x{size}, {steps} steps x K=2, one edit per weight",
        samplers=len(samplers),
        compiles=sum(s.traces for s in samplers.values()),
        compile_s=round(sum(s.compile_seconds for s in samplers.values()), 1),
        wall_s=round(wall, 1),
    )


def main():
    import jax

    import mgjax

    print(f"mgjax from {os.path.dirname(mgjax.__file__)}, backend {jax.default_backend()}")
    print(f"guidance weights {WEIGHTS}")
    for row in (toy_sweep(4), toy_sweep(1), tiny_sweep()):
        print(json.dumps(row))


if __name__ == "__main__":
    main()
