"""Guided-sampler cost: (a) tiny models, JAX vs the PyTorch reference transcription, same run;
(b) full SD v1.4 + RAFT-large shapes: XLA's FLOP count and peak memory of one guided evaluation.

  python -m bench.sampler tiny [--steps 2] [--recursive 2] [--repeats 3]
  python -m bench.sampler full [--dtype float32 bfloat16] [--raft-iters 5]

(a) builds random tiny models in torch (UNet2DConditionModel, AutoencoderKL, CLIPTextModel,
torchvision raft_small), loads the same weights into mgjax through its from_pt path, and times
guided evaluations (UNet fwd+bwd at CFG batch 2, VAE decoder fwd+bwd, RAFT fwd+bwd) on 128x128
images; compile time is reported apart. (b) allocates nothing: parameters are abstract
(jax.eval_shape), one guided evaluation is lowered and compiled for the current backend, and
XLA's cost and memory analyses are printed. Nothing is downloaded.
"""

import argparse
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from bench.timing import median_time, xla_flops
from flow.raft import Raft, RaftConfig, init_raft
from mgjax.method import guidance as G
from mgjax.method.guidance import eval_noise
from mgjax.method.inputs import GuidanceInputs
from mgjax.method.sampler import Sampler
from mgjax.model import sd as sdm

SD14_UNET = dict(
    sample_size=64,
    in_channels=4,
    out_channels=4,
    down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    block_out_channels=(320, 640, 1280, 1280),
    layers_per_block=2,
    attention_head_dim=8,
    cross_attention_dim=768,
)
SD14_VAE = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    block_out_channels=(128, 256, 512, 512),
    layers_per_block=2,
    latent_channels=4,
    sample_size=512,
)


def bench_tiny(args):
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from flow.checkpoint import load_raft
    from flow.convert import convert
    from tests import torch_reference
    from tests.tiny_models import TINY_CLIP, TINY_UNET, TINY_VAE, tiny_tokenizer
    from tests.torch_raft import image_pair, random_torchvision_raft

    jax.config.update("jax_default_matmul_precision", "highest")
    torch.set_num_threads(max(1, torch.get_num_threads()))
    torch.manual_seed(0)
    unet = UNet2DConditionModel(**TINY_UNET).eval()
    vae = AutoencoderKL(**TINY_VAE).eval()
    text = CLIPTextModel(CLIPTextConfig(**TINY_CLIP)).eval()
    raft_t = random_torchvision_raft(small=True, seed=3)
    with tempfile.TemporaryDirectory() as d:
        d = Path(d)
        unet.save_pretrained(d / "unet")
        vae.save_pretrained(d / "vae")
        text.save_pretrained(d / "text_encoder")
        tiny_tokenizer(d / "tokenizer")
        torch.save(raft_t.state_dict(), d / "raft.pth")
        convert(str(d / "raft.pth"), str(d / "raft.mgjax"))
        sd = sdm.load(str(d), from_pt=True)
        raft = load_raft(str(d / "raft.mgjax"), context_norm="batch")

    size, steps, k = 128, args.steps, args.recursive
    a, _ = image_pair(1, size, size)
    img = a / 255.0
    flow = np.zeros((1, size, size, 2), np.float32)
    flow[:, 40:88, 32:80] = (6.0, 4.0)
    traj = np.random.default_rng(0).standard_normal((500, 1, 4, 32, 32)).astype(np.float32)
    cond, uncond = np.asarray(sd.embed("a cat")), np.asarray(sd.embed(""))
    jax_runs = {}
    for loops in ("scan", "unrolled"):  # mgjax.model.levers.LOOPS; "auto" picks unrolled on CPU
        settings = dict(recursive_steps=k, guidance_weight=30.0, chunk=steps, loops=loops)
        sampler = Sampler.of(sd, raft, **settings)
        edit = sampler.prepare(img, flow, cond, uncond, trajectory=traj)
        state = sampler.init(edit, traj[0], seeds=0)

        def run(sampler=sampler, edit=edit):  # a fresh state each time: run_chunk donates it
            state = sampler.init(edit, traj[0], seeds=0)
            return jax.block_until_ready(sampler.run_chunk(edit, state)[0].z)

        run()  # compiles
        run_s = median_time(run, args.repeats)
        jax_runs[loops] = (run_s, sampler.compile_seconds)

    keys = np.asarray(state.keys)
    energy = torch_reference.ReferenceFlowLoss(
        raft_t, torch.from_numpy(flow).permute(0, 3, 1, 2), 100.0, 3.0, False, True
    )

    def noise_fn(i, j):
        noise = eval_noise(keys, i, j, k, (1, 4, 32, 32))
        return tuple(torch.from_numpy(np.array(n)) for n in noise)

    def run_torch():
        torch_reference.reference_sample(
            unet,
            vae,
            energy,
            torch.from_numpy(img).permute(0, 3, 1, 2) * 2 - 1,
            torch.from_numpy(cond),
            torch.from_numpy(uncond),
            torch.from_numpy(traj[0]),
            noise_fn,
            max_steps=steps,
            cached_latents=torch.from_numpy(traj),
            num_recursive_steps=k,
            guidance_weight=30.0,
            clip_grad=200.0,
        )

    torch_s = median_time(run_torch, args.repeats)
    evals = steps * k
    print(
        f"tiny guided sampler, {size}x{size} images, {steps} DDIM steps x {k} recursive "
        f"= {evals} guided evaluations, backend {jax.default_backend()}"
    )
    for loops, (jax_s, compile_s) in jax_runs.items():
        print(
            f"  jax, loops {loops:8s}: {evals / jax_s:7.2f} evals/s  ({jax_s / evals * 1e3:.1f} "
            f"ms/eval; compile {compile_s:.1f} s; speed-up over torch {torch_s / jax_s:.2f}x)"
        )
    torch_ms = torch_s / evals * 1e3
    print(f"  torch                : {evals / torch_s:7.2f} evals/s  ({torch_ms:.1f} ms/eval)")


def bench_full(args):
    for dtype in args.dtype:
        _full_one(dtype, args.raft_iters)


def abstract_sd14(dtype: str = "float32", batch: int = 1, **settings):
    """SD v1.4's UNet and VAE and RAFT-large with abstract weights (jax.eval_shape: nothing is
    allocated), a Sampler of theirs with `settings`, and abstract inputs of `batch` 512x512
    edits: (sampler, params, raft, edit, z, keys) for lowering one evaluation."""
    from diffusers import FlaxAutoencoderKL, FlaxUNet2DConditionModel

    jdt = sdm.DTYPES[dtype]
    unet = FlaxUNet2DConditionModel(**SD14_UNET, dtype=jdt)
    vae = FlaxAutoencoderKL(**SD14_VAE, dtype=jdt)
    shapes = {
        "unet": jax.eval_shape(unet.init_weights, jax.random.PRNGKey(0)),
        "vae": jax.eval_shape(vae.init_weights, jax.random.PRNGKey(0)),
    }
    params = jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, jdt), shapes)
    sd = sdm.StableDiffusion(unet, vae, None, None, params, jdt)
    rcfg = RaftConfig(small=False, context_norm="batch", dtype=dtype)
    raft_vars = jax.eval_shape(lambda k: init_raft(rcfg, k), jax.random.PRNGKey(0))
    raft = Raft(raft_vars, rcfg)
    sampler = Sampler.of(sd, raft, **settings)
    b, h, w, steps = batch, 512, 512, sampler.method.steps
    f32 = jnp.float32
    edit = GuidanceInputs(
        source=jax.ShapeDtypeStruct((b, h, w, 3), f32),
        target_flow=jax.ShapeDtypeStruct((b, h, w, 2), f32),
        occlusion=jax.ShapeDtypeStruct((b, h, w, 1), f32),
        frozen=jax.ShapeDtypeStruct((b, 4, 64, 64), jnp.bool_),
        cond=jax.ShapeDtypeStruct((b, 77, 768), f32),
        uncond=jax.ShapeDtypeStruct((b, 77, 768), f32),
        schedule=jax.ShapeDtypeStruct((steps,), f32),
        trajectory=jax.ShapeDtypeStruct((steps, b, 4, 64, 64), f32),
    )
    z = jax.ShapeDtypeStruct((b, 4, 64, 64), f32)
    keys = jax.ShapeDtypeStruct((b, 2), jnp.uint32)
    return sampler, params, raft, edit, z, keys


def _full_one(dtype: str, raft_iters: int):
    # loops "unrolled": RAFT's refinement unrolled, since XLA's cost analysis counts a loop body
    # once
    sampler, params, raft, edit, z, keys = abstract_sd14(
        dtype, raft_iters=raft_iters, loops="unrolled"
    )

    def one_eval(params, raft, edit, z, keys):
        return G.evaluate(sampler.guidance, params, raft, edit, z, 0, 0, keys).z_prev

    print(
        f"SD v1.4 UNet (CFG batch 2) + VAE decoder + RAFT-large ({raft_iters} iters), "
        f"512x512, one guided evaluation (fwd+bwd), {dtype}, backend "
        f"{jax.default_backend()}:"
    )
    n_params = sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(params))
    print(f"  parameters (UNet+VAE): {n_params / 1e6:.0f} M")
    t = time.perf_counter()
    compiled = jax.jit(one_eval).lower(params, raft, edit, z, keys).compile()
    compile_s = time.perf_counter() - t
    mem = compiled.memory_analysis()
    flops = xla_flops(compiled) or float("nan")
    # --source_cache: the source's RAFT encoding computed once per edit, not in the evaluation
    encoding = jax.eval_shape(lambda r, x: r.encode_source(x), raft, edit.source)
    cached = jax.jit(one_eval).lower(params, raft, edit.replace(raft_source=encoding), z, keys)
    cached = xla_flops(cached.compile()) or float("nan")
    print(
        f"  XLA flops: {flops / 1e12:.2f} TFLOP per evaluation "
        f"-> {flops * 5000 / 1e15:.1f} PFLOP per edit at paper settings (500 x 10); "
        f"{cached / 1e12:.2f} TFLOP with --source_cache"
    )
    if mem is not None:
        gib = 2**30
        print(
            f"  memory: arguments {mem.argument_size_in_bytes / gib:.2f} GiB, temporaries "
            f"{mem.temp_size_in_bytes / gib:.2f} GiB, output "
            f"{mem.output_size_in_bytes / gib:.3f} GiB, peak ~"
            f"{(mem.argument_size_in_bytes + mem.temp_size_in_bytes) / gib:.2f} GiB"
        )
    print(f"  compile: {compile_s:.1f} s")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="mode", required=True)
    tiny = sub.add_parser("tiny")
    tiny.add_argument("--steps", type=int, default=2)
    tiny.add_argument("--recursive", type=int, default=2)
    tiny.add_argument("--repeats", type=int, default=3)
    full = sub.add_parser("full")
    full.add_argument(
        "--dtype", nargs="+", default=["float32", "bfloat16"], choices=["float32", "bfloat16"]
    )
    full.add_argument("--raft-iters", type=int, default=5)
    args = parser.parse_args()
    bench_tiny(args) if args.mode == "tiny" else bench_full(args)


if __name__ == "__main__":
    main()
