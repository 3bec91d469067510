"""Full-scale cost of motion guidance on SDXL base at 1024x1024, by XLA's analyses: abstract
weights (nothing is allocated or downloaded), one guided evaluation lowered and compiled for
the current backend (the CPU's cost analysis counts every convolution and matmul; XLA:GPU's
leaves out what it hands to cuDNN/cuBLAS).

  python -m bench.sdxl flops                 # FLOPs per guided evaluation and per edit
  python -m bench.sdxl raft                  # RAFT-large at 1024x1024 vs a 512x512 pair
  python -m bench.sdxl memory --variants bf16 bf16-full-mea --batches 1 2
                                             # XLA memory per lever and batch size
  python -m bench.sdxl time --variants bf16  # on a GPU: time per evaluation (random weights)

flops: SDXL's UNet (CFG batch 2, the text_time conditioning), the VAE decoder (fwd+bwd) and
RAFT-large (5 iterations, unrolled: XLA counts a loop body once) at 1024x1024, bfloat16 and
float32, and the paper's edit (500 steps x K = 10). raft: the energy's flow part alone at the
full size and on the pair downscaled by 2 (its flow upscaled back), fwd+bwd: the choice of where
RAFT runs. memory: arguments + temporaries of one guided evaluation per lever
(bench.full_scale's variants: dtype, remat, attention) and batch size, the largest batch per
80 GiB from a linear fit, and whether batch 1 fits a 16 GiB TPU v5e chip.
"""

import argparse
import json
import time

import jax
import jax.numpy as jnp
import numpy as np

from bench.full_scale import VARIANTS
from bench.sampler import SD14_VAE
from bench.timing import median_time, memory_row, xla_flops
from flow.raft import Raft, RaftConfig, init_raft
from mgjax.method import guidance as G
from mgjax.method.inputs import GuidanceInputs
from mgjax.method.sampler import Sampler
from mgjax.model import sd as sdm

GIB = 2**30
# stabilityai/stable-diffusion-xl-base-1.0's unet/ and vae/ config.json (the fields that differ
# from the classes' defaults)
SDXL_UNET = dict(
    sample_size=128,
    in_channels=4,
    out_channels=4,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    block_out_channels=(320, 640, 1280),
    layers_per_block=2,
    attention_head_dim=(5, 10, 20),
    cross_attention_dim=2048,
    transformer_layers_per_block=(1, 2, 10),
    use_linear_projection=True,
    addition_embed_type="text_time",
    addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816,
)
SDXL_VAE = dict(SD14_VAE, sample_size=1024, scaling_factor=0.13025)  # SD's VAE shapes
SIZE, LATENT, STEPS, K = 1024, 128, 500, 10
TEXT, POOLED = (77, 2048), 1280
V5E_GIB = 16


def _abstract(tree, dtype):
    return jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, dtype), tree)


def build(dtype: str, attention: str = "plain", remat: str = "none", loops: str = "unrolled"):
    """(Sampler over abstract SDXL + RAFT-large weights, the abstract weights)."""
    from diffusers import FlaxAutoencoderKL, FlaxUNet2DConditionModel

    jdt = sdm.DTYPES[dtype]
    mea = attention == "memory_efficient"
    unet = FlaxUNet2DConditionModel(**SDXL_UNET, dtype=jdt, use_memory_efficient_attention=mea)
    vae = FlaxAutoencoderKL(**SDXL_VAE, dtype=jdt)
    shapes = {
        "unet": jax.eval_shape(unet.init_weights, jax.random.PRNGKey(0)),
        "vae": jax.eval_shape(vae.init_weights, jax.random.PRNGKey(0)),
    }
    sd = sdm.StableDiffusion(unet, vae, None, None, _abstract(shapes, jdt), jdt)
    rcfg = RaftConfig(small=False, context_norm="batch", dtype=dtype)
    raft = Raft(jax.eval_shape(lambda k: init_raft(rcfg, k), jax.random.PRNGKey(0)), rcfg)
    return Sampler.of(sd, raft, loops=loops, remat=remat), sd.params


def edit(batch: int, source_cache: bool = False, raft=None) -> GuidanceInputs:
    """Abstract inputs of `batch` 1024x1024 edits with SDXL's conditioning."""
    f32, b = jnp.float32, batch
    sds = jax.ShapeDtypeStruct
    cond = {
        "text": sds((b, *TEXT), f32),
        "pooled": sds((b, POOLED), f32),
        "time_ids": sds((b, 6), f32),
    }
    inputs = GuidanceInputs(
        source=sds((b, SIZE, SIZE, 3), f32),
        target_flow=sds((b, SIZE, SIZE, 2), f32),
        occlusion=sds((b, SIZE, SIZE, 1), f32),
        frozen=sds((b, 4, LATENT, LATENT), jnp.bool_),
        cond=cond,
        uncond=cond,
        schedule=sds((STEPS,), f32),
        trajectory=sds((STEPS, b, 4, LATENT, LATENT), f32),
    )
    if source_cache:
        encoding = jax.eval_shape(lambda r, x: r.encode_source(x), raft, inputs.source)
        inputs = inputs.replace(raft_source=encoding)
    return inputs


def compile_evaluation(sampler, params, batch: int, source_cache: bool = False):
    """One guided evaluation (fwd+bwd through UNet, decoder and RAFT, the DDIM update),
    compiled."""
    g, raft = sampler.guidance, sampler.raft
    z = jax.ShapeDtypeStruct((batch, 4, LATENT, LATENT), jnp.float32)
    keys = jax.ShapeDtypeStruct((batch, 2), jnp.uint32)

    def one_eval(params, raft, inputs, z, keys):
        return G.evaluate(g, params, raft, inputs, z, 0, 0, keys).z_prev

    inputs = edit(batch, source_cache, raft)
    return jax.jit(one_eval).lower(params, raft, inputs, z, keys).compile()


def flops(dtypes: list[str], source_cache: bool = False) -> list[dict]:
    rows = []
    for dtype in dtypes:
        sampler, params = build(dtype)
        n = sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(params))
        t = time.perf_counter()
        compiled = compile_evaluation(sampler, params, 1, source_cache)
        mem = compiled.memory_analysis()
        row = dict(
            dtype=dtype,
            source_cache=source_cache,
            params_m=n / 1e6,
            tflop_eval=xla_flops(compiled) / 1e12,
            arg_gib=mem.argument_size_in_bytes / GIB,
            temp_gib=mem.temp_size_in_bytes / GIB,
            compile_s=time.perf_counter() - t,
            backend=jax.default_backend(),
        )
        row["pflop_edit"] = row["tflop_eval"] * STEPS * K / 1e3
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def raft_cost(dtype: str = "bfloat16") -> list[dict]:
    """The energy's flow part, fwd + grad w.r.t. the edit: RAFT-large (5 iterations, unrolled)
    on the 1024x1024 pair, and on the pair resized to 512x512 with the flow resized back (x2)."""
    rcfg = RaftConfig(small=False, context_norm="batch", dtype=dtype)
    raft = Raft(jax.eval_shape(lambda k: init_raft(rcfg, k), jax.random.PRNGKey(0)), rcfg)
    rows = []
    for side in (SIZE, SIZE // 2):

        def loss(x, a, raft, side=side):
            if side != SIZE:
                a, x = (jax.image.resize(v, (1, side, side, 3), "linear") for v in (a, x))
            flow = raft(255.0 * a, 255.0 * x, iters=5, unroll=True)
            if side != SIZE:
                flow = jax.image.resize(flow, (1, SIZE, SIZE, 2), "linear") * (SIZE / side)
            return jnp.abs(flow).mean()

        img = jax.ShapeDtypeStruct((1, SIZE, SIZE, 3), jnp.float32)
        compiled = jax.jit(jax.grad(loss)).lower(img, img, raft).compile()
        mem = compiled.memory_analysis()
        row = dict(
            raft_side=side,
            dtype=dtype,
            tflop=xla_flops(compiled) / 1e12,
            temp_gib=mem.temp_size_in_bytes / GIB if mem else None,
        )
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def memory(names: list[str], batches: list[int]) -> list[dict]:
    rows = []
    for name in names:
        dtype, remat, attention = VARIANTS[name]
        sampler, params = build(dtype, attention, remat, loops="scan")
        for b in batches:
            t = time.perf_counter()
            compiled = compile_evaluation(sampler, params, b)
            rows.append(memory_row(name, b, compiled, time.perf_counter() - t))
    return rows


def memory_table(rows: list[dict]) -> None:
    """Per variant: GiB per batch size, the largest batch per 80 GiB (linear fit over the batch
    sizes measured) and whether batch 1 fits a 16 GiB TPU v5e chip."""
    by_name: dict[str, list] = {}
    for r in rows:
        by_name.setdefault(r["name"], []).append(r)
    for name, rs in by_name.items():
        rs.sort(key=lambda r: r["batch"])
        total = [r["arg_gib"] + r["temp_gib"] for r in rs]
        cells = ", ".join(f"b{r['batch']}: {x:.1f}" for r, x in zip(rs, total, strict=True))
        fit = "-"
        if len(rs) >= 2:
            slope = (total[-1] - total[0]) / (rs[-1]["batch"] - rs[0]["batch"])
            fixed = total[0] - slope * rs[0]["batch"]
            fit = f"{int((80 - fixed) // slope)}" if slope > 0 else "-"
        one = next((x for r, x in zip(rs, total, strict=True) if r["batch"] == 1), None)
        fits = "-" if one is None else ("yes" if one <= V5E_GIB else "no")
        print(f"| {name} | {cells} | per 80 GiB: {fit} | batch 1 in 16 GiB: {fits} |")


def time_one(name: str, repeats: int) -> None:
    """Time per guided evaluation on the current device with random weights (a GPU run)."""
    dtype, remat, attention = VARIANTS[name]
    sampler, shapes = build(dtype, attention, remat, loops="scan")
    params = sdm.cast(sdm.random_params(shapes, 0), sdm.DTYPES[dtype])
    raft = Raft(init_raft(sampler.raft.config, jax.random.PRNGKey(1)), sampler.raft.config)
    compiled = compile_evaluation(sampler, shapes, 1)
    rng = np.random.default_rng(0)
    inputs = jax.tree_util.tree_map(
        lambda s: jnp.asarray(rng.uniform(size=s.shape), s.dtype), edit(1)
    )
    z = jnp.asarray(rng.standard_normal((1, 4, LATENT, LATENT)), jnp.float32)
    keys = jax.random.split(jax.random.PRNGKey(0), 1)
    s = median_time(lambda: jax.block_until_ready(compiled(params, raft, inputs, z, keys)), repeats)
    print(
        f"{name}: {s * 1e3:.0f} ms per guided evaluation, {s * STEPS * K / 3600:.2f} h per "
        f"paper-setting edit ({jax.devices()[0].device_kind})"
    )


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("mode", choices=("flops", "raft", "memory", "time"))
    parser.add_argument("--dtype", nargs="+", default=["bfloat16", "float32"])
    parser.add_argument("--variants", nargs="+", default=["bf16", "bf16-full-mea"])
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 2])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--source_cache", action="store_true", help="flops: with --source_cache")
    args = parser.parse_args()
    if args.mode == "flops":
        flops(args.dtype, args.source_cache)
    elif args.mode == "raft":
        raft_cost(args.dtype[0])
    elif args.mode == "memory":
        memory_table(memory(args.variants, args.batches))
    else:
        for name in args.variants:
            time_one(name, args.repeats)


if __name__ == "__main__":
    main()
