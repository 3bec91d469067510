"""The per-edit arrays of the guided sampler (`GuidanceInputs`), checked and assembled by
`prepare` on the host, before anything is compiled."""

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from flow.errors import InputError
from mgjax.method import numeric as N
from mgjax.method.energy import occlusion_mask
from mgjax.model import conditioning


@struct.dataclass
class GuidanceInputs:
    """What the guided sampler needs of a batch of B edits (all arrays)."""

    source: jnp.ndarray  # f32[B,H,W,3] in [0, 1]
    target_flow: jnp.ndarray  # f32[B,H,W,2]
    occlusion: jnp.ndarray  # f32[B,H,W,1], 1 = used by the colour loss
    frozen: jnp.ndarray  # bool[B,C,h,w], True = copied from the source trajectory
    cond: object  # the model's conditioning pytree of the prompt, every leaf batch first [B,...]
    uncond: object  # the same for "" (classifier-free guidance's unconditional input)
    schedule: jnp.ndarray  # f32[S] guidance multiplier per DDIM step, index 0 = noisiest
    trajectory: jnp.ndarray | None = None  # f32[S,B,C,h,w] source latents, sampling order
    z0: jnp.ndarray | None = None  # f32[B,C,h,w] source latent, when there is no trajectory
    extras: dict | None = None  # name -> [B, ...] arrays for custom energies (Context.extras)
    # RAFT's encoding of 255 * source (flow.raft.encode_source), the same in every evaluation;
    # None: each evaluation encodes the source itself
    raft_source: dict | None = None
    # the method's numbers per image (mgjax.method.numeric.Numeric, f32[B] leaves): data of the
    # compiled step, so new values never recompile; None: the sampler's method's, for all
    numeric: object = None


# The batch axis of each per-image field (the schedule is shared by the batch).
BATCH_AXIS = {
    "source": 0,
    "target_flow": 0,
    "occlusion": 0,
    "frozen": 0,
    "cond": 0,
    "uncond": 0,
    "z0": 0,
    "trajectory": 1,
    "numeric": 0,
}


def map_images(inputs: GuidanceInputs, fn) -> GuidanceInputs:
    """`inputs` with fn(array, batch_axis) applied to each per-image array, extras included
    (absent fields stay absent); the schedule is kept."""
    changes = {
        k: jax.tree_util.tree_map(lambda x, axis=axis: fn(x, axis), getattr(inputs, k))
        for k, axis in BATCH_AXIS.items()
        if getattr(inputs, k) is not None
    }
    for name in ("extras", "raft_source"):
        if getattr(inputs, name):
            changes[name] = {k: fn(v, 0) for k, v in getattr(inputs, name).items()}
    return inputs.replace(**changes)


def prepare(
    sd,
    method,
    source,
    target_flow,
    cond,
    uncond,
    frozen=None,
    trajectory=None,
    z0=None,
    schedule=None,
    extras=None,
    numeric=None,
    dtype=jnp.float32,
) -> GuidanceInputs:
    """Check and assemble the inputs of B edits for `sd` (its vae_factor and latent_channels)
    and `method` (mgjax.config.Method: steps, occlusion_masking).

    Args:
      source: [B,H,W,3] in [0, 1]; target_flow: [B,H,W,2] in pixels.
      cond, uncond: the model's conditionings (`embed`), each leaf [B or 1, ...].
      frozen: [B,C,h,w] or [B,1,h,w] (True = frozen), or None (nothing frozen).
      trajectory: [S,B,C,h,w] source latents, or z0: [B,C,h,w] (exactly one of them).
      schedule: [S] guidance multipliers, or None (all ones).
      extras: {name: [B, ...]} for the energy, or None.
      numeric: the method's numbers per image (mgjax.method.numeric.Numeric), or None: `method`'s
      for every image.
    Raises InputError (a ValueError) naming the problem.
    """
    source = np.asarray(source, dtype)
    flow = np.asarray(target_flow, dtype)
    if source.ndim != 4 or source.shape[-1] != 3:
        raise InputError(f"source image must be (B, H, W, 3), got shape {source.shape}")
    b, h, w, _ = source.shape
    factor = sd.vae_factor * 8
    if h % factor or w % factor:
        raise InputError(
            f"image size {h}x{w} is not a multiple of {factor} (VAE factor "
            f"{sd.vae_factor} x RAFT's 8); resize or crop to "
            f"{h // factor * factor}x{w // factor * factor}"
        )
    if min(h, w) < 64:
        raise InputError(f"image must be at least 64x64 for RAFT, got {h}x{w}")
    if flow.shape != (b, h, w, 2):
        raise InputError(
            f"target flow shape {flow.shape} does not match the image: expected {(b, h, w, 2)}"
        )
    if not np.isfinite(flow).all():
        raise InputError("target flow contains NaN or inf values; fix the flow file")
    if not np.isfinite(source).all():
        raise InputError("source image contains NaN or inf values")
    lat = (b, sd.latent_channels, h // sd.vae_factor, w // sd.vae_factor)
    if frozen is None:
        frozen = np.zeros(lat, bool)
    frozen = np.asarray(frozen)
    if frozen.ndim == 4 and frozen.shape[1] == 1:
        frozen = np.broadcast_to(frozen, lat)
    if frozen.shape != lat:
        raise InputError(
            f"frozen mask shape {frozen.shape} does not match the latent: expected {lat} "
            f"(or {(b, 1) + lat[2:]})"
        )
    s = method.steps
    if schedule is None:
        schedule = np.ones(s, np.float32)
    schedule = np.asarray(schedule, np.float32).reshape(-1)
    if schedule.shape != (s,):
        raise InputError(
            f"guidance schedule has {schedule.size} entries but there are {s} DDIM steps"
        )
    if not np.isfinite(schedule).all():
        raise InputError("guidance schedule contains NaN or inf values")
    if (trajectory is None) == (z0 is None):
        raise InputError("give exactly one of trajectory (cached source latents) or z0")
    if trajectory is not None:
        trajectory = np.asarray(trajectory, dtype)
        if trajectory.shape[0] != s:
            raise InputError(
                f"source trajectory has {trajectory.shape[0]} steps but there are {s} "
                "DDIM steps; regenerate it with the same number of steps"
            )
        if trajectory.shape[1:] != lat:
            raise InputError(
                f"source trajectory latents are {trajectory.shape[1:]}, expected {lat}"
            )
        if not np.isfinite(trajectory).all():
            raise InputError("source trajectory contains NaN or inf values")
        trajectory = jnp.asarray(trajectory)
    else:
        z0 = np.asarray(z0, dtype)
        if z0.shape != lat:
            raise InputError(f"source latent z0 is {z0.shape}, expected {lat}")
        z0 = jnp.asarray(z0)
    cond, uncond = (conditioning.broadcast(c, b, dtype) for c in (cond, uncond))
    extras = {} if extras is None else dict(extras)
    for name, x in extras.items():
        if np.ndim(x) == 0 or np.shape(x)[0] != b:
            raise InputError(
                f"energy extra {name!r} has shape {np.shape(x)}; extras are per edit, "
                f"with the batch ({b}) first"
            )
    extras = {k: jnp.asarray(v) for k, v in extras.items()}
    occ = (
        occlusion_mask(jnp.asarray(flow))
        if method.occlusion_masking
        else jnp.ones((b, h, w, 1), jnp.float32)
    )
    if numeric is None:
        numeric = N.of(method, b, dtype)
    numeric = jax.tree_util.tree_map(lambda x: jnp.asarray(x, dtype), numeric)
    if any(np.shape(x) != (b,) for x in jax.tree_util.tree_leaves(numeric)):
        raise InputError(f"the method's numbers need one value per image ({b})")
    if not all(np.isfinite(np.asarray(x)).all() for x in jax.tree_util.tree_leaves(numeric)):
        raise InputError("the method's numbers contain NaN or inf values")
    return GuidanceInputs(
        numeric=numeric,
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
