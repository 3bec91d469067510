"""Performance levers (mgjax.model.levers): each keeps the result and does what it is for.

Tiny random models (no torch): the SD-class UNet/VAE of `tests.tiny_models.tiny()` and a random
RAFT-small at 64x64 images, 16x16 latents.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flow.raft import Raft, RaftConfig, init_raft
from mgjax import config as C
from mgjax.method import guidance as G
from mgjax.method import loop
from mgjax.method.energy import Energy
from mgjax.method.sampler import Sampler
from mgjax.model.levers import resolve_loops
from tests import tiny_models, xla

H = W = 64


@pytest.fixture(scope="module")
def tiny():
    sd = tiny_models.tiny(seed=0)
    rc = RaftConfig(small=True, context_norm="batch")
    raft = Raft(init_raft(rc, jax.random.PRNGKey(1)), rc)
    rng = np.random.default_rng(0)
    img = rng.uniform(size=(1, H, W, 3)).astype(np.float32)
    flow = np.zeros((1, H, W, 2), np.float32)
    flow[:, 16:40, 16:40] = (4.0, 2.0)
    z0 = rng.standard_normal((1, 4, 16, 16)).astype(np.float32)
    cond, uncond = np.asarray(sd.embed("a ball")), np.asarray(sd.embed(""))
    return dict(sd=sd, raft=raft, img=img, flow=flow, z0=z0, cond=cond, uncond=uncond)


def _one_evaluation(t, sd, raft, **config):
    """Compiled guided evaluation (DDIM step 1, j = 0) and its inputs."""
    config = dict(steps=4, recursive_steps=2, guidance_weight=10.0, clip=0.0) | config
    sampler = Sampler.of(sd, raft, **config)
    edit = sampler.prepare(t["img"], t["flow"], t["cond"], t["uncond"], z0=t["z0"])
    state = sampler.init(edit, t["z0"], seeds=0)

    def evaluate(p, r, e, z, k):
        ev = G.evaluate(sampler.guidance, p, r, e, z, 1, 0, k)
        return ev.z_prev, ev.logs, ev.x0

    fn = jax.jit(evaluate)
    compiled = fn.lower(sd.params, raft, edit, state.z, state.keys).compile()
    return compiled, (sd.params, raft, edit, state.z, state.keys)


@pytest.mark.slow
def test_remat_recomputes_and_keeps_the_result(tiny):
    results, temps, flops = {}, {}, {}
    for policy in ("none", "dots", "full"):
        compiled, args = _one_evaluation(tiny, tiny["sd"], tiny["raft"], remat=policy)
        temps[policy] = compiled.memory_analysis().temp_size_in_bytes
        flops[policy] = xla.flops(compiled)
        z_prev, logs, x = compiled(*args)
        results[policy] = (np.asarray(z_prev), float(logs["energy"][0]))
        if policy == "none":
            tiny["fp32"] = (float(logs["energy"][0]), np.asarray(x))  # for the bf16 test
            if resolve_loops(C.Speed().loops) == "unrolled":  # auto, on CPU
                tiny["unrolled"] = results["none"]  # for the loops test
            # the noise floor: the same evaluation, input moved by 1e-7
            params, raft, edit, z, keys = args
            moved = compiled(params, raft, edit, z * (1 + 1e-7), keys)[0]
            floor = np.abs(np.asarray(moved) - results["none"][0]).max()
    # full recomputes each model's forward pass in the backward pass: about +1/3 FLOPs
    assert flops["full"] > 1.2 * flops["none"], flops
    assert flops["none"] < flops["dots"] < flops["full"], flops
    # Per-model remat frees one model's activations before the next model's backward pass, so
    # it helps only where no single model dominates: here dots saves memory, full barely does
    # (at full scale dots takes 1.2 of 21.7 GiB off XLA's peak, full nothing: BENCHMARKS.md).
    assert temps["dots"] < 0.9 * temps["none"] and temps["full"] <= temps["none"], temps
    z_ref, e_ref = results["none"]
    for policy in ("dots", "full"):
        z, e = results[policy]
        assert e == pytest.approx(e_ref, rel=1e-6)  # the forward pass is the same
        # The guidance gradient through a random RAFT is ill-conditioned (bilinear lookups):
        # recomputing it may differ by rounding, amplified, but not by more than a 1e-7
        # relative change of the input does.
        assert np.abs(z - z_ref).max() <= max(floor, 1e-5), (policy, floor)


def _primitives(jaxpr, names: list) -> list:
    """Every primitive's name in a jaxpr, sub-jaxprs (scan, remat, ...) included."""
    for eqn in jaxpr.eqns:
        names.append(eqn.primitive.name)
        for value in eqn.params.values():
            for sub in value if isinstance(value, list | tuple) else [value]:
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    _primitives(inner, names)
    return names


@pytest.mark.slow
def test_blocks_remat_checkpoints_each_block_once_and_keeps_the_gradient(tiny):
    """remat "blocks" puts one checkpoint around each UNet block (down, mid, up) and each VAE
    decoder block (mid, up), none inside another, and none when the lever is off; the
    gradient through UNet and decoder is the same, at the cost of their forward passes again."""
    sd = tiny["sd"]
    z = jnp.asarray(np.random.default_rng(2).standard_normal((1, 4, 16, 16)), jnp.float32)
    ctx = jnp.asarray(tiny["cond"])

    def unet_then_decode(p, z):
        return sd.decode(p, sd.eps(p, z, jnp.array([10]), ctx))

    counts, grads, flops = {}, {}, {}
    for policy in ("none", "full", "blocks"):
        fn = G.remat(unet_then_decode, policy)
        jaxpr = jax.make_jaxpr(fn)(sd.params, z).jaxpr
        counts[policy] = _primitives(jaxpr, []).count("remat2")  # jax.checkpoint's primitive
        if policy != "full":
            grad = jax.jit(jax.grad(lambda z, fn=fn: jnp.sum(fn(sd.params, z) ** 2)))
            compiled = grad.lower(z).compile()
            flops[policy] = xla.flops(compiled)
            grads[policy] = np.asarray(compiled(z))
    unet, vae = sd.unet.config, sd.vae.config
    blocks = len(unet.down_block_types) + 1 + len(unet.up_block_types) + 1 + len(vae.up_block_types)
    assert counts == {"none": 0, "full": 1, "blocks": blocks}, (counts, blocks)
    assert flops["blocks"] > 1.2 * flops["none"], flops  # the forward passes again
    # Recomputing a block's forward lets XLA fuse it differently, so the two gradients differ by
    # float32 rounding (2.4e-5 of values up to ~10 on CI's CPU, 0 here): bound the difference
    # relative to the gradient's scale, where a lost or doubled block would be of order one.
    scale = np.abs(grads["none"]).max()
    err = np.abs(grads["blocks"] - grads["none"]).max()
    assert err <= 1e-5 * scale, (err, scale)


@pytest.mark.slow
def test_source_cache_encodes_the_source_once_and_keeps_the_result(tiny):
    """source_cache: prepare encodes the source with RAFT once (GuidanceInputs.raft_source), the
    evaluation does not (fewer FLOPs by at least 90% of the encoders'), and the result
    stays within the noise floor: the same evaluation with its input moved by 1e-7."""
    runs, flops = {}, {}
    for cache in (False, True):
        compiled, args = _one_evaluation(tiny, tiny["sd"], tiny["raft"], source_cache=cache)
        edit = args[2]
        assert (edit.raft_source is not None) == cache
        flops[cache] = xla.flops(compiled)
        z_prev, logs, _ = compiled(*args)
        runs[cache] = (np.asarray(z_prev), float(logs["energy"][0]))
        if not cache:
            params, raft, edit, z, keys = args
            moved = np.asarray(compiled(params, raft, edit, z * (1 + 1e-7), keys)[0])
            floor = np.abs(moved - runs[False][0]).max()
            source = 255.0 * edit.source
    encoders = xla.flops(jax.jit(tiny["raft"].encode_source).lower(source).compile())
    assert flops[True] <= flops[False] - 0.9 * encoders, (flops, encoders)
    assert runs[True][1] == pytest.approx(runs[False][1], rel=1e-6)  # the same energy
    assert np.abs(runs[True][0] - runs[False][0]).max() <= max(floor, 1e-5), floor


@pytest.mark.slow
def test_memory_efficient_attention_matches_plain(tiny):
    sd = tiny["sd"]
    mea = sd.configure(attention="memory_efficient")
    assert mea.attention == "memory_efficient" and sd.attention == "plain"
    assert mea.astype("float32").attention == "memory_efficient"  # kept across a dtype change
    # 64x64 latents: 4096 tokens in the first attention layers, four query chunks of 1024
    z = jnp.asarray(np.random.default_rng(1).standard_normal((2, 4, 64, 64)), jnp.float32)
    t = jnp.array([500, 20])
    ctx = jnp.concatenate([sd.embed("a"), sd.embed("b")])
    a = np.asarray(jax.jit(sd.eps)(sd.params, z, t, ctx))
    b = np.asarray(jax.jit(mea.eps)(mea.params, z, t, ctx))
    np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-5)
    with pytest.raises(Exception, match="attention must be one of"):
        sd.configure(attention="flash")


@pytest.mark.slow
@pytest.mark.parametrize("loops", ["scan", "unrolled"])
def test_skip_unguided_steps_same_result_nan_logs_and_state_donated(tiny, loops):
    schedule = np.array([1.0, 0.0, 1.0, 0.0], np.float32)
    finals = {}
    for skip in (True, False):
        cfg = dict(
            steps=4, recursive_steps=2, guidance_weight=10.0, chunk=4, skip_unguided=skip,
            loops=loops,
        )  # fmt: skip
        sampler = Sampler.of(tiny["sd"], tiny["raft"], **cfg)
        edit = sampler.prepare(
            tiny["img"],
            tiny["flow"],
            tiny["cond"],
            tiny["uncond"],
            z0=tiny["z0"],
            schedule=schedule,
        )
        z_T = jnp.asarray(tiny["z0"])
        start = sampler.init(edit, z_T, seeds=0)
        state, logs, _ = sampler.advance(edit, start)
        finals[skip] = (np.asarray(state.z), logs)
        assert start.z.is_deleted()  # the carried state is donated to the chunk
        assert not z_T.is_deleted()  # init copied the caller's array
    z_skip, logs_skip = finals[True]
    z_full, logs_full = finals[False]
    np.testing.assert_allclose(z_skip, z_full, rtol=1e-6, atol=1e-6)
    energy = logs_skip["energy"][:, :, 0]
    assert np.isnan(energy[[1, 3]]).all() and np.isfinite(energy[[0, 2]]).all()
    assert np.isfinite(logs_full["energy"]).all()  # without skipping, every energy is computed
    np.testing.assert_array_equal(logs_skip["guidance_norm"][[1, 3]], 0.0)


@dataclasses.dataclass(frozen=True)
class _Pull(Energy):
    """A smooth, well-conditioned energy (squared distance to the source): guided trajectories
    under it are not chaotic, so two drivers can be compared over many steps."""

    log_names = ("pull",)

    def __call__(self, x, ctx):
        loss = jnp.mean(jnp.square(x - ctx.source), axis=(1, 2, 3))
        return loss, {"pull": loss}


@pytest.mark.slow
def test_unrolled_loops_run_the_scans_evaluations(tiny):
    """loops "unrolled" (one compiled evaluation per call: the CPU default) runs the scan's
    evaluations in the same order with the same noise: the same latents, logs and snapshots over
    three chunks (guided, unguided, mixed; K = 2), the scan compiled once per chunk kind, the
    unrolled evaluation once per guided/unguided, the carried latent donated."""
    schedule = np.array([1.0, 1.0, 0.0, 0.0, 0.0, 1.0], np.float32)
    out = {}
    for loops in ("scan", "unrolled"):
        cfg = dict(
            steps=6, recursive_steps=2, guidance_weight=300.0, chunk=2, clip=0.0, loops=loops
        )
        sampler = Sampler.of(tiny["sd"], tiny["raft"], _Pull(), snapshot_every=3, **cfg)
        assert sampler.loops == loops
        edit = sampler.prepare(
            tiny["img"], tiny["flow"], tiny["cond"], tiny["uncond"], z0=tiny["z0"],
            schedule=schedule,
        )  # fmt: skip
        start = sampler.init(edit, jnp.asarray(tiny["z0"]), seeds=4)
        snaps = {}
        result = loop.run(sampler, edit, start, on_snapshots=snaps.update)
        state, logs = result.state, result.logs
        assert start.z.is_deleted()
        out[loops] = (np.asarray(state.z), logs, snaps, sampler.traces)
    z_scan, logs_scan, snaps_scan, traces_scan = out["scan"]
    z_unr, logs_unr, snaps_unr, traces_unr = out["unrolled"]
    assert traces_scan == 3 and traces_unr == 2
    assert np.isnan(logs_unr["pull"][2:5]).all() and np.isfinite(logs_unr["pull"][[0, 1, 5]]).all()
    assert logs_scan["guidance_norm"][0, 0, 0] > 1.0  # guidance moves the latent
    for k in logs_scan:
        np.testing.assert_allclose(logs_unr[k], logs_scan[k], rtol=1e-5, atol=1e-6, err_msg=k)
    assert sorted(snaps_unr) == sorted(snaps_scan) == [0, 3]
    for step in snaps_scan:
        np.testing.assert_allclose(snaps_unr[step], snaps_scan[step], atol=1e-5)
    # fp32 rounding of differently fused programs, carried over 12 evaluations: seen 1.7e-6
    rel = np.linalg.norm(z_unr - z_scan) / np.linalg.norm(z_scan)
    print(f"final latent, unrolled vs scan: relative L2 {rel:.1e}")
    assert rel < 2e-5, rel


@pytest.mark.slow
def test_unrolled_raft_gradient_matches_the_scans(tiny):
    """One guided evaluation with the paper's energy: RAFT unrolled ("unrolled") against its
    scan ("scan"): the same energy, and a guided latent within the noise floor (the change a
    1e-7 relative input change makes: the gradient through a random RAFT is ill-conditioned)."""
    runs = {"unrolled": tiny["unrolled"]} if "unrolled" in tiny else {}  # the remat test's
    for loops in ("scan", "unrolled"):
        if loops in runs:
            continue
        compiled, args = _one_evaluation(tiny, tiny["sd"], tiny["raft"], loops=loops)
        z_prev, logs, _ = compiled(*args)
        runs[loops] = (np.asarray(z_prev), float(logs["energy"][0]))
        if loops == "scan":
            params, raft, edit, z, keys = args
            moved = np.asarray(compiled(params, raft, edit, z * (1 + 1e-7), keys)[0])
            floor = np.abs(moved - runs["scan"][0]).max()
    (z_scan, e_scan), (z_unr, e_unr) = runs["scan"], runs["unrolled"]
    assert e_unr == pytest.approx(e_scan, rel=1e-6)
    assert np.abs(z_unr - z_scan).max() <= max(floor, 1e-5), floor


def test_loops_setting():
    assert resolve_loops("auto", "cpu") == "unrolled"
    assert resolve_loops("auto", "gpu") == resolve_loops("auto", "tpu") == "scan"
    assert resolve_loops("scan", "cpu") == "scan" and resolve_loops("unrolled", "gpu") == "unrolled"
    with pytest.raises(ValueError, match="loops must be one of"):
        C.Speed(loops="python")


@pytest.mark.slow
def test_bf16_evaluation_close_to_fp32(tiny):
    """bf16 UNet, VAE and RAFT against fp32 on what is well conditioned: the energy and the
    decoded x0 estimate (forward passes). The guided step's drift is stated by bench/levers.py:
    at random weights RAFT's gradient moves more under a 1e-7 input change than that."""
    sd, raft = tiny["sd"], tiny["raft"]
    if "fp32" not in tiny:  # normally left by the remat test
        compiled, args = _one_evaluation(tiny, sd, raft)
        _, logs, x = compiled(*args)
        tiny["fp32"] = (float(logs["energy"][0]), np.asarray(x))
    e32, x32 = tiny["fp32"]
    half = (sd.astype("bfloat16"), raft.replace_config(dtype="bfloat16"))
    compiled, args = _one_evaluation(tiny, *half)
    z16, logs, x16 = compiled(*args)
    assert z16.dtype == jnp.float32  # the guidance state stays float32
    assert float(logs["energy"][0]) == pytest.approx(e32, rel=0.05)
    # bf16 keeps 8 mantissa bits (2^-9 relative per rounding). Two-sided: bf16 is really used,
    # and the decoded estimate stays close.
    rel = np.linalg.norm(np.asarray(x16) - x32) / np.linalg.norm(x32)
    assert 1e-4 < rel < 0.05, rel
