"""The research API: mgjax.method.guidance's pure functions, composed by hand with jax.jit and
jax.grad, on a seam small enough to compile in a second (a linear noise model and a decoder
that upsamples three latent channels) and an energy without a flow network."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mgjax import config as C
from mgjax.method import ddim
from mgjax.method import guidance as G
from mgjax.method import numeric as N
from mgjax.method.energy import Energy
from mgjax.method.inputs import prepare

B, S, H = 2, 4, 64  # images, DDIM steps, image size (latents 4x8x8)


@dataclasses.dataclass(eq=False)
class Seam:
    """eps = w z + mean(context); decode = tanh of the first three channels upsampled 8x."""

    latent_channels = 4
    vae_factor = 8
    out_dtype = jnp.float32

    def eps(self, params, z, t, context):
        return params["w"] * z + jnp.mean(context, axis=(1, 2))[:, None, None, None]

    def decode(self, params, z):
        x = jnp.repeat(jnp.repeat(z[:, :3], 8, axis=2), 8, axis=3)
        return jnp.tanh(params["v"] * jnp.transpose(x, (0, 2, 3, 1)))


@dataclasses.dataclass(frozen=True)
class Pull(Energy):
    """Mean squared distance of the estimate to the source, per image."""

    log_names = ("pull",)

    def __call__(self, x, ctx):
        loss = jnp.mean(jnp.square(x - ctx.source), axis=(1, 2, 3))
        return loss, {"pull": loss}


@pytest.fixture(scope="module")
def case():
    rng = np.random.default_rng(0)
    method = C.make(
        steps=S, recursive_steps=2, guidance_weight=50.0, clip=0.24, cfg_scale=1.0
    ).method
    seam = Seam()
    g = G.Guidance(seam, Pull(), method)
    frozen = np.zeros((B, 1, 8, 8), bool)
    frozen[..., :2] = True
    inputs = prepare(
        seam,
        method,
        rng.uniform(size=(B, H, H, 3)),
        np.zeros((B, H, H, 2)),
        rng.standard_normal((1, 3, 5)),
        np.zeros((1, 3, 5)),
        frozen=frozen,
        trajectory=rng.standard_normal((S, B, 4, 8, 8)),
        schedule=np.array([1.0, 0.5, 0.0, 2.0]),
    )
    params = {"w": jnp.float32(0.3), "v": jnp.float32(0.8)}
    z_T = rng.standard_normal((B, 4, 8, 8)).astype(np.float32)
    return g, params, inputs, z_T


def test_evaluation_returns_the_energys_gradient_and_the_clipped_guidance(case):
    """grad is dE/dz_t of the energy written out here by hand (frozen entries replaced first),
    guidance is s lambda_g schedule[i] grad clipped per image, and z_prev is the DDIM step with
    eps + guidance (DDIM eq. 12)."""
    g, params, inputs, z_T = case
    i, j = 1, 0
    state = G.init(inputs, z_T, seeds=[3, 4])
    ev = jax.jit(G.evaluate, static_argnums=0)(g, params, None, inputs, state.z, i, j, state.keys)
    sch = ddim.make_schedule(S)
    abar, s = sch.abar[i], jnp.sqrt(1 - sch.abar[i])
    z = jnp.where(inputs.frozen, inputs.trajectory[i], jnp.asarray(z_T))
    seam = g.sd

    def energy(z):
        eps = seam.eps(params, z, None, inputs.cond)
        x = seam.decode(params, (z - s * eps) / jnp.sqrt(abar)) * 0.5 + 0.5
        return jnp.sum(jnp.mean(jnp.square(x - inputs.source), axis=(1, 2, 3)))

    grad = jax.grad(energy)(z)
    np.testing.assert_allclose(ev.grad, grad, rtol=1e-5, atol=1e-8)
    d = s * 50.0 * 0.5 * grad
    norm = np.linalg.norm(np.asarray(d).reshape(B, -1), axis=1)
    assert (norm > 0.24).any() and (norm < 0.24).any()  # the clip acts on one image
    expected = d * np.minimum(1.0, 0.24 / norm)[:, None, None, None]
    np.testing.assert_allclose(ev.guidance, expected, rtol=1e-5, atol=1e-8)
    np.testing.assert_allclose(ev.logs["guidance_norm"], np.minimum(norm, 0.24), rtol=1e-5)
    eps = seam.eps(params, z, None, inputs.cond)
    np.testing.assert_allclose(ev.eps, eps, rtol=1e-6)
    z_prev = ddim.step(z, eps + expected, abar, sch.abar_prev[i])
    np.testing.assert_allclose(ev.z_prev, z_prev, rtol=1e-5, atol=1e-6)


def test_a_hand_written_loop_equals_step_chunk(case):
    """init at any step; K recursive evaluations by hand (evaluate, z_next fed back, the K-th
    z_prev kept) equal recursive_step, and step_chunk over steps 1..3 equals recursive_step
    three times; a second input of the same shapes reuses the compiled chunk."""
    g, params, inputs, z_T = case
    state = G.init(inputs, z_T, seeds=[3, 4], step=1)
    assert int(state.step) == 1
    traces = []

    def chunk(g, params, raft, inputs, state, length):
        traces.append(length)
        return G.step_chunk(g, params, raft, inputs, state, length, mode="mixed")

    step = jax.jit(chunk, static_argnums=(0, 5))
    new, logs, _ = step(g, params, None, inputs, state, 3)
    assert int(new.step) == 4 and logs["pull"].shape == (3, 2, B)
    assert np.isnan(logs["pull"][1]).all()  # schedule[2] = 0: not evaluated
    z = state.z
    for i in (1, 2, 3):
        mode = "guided" if i != 2 else "unguided"
        z_t = z
        for j in range(2):
            ev = G.evaluate(g, params, None, inputs, z_t, i, j, state.keys, mode)
            z_t, kept = ev.z_next, ev.z_prev
        z_rec, _, _ = G.recursive_step(g, params, None, inputs, z, i, state.keys, mode)
        np.testing.assert_allclose(z_rec, kept, rtol=1e-5, atol=1e-6)
        z = kept
    np.testing.assert_allclose(new.z, z, rtol=1e-5, atol=1e-6)
    other = inputs.replace(source=1.0 - inputs.source)
    step(g, params, None, other, state, 3)
    assert traces == [3]


def test_guidance_weight_zero_is_plain_ddim(case):
    """lambda_g = 0, K = 1 and nothing frozen: step_chunk is DDIM with the seam's eps."""
    g, params, inputs, z_T = case
    method = dataclasses.replace(g.method, guidance_weight=0.0, recursive_steps=1)
    plain = G.Guidance(g.sd, g.energy, method)
    free = inputs.replace(frozen=jnp.zeros_like(inputs.frozen))
    state = G.init(free, z_T, seeds=0)
    new, logs, _ = G.step_chunk(plain, params, None, free, state, S, mode="unguided")
    sch, z = ddim.make_schedule(S), jnp.asarray(z_T)
    for i in range(S):
        z = ddim.step(z, g.sd.eps(params, z, None, free.cond), sch.abar[i], sch.abar_prev[i])
    np.testing.assert_allclose(new.z, z, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(logs["guidance_norm"], 0.0)


def test_the_step_is_differentiable_in_the_weights(case):
    """jax.grad through a whole guided chunk with respect to a model weight (second-order:
    the guidance is itself a gradient) is finite and matches a central difference."""
    g, params, inputs, z_T = case
    state = G.init(inputs, z_T, seeds=[3, 4])

    def final(w):
        p = dict(params, w=w)
        new, _, _ = G.step_chunk(g, p, None, inputs, state, 2, mode="guided")
        return jnp.sum(new.z**2)

    grad = jax.jit(jax.grad(final))(jnp.float32(0.3))
    h = 1e-2
    numeric = (final(jnp.float32(0.3 + h)) - final(jnp.float32(0.3 - h))) / (2 * h)
    assert np.isfinite(grad) and grad == pytest.approx(float(numeric), rel=2e-2)


def _with(inputs, **values):
    """`inputs` with some of the method's numbers replaced (one value, or one per image)."""
    return inputs.replace(numeric=N.replace(inputs.numeric, **values))


def test_numbers_are_data_one_trace_for_every_weight_clip_and_scale(case):
    """New guidance weights, clips and CFG scales (one per image) reuse the jitted chunk, and
    act: each image of a mixed batch is what a batch of its own value gives."""
    g, params, inputs, z_T = case
    g = G.Guidance(g.sd, g.energy, g.method, switches=N.Switches(cfg=True))
    state = G.init(inputs, z_T, seeds=[3, 4])
    traces = []

    def chunk(g, params, inputs, state):
        traces.append(1)
        return G.step_chunk(g, params, None, inputs, state, 2, mode="guided")[0].z

    step = jax.jit(chunk, static_argnums=0)
    runs = {
        w: np.asarray(step(g, params, _with(inputs, guidance_weight=w, clip=c, cfg_scale=k), state))
        for w, c, k in ((0.0, 0.24, 1.0), (20.0, 0.0, 2.0), (50.0, 0.24, 3.0))
    }
    mixed = _with(inputs, guidance_weight=[0.0, 50.0], clip=[0.24, 0.24], cfg_scale=[1.0, 3.0])
    both = np.asarray(step(g, params, mixed, state))
    assert len(traces) == 1
    np.testing.assert_allclose(both[0], runs[0.0][0], rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(both[1], runs[50.0][1], rtol=1e-6, atol=1e-6)
    assert np.abs(runs[50.0] - runs[0.0]).max() > 1e-3  # the weight acts


@dataclasses.dataclass(frozen=True)
class WeighedPull(Energy):
    """Pull weighed by the preservation weight the sampler gives this evaluation."""

    log_names = ("pull",)

    def __call__(self, x, ctx):
        loss = ctx.numeric.preserve_weight * Pull()(x, ctx)[0]
        return loss, {"pull": loss}


def test_preservation_weight_ramps_linearly_over_the_steps(case):
    """preserve_ramp r: DDIM step i weighs the preservation term by w (1 + (r - 1) i / (S - 1)),
    w at the first step and w r at the last; an evaluation with (w, r) equals one with that
    weight and r = 1, and new ramps reuse the compiled evaluation (the ramp is data)."""
    base, params, inputs, z_T = case
    g = G.Guidance(base.sd, WeighedPull(), base.method)
    inputs = _with(inputs, clip=0.0)  # unclipped: the term's size shows the weight
    state = G.init(inputs, z_T, seeds=[3, 4])
    traces = []

    def guidance(g, inputs, i):
        traces.append(1)
        return G.evaluate(g, params, None, inputs, state.z, i, 0, state.keys).guidance

    ev = jax.jit(guidance, static_argnums=0)
    for i in (0, 1, 3):  # step 2's schedule is 0
        ramped = np.asarray(ev(g, _with(inputs, preserve_weight=2.0, preserve_ramp=4.0), i))
        w = 2.0 * (1 + 3.0 * i / (S - 1))
        flat = np.asarray(ev(g, _with(inputs, preserve_weight=w, preserve_ramp=1.0), i))
        np.testing.assert_allclose(ramped, flat, rtol=1e-5, atol=1e-9)
        if i != 0:  # the ramp acts (step 0 is w at any ramp)
            same = np.asarray(ev(g, _with(inputs, preserve_weight=2.0, preserve_ramp=1.0), i))
            assert np.abs(ramped - same).max() > 1e-4
    assert len(traces) == 1
    num = N.replace(inputs.numeric, preserve_weight=3.0, preserve_ramp=0.5)
    np.testing.assert_allclose(G.numbers_at(g, num, 0).preserve_weight, [3.0, 3.0])
    np.testing.assert_allclose(G.numbers_at(g, num, S - 1).preserve_weight, [1.5, 1.5])
    # the final image's energy is weighed as the last step weighs it
    final = G.final_energy(g, params, None, inputs.replace(numeric=num), state.z)[0]
    flat = _with(inputs, preserve_weight=1.5, preserve_ramp=1.0)
    np.testing.assert_allclose(final, G.final_energy(g, params, None, flat, state.z)[0], rtol=1e-6)


def test_cfg_one_with_the_switch_on_is_eps_cond_to_rounding(case):
    """A batch whose every scale is 1 skips the unconditional half (switches.cfg False); with
    the switch on (a batch mixing scales), scale 1 gives eps_u + 1 (eps_c - eps_u): eps_c to
    within a rounding of the subtraction."""
    g, params, inputs, z_T = case
    assert not g.switches.cfg  # the case's method has cfg_scale 1
    on = G.Guidance(g.sd, g.energy, g.method, switches=N.Switches(cfg=True))
    state = G.init(inputs, z_T, seeds=[3, 4])
    ev_off = G.evaluate(g, params, None, inputs, state.z, 0, 0, state.keys)
    ev_on = G.evaluate(on, params, None, inputs, state.z, 0, 0, state.keys)
    diff = float(np.abs(np.asarray(ev_on.eps) - np.asarray(ev_off.eps)).max())
    scale = float(np.abs(np.asarray(ev_off.eps)).max())
    assert diff <= 4 * np.finfo(np.float32).eps * scale, (diff, scale)


def test_vmap_over_guidance_weights(case):
    """jax.vmap of a guided chunk over a batch of guidance weights (each f32[B]) equals one
    chunk per weight."""
    g, params, inputs, z_T = case
    state = G.init(inputs, z_T, seeds=[3, 4])

    def chunk(weight):
        return G.step_chunk(g, params, None, _with(inputs, guidance_weight=weight), state, 2)[0].z

    weights = jnp.array([[0.0, 0.0], [10.0, 10.0], [50.0, 25.0]])
    zs = jax.jit(jax.vmap(chunk))(weights)
    assert zs.shape == (3, *state.z.shape)
    for n in range(3):
        np.testing.assert_allclose(zs[n], jax.jit(chunk)(weights[n]), rtol=1e-5, atol=1e-6)
    assert np.abs(np.asarray(zs[2] - zs[0])).max() > 1e-3


def test_grad_of_the_final_energy_wrt_the_guidance_weight(case):
    """jax.grad of the final energy after a guided chunk with respect to each image's guidance
    weight: finite, negative (more guidance lowers the energy here) and a central difference's."""
    g, params, inputs, z_T = case
    state = G.init(inputs, z_T, seeds=[3, 4])

    def final(weight):
        edit = _with(inputs, guidance_weight=weight, clip=0.0)  # no clip: smooth in the weight
        new, _, _ = G.step_chunk(g, params, None, edit, state, 2, mode="guided")
        return G.final_energy(g, params, None, edit, new.z)[0].sum()

    w = jnp.array([5.0, 5.0])
    grad = np.asarray(jax.jit(jax.grad(final))(w))
    h = 0.05
    for n in range(B):
        step = jnp.zeros(B).at[n].set(h)
        numeric = (final(w + step) - final(w - step)) / (2 * h)
        assert np.isfinite(grad[n]) and grad[n] == pytest.approx(float(numeric), rel=2e-2)
    assert (grad < 0).all(), grad


def test_energy_must_be_an_energy():
    with pytest.raises(TypeError, match="Energy"):
        G.Guidance(Seam(), lambda x, ctx: x.sum())


@pytest.mark.parametrize("band", [0, 1, 2])
def test_paste_weight_ramps_from_the_editable_edge_and_ignores_the_image_border(band):
    """For a straight edge the weight at depth d into the frozen region (d = 0 next to the
    editable region) is min(1, (d + 1) / (2r + 1)), r = band x factor / 2; editable pixels
    weigh 0; the frame's border does not thin it; a pixel is pasted only where every latent
    channel is frozen."""
    factor, h, w = 8, 6, 8
    frozen = np.ones((1, 4, h, w), bool)
    frozen[0, :, :, :3] = False  # editable: the first three latent columns
    frozen[0, 2, 0, 6] = False  # one channel editable: that latent pixel is not pasted
    a = np.asarray(G.paste_weight(jnp.asarray(frozen), factor, band))[0, ..., 0]
    assert a.shape == (h * factor, w * factor)
    r = band * factor // 2
    depth = np.arange(w * factor) - 3 * factor
    expected = np.where(depth < 0, 0.0, np.minimum(1.0, (depth + 1) / (2 * r + 1)))
    row = 5 * factor  # a row far from the one-channel cell
    np.testing.assert_allclose(a[row], expected, atol=1e-6)
    np.testing.assert_allclose(a[-1], expected, atol=1e-6)  # the frame's last row: the same
    np.testing.assert_array_equal(a[:factor, 6 * factor : 7 * factor], 0.0)
    assert ((a >= 0) & (a <= 1)).all()


def test_paste_source_puts_the_source_where_the_frozen_mask_holds(case):
    """final_image is the decoded latents without paste_source; with it, the source image
    where the paste weight is 1, the decoded image where it is 0, their blend between; the
    Sampler's decode needs the inputs then."""
    from mgjax.method.sampler import Sampler

    g, params, inputs, z_T = case
    decoded = np.asarray(g.sd.decode(params, jnp.asarray(z_T))) * 0.5 + 0.5
    np.testing.assert_allclose(
        np.asarray(G.final_image(g, params, inputs, jnp.asarray(z_T))), decoded, atol=1e-6
    )
    method = dataclasses.replace(g.method, paste_source=True, paste_band=1)
    gp = G.Guidance(g.sd, g.energy, method)
    got = np.asarray(G.final_image(gp, params, inputs, jnp.asarray(z_T)))
    a = np.asarray(G.paste_weight(inputs.frozen, 8, 1))
    source = np.asarray(inputs.source)
    full, none = a[..., 0] == 1, a[..., 0] == 0
    assert full.any() and none.any() and ((a > 0) & (a < 1)).any()
    np.testing.assert_allclose(got[full], source[full], atol=1e-6)
    np.testing.assert_allclose(got[none], decoded[none], atol=1e-6)
    np.testing.assert_allclose(got, a * source + (1 - a) * decoded, atol=1e-6)
    seam = dataclasses.replace(g.sd)
    seam.params = params
    sampler = Sampler(seam, None, method, energy=g.energy)
    with pytest.raises(ValueError, match="paste_source needs the edit's inputs"):
        sampler.decode(jnp.asarray(z_T))
    np.testing.assert_allclose(
        sampler.decode(jnp.asarray(z_T), inputs), np.clip(got, 0, 1), atol=1e-6
    )
