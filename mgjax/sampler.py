"""The Motion Guidance sampler: guided DDIM with recursive denoising, as jitted lax.scan chunks.

One guided evaluation at DDIM step i (timestep t, abar, s = sqrt(1 - abar)), for every image of
the batch at once (MOTION_GUIDANCE.md, "The guided sampler"):

  1. z_t[frozen] = g_t[frozen] (the source trajectory at step i, or sqrt(abar) z0 + s noise);
  2. eps = eps_u + w_cfg (eps_c - eps_u), one UNet call on the batch [uncond, cond];
  3. x = VAE.decode((z_t - s eps) / sqrt(abar)), mapped from [-1, 1] to [0, 1];
  4. E = lambda_flow L_flow + lambda_color L_color (mgjax.energy), RAFT(source, x);
  5. grad = dE/dz_t through RAFT, the decoder and the UNet (both CFG branches);
  6. d = s lambda_g schedule[i] grad, clipped to L2 norm `clip` per image;
  7. z_prev = DDIM(z_t, eps + d);
  8. repeated K times per step, re-noising z_prev back to t in between; the K-th z_prev is kept.

A chunk of DDIM steps is one `lax.scan` (the K evaluations an inner scan), compiled once per
chunk length and kind (all steps guided, all unguided, mixed) and reused; the weights are jit
arguments. With `loops="unrolled"` (the default on CPU, mgjax.levers.LOOPS) the same
evaluations run one compiled call each, RAFT unrolled. The state is a flax.struct dataclass, so
a run can stop after any chunk and resume. Each image has its own PRNG key, so an image's result
does not depend on what else is in the batch.
"""

import dataclasses
import math
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct
from jax import lax

from flow.errors import UserError
from flow.raft import Raft
from mgjax import ddim
from mgjax.energy import Context, Energy, EnergyWeights, MotionEnergy, occlusion_mask
from mgjax.levers import LOOPS, RAFT_GRADIENTS, REMAT_POLICIES, resolve_loops
from mgjax.source import cfg_eps


@dataclasses.dataclass(frozen=True)
class GuidanceConfig:
    """Static settings (hashable: part of the compile key). Defaults are the reference's."""

    num_steps: int = 500
    recursive_steps: int = 10  # K
    guidance_weight: float = 300.0  # lambda_g
    flow_weight: float = 3.0
    color_weight: float = 100.0
    clip: float = 200.0  # max L2 norm of the noise update d per image; 0 disables
    cfg_scale: float = 7.5
    eta: float = 0.0
    occlusion_masking: bool = True
    oracle: bool = False
    raft_iters: int = 5
    raft_gradient: str = "detached"  # RAFT_GRADIENTS (mgjax.levers)
    chunk: int = 10  # DDIM steps per compiled scan (loops "unrolled": per checkpoint and log)
    snapshot_every: int = 0  # keep the decoded x0 estimate every N steps (0: none)
    remat: str = "none"  # REMAT_POLICIES: none | dots | full | blocks
    # Steps whose guidance multiplier (lambda_g * schedule[i]) is 0 run the UNet alone: no
    # decoder, RAFT or backward pass; their energy logs are NaN (not evaluated).
    skip_unguided: bool = True
    loops: str = "auto"  # LOOPS (mgjax.levers): scan | unrolled | auto (unrolled on CPU)
    # Encode each edit's source with RAFT once (Edit.raft_source) instead of in every guided
    # evaluation: the same flow, less work. Off by default for now: it changes the rounding,
    # and the toy pack's guided figures, measured without it, would have to be measured again.
    source_cache: bool = False

    def __post_init__(self):
        checks = (
            (self.num_steps >= 1, "num_steps must be >= 1"),
            (self.recursive_steps >= 1, "recursive_steps must be >= 1"),
            (self.chunk >= 1, "chunk must be >= 1"),
            (self.clip >= 0, "clip must be >= 0 (0 disables clipping)"),
            (self.eta >= 0, "eta must be >= 0"),
            (self.raft_iters >= 1, "raft_iters must be >= 1"),
            (
                self.raft_gradient in RAFT_GRADIENTS,
                f"raft_gradient must be one of {RAFT_GRADIENTS}, got {self.raft_gradient!r}",
            ),
            (self.snapshot_every >= 0, "snapshot_every must be >= 0"),
            (self.remat in REMAT_POLICIES, f"remat must be one of {tuple(REMAT_POLICIES)}"),
            (self.loops in LOOPS, f"loops must be one of {LOOPS}, got {self.loops!r}"),
        )
        for ok, message in checks:
            if not ok:
                raise UserError(message)

    @property
    def energy_weights(self) -> EnergyWeights:
        return EnergyWeights(flow=self.flow_weight, color=self.color_weight)

    def paper_energy(self) -> MotionEnergy:
        """The energy these settings describe (the sampler's default)."""
        return MotionEnergy(self.flow_weight, self.color_weight, self.raft_iters, self.oracle)


@struct.dataclass
class Edit:
    """Per-edit inputs of a batch of B images (all arrays; built by `GuidedSampler.prepare`)."""

    source: jnp.ndarray  # f32[B,H,W,3] in [0, 1]
    target_flow: jnp.ndarray  # f32[B,H,W,2]
    occlusion: jnp.ndarray  # f32[B,H,W,1], 1 = used by the colour loss
    frozen: jnp.ndarray  # bool[B,C,h,w], True = copied from the source trajectory
    cond: jnp.ndarray  # f32[B,L,D] prompt embedding
    uncond: jnp.ndarray  # f32[B,L,D] embedding of ""
    schedule: jnp.ndarray  # f32[S] guidance multiplier per DDIM step, index 0 = noisiest
    trajectory: jnp.ndarray | None = None  # f32[S,B,C,h,w] source latents, sampling order
    z0: jnp.ndarray | None = None  # f32[B,C,h,w] source latent, when there is no trajectory
    extras: dict | None = None  # name -> [B, ...] arrays for custom energies (Context.extras)
    # RAFT's encoding of 255 * source (flow.raft.encode_source), the same in every evaluation:
    # computed once by prepare; None: each evaluation encodes the source itself
    raft_source: dict | None = None


# The batch axis of each per-image field of Edit (the schedule is shared by the batch).
EDIT_BATCH_AXIS = {
    "source": 0,
    "target_flow": 0,
    "occlusion": 0,
    "frozen": 0,
    "cond": 0,
    "uncond": 0,
    "z0": 0,
    "trajectory": 1,
}


def map_images(edit: Edit, fn) -> Edit:
    """`edit` with fn(array, batch_axis) applied to each per-image array, extras included
    (absent fields stay absent); the schedule is kept."""
    changes = {
        k: fn(getattr(edit, k), axis)
        for k, axis in EDIT_BATCH_AXIS.items()
        if getattr(edit, k) is not None
    }
    for name in ("extras", "raft_source"):
        if getattr(edit, name):
            changes[name] = {k: fn(v, 0) for k, v in getattr(edit, name).items()}
    return edit.replace(**changes)


@struct.dataclass
class SamplerState:
    z: jnp.ndarray  # f32[B,C,h,w] latent at the start of DDIM step `step`
    step: jnp.ndarray  # i32[] next DDIM step (0 = noisiest)
    keys: jnp.ndarray  # u32[B,2] one PRNG key per image


class DivergenceError(RuntimeError):
    """The latents or the energy became NaN/inf; `bad` lists the batch images affected."""

    def __init__(self, message: str, bad: tuple[int, ...] = ()):
        super().__init__(message)
        self.bad = tuple(bad)


def eval_noise(keys, i, j, recursive_steps: int, shape, dtype=jnp.float32):
    """The noise of evaluation j of DDIM step i, per image: (source, eta, re-noise), f32[B,...].

    Public so that a reference implementation can be fed exactly the same noise.
    """

    def one(key):
        k = jax.random.fold_in(key, i * recursive_steps + j)
        ks = jax.random.split(k, 3)
        return tuple(jax.random.normal(kk, shape[1:], dtype) for kk in ks)

    return jax.vmap(one)(keys)


def clip_norm(d, clip: float):
    """Scale each image's d (f32[B,...]) down to L2 norm `clip` where it is larger (0: off)."""
    norm = jnp.sqrt(jnp.sum(jnp.square(d), axis=tuple(range(1, d.ndim))))
    if clip:
        factor = jnp.where(norm > clip, clip / jnp.maximum(norm, 1e-30), 1.0)
        d = d * factor.reshape((-1,) + (1,) * (d.ndim - 1))
    return d, jnp.minimum(norm, clip) if clip else norm


class GuidedSampler:
    """Motion-guided DDIM over a StableDiffusion seam and a RAFT network.

    `sd` is `mgjax.sd.StableDiffusion` (or anything with its `eps`, `decode`, `params`,
    `latent_channels`, `vae_factor` members). `energy` (an `mgjax.energy.Energy`) defaults to
    the paper's, `config.paper_energy()`; with another energy the config's flow/colour
    weights, raft_iters and oracle settings are unused.
    """

    def __init__(
        self,
        sd,
        raft: Raft,
        config: GuidanceConfig = GuidanceConfig(),
        energy: Energy | None = None,
    ):
        self.sd = sd
        self.raft = raft
        self.config = config
        self.energy = config.paper_energy() if energy is None else energy
        if not isinstance(self.energy, Energy):
            raise UserError(
                f"energy must be an mgjax.energy.Energy, got {type(self.energy).__name__}"
            )
        # what every chunk logs, name -> f32[L, K, B]
        self.log_names = ("energy", *self.energy.log_names, "noise_norm", "guidance_norm")
        self.schedule = ddim.make_schedule(config.num_steps)
        self.dtype = getattr(sd, "out_dtype", jnp.float32)  # float64 only in exactness tests
        self.traces = 0  # how many times a chunk function was traced (a retrace tripwire)
        self.compile_seconds = 0.0  # time spent tracing + compiling chunk functions
        # The carried state is donated: its buffers are reused for the next chunk's state.
        self._chunk = jax.jit(
            self._chunk_fn, static_argnames=("length", "mode"), donate_argnames=("state",)
        )
        self.loops = resolve_loops(config.loops)
        # loops "unrolled": one evaluation per call; the latent it advances is donated
        self._evaluation = jax.jit(
            self._evaluation_fn, static_argnames=("mode",), donate_argnames=("z",)
        )
        self._compiled: dict = {}
        self._final = None  # jitted final_energy
        self._encode_source = jax.jit(lambda raft, image: raft.encode_source(image))

    # ------------------------------------------------------------------ inputs

    def prepare(
        self,
        source,
        target_flow,
        cond,
        uncond,
        frozen=None,
        trajectory=None,
        z0=None,
        schedule=None,
        extras=None,
        encode: bool = True,
    ) -> Edit:
        """Validate and assemble the per-edit inputs; every shape problem is a UserError here,
        before anything is compiled. Arrays: source [B,H,W,3] in [0,1]; target_flow [B,H,W,2];
        frozen [B,C,h,w] or [B,1,h,w] (True = frozen) or None; trajectory [S,B,C,h,w] or z0
        [B,C,h,w] (one of them); schedule [S] or None (all ones); extras {name: [B, ...]} for
        the energy (or None). encode: with config.source_cache, encode the source now
        (`encode_source`); batch editing does it after sharding instead."""
        cfg = self.config
        source = np.asarray(source, self.dtype)
        flow = np.asarray(target_flow, self.dtype)
        if source.ndim != 4 or source.shape[-1] != 3:
            raise UserError(f"source image must be (B, H, W, 3), got shape {source.shape}")
        b, h, w, _ = source.shape
        factor = self.sd.vae_factor * 8
        if h % factor or w % factor:
            raise UserError(
                f"image size {h}x{w} is not a multiple of {factor} (VAE factor "
                f"{self.sd.vae_factor} x RAFT's 8); resize or crop to "
                f"{h // factor * factor}x{w // factor * factor}"
            )
        if min(h, w) < 64:
            raise UserError(f"image must be at least 64x64 for RAFT, got {h}x{w}")
        if flow.shape != (b, h, w, 2):
            raise UserError(
                f"target flow shape {flow.shape} does not match the image: expected {(b, h, w, 2)}"
            )
        if not np.isfinite(flow).all():
            raise UserError("target flow contains NaN or inf values; fix the flow file")
        if not np.isfinite(source).all():
            raise UserError("source image contains NaN or inf values")
        lat = (b, self.sd.latent_channels, h // self.sd.vae_factor, w // self.sd.vae_factor)
        if frozen is None:
            frozen = np.zeros(lat, bool)
        frozen = np.asarray(frozen)
        if frozen.ndim == 4 and frozen.shape[1] == 1:
            frozen = np.broadcast_to(frozen, lat)
        if frozen.shape != lat:
            raise UserError(
                f"frozen mask shape {frozen.shape} does not match the latent: expected {lat} "
                f"(or {(b, 1) + lat[2:]})"
            )
        s = cfg.num_steps
        if schedule is None:
            schedule = np.ones(s, np.float32)
        schedule = np.asarray(schedule, np.float32).reshape(-1)
        if schedule.shape != (s,):
            raise UserError(
                f"guidance schedule has {schedule.size} entries but there are {s} DDIM steps"
            )
        if not np.isfinite(schedule).all():
            raise UserError("guidance schedule contains NaN or inf values")
        if (trajectory is None) == (z0 is None):
            raise UserError("give exactly one of trajectory (cached source latents) or z0")
        if trajectory is not None:
            trajectory = np.asarray(trajectory, self.dtype)
            if trajectory.shape[0] != s:
                raise UserError(
                    f"source trajectory has {trajectory.shape[0]} steps but there are {s} "
                    "DDIM steps; regenerate it with the same number of steps"
                )
            if trajectory.shape[1:] != lat:
                raise UserError(
                    f"source trajectory latents are {trajectory.shape[1:]}, expected {lat}"
                )
            if not np.isfinite(trajectory).all():
                raise UserError("source trajectory contains NaN or inf values")
            trajectory = jnp.asarray(trajectory)
        else:
            z0 = np.asarray(z0, self.dtype)
            if z0.shape != lat:
                raise UserError(f"source latent z0 is {z0.shape}, expected {lat}")
            z0 = jnp.asarray(z0)
        cond, uncond = (
            jnp.broadcast_to(jnp.asarray(c, self.dtype), (b,) + c.shape[-2:])
            for c in (cond, uncond)
        )
        extras = {} if extras is None else dict(extras)
        for name, x in extras.items():
            if np.ndim(x) == 0 or np.shape(x)[0] != b:
                raise UserError(
                    f"energy extra {name!r} has shape {np.shape(x)}; extras are per edit, "
                    f"with the batch ({b}) first"
                )
        extras = {k: jnp.asarray(v) for k, v in extras.items()}
        occ = (
            occlusion_mask(jnp.asarray(flow))
            if cfg.occlusion_masking
            else jnp.ones((b, h, w, 1), jnp.float32)
        )
        edit = Edit(
            source=jnp.asarray(source),
            target_flow=jnp.asarray(flow),
            occlusion=occ,
            frozen=jnp.asarray(frozen, bool),
            cond=cond,
            uncond=uncond,
            schedule=jnp.asarray(schedule),
            trajectory=trajectory,
            z0=z0,
            extras=extras,
        )
        return self.encode_source(edit) if encode else edit

    def encode_source(self, edit: Edit) -> Edit:
        """With config.source_cache, `edit` with RAFT's encoding of its source images
        (Edit.raft_source), computed where the source lies: after the edit is sharded, each
        device encodes its own images, as a single edit would (prepare calls this; so does batch
        editing after sharding). Without it, `edit` unchanged."""
        if not self.config.source_cache:
            return edit
        return edit.replace(raft_source=self._encode_source(self.raft, 255.0 * edit.source))

    def init(self, edit: Edit, z_T, seeds) -> SamplerState:
        """Start state from z_T f32[B,C,h,w]; seeds: one int per image (or a single int)."""
        z_T = jnp.array(z_T, self.dtype)  # a copy: the state is donated to the first chunk
        expected = edit.frozen.shape
        if z_T.shape != expected:
            raise UserError(f"initial latent z_T is {z_T.shape}, expected {expected}")
        seeds = np.broadcast_to(np.asarray(seeds, np.uint32), (expected[0],))
        keys = jax.vmap(jax.random.PRNGKey)(jnp.asarray(seeds))
        return SamplerState(z=z_T, step=jnp.zeros((), jnp.int32), keys=keys)

    # ------------------------------------------------------------------ one evaluation

    def cfg_eps(self, params, z, t, edit: Edit):
        """Classifier-free guided noise estimate for the edit's prompts."""
        return cfg_eps(
            self.sd, params, z, t, edit.cond, edit.uncond, self.config.cfg_scale, skip_at_one=True
        )

    def _remat(self, fn, diffusers: bool = True):
        """`fn` under the configured rematerialization policy; diffusers: fn applies diffusers
        models (remat "blocks" checkpoints their blocks one by one, and other models whole)."""
        if self.config.remat == "none":
            return fn
        if self.config.remat == "blocks" and diffusers:
            from mgjax.remat import per_block

            return per_block(fn)
        return jax.checkpoint(fn, policy=REMAT_POLICIES[self.config.remat])

    def _evaluate(self, params, raft, edit: Edit, z, i, j, keys, mode: str | None = None):
        """Guided evaluation j of DDIM step i: returns (z_prev, renoised z_t, logs, x).

        mode (static, from the host's view of the chunk's guidance multipliers): "guided" (all
        nonzero, or skip_unguided off), "unguided" (all zero: the UNet alone) or "mixed" (a
        `lax.cond` per step; a lone toy evaluation on XLA:CPU took 709 ms with it and 416 ms
        without, BENCHMARKS.md). None: what the config alone says (mixed unless skip_unguided
        is off or lambda_g is 0)."""
        cfg, sch = self.config, self.schedule
        abar, abar_prev, t = sch.abar[i], sch.abar_prev[i], sch.timesteps[i]
        s = jnp.sqrt(1.0 - abar)
        n_src, n_eta, n_re = eval_noise(keys, i, j, cfg.recursive_steps, z.shape, z.dtype)
        if edit.trajectory is not None:
            g = edit.trajectory[i]
        else:
            g = ddim.add_noise(edit.z0, n_src, abar)
        z = jnp.where(edit.frozen, g, z)
        weight = cfg.guidance_weight * edit.schedule[i]
        unet = self._remat(lambda p, z_in: self.cfg_eps(p, z_in, t, edit))
        decode = self._remat(self.sd.decode)
        if cfg.raft_gradient == "full":
            raft = raft.replace_config(detach=False)
        unroll = {"unroll": True} if self.loops == "unrolled" else {}  # a Raft's keyword
        flow_net = lambda a, b, iters, src=None: self._remat(  # noqa: E731
            lambda r, a, b, src: r(a, b, iters=iters, source=src, **unroll), diffusers=False
        )(raft, a, b, src)

        ctx = self.context(edit, flow_net)

        def energy(z_in):
            eps = unet(params, z_in)
            x = decode(params, ddim.predict_x0(z_in, eps, abar)) * 0.5 + 0.5
            e, terms = self.energy(x, ctx)
            logs = {"energy": e, **{k: terms[k] for k in self.energy.log_names}}
            return e.sum(), (eps, logs, x)

        def guided(z):
            (_, (eps, logs, x)), grad = jax.value_and_grad(energy, has_aux=True)(z)
            d, d_norm = clip_norm(s * weight * grad, cfg.clip)
            return eps + d, logs, x, d_norm

        def unguided(z):
            eps = self.cfg_eps(params, z, t, edit)
            if cfg.snapshot_every:
                x = self.sd.decode(params, ddim.predict_x0(z, eps, abar)) * 0.5 + 0.5
            else:
                x = jnp.zeros(edit.source.shape, self.dtype)
            nan = jnp.full(z.shape[:1], jnp.nan, self.dtype)
            logs = {k: nan for k in ("energy", *self.energy.log_names)}
            return eps, logs, x, jnp.zeros(z.shape[:1], self.dtype)

        if mode is None:
            never = cfg.guidance_weight == 0
            mode = "guided" if not cfg.skip_unguided else "unguided" if never else "mixed"
        if mode == "unguided":  # no energy compiled
            eps, logs, x, d_norm = unguided(z)
        elif mode == "mixed":
            eps, logs, x, d_norm = lax.cond(weight != 0, guided, unguided, z)
        else:
            eps, logs, x, d_norm = guided(z)
        z_prev = ddim.step(z, eps, abar, abar_prev, cfg.eta, n_eta if cfg.eta else None)
        logs = dict(logs)
        logs["noise_norm"] = jnp.sqrt(jnp.sum(jnp.square(eps), axis=(1, 2, 3)))
        logs["guidance_norm"] = d_norm
        return z_prev, ddim.renoise(z_prev, abar, abar_prev, n_re), logs, x

    @staticmethod
    def context(edit: Edit, flow_net) -> Context:
        """The energy's view of an edit; flow_net(a, b, iters) is the flow network. When the
        edit carries its source's RAFT encoding (source_cache), flows from the source call
        flow_net(255 * source, b, iters, edit.raft_source) instead."""
        cached = edit.raft_source
        return Context(
            source=edit.source,
            target_flow=edit.target_flow,
            occlusion=edit.occlusion,
            flow=flow_net,
            extras=edit.extras or {},
            source_flow=None
            if cached is None  # Context.flow_from_source goes through flow_net
            else lambda b, iters: flow_net(255.0 * edit.source, b, iters, cached),
        )

    def final_energy(self, edit: Edit, images) -> dict[str, np.ndarray]:
        """The energy and its terms on final images f32[B,H,W,3] in [0, 1] (not a one-step
        estimate): name -> f32[B]."""

        if self._final is None:

            def measure(raft, x, edit):
                ctx = self.context(edit, lambda a, b, iters, s=None: raft(a, b, iters, source=s))
                e, terms = self.energy(x, ctx)
                return {"energy": e, **{k: terms[k] for k in self.energy.log_names}}

            self._final = jax.jit(measure)
        out = self._final(self.raft, jnp.asarray(images, self.dtype), edit)
        return {k: np.asarray(v) for k, v in out.items()}

    def guided_steps(self, edit: Edit, start: int, length: int) -> np.ndarray:
        """bool[length]: which DDIM steps from `start` evaluate the energy (all of them unless
        skip_unguided, which skips those whose lambda_g * schedule[i] is 0)."""
        if not self.config.skip_unguided:
            return np.ones(length, bool)
        weights = np.asarray(edit.schedule, np.float64)[start : start + length]
        return weights * self.config.guidance_weight != 0

    def chunk_mode(self, edit: Edit, start: int, length: int) -> str:
        """How the chunk of DDIM steps start..start+length-1 treats guidance (see _evaluate)."""
        guided = self.guided_steps(edit, start, length)
        return "guided" if guided.all() else "unguided" if not guided.any() else "mixed"

    def _chunk_fn(
        self, params, raft, edit: Edit, state: SamplerState, length: int, mode: str | None = None
    ):
        self.traces += 1
        cfg = self.config

        def ddim_step(z, i):
            def recursive(carry, j):
                z_t, _, snap = carry
                z_prev, z_next, logs, x = self._evaluate(
                    params, raft, edit, z_t, i, j, state.keys, mode
                )
                if cfg.snapshot_every:
                    snap = jnp.where(j == 0, x, snap)
                return (z_next, z_prev, snap), logs

            snap0 = jnp.zeros(edit.source.shape if cfg.snapshot_every else (), self.dtype)
            (_, z_prev, snap), logs = lax.scan(
                recursive, (z, z, snap0), jnp.arange(cfg.recursive_steps)
            )
            return z_prev, (logs, snap)

        steps = state.step + jnp.arange(length)
        z, (logs, snaps) = lax.scan(ddim_step, state.z, steps)
        new = state.replace(z=z, step=state.step + length)
        return new, logs, snaps  # logs: name -> f32[length, K, B]

    # ------------------------------------------------------------------ driving

    def run_chunk(self, edit: Edit, state: SamplerState, length: int | None = None):
        """Advance `length` DDIM steps (default: the configured chunk, cut at the end)."""
        left = self.config.num_steps - int(state.step)
        length = min(length or self.config.chunk, left)
        if length <= 0:
            raise UserError("the sampler state is already at the last DDIM step")
        if self.loops == "unrolled":
            return self._run_unrolled(edit, state, length)
        mode = self.chunk_mode(edit, int(state.step), length)
        args = (self.sd.params, self.raft, edit, state)
        return self._compiled_for(self._chunk, args, length=length, mode=mode)(*args)

    def _compiled_for(self, jitted, args, **static):
        """`jitted` compiled for these arguments' shapes and the static ones, cached; compiled
        ahead of time, so that compile time is measured apart (compile_seconds)."""
        leaves, treedef = jax.tree_util.tree_flatten(args)
        avals = tuple((jnp.shape(x), jnp.result_type(x)) for x in leaves)
        key = (jitted, tuple(sorted(static.items())), treedef, avals)
        fn = self._compiled.get(key)
        if fn is None:
            t = time.perf_counter()
            fn = jitted.lower(*args, **static).compile()
            self.compile_seconds += time.perf_counter() - t
            self._compiled[key] = fn
        return fn

    def _evaluation_fn(self, params, raft, edit: Edit, z, i, j, keys, mode: str):
        self.traces += 1
        return self._evaluate(params, raft, edit, z, i, j, keys, mode)

    def _run_unrolled(self, edit: Edit, state: SamplerState, length: int):
        """run_chunk with loops "unrolled": the scan's evaluations in the same order, with the
        same noise, one compiled call each; guided and unguided steps (skip_unguided) are two
        compiled evaluations chosen per step on the host, so no lax.cond."""
        cfg, start = self.config, int(state.step)
        z, logs, snaps, fns = state.z, [], [], {}
        for n, guided in enumerate(self.guided_steps(edit, start, length)):
            i = jnp.asarray(start + n, jnp.int32)
            z_t, step_logs = z, []
            for j in range(cfg.recursive_steps):
                jj = jnp.asarray(j, jnp.int32)
                args = (self.sd.params, self.raft, edit, z_t, i, jj, state.keys)
                if guided not in fns:
                    mode = "guided" if guided else "unguided"
                    fns[guided] = self._compiled_for(self._evaluation, args, mode=mode)
                z, z_t, out, x = fns[guided](*args)
                step_logs.append(out)
                if j == 0:
                    snaps.append(x if cfg.snapshot_every else jnp.zeros((), self.dtype))
            logs.append({k: jnp.stack([o[k] for o in step_logs]) for k in step_logs[0]})
        logs = {k: jnp.stack([o[k] for o in logs]) for k in logs[0]}
        new = state.replace(z=z, step=state.step + length)
        return new, logs, jnp.stack(snaps)

    def advance(self, edit: Edit, state: SamplerState):
        """One chunk, checked: (state, logs name -> f32[L, K, B] numpy, snapshots step ->
        f32[B,H,W,3] for the steps of this chunk that fall on `snapshot_every`).
        Raises DivergenceError on NaN/inf in the latents or the energy."""
        start = int(state.step)
        state, logs, snaps = self.run_chunk(edit, state)
        logs = {k: np.asarray(v) for k, v in logs.items()}
        z_ok = np.asarray(jnp.isfinite(state.z).all(axis=(1, 2, 3)))
        # unguided steps (skip_unguided) log NaN energies by design
        evaluated = self.guided_steps(edit, start, int(state.step) - start)
        e_ok = (np.isfinite(logs["energy"]) | ~evaluated[:, None, None]).all(axis=(0, 1))
        if not (z_ok.all() and e_ok.all()):
            bad = np.flatnonzero(~(z_ok & e_ok)).tolist()
            raise DivergenceError(
                f"guidance diverged (NaN/inf) in DDIM steps {start}..{int(state.step) - 1} "
                f"for batch images {bad}; lower the guidance weight or the clip norm",
                bad,
            )
        snapshots = {}
        if self.config.snapshot_every:
            snaps = np.asarray(snaps)
            for n in range(snaps.shape[0]):
                if (start + n) % self.config.snapshot_every == 0:
                    snapshots[start + n] = snaps[n]
        return state, logs, snapshots

    def sample(
        self,
        edit: Edit,
        state: SamplerState,
        on_chunk: Callable[[SamplerState, dict], None] | None = None,
    ) -> tuple[SamplerState, dict, dict]:
        """Run to the end. Returns (final state, logs name -> f32[S_run, K, B],
        snapshots step -> f32[B,H,W,3]). Raises DivergenceError on NaN/inf."""
        all_logs: dict[str, list] = {k: [] for k in self.log_names}
        snapshots = {}
        while int(state.step) < self.config.num_steps:
            state, logs, snaps = self.advance(edit, state)
            for k in self.log_names:
                all_logs[k].append(logs[k])
            snapshots.update(snaps)
            if on_chunk is not None:
                on_chunk(state, logs)
        return state, {k: np.concatenate(v) for k, v in all_logs.items()}, snapshots

    def decode(self, z) -> np.ndarray:
        """Final latents -> images f32[B,H,W,3] in [0, 1] (clamped)."""
        x = jax.jit(self.sd.decode)(self.sd.params, z)
        return np.clip(np.asarray(x) * 0.5 + 0.5, 0.0, 1.0)


class Progress:
    """A progress bar with steps, evaluations/s and ETA, printed after each chunk."""

    def __init__(self, total_steps: int, recursive_steps: int, print_fn=print, width: int = 30):
        self.total, self.k, self.print, self.width = total_steps, recursive_steps, print_fn, width
        self.start = None

    def __call__(self, state: SamplerState, logs: dict) -> None:
        done, now = int(state.step), time.perf_counter()
        n = logs["energy"].shape[0]
        if self.start is None:  # the rate counts from the end of the first chunk
            self.start = (done, now)
            rate = float("nan")
        else:
            rate = (done - self.start[0]) / max(now - self.start[1], 1e-9)
        eta = (self.total - done) / rate if rate == rate and rate > 0 else float("nan")
        fill = int(self.width * done / self.total)
        bar = "#" * fill + "." * (self.width - fill)
        eta_s = "--" if eta != eta else f"{math.floor(eta / 60):d}m{eta % 60:04.1f}s"
        rate_s = "--" if rate != rate else f"{rate * self.k:.2f}"  # unknown until chunk 2
        self.print(
            f"[{bar}] {done}/{self.total} steps  {rate_s} evals/s  ETA {eta_s}  "
            f"energy {float(np.mean(logs['energy'][-1])):.4g}  (chunk of {n})"
        )
