"""Flax RAFT vs torchvision RAFT: same weights (saved by torch, converted by us), same flow."""

import copy

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torchvision

from flow import load_raft
from flow.convert import convert
from tests import xla
from tests.torch_raft import image_pair, random_torchvision_raft, torch_flow

H, W = 128, 160  # >= 128 (upstream minimum), non-square


@pytest.fixture(scope="module", params=["large", "small"])
def models(request, tmp_path_factory):
    """(torchvision model, path of our converted weights file, small?)."""
    small = request.param == "small"
    model = random_torchvision_raft(small, seed=1 if small else 0)
    folder = tmp_path_factory.mktemp(request.param)
    torch.save(model.state_dict(), folder / "raft.pth")
    convert(str(folder / "raft.pth"), str(folder / "raft.mgjax"))
    return model, str(folder / "raft.mgjax"), small


def test_small_models_upsampling_is_torchs_bilinear_interpolate_in_float64():
    """RAFT-small's x8 flow upsampling = 8 * F.interpolate(bilinear, align_corners=True), to
    float64 rounding: the weights are built in float64 for a float64 network."""
    from flow.raft import bilinear_upsample8

    flow = np.random.default_rng(0).normal(size=(2, 13, 17, 2)) * 10.0
    ref = 8.0 * torch.nn.functional.interpolate(
        torch.from_numpy(flow).permute(0, 3, 1, 2), scale_factor=8, mode="bilinear",
        align_corners=True,
    ).permute(0, 2, 3, 1).numpy()  # fmt: skip
    with jax.enable_x64(True):
        ours = np.asarray(bilinear_upsample8(jnp.asarray(flow, jnp.float64)))
    assert ours.dtype == np.float64 and ours.shape == ref.shape == (2, 104, 136, 2)
    np.testing.assert_allclose(ours, ref, rtol=0, atol=1e-10)


@pytest.mark.slow
@pytest.mark.parametrize("iters", [5, 12])
def test_flow_matches_torchvision_eval_mode(models, iters):
    model, path, _ = models
    a, b = image_pair(2, H, W)
    ref = torch_flow(model, a, b, iters)
    ours = np.asarray(load_raft(path, context_norm="running")(a, b, iters=iters))
    assert ours.shape == (2, H, W, 2)
    assert np.abs(ref).max() > 1.0  # the comparison is not between two near-zero fields
    np.testing.assert_array_less(np.abs(ours - ref).max(), 1e-3)


@pytest.mark.slow
def test_context_norm_batch_matches_train_mode_one_image(models):
    """ "batch" = torch train() called with one image (the Motion Guidance reference's RAFT)."""
    model, path, small = models
    a, b = image_pair(3, H, W, seed=2)
    net = load_raft(path, context_norm="batch")
    singles = [np.asarray(net(a[i : i + 1], b[i : i + 1], iters=5)) for i in range(3)]
    batched = np.asarray(net(a, b, iters=5))
    np.testing.assert_allclose(batched, np.concatenate(singles), atol=1e-4)
    ref = torch_flow(model, a[:1], b[:1], 5, train=True)
    np.testing.assert_array_less(np.abs(singles[0] - ref).max(), 1e-3)
    if not small:  # the modes must differ, or this test checks nothing
        running = np.asarray(load_raft(path, context_norm="running")(a[:1], b[:1], iters=5))
        assert np.abs(running - singles[0]).max() > 1e-2


@pytest.mark.slow
@pytest.mark.parametrize("context_norm", ["running", "batch"])
def test_gradient_matches_torch_autograd_fp64(models, context_norm, monkeypatch):
    """d<c, flow>/d image2 (and image1) vs torch autograd: relative L2 error < 1e-3 (seen ~1e-12).

    Run in float64 on both sides: with random weights the flow is a ReLU network whose gradient
    jumps wherever fp32 rounding flips a unit (1e-6 input noise moves the fp32 gradient of RAFT-
    large's encoder by ~0.7%), which would hide real differences; fp64 removes that noise.
    """
    model, path, small = models
    if small and context_norm == "batch":
        pytest.skip("RAFT-small's context encoder has no norm: the modes are the same network")
    a, b = image_pair(1, H, W, seed=3)
    c = np.random.default_rng(4).normal(size=(1, H, W, 2))
    with jax.enable_x64(True):
        net = load_raft(path, context_norm=context_norm, dtype="float64")

        def functional(net, x1, x2):
            return jnp.sum(net(x1, x2, iters=5) * c)

        g1, g2 = jax.jit(jax.grad(functional, argnums=(1, 2)))(
            net, a.astype(np.float64), b.astype(np.float64)
        )
        g1, g2 = np.asarray(g1), np.asarray(g2)
    assert g2.dtype == np.float64

    ref_model = copy.deepcopy(model).double().train(context_norm == "batch")
    t1, t2 = (torch.from_numpy(x).double().permute(0, 3, 1, 2).requires_grad_() for x in (a, b))
    # torchvision builds its lookup offsets in the default dtype and its grid with .float().
    grid = torchvision.models.optical_flow.raft.make_coords_grid
    monkeypatch.setattr(
        torchvision.models.optical_flow.raft, "make_coords_grid", lambda *a: grid(*a).double()
    )
    torch.set_default_dtype(torch.float64)
    try:
        flow = ref_model(t1 / 127.5 - 1.0, t2 / 127.5 - 1.0, num_flow_updates=5)[-1]
    finally:
        torch.set_default_dtype(torch.float32)
    (flow * torch.from_numpy(c).permute(0, 3, 1, 2)).sum().backward()
    for ours, ref in ((g2, t2.grad), (g1, t1.grad)):
        ref = ref.permute(0, 2, 3, 1).numpy()
        rel = np.linalg.norm(ours - ref) / np.linalg.norm(ref)
        print(f"relative L2 gradient error {rel:.2e}")
        assert np.linalg.norm(ref) > 0 and rel < 1e-3, rel


@pytest.mark.slow
def test_jitted_call_traces_once(models):
    _, path, _ = models
    net = load_raft(path)
    traces = []

    @jax.jit
    def run(net, x1, x2):
        traces.append(1)
        return net(x1, x2, iters=2)

    for seed in range(3):
        a, b = image_pair(1, H, W, seed=seed)
        run(net, a, b).block_until_ready()
    assert len(traces) == 1


@pytest.mark.slow
def test_bfloat16_runs_close_to_float32(models):
    """bf16 compute is a lever, not a parity mode: finite and in the same regime as fp32."""
    _, path, _ = models
    a, b = image_pair(1, H, W, seed=5)
    f32 = np.asarray(load_raft(path, context_norm="running")(a, b, iters=5))
    bf16 = np.asarray(load_raft(path, context_norm="running", dtype="bfloat16")(a, b, iters=5))
    assert bf16.dtype == np.float32 and np.isfinite(bf16).all()
    drift = np.abs(bf16 - f32).mean() / np.abs(f32).mean()
    print(f"bf16 vs fp32 mean relative drift: {drift:.4f}")
    assert drift < 0.1


@pytest.mark.slow
def test_input_scale_runs_on_upsampled_images_and_pools_the_flow(tmp_path):
    """input_scale 2: RAFT on 2x bilinearly upsampled images (half-pixel centres), the flow
    2x2-averaged back and halved; the factor is kept by the checkpoint."""
    from flow import checkpoint
    from flow.errors import InputError
    from flow.raft import RaftConfig, init_raft, raft_forward

    scaled = RaftConfig(small=True, input_scale=2)
    plain = RaftConfig(small=True)
    variables = init_raft(plain, jax.random.PRNGKey(0), (64, 64))
    a, b = (jnp.asarray(x) for x in image_pair(1, 64, 64, seed=3))
    out = raft_forward(scaled, variables, a, b, 3)
    big = [jax.image.resize(x, (1, 128, 128, 3), "bilinear") for x in (a, b)]
    ref = raft_forward(plain, variables, *big, 3)
    ref = np.asarray(ref).reshape(1, 64, 2, 64, 2, 2).mean(axis=(2, 4)) / 2
    assert out.shape == (1, 64, 64, 2)
    np.testing.assert_allclose(np.asarray(out), ref, atol=1e-5)
    path = str(tmp_path / "s.mgjax")
    checkpoint.save(path, jax.tree_util.tree_map(np.asarray, variables), scaled)
    assert load_raft(path).config.input_scale == 2
    with pytest.raises(InputError, match="input_scale"):
        RaftConfig(small=True, input_scale=3)


@pytest.mark.slow
def test_full_gradient_is_the_exact_derivative_detached_is_not(models):
    """RaftConfig.detach=False: <grad, v> equals the central finite difference of <c, flow>
    along a random direction v (fp64, both images moved); the upstream detached gradient
    differs from it (it leaves out the refinement path). Step 1e-7: at 1e-5 the difference
    already crosses kinks of the bilinear lookups (0.4% off); at 1e-7 it agrees to ~1e-6."""
    _, path, small = models
    if not small:
        pytest.skip("the refinement loop is the same code for both sizes; small is cheaper")
    a, b = image_pair(1, H, W, seed=5)
    rng = np.random.default_rng(6)
    c = rng.normal(size=(1, H, W, 2))
    v1, v2 = rng.normal(size=a.shape), rng.normal(size=b.shape)
    with jax.enable_x64(True):
        detached = load_raft(path, context_norm="running", dtype="float64")
        full = detached.replace_config(detach=False)

        def functional(net, x1, x2):
            return jnp.sum(net(x1, x2, iters=4) * c)

        value = jax.jit(functional)
        a64, b64 = a.astype(np.float64), b.astype(np.float64)
        h = 1e-7
        numeric = (
            value(full, a64 + h * v1, b64 + h * v2) - value(full, a64 - h * v1, b64 - h * v2)
        ) / (2 * h)
        slopes = {}
        for name, net in (("full", full), ("detached", detached)):
            g1, g2 = jax.jit(jax.grad(functional, argnums=(1, 2)))(net, a64, b64)
            slopes[name] = float(jnp.sum(g1 * v1) + jnp.sum(g2 * v2))
    numeric = float(numeric)
    print(f"finite difference {numeric:.6e}, full {slopes['full']:.6e}, "
          f"detached {slopes['detached']:.6e}")  # fmt: skip
    assert abs(slopes["full"] - numeric) < 1e-5 * abs(numeric)
    assert abs(slopes["detached"] - numeric) > 1e-3 * abs(numeric)


@pytest.mark.slow
def test_cached_source_encoding_gives_the_same_flow_and_gradient(models):
    """encode_source once, then many image2s (the sampler's cache): the flow and its gradient
    with respect to image2 are those of the plain call (fp64, where only the order of float
    operations could differ: in fp32 the plain call runs the feature encoder on both images as
    one batch, and the random network's gradient carried that to 2e-3 of its scale on one
    machine, 0 on another), and the cached call
    leaves out the source encoders' work (XLA's FLOP count, refinement unrolled so it is counted
    whole)."""
    _, path, _ = models
    a, b = image_pair(2, H, W, seed=7)
    c = np.random.default_rng(8).normal(size=(2, H, W, 2))
    with jax.enable_x64(True):
        # context_norm "batch", the sampler's: per-image statistics
        net = load_raft(path, context_norm="batch", dtype="float64")
        a, b = jnp.asarray(a, jnp.float64), jnp.asarray(b, jnp.float64)
        cache = jax.jit(net.encode_source)(a)

        def flow_and_grad(x1, x2, source):  # x1 an argument: as a constant XLA would fold it
            def loss(x2):
                flow = net(x1, x2, iters=3, unroll=True, source=source)
                return jnp.sum(flow * c), flow

            (_, flow), grad = jax.value_and_grad(loss, has_aux=True)(x2)
            return flow, grad

        runs, flops = {}, {}
        for name, source in (("plain", None), ("cached", cache)):
            compiled = jax.jit(flow_and_grad).lower(a, b, source).compile()
            flops[name] = xla.flops(compiled)
            runs[name] = [np.asarray(v) for v in compiled(a, b, source)]
        encoders = xla.flops(jax.jit(net.encode_source).lower(a).compile())
    for plain, cached in zip(runs["plain"], runs["cached"], strict=True):
        scale = np.abs(plain).max()
        assert scale > 0
        assert np.abs(cached - plain).max() <= 1e-10 * scale, (np.abs(cached - plain).max(), scale)
    assert flops["cached"] <= flops["plain"] - 0.9 * encoders, (flops, encoders)
