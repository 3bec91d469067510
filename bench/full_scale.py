"""Full-scale cost of a guided evaluation: SD v1.4 UNet + VAE + RAFT-large shapes at 512x512,
random weights (nothing is downloaded), every performance lever, and the PyTorch transcription
of the reference timed on the same device in the same run.

  python -m bench.full_scale                       # every variant + torch, one process each
  python -m bench.full_scale --variants bf16 bf16-full --torch none
  python -m bench.full_scale --memory-only --variants bf16 bf16-full-mea --batches 1 2
                                                   # compile only: XLA memory, batch sizes

Per JAX variant (dtype, remat policy, attention): compile time of one chunk (1 DDIM step x K
guided evaluations), median time per guided evaluation, peak memory (the device's allocator
statistics on GPU, XLA's memory analysis elsewhere), FLOPs per evaluation (XLA's count for the
compiled chunk, recomputation included; RAFT's loop body counted once, ~2% low: the exact
count is `python -m bench.sampler full`), achieved FLOP/s and its share of the device's dense peak.
Each variant runs in its own process, so peaks don't mix. The torch rows run
tests/torch_reference.py (the authors' loop, statement by statement) on diffusers' PyTorch
UNet/VAE and torchvision raft_large: fp32, and with RAFT under fp16
autocast as the reference ran it. `--memory-only` compiles (never runs) the variants at a few
batch sizes, and reports the largest batch per 80 GiB from a linear fit of XLA's analysis.

XLA:GPU's cost analysis leaves out the convolutions and matmuls it hands to cuDNN/cuBLAS (custom
calls), so on a GPU its count is a small fraction of the work (0.3-0.8 of 8.9 TFLOP). There,
pass the CPU backend's count of the same graph (`python -m bench.sampler full`, RAFT unrolled):
`--flops_per_eval bfloat16=8.94 float32=8.87`. `--table rows.jsonl` prints the table again
from the rows a run wrote with `--json` (a device run cut short still leaves them).
"""

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from bench.timing import memory_row, xla_flops

ROOT = Path(__file__).resolve().parents[1]

GIB = 2**30
# name -> (dtype, remat, attention)
VARIANTS = {
    "fp32": ("float32", "none", "plain"),
    "bf16": ("bfloat16", "none", "plain"),
    "bf16-dots": ("bfloat16", "dots", "plain"),
    "bf16-full": ("bfloat16", "full", "plain"),
    "bf16-mea": ("bfloat16", "none", "memory_efficient"),
    "bf16-full-mea": ("bfloat16", "full", "memory_efficient"),
    "bf16-blocks": ("bfloat16", "blocks", "plain"),
    "bf16-blocks-mea": ("bfloat16", "blocks", "memory_efficient"),
    "fp32-full": ("float32", "full", "plain"),
    "bf16-dots-mea": ("bfloat16", "dots", "memory_efficient"),
    "fp32-full-mea": ("float32", "full", "memory_efficient"),
}
DEFAULT_VARIANTS = ["bf16", "bf16-mea", "fp32", "bf16-full", "bf16-dots"]  # most telling first
TORCH = {"torch-fp32": False, "torch-ref": True}  # name -> RAFT under fp16 autocast
# Dense peak FLOP/s by device kind (datasheet, SXM): bf16 tensor cores, tf32 tensor cores.
HOPPER = {"bfloat16": 989e12, "float32": 494e12}
PEAKS = {"H100": HOPPER, "H200": HOPPER}


def _peak(device_kind: str, dtype: str):
    for key, peaks in PEAKS.items():
        if key in device_kind:
            return peaks[dtype]
    return None


# ----------------------------------------------------------------------------- JAX side


def _build(dtype: str, attention: str, batch: int, remat: str, k: int, abstract: bool):
    import jax
    import jax.numpy as jnp
    import numpy as np
    from diffusers import FlaxAutoencoderKL, FlaxUNet2DConditionModel

    from bench.sampler import SD14_UNET, SD14_VAE
    from flow.raft import Raft, RaftConfig, init_raft
    from mgjax.method.sampler import Sampler
    from mgjax.model import sd as sdm

    jdt = sdm.DTYPES[dtype]
    unet = FlaxUNet2DConditionModel(
        **SD14_UNET, dtype=jdt, use_memory_efficient_attention=attention == "memory_efficient"
    )
    vae = FlaxAutoencoderKL(**SD14_VAE, dtype=jdt)
    shapes = {
        "unet": jax.eval_shape(unet.init_weights, jax.random.PRNGKey(0)),
        "vae": jax.eval_shape(vae.init_weights, jax.random.PRNGKey(0)),
    }
    rcfg = RaftConfig(small=False, context_norm="batch", dtype=dtype)
    if abstract:
        params = jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, jdt), shapes)
        raft_vars = jax.eval_shape(lambda key: init_raft(rcfg, key), jax.random.PRNGKey(0))
    else:
        params = sdm.cast(_device_random(shapes), jdt)
        raft_vars = init_raft(rcfg, jax.random.PRNGKey(1))
    sd = sdm.StableDiffusion(unet, vae, None, None, params, jdt)
    raft = Raft(raft_vars, rcfg)
    settings = dict(recursive_steps=k, chunk=1, remat=remat, loops="scan")
    sampler = Sampler.of(sd, raft, **settings)
    rng = np.random.default_rng(0)
    b, h, w = batch, 512, 512
    flow = np.zeros((b, h, w, 2), np.float32)
    flow[:, 160:352, 128:320] = (24.0, 8.0)
    frozen = np.zeros((b, 1, 64, 64), bool)
    frozen[:, :, :10] = True
    edit = sampler.prepare(
        rng.uniform(size=(b, h, w, 3)).astype(np.float32),
        flow,
        0.1 * rng.standard_normal((b, 77, 768)).astype(np.float32),
        0.1 * rng.standard_normal((b, 77, 768)).astype(np.float32),
        frozen=frozen,
        trajectory=rng.standard_normal((500, b, 4, 64, 64)).astype(np.float32),
    )
    state = sampler.init(edit, rng.standard_normal((b, 4, 64, 64)), seeds=list(range(b)))
    return jax, jnp, sampler, edit, state


def _device_random(shapes):
    """Random weights made on the device (kernels ~ N(0, 1/fan_in), norm scales 1, biases 0)."""
    import jax
    import jax.numpy as jnp

    leaves, treedef = jax.tree_util.tree_flatten_with_path(shapes)
    keys = jax.random.split(jax.random.PRNGKey(0), len(leaves))
    out = []
    for (path, x), key in zip(leaves, keys, strict=True):
        name = getattr(path[-1], "key", str(path[-1]))
        if name == "kernel":
            fan_in = max(1, int(jnp.prod(jnp.array(x.shape[:-1]))))
            out.append(jax.random.normal(key, x.shape, jnp.float32) / fan_in**0.5)
        elif name == "scale":
            out.append(jnp.ones(x.shape, jnp.float32))
        else:
            out.append(0.02 * jax.random.normal(key, x.shape, jnp.float32))
    return jax.tree_util.tree_unflatten(treedef, out)


def run_jax(name: str, k: int, repeats: int, batch: int) -> dict:
    dtype, remat, attention = VARIANTS[name]
    jax, jnp, sampler, edit, state = _build(dtype, attention, batch, remat, k, False)
    dev = jax.devices()[0]
    args = (sampler.sd.params, sampler.raft, edit)
    t = time.perf_counter()
    mode = None  # "guided": what the sampler runs for this edit
    compiled = sampler.compiled_chunk(edit, state, length=1, mode=mode)
    compile_s = time.perf_counter() - t
    mem = compiled.memory_analysis()
    # The chunk is 1 DDIM step x K evaluations, and XLA counts a loop body once: one guided
    # evaluation with RAFT's update loop counted once (4 of its 5 iterations, ~0.04 TFLOP each
    # fwd+bwd, are missing: ~2% low).
    flops = xla_flops(compiled)
    times = []
    for _ in range(repeats + 1):  # the first call is a warm-up
        t = time.perf_counter()
        state, logs, _ = compiled(*args, state)
        jax.block_until_ready(state.z)
        times.append(time.perf_counter() - t)
    energy = float(jnp.asarray(logs["energy"]).mean())
    per_eval = sorted(times[1:])[len(times[1:]) // 2] / k if repeats else times[0] / k
    stats = dev.memory_stats() or {}
    peak = _peak(dev.device_kind, dtype)
    return dict(
        name=name,
        dtype=dtype,
        remat=remat,
        attention=attention,
        batch=batch,
        device=dev.device_kind,
        backend=jax.default_backend(),
        compile_s=compile_s,
        eval_s=per_eval,
        evals_timed=k * max(repeats, 1),
        flops=flops,
        flops_source=f"XLA {jax.default_backend()} cost analysis",
        tflops_s=flops / per_eval / 1e12 if flops else None,
        peak_share=(flops / per_eval / peak) if peak and flops else None,
        peak_bytes=stats.get("peak_bytes_in_use"),
        xla_arg_bytes=mem.argument_size_in_bytes if mem else None,
        xla_temp_bytes=mem.temp_size_in_bytes if mem else None,
        energy_finite=bool(jnp.isfinite(energy)),
    )


def memory_only(names: list[str], batches: list[int]) -> list[dict]:
    """Compile (never run) one chunk per variant and batch size: XLA's memory analysis."""
    rows = []
    for name in names:
        dtype, remat, attention = VARIANTS[name]
        for b in batches:
            jax, _, sampler, edit, state = _build(dtype, attention, b, remat, 1, True)
            # abstract weights: only shapes; the edit arrays are concrete but small
            t = time.perf_counter()
            compiled = sampler.compiled_chunk(edit, state, length=1, mode="guided")
            rows.append(memory_row(name, b, compiled, time.perf_counter() - t))
    return rows


# ----------------------------------------------------------------------------- torch side


def run_torch(name: str, k: int, repeats: int) -> dict:
    import numpy as np
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from torchvision.models.optical_flow import raft_large

    from bench.sampler import SD14_UNET, SD14_VAE
    from tests import torch_reference

    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    unet = UNet2DConditionModel(**SD14_UNET).to(dev).eval()
    vae = AutoencoderKL(**SD14_VAE).to(dev).eval()
    raft = raft_large(weights=None).to(dev)
    for m in (unet, vae, raft):
        m.requires_grad_(False)
    rng = np.random.default_rng(0)
    t = lambda a: torch.from_numpy(np.asarray(a, np.float32)).to(dev)  # noqa: E731
    flow = np.zeros((1, 2, 512, 512), np.float32)
    flow[:, :, 160:352, 128:320] = np.array([24.0, 8.0])[:, None, None]
    energy = torch_reference.ReferenceFlowLoss(
        raft, t(flow), 100.0, 3.0, False, True, iters=5, autocast=TORCH[name]
    )
    traj = t(rng.standard_normal((500, 1, 4, 64, 64)))
    src = t(rng.uniform(-1, 1, (1, 3, 512, 512)))
    cond, uncond = (t(0.1 * rng.standard_normal((1, 77, 768))) for _ in range(2))
    noise = [t(rng.standard_normal((1, 4, 64, 64))) for _ in range(3)]
    mask = torch.zeros((1, 4, 64, 64), dtype=torch.bool, device=dev)
    mask[:, :, :10] = True

    def one_step():
        torch_reference.reference_sample(
            unet,
            vae,
            energy,
            src,
            cond,
            uncond,
            traj[0],
            lambda i, j: noise,
            max_steps=1,
            cached_latents=traj,
            edit_mask=mask,
            num_recursive_steps=k,
            guidance_weight=300.0,
            clip_grad=200.0,
        )
        if dev.type == "cuda":
            torch.cuda.synchronize()

    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(repeats + 1):
        t0 = time.perf_counter()
        one_step()
        times.append(time.perf_counter() - t0)
    per_eval = sorted(times[1:])[len(times[1:]) // 2] / k if repeats else times[0] / k
    return dict(
        name=name,
        dtype="float32" + (" (RAFT fp16 autocast)" if TORCH[name] else ""),
        device=torch.cuda.get_device_name() if dev.type == "cuda" else "cpu",
        backend=f"torch {torch.__version__}",
        eval_s=per_eval,
        evals_timed=k * max(repeats, 1),
        peak_bytes=torch.cuda.max_memory_allocated() if dev.type == "cuda" else None,
    )


# ----------------------------------------------------------------------------- driver


def _child(args, name: str) -> dict | None:
    """Run one variant in a fresh process; its last stdout line is a JSON result."""
    cmd = [sys.executable, "-m", "bench.full_scale", "--one", name, "-k", str(args.k)]
    cmd += ["--repeats", str(args.repeats), "--batch", str(args.batch)]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode or not lines:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        print(f"  {name}: failed (exit {proc.returncode}): {' | '.join(tail)}", flush=True)
        return dict(name=name, error=" | ".join(tail))
    row = json.loads(lines[-1][len("RESULT ") :])
    print(f"  {name}: done ({json.dumps(row)})", flush=True)
    if args.json:  # one line per finished variant, so a cut-off run keeps what it measured
        with open(args.json, "a") as f:
            f.write(json.dumps(row) + "\n")
    return row


def with_flops(rows: list[dict], tflops: dict[str, float]) -> list[dict]:
    """Achieved FLOP/s from a given count per dtype (TFLOP per evaluation) instead of the
    backend's own; the backend's count stays in `xla_flops`."""
    out = []
    for r in rows:
        r = dict(r)
        if r.get("dtype") in tflops and "eval_s" in r:
            r["xla_flops"] = r.get("flops")
            r["flops"] = tflops[r["dtype"]] * 1e12
            r["flops_source"] = "given (--flops_per_eval)"
            r["tflops_s"] = r["flops"] / r["eval_s"] / 1e12
            peak = _peak(r.get("device", ""), r["dtype"])
            r["peak_share"] = r["flops"] / r["eval_s"] / peak if peak else None
        out.append(r)
    return out


def _parse_flops(items: list[str]) -> dict[str, float]:
    out = {}
    for item in items:
        dtype, sep, value = item.partition("=")
        try:
            if not sep or dtype not in ("float32", "bfloat16"):
                raise ValueError
            out[dtype] = float(value)
        except ValueError:
            sys.exit(f"--flops_per_eval: expected DTYPE=TFLOP, e.g. bfloat16=8.94, got {item!r}")
    return out


def _fmt(x, spec, scale=1.0):
    return "-" if x is None else format(x * scale, spec)


def print_table(rows: list[dict], torch_rows: list[dict]) -> None:
    ref = [r for r in torch_rows if "eval_s" in r]
    ref_s = {r["name"]: r["eval_s"] for r in ref}
    head = (
        f"| variant | compile s | ms / eval | TFLOP / eval | TFLOP/s | share of peak | "
        f"peak GiB | XLA temp GiB | paper edit (5,000 evals) | vs {', '.join(ref_s) or 'torch'} |"
    )
    print(head)
    print("|---" * (head.count("|") - 1) + "|")
    for r in rows + torch_rows:
        if "error" in r:
            print(f"| {r['name']} | failed: {r['error'][:80]} |")
            continue
        edit_min = r["eval_s"] * 5000 / 60
        ratio = ", ".join(f"{s / r['eval_s']:.1f}x" for s in ref_s.values()) if ref_s else "-"
        print(
            f"| {r['name']} | {_fmt(r.get('compile_s'), '.1f')} | {r['eval_s'] * 1e3:.1f} | "
            f"{_fmt(r.get('flops'), '.2f', 1e-12)} | {_fmt(r.get('tflops_s'), '.1f')} | "
            f"{_fmt(r.get('peak_share'), '.1%')} | {_fmt(r.get('peak_bytes'), '.1f', 1 / GIB)} | "
            f"{_fmt(r.get('xla_temp_bytes'), '.1f', 1 / GIB)} | {edit_min:.1f} min | {ratio} |"
        )


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--variants", nargs="+", default=DEFAULT_VARIANTS, choices=list(VARIANTS))
    parser.add_argument("--torch", nargs="+", default=list(TORCH), choices=[*TORCH, "none"])
    parser.add_argument("-k", type=int, default=None, help="evaluations per timed chunk")
    parser.add_argument("--repeats", type=int, default=None, help="timed chunks (median)")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--one", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--memory-only", action="store_true")
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 2])
    parser.add_argument("--json", default=None, help="also write the rows to this file")
    parser.add_argument(
        "--flops_per_eval",
        nargs="+",
        default=[],
        metavar="DTYPE=TFLOP",
        help="FLOP count per evaluation to use for FLOP/s (XLA:GPU's leaves out cuDNN/cuBLAS)",
    )
    parser.add_argument("--table", default=None, help="print the table from a --json file")
    args = parser.parse_args()
    tflops = _parse_flops(args.flops_per_eval)

    if args.table:
        try:
            rows = [json.loads(ln) for ln in Path(args.table).read_text().splitlines() if ln]
        except (OSError, ValueError) as e:
            sys.exit(f"--table: cannot read {args.table}: {e}")
        rows = with_flops(rows, tflops)
        is_torch = [r for r in rows if r.get("name") in TORCH]
        print_table([r for r in rows if r.get("name") not in TORCH], is_torch)
        return

    if args.one:  # child process
        row = (
            run_torch(args.one, args.k, args.repeats)
            if args.one in TORCH
            else run_jax(args.one, args.k, args.repeats, args.batch)
        )
        print("RESULT " + json.dumps(row), flush=True)
        return
    if args.memory_only:
        rows = memory_only(args.variants, args.batches)
        _memory_table(rows)
        return

    import jax

    gpu = jax.default_backend() == "gpu"
    # CPU: one evaluation of each variant (minutes each on 2 cores); GPU: medians
    args.k = args.k or (4 if gpu else 1)
    args.repeats = args.repeats if args.repeats is not None else (3 if gpu else 0)
    kind = jax.devices()[0].device_kind
    print(
        f"full-scale guided evaluation: SD v1.4 UNet (CFG batch 2) + VAE decoder + RAFT-large "
        f"(5 iters), 512x512, batch {args.batch}, on {kind} ({jax.default_backend()}); "
        f"{args.k} evaluations per chunk, median of {max(args.repeats, 1)}",
        flush=True,
    )
    rows = [_child(args, n) for n in args.variants]
    torch_rows = [] if "none" in args.torch else [_child(args, n) for n in args.torch]
    print()
    print_table(with_flops(rows, tflops), torch_rows)


def _memory_table(rows):
    print("\n| variant | batch | XLA arguments GiB | XLA temporaries GiB | sum GiB | compile s |")
    print("|---|---:|---:|---:|---:|---:|")
    for r in rows:
        print(
            f"| {r['name']} | {r['batch']} | {r['arg_gib']:.2f} | {r['temp_gib']:.2f} | "
            f"{r['arg_gib'] + r['temp_gib']:.2f} | {r['compile_s']:.0f} |"
        )
    by = {}
    for r in rows:
        by.setdefault(r["name"], {})[r["batch"]] = r["arg_gib"] + r["temp_gib"]
    for name, m in by.items():
        if len(m) >= 2:
            (b1, m1), (b2, m2) = sorted(m.items())[:2]
            per = (m2 - m1) / (b2 - b1)
            fixed = m1 - per * b1
            largest = int((80 - fixed) // per) if per > 0 else None
            print(
                f"{name}: {fixed:.2f} GiB + {per:.2f} GiB per image (linear fit of batches "
                f"{b1}, {b2}) -> largest batch in 80 GiB: {largest}"
            )


if __name__ == "__main__":
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    main()
