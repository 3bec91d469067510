"""Motion Guidance as pure functions: guided DDIM with recursive denoising.

One guided evaluation at DDIM step i (timestep t, abar, s = sqrt(1 - abar)), for every image of
the batch at once (MOTION_GUIDANCE.md, "The guided sampler"):

  1. z_t[frozen] = g_t[frozen] (the source trajectory at step i, or sqrt(abar) z0 + s noise);
  2. eps = eps_u + w_cfg (eps_c - eps_u), one UNet call on the batch [uncond, cond];
  3. x = VAE.decode((z_t - s eps) / sqrt(abar)), mapped from [-1, 1] to [0, 1]  (DDIM eq. 12);
  4. E = lambda_flow L_flow + lambda_color L_color (mgjax.method.energy), RAFT(source, x);
  5. grad = dE/dz_t through RAFT, the decoder and the UNet (both CFG branches);
  6. d = s lambda_g schedule[i] grad, clipped to L2 norm `clip` per image;
  7. z_prev = DDIM(z_t, eps + d);
  8. repeated K times per step, re-noising z_prev back to t in between; the K-th z_prev is kept.

Everything here is a function of its arguments: `Guidance` is the static description (the model
seam, the energy, the settings that shape the program; hashable, a `static_argnums` of jit), the
weights (`params`, the `Raft`) and the per-edit arrays (`GuidanceInputs`, with the method's numbers
per image in `inputs.numeric`, mgjax.method.numeric) are arguments, and the state is a pytree:

    g = Guidance(sd, energy, method, speed)
    state = init(inputs, z_T, seeds)
    step = jax.jit(step_chunk, static_argnums=0, static_argnames=("length", "mode"))
    state, logs, snapshots = step(g, sd.params, raft, inputs, state, length=10)

`evaluate` returns everything one evaluation computes (the guidance term, the energy's gradient,
the one-step estimate) for inspection; `mgjax.method.sampler.Sampler` drives these functions with
compile caching, the scan/unrolled choice and a NaN check.
"""

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct
from jax import lax

from mgjax.config import Method, Speed
from mgjax.method import cost, ddim
from mgjax.method import numeric as N
from mgjax.method.energy import Context, Energy
from mgjax.method.inputs import GuidanceInputs
from mgjax.method.source import cfg_eps, cfg_eps_cond_gradient
from mgjax.model.levers import REMAT_POLICIES, resolve_loops


@struct.dataclass
class SamplerState:
    z: jnp.ndarray  # f32[B,C,h,w] latent at the start of DDIM step `step`
    step: jnp.ndarray  # i32[] next DDIM step (0 = noisiest)
    keys: jnp.ndarray  # u32[B,2] one PRNG key per image


@struct.dataclass
class Evaluation:
    """What one guided evaluation computes, batch-first (B images)."""

    z_prev: jnp.ndarray  # f32[B,C,h,w] DDIM step from z_t with eps + guidance
    z_next: jnp.ndarray  # f32[B,C,h,w] z_prev re-noised back to step i's noise level
    eps: jnp.ndarray  # f32[B,C,h,w] classifier-free guided noise estimate
    guidance: jnp.ndarray  # f32[B,C,h,w] the clipped guidance term d (0 where unguided)
    grad: jnp.ndarray  # f32[B,C,h,w] dE/dz_t (0 where unguided)
    x0: jnp.ndarray  # f32[B,H,W,3] the decoded one-step estimate in [0, 1] (zeros if not decoded)
    logs: dict  # name -> f32[B]: the energy, its terms, noise_norm, guidance_norm


@dataclasses.dataclass(frozen=True, eq=False)
class Guidance:
    """The static part of the method: the model seam, the energy and the settings.

    `sd` is `mgjax.model.sd.StableDiffusion` (or anything with its `eps`, `decode`,
    `latent_channels` and `vae_factor` members); its weights are passed to the functions below
    separately. Hashed by identity, so it can be a static jit argument; `snapshot_every` > 0 decodes
    the one-step estimate of unguided steps too (for snapshots).

    The program reads the method's structure (steps, K, ...) from `method`; its numbers
    (guidance weight, clip, CFG scale, eta, the energy's weights) come per image from
    `inputs.numeric` (mgjax.method.numeric), and `method`'s are only the fallback for inputs without
    them. `switches` (mgjax.method.numeric.Switches) says what the batch's numbers switch on: with
    `cfg` False every cfg_scale is taken as 1 and the unconditional half never runs; without
    `stochastic` eta is taken as 0. Default: what `method`'s own numbers need.
    """

    sd: Any
    energy: Energy
    method: Method = Method()
    speed: Speed = Speed()
    snapshot_every: int = 0
    switches: N.Switches | None = None

    def __post_init__(self):
        if not isinstance(self.energy, Energy):
            raise TypeError(
                f"energy must be an mgjax.method.energy.Energy, got {type(self.energy).__name__}"
            )
        if self.switches is None:
            object.__setattr__(self, "switches", N.Switches.of_method(self.method))
        # the cost levers per step (static: each changes which evaluations and passes run)
        object.__setattr__(self, "plan", cost.plan(self.method))

    @property
    def loops(self) -> str:
        """ "scan" or "unrolled": what the speed setting resolves to on this backend."""
        return resolve_loops(self.speed.loops)

    @property
    def schedule(self) -> ddim.Schedule:
        return ddim.make_schedule(self.method.steps)

    @property
    def log_names(self) -> tuple[str, ...]:
        """What every evaluation logs, in order."""
        return ("energy", *self.energy.log_names, "noise_norm", "guidance_norm")

    @property
    def dtype(self):
        return getattr(self.sd, "out_dtype", jnp.float32)  # float64 only in exactness tests


def init(inputs: GuidanceInputs, z_T, seeds, step: int = 0) -> SamplerState:
    """The state at DDIM step `step` (0: the noisiest) from latents z_T f32[B,C,h,w] and one
    seed per image (or one for all)."""
    z_T = jnp.array(z_T, inputs.source.dtype)  # a copy: drivers donate the state
    expected = inputs.frozen.shape
    if z_T.shape != expected:
        raise ValueError(f"initial latent z_T is {z_T.shape}, expected {expected}")
    seeds = np.broadcast_to(np.asarray(seeds, np.uint32), (expected[0],))
    keys = jax.vmap(jax.random.PRNGKey)(jnp.asarray(seeds))
    return SamplerState(z=z_T, step=jnp.asarray(step, jnp.int32), keys=keys)


def eval_noise(keys, i, j, recursive_steps: int, shape, dtype=jnp.float32):
    """The noise of evaluation j of DDIM step i, per image: (source, eta, re-noise), f32[B,...].
    Key = fold_in(image key, i K + j), split in three."""

    def one(key):
        k = jax.random.fold_in(key, i * recursive_steps + j)
        ks = jax.random.split(k, 3)
        return tuple(jax.random.normal(kk, shape[1:], dtype) for kk in ks)

    return jax.vmap(one)(keys)


def clip_norm(d, clip):
    """Scale each image's d (f32[B,...]) down to L2 norm `clip` where it is larger (0: off);
    clip is one number or one per image (f32[B], data: 0 switches it off per image).
    Returns (d, the norm after clipping f32[B])."""
    norm = jnp.sqrt(jnp.sum(jnp.square(d), axis=tuple(range(1, d.ndim))))
    clip = jnp.broadcast_to(jnp.asarray(clip, norm.dtype), norm.shape)
    on = clip > 0
    factor = jnp.where(on & (norm > clip), clip / jnp.maximum(norm, 1e-30), 1.0)
    d = d * N.per_image(factor, d.ndim)
    return d, jnp.where(on, jnp.minimum(norm, clip), norm)


def remat(fn, policy: str, diffusers: bool = True):
    """`fn` under a rematerialization policy (mgjax.model.levers.REMAT_POLICIES);
    diffusers: fn applies diffusers models, whose blocks "blocks" checkpoints one by one (other
    models: whole)."""
    if policy == "none":
        return fn
    if policy == "blocks" and diffusers:
        from mgjax.model.remat import per_block

        return per_block(fn)
    return jax.checkpoint(fn, policy=REMAT_POLICIES[policy])


def numbers(g: Guidance, inputs: GuidanceInputs) -> N.Numeric:
    """The method's numbers per image: the inputs', or the method's repeated over the batch."""
    if inputs.numeric is not None:
        return inputs.numeric
    return N.of(g.method, inputs.source.shape[0], inputs.source.dtype)


def numbers_at(g: Guidance, num: N.Numeric, i) -> N.Numeric:
    """`num` as DDIM step i (int or traced) weighs its energy: the preservation weight grows
    linearly from preserve_weight at the first step to preserve_weight x preserve_ramp at the
    last (at ramp 1 it is multiplied by exactly 1)."""
    progress = jnp.asarray(i, num.preserve_ramp.dtype) / max(g.method.steps - 1, 1)
    gain = 1.0 + (num.preserve_ramp - 1.0) * progress
    return num.replace(preserve_weight=num.preserve_weight * gain)


def context(inputs: GuidanceInputs, flow_net, numeric: N.Numeric | None = None) -> Context:
    """The energy's view of the inputs; flow_net(a, b, iters, source_encoding=None) is the flow
    network. With the source's RAFT encoding in the inputs (source_cache), flows from the source
    reuse it. `numeric`: the per-image numbers (default: the inputs')."""
    cached = inputs.raft_source
    return Context(
        source=inputs.source,
        target_flow=inputs.target_flow,
        occlusion=inputs.occlusion,
        flow=flow_net,
        extras=inputs.extras or {},
        numeric=inputs.numeric if numeric is None else numeric,
        source_flow=None
        if cached is None  # Context.flow_from_source goes through flow_net
        else lambda b, iters: flow_net(255.0 * inputs.source, b, iters, cached),
    )


def weighted_steps(g: Guidance, inputs: GuidanceInputs, start: int, length: int) -> np.ndarray:
    """bool[length]: which DDIM steps from `start` have lambda_g * schedule[i] != 0 for some
    image, inside the guidance window (guide_from, guide_until, guide_every). Host-side."""
    schedule = np.asarray(inputs.schedule, np.float64)[start : start + length]
    schedule = schedule * g.plan.window[start : start + length]
    weights = np.asarray(numbers(g, inputs).guidance_weight, np.float64)
    return (schedule[:, None] * weights[None, :] != 0).any(axis=1)


def guided_steps(g: Guidance, inputs: GuidanceInputs, start: int, length: int) -> np.ndarray:
    """bool[length]: which DDIM steps from `start` evaluate the energy (all of them unless
    skip_unguided, which skips those whose lambda_g * schedule[i] is 0 for every image, or that
    lie outside the guidance window). Host-side: it reads the schedule and the guidance weights
    (the program's form depends on it, as a static mode)."""
    if not g.speed.skip_unguided:
        return np.ones(length, bool)
    return weighted_steps(g, inputs, start, length)


def step_evaluations(g: Guidance, inputs: GuidanceInputs, start: int, length: int) -> np.ndarray:
    """i32[length]: how many of the k_max evaluation slots steps start.. run (their phase's
    K; 1 for a step without weight when recurse_unguided is off). Host-side."""
    return g.plan.step_k(weighted_steps(g, inputs, start, length), start)


def energy_slots(g: Guidance, inputs: GuidanceInputs, start: int, length: int) -> np.ndarray:
    """bool[length, k_max]: the evaluations that compute the energy (the others log NaN)."""
    k = step_evaluations(g, inputs, start, length)
    j = np.arange(g.plan.k_max)[None, :]
    first = (j == 0) if g.plan.reuse_gradient else np.ones_like(j, bool)
    return guided_steps(g, inputs, start, length)[:, None] & (j < k[:, None]) & first


def chunk_mode(g: Guidance, inputs: GuidanceInputs, start: int, length: int) -> str:
    """How steps start..start+length-1 treat guidance: "guided" (every step evaluates the
    energy), "unguided" (none: the UNet alone) or "mixed" (a lax.cond per step)."""
    guided = guided_steps(g, inputs, start, length)
    return "guided" if guided.all() else "unguided" if not guided.any() else "mixed"


def step_weight(g: Guidance, inputs: GuidanceInputs, num: N.Numeric, i):
    """f32[B]: lambda_g * schedule[i] of each image, 0 outside the guidance window."""
    weight = num.guidance_weight * inputs.schedule[i]
    if g.plan.windowed:  # static: the window is a constant of the program
        weight = jnp.where(jnp.asarray(g.plan.window)[i], weight, 0.0)
    return weight


def evaluate(
    g: Guidance,
    params,
    raft,
    inputs: GuidanceInputs,
    z,
    i,
    j,
    keys,
    mode: str = "guided",
    given=None,
) -> Evaluation:
    """Guided evaluation j of DDIM step i from z_t = z f32[B,C,h,w].

    mode (static): "guided", "unguided" (the UNet alone; the energy is not compiled, its logs are
    NaN), "mixed" (a lax.cond on lambda_g * schedule[i] != 0 for some image) or "reuse" (the
    UNet alone, with the guidance term `given` f32[B,C,h,w] of the step's first evaluation:
    reuse_gradient). The numbers (lambda_g, clip, CFG scale, eta, the energy's weights) are read
    per image from inputs.numeric: runtime values, so new values never recompile.
    """
    m, sch = g.method, g.schedule
    num = numbers(g, inputs)
    view = lambda x: N.per_image(x, z.ndim)  # noqa: E731 - f32[B] -> f32[B,1,1,1]
    abar, abar_prev, t = sch.abar[i], sch.abar_prev[i], sch.timesteps[i]
    s = jnp.sqrt(1.0 - abar)
    n_src, n_eta, n_re = eval_noise(keys, i, j, g.plan.k_max, z.shape, z.dtype)
    if inputs.trajectory is not None:
        source_latent = inputs.trajectory[i]
    else:
        source_latent = ddim.add_noise(inputs.z0, n_src, abar)
    z = jnp.where(inputs.frozen, source_latent, z)
    weight = step_weight(g, inputs, num, i)  # f32[B]
    policy = g.speed.remat
    # static: without switches.cfg every scale is 1 and the UNet runs on the prompt alone
    cfg_scale = view(num.cfg_scale) if g.switches.cfg else 1.0

    def eps_of(p, z_in):
        return cfg_eps(g.sd, p, z_in, t, inputs.cond, inputs.uncond, cfg_scale, skip_at_one=True)

    def eps_cond_gradient(p, z_in):
        return cfg_eps_cond_gradient(g.sd, p, z_in, t, inputs.cond, inputs.uncond, cfg_scale)

    cond_only = m.cfg_gradient == "cond" and g.switches.cfg  # static
    unet = remat(eps_cond_gradient if cond_only else eps_of, policy)
    decode = remat(g.sd.decode, policy)
    if m.raft_gradient == "full":
        raft = raft.replace_config(detach=False)
    unroll = {"unroll": True} if g.loops == "unrolled" else {}  # a Raft's keyword

    def flow_net(a, b, iters, src=None):
        run = lambda r, a, b, src: r(a, b, iters=iters, source=src, **unroll)  # noqa: E731
        return remat(run, policy, diffusers=False)(raft, a, b, src)

    ctx = context(inputs, flow_net, numbers_at(g, num, i))

    def energy(z_in):
        eps = unet(params, z_in)
        x = decode(params, ddim.predict_x0(z_in, eps, abar)) * 0.5 + 0.5
        e, terms = g.energy(x, ctx)
        logs = {"energy": e, **{k: terms[k] for k in g.energy.log_names}}
        return e.sum(), (eps, logs, x)

    def guided(z):
        (_, (eps, logs, x)), grad = jax.value_and_grad(energy, has_aux=True)(z)
        d, d_norm = clip_norm(view(s * weight) * grad, num.clip)
        if g.plan.rescaled:  # static: rescale_guidance with fewer evaluations than k_max
            gain = jnp.asarray(g.plan.gain)[i]
            d, d_norm = gain * d, gain * d_norm
        return eps, d, grad, logs, x, d_norm

    def unguided(z, d=None):
        eps = eps_of(params, z)
        if g.snapshot_every:
            x = g.sd.decode(params, ddim.predict_x0(z, eps, abar)) * 0.5 + 0.5
        else:
            x = jnp.zeros(inputs.source.shape, g.dtype)
        nan = jnp.full(z.shape[:1], jnp.nan, g.dtype)
        logs = {k: nan for k in ("energy", *g.energy.log_names)}
        zero = jnp.zeros_like(z)
        if d is None:
            return eps, zero, zero, logs, x, jnp.zeros(z.shape[:1], g.dtype)
        d_norm = jnp.sqrt(jnp.sum(jnp.square(d), axis=tuple(range(1, d.ndim))))
        return eps, d, zero, logs, x, d_norm

    if mode == "unguided":
        eps, d, grad, logs, x, d_norm = unguided(z)
    elif mode == "mixed":
        eps, d, grad, logs, x, d_norm = lax.cond(jnp.any(weight != 0), guided, unguided, z)
    elif mode == "guided":
        eps, d, grad, logs, x, d_norm = guided(z)
    elif mode == "reuse":
        eps, d, grad, logs, x, d_norm = unguided(z, given)
    else:
        raise ValueError(f"mode must be guided, unguided, mixed or reuse, got {mode!r}")
    eps_guided = eps + d
    if g.switches.stochastic:  # static: some image has eta > 0 (eta 0 ones add 0 x noise)
        z_prev = ddim.step(z, eps_guided, abar, abar_prev, view(num.eta), n_eta)
    else:
        z_prev = ddim.step(z, eps_guided, abar, abar_prev)
    logs = dict(logs)
    logs["noise_norm"] = jnp.sqrt(jnp.sum(jnp.square(eps_guided), axis=(1, 2, 3)))
    logs["guidance_norm"] = d_norm
    z_next = ddim.renoise(z_prev, abar, abar_prev, n_re)
    return Evaluation(z_prev, z_next, eps, d, grad, x, logs)


def step_k(g: Guidance, inputs: GuidanceInputs, i):
    """i32[]: the evaluations DDIM step i runs (traced; Plan.step_k's rule)."""
    k = jnp.asarray(g.plan.phase_k)[i]
    if g.plan.recurse_unguided:
        return k
    weighted = jnp.any(step_weight(g, inputs, numbers(g, inputs), i) != 0)
    return jnp.where(weighted, k, 1)


def recursive_step(g: Guidance, params, raft, inputs, z, i, keys, mode: str = "guided"):
    """DDIM step i with K recursive evaluations: (z_prev f32[B,C,h,w], logs name -> f32[K,B],
    the first evaluation's one-step estimate f32[B,H,W,3] (a scalar 0 without snapshots)).

    With the cost levers (mgjax.method.cost.Plan): K = k_max slots, of which the step's own K
    run (a lax.cond per slot; a skipped slot keeps the latent and logs NaN); reuse_gradient
    evaluates the energy in the first and applies its guidance term in the others."""
    p = g.plan
    k = step_k(g, inputs, i) if p.varying_k else None
    reuse = p.reuse_gradient and mode != "unguided"

    def slot(z_t, j, mode, given=None):
        ev = evaluate(g, params, raft, inputs, z_t, i, j, keys, mode, given)
        return (ev.z_next, ev.z_prev, ev.x0, ev.logs), ev.guidance

    def one(carry, j):
        z_t, z_prev, snap, given = carry
        run = lambda: slot(z_t, j, "reuse" if reuse else mode, given)[0]  # noqa: E731
        if k is None:
            z_next, z_prev, x0, logs = run()
        else:  # a skipped slot keeps the latent it was given
            _, _, x0_shape, log_shapes = jax.eval_shape(run)
            skip = lambda: (z_t, z_prev, jnp.zeros(x0_shape.shape, x0_shape.dtype),  # noqa: E731
                            nan_logs(log_shapes))  # fmt: skip
            z_next, z_prev, x0, logs = lax.cond(j < k, run, skip)
        if g.snapshot_every:
            snap = jnp.where(j == 0, x0, snap)
        return (z_next, z_prev, snap, given), logs

    snap0 = jnp.zeros(inputs.source.shape if g.snapshot_every else (), g.dtype)
    if not reuse:
        (_, z_prev, snap, _), logs = lax.scan(one, (z, z, snap0, None), jnp.arange(p.k_max))
        return z_prev, logs, snap
    # the first slot evaluates the energy; the others apply its guidance term
    (z_next, z_prev, x0, logs0), given = slot(z, 0, mode)
    snap = x0 if g.snapshot_every else snap0
    (_, z_prev, snap, _), logs = lax.scan(
        one, (z_next, z_prev, snap, given), jnp.arange(1, p.k_max)
    )
    logs = {name: jnp.concatenate([logs0[name][None], logs[name]]) for name in logs0}
    return z_prev, logs, snap


def nan_logs(shapes: dict) -> dict:
    """Logs of a skipped evaluation slot: NaN of each log's shape."""
    return {name: jnp.full(x.shape, jnp.nan, x.dtype) for name, x in shapes.items()}


def image_energy(g: Guidance, raft, inputs: GuidanceInputs, x):
    """The energy of final images x f32[B,H,W,3] in [0, 1], weighed as the last step weighs it:
    (f32[B], logs name -> f32[B])."""
    flow_net = lambda a, b, iters, src=None: raft(a, b, iters=iters, source=src)  # noqa: E731
    num = numbers_at(g, numbers(g, inputs), g.method.steps - 1)
    e, terms = g.energy(x, context(inputs, flow_net, num))
    return e, {k: terms[k] for k in g.energy.log_names}


def paste_weight(frozen, factor: int, band: int):
    """Where the source's pixels replace the edit's, f32[B,H,W,1] in [0, 1], from a frozen mask
    bool[B,C,h,w]: 1 where every channel of the latent pixel above is frozen and `band` latent
    pixels (factor x band image pixels) or more from any editable one, falling linearly (for a
    straight edge) to 0 at the editable region's edge; 0 throughout the editable region. The
    image's border counts as frozen, so it does not thin the weight there."""
    keep = jnp.all(frozen, axis=1).astype(jnp.float32)
    keep = jnp.repeat(jnp.repeat(keep, factor, axis=1), factor, axis=2)[..., None]
    r = (band * factor) // 2
    if r == 0:
        return keep
    window, ones = (1, 2 * r + 1, 2 * r + 1, 1), (1, 1, 1, 1)
    # erode by r (outside the frame counts as frozen), then average over the same window's
    # pixels inside the frame: 0 up to r pixels in, 1 from 2r in. The count of those pixels is
    # a host constant (a reduce-window over ones would be folded at compile time, slowly).
    inner = lax.reduce_window(keep, jnp.inf, lax.min, window, ones, "SAME")
    total = lax.reduce_window(inner, 0.0, lax.add, window, ones, "SAME")
    h, w = keep.shape[1:3]
    count = [np.minimum(np.arange(n), r) + np.minimum(np.arange(n)[::-1], r) + 1 for n in (h, w)]
    return total / np.outer(*count)[None, :, :, None].astype(np.float32)


def final_image(g: Guidance, params, inputs: GuidanceInputs, z):
    """Final latents z f32[B,C,h,w] decoded to images f32[B,H,W,3] in [0, 1] (not clamped; not a
    one-step estimate); with method.paste_source the source's pixels replace the decoded ones
    where the frozen mask holds (`paste_weight`)."""
    x = g.sd.decode(params, z) * 0.5 + 0.5
    if not g.method.paste_source:  # static
        return x
    a = paste_weight(inputs.frozen, g.sd.vae_factor, g.method.paste_band).astype(x.dtype)
    return a * inputs.source.astype(x.dtype) + (1.0 - a) * x


def final_energy(g: Guidance, params, raft, inputs: GuidanceInputs, z):
    """The energy of final latents z f32[B,C,h,w], as `final_image` makes them, as
    `image_energy`. Differentiable end to end: jax.grad of it after step_chunk differentiates a
    whole guided run, with respect to its numbers too."""
    return image_energy(g, raft, inputs, final_image(g, params, inputs, z))


def step_chunk(
    g: Guidance, params, raft, inputs, state: SamplerState, length: int, mode: str = "guided"
):
    """`length` DDIM steps from state.step as one lax.scan: (state, logs name -> f32[L,K,B],
    snapshots f32[L,B,H,W,3] (f32[L] zeros without snapshot_every))."""

    def body(z, i):
        z_prev, logs, snap = recursive_step(g, params, raft, inputs, z, i, state.keys, mode)
        return z_prev, (logs, snap)

    steps = state.step + jnp.arange(length)
    z, (logs, snaps) = lax.scan(body, state.z, steps)
    return state.replace(z=z, step=state.step + length), logs, snaps
