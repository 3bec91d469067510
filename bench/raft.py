"""RAFT forward and forward+backward: our Flax port vs torchvision, same device, same run.

  python -m bench.raft [--size 512] [--iters 5] [--batch 1] [--repeats 3] [--small]

Random weights (nothing downloaded); both networks hold the same weights. The gradient is of a
random linear functional of the flow w.r.t. image2 (what motion guidance needs). Compile time
is reported apart from run time; times are medians over --repeats after one warm-up.
"""

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

from bench.timing import median_time
from flow.checkpoint import to_variables
from flow.raft import Raft, RaftConfig


def bench_jax(state, small, dtype, a, b, c, iters, repeats):
    variables, _ = to_variables(state)
    net = Raft(jax.tree_util.tree_map(jnp.asarray, variables), RaftConfig(small, "batch", dtype))
    fwd = jax.jit(lambda n, x1, x2: n(x1, x2, iters=iters))
    grad = jax.jit(jax.grad(lambda x2, n, x1: jnp.sum(n(x1, x2, iters=iters) * c)))
    a, b = jnp.asarray(a), jnp.asarray(b)
    out = {}
    for name, fn, args in (("forward", fwd, (net, a, b)), ("fwd+bwd", grad, (b, net, a))):
        t = time.perf_counter()
        compiled = fn.lower(*args).compile()
        compile_s = time.perf_counter() - t
        run_s = median_time(lambda f=compiled, x=args: jax.block_until_ready(f(*x)), repeats)
        out[name] = (compile_s, run_s)
    return out


def bench_torch(model, a, b, c, iters, repeats, autocast: bool):
    import torch

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    model = model.to(dev).train()  # the Motion Guidance reference never calls .eval()
    t1, t2 = (torch.from_numpy(x).permute(0, 3, 1, 2).to(dev) / 127.5 - 1 for x in (a, b))
    tc = torch.from_numpy(c).permute(0, 3, 1, 2).to(dev)
    sync = torch.cuda.synchronize if dev == "cuda" else (lambda: None)

    def fwd():
        with torch.no_grad(), torch.autocast(dev, torch.float16, enabled=autocast):
            model(t1, t2, num_flow_updates=iters)
        sync()

    def fwd_bwd():
        x2 = t2.clone().requires_grad_()
        with torch.autocast(dev, torch.float16, enabled=autocast):
            flow = model(t1, x2, num_flow_updates=iters)[-1]
        (flow.float() * tc).sum().backward()
        sync()

    return {
        "forward": (0.0, median_time(fwd, repeats)),
        "fwd+bwd": (0.0, median_time(fwd_bwd, repeats)),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--size", type=int, default=512)
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--small", action="store_true", help="RAFT-small instead of RAFT-large")
    p.add_argument("--no_torch", action="store_true", help="skip the torchvision reference")
    args = p.parse_args()

    rng = np.random.default_rng(0)
    shape = (args.batch, args.size, args.size, 3)
    a = rng.uniform(0, 255, shape).astype(np.float32)
    b = np.roll(a, 4, axis=2)
    c = rng.normal(size=shape[:3] + (2,)).astype(np.float32)

    import torch
    import torchvision

    torch.manual_seed(0)
    factory = (
        torchvision.models.optical_flow.raft_small
        if args.small
        else torchvision.models.optical_flow.raft_large
    )
    model = factory(weights=None)
    state = {k: v.numpy() for k, v in model.state_dict().items()}

    print(
        f"device: jax {jax.devices()[0].device_kind} ({jax.default_backend()}); "
        f"torch {'cuda ' + torch.cuda.get_device_name() if torch.cuda.is_available() else 'cpu'}"
    )
    print(
        f"RAFT-{'small' if args.small else 'large'}, {args.batch}x{args.size}x{args.size}, "
        f"{args.iters} iterations, median of {args.repeats}"
    )
    rows = {}
    for dtype in ("float32", "bfloat16"):
        rows[f"mgjax {dtype}"] = bench_jax(
            state, args.small, dtype, a, b, c, args.iters, args.repeats
        )
    if not args.no_torch:
        rows["torchvision fp32"] = bench_torch(model, a, b, c, args.iters, args.repeats, False)
        if torch.cuda.is_available():
            rows["torchvision fp16 autocast"] = bench_torch(
                model, a, b, c, args.iters, args.repeats, True
            )

    ref = rows.get("torchvision fp32")
    print(
        f"{'implementation':28s} {'pass':8s} {'compile s':>10s} {'run ms':>10s} {'torch/ours':>11s}"
    )
    for name, res in rows.items():
        for kind, (compile_s, run_s) in res.items():
            ratio = f"{ref[kind][1] / run_s:10.2f}x" if ref else ""
            comp = f"{compile_s:10.2f}" if compile_s else f"{'-':>10s}"
            print(f"{name:28s} {kind:8s} {comp} {run_s * 1e3:10.1f} {ratio:>11s}")


if __name__ == "__main__":
    main()
