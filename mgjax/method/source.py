"""Source trajectories: the latents the frozen region is copied from, and the edit's z_T.

* `generate`: sample a source image from a prompt and z_T with plain DDIM, caching the latent
  at the start of every step (index 0 = z_T, the noisiest).
* `invert`: a real image -> VAE posterior mean -> DDIM inversion over the same schedule
  (ascending t), reversed to sampling order; z_T is the inversion's last latent.
* `sdedit`: a real image noised part of the way and denoised back with plain DDIM (what a
  model keeps of an image it redraws from that noise level).

Both run as jitted `lax.scan` chunks of DDIM steps (one compile per chunk length).
"""

from collections.abc import Callable
from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from flow.errors import InputError
from mgjax.config import Method
from mgjax.method import ddim
from mgjax.model import conditioning


class Trajectory(NamedTuple):
    z_T: np.ndarray  # f32[B,C,h,w]
    latents: np.ndarray  # f32[S,B,C,h,w], sampling order: latents[0] = z_T
    z0: np.ndarray  # f32[B,C,h,w] clean latent (the sample, or the encoded real image)


def cfg_eps(sd, params, z, t, cond, uncond, cfg_scale, skip_at_one: bool = False):
    """Classifier-free guided noise estimate, one UNet call on the batch [uncond, cond] (the
    conditionings are the model's pytrees, batch first). With `skip_at_one` and `cfg_scale` 1 (a
    Python number) that is eps(cond) alone: the unconditional half is skipped (the guided sampler
    asks for it; DDIM inversion keeps both halves)."""
    b = z.shape[0]
    if skip_at_one and isinstance(cfg_scale, int | float) and cfg_scale == 1.0:
        return sd.eps(params, z, jnp.full((b,), t, jnp.int32), cond)
    eps = sd.eps(
        params,
        jnp.concatenate([z, z]),
        jnp.full((2 * b,), t, jnp.int32),
        conditioning.concat([uncond, cond]),
    )
    return eps[:b] + cfg_scale * (eps[b:] - eps[:b])


@jax.custom_vjp
def _with_gradient_of(value, surrogate):
    """`value`, differentiated as if it were `surrogate` (same shape)."""
    return value


def _with_gradient_of_fwd(value, surrogate):
    return value, None


def _with_gradient_of_bwd(_, cotangent):
    return jnp.zeros_like(cotangent), cotangent


_with_gradient_of.defvjp(_with_gradient_of_fwd, _with_gradient_of_bwd)


def cfg_eps_cond_gradient(sd, params, z, t, cond, uncond, cfg_scale):
    """cfg_eps's value, differentiated through the conditional branch alone: CFG's Jacobian
    (1 - w) J_uncond + w J_cond taken as J_cond (Method.cfg_gradient "cond"). Two UNet calls of
    batch B; the unconditional one is never differentiated, so a backward pass runs the UNet's
    backward on B images instead of 2B."""
    tb = jnp.full((z.shape[0],), t, jnp.int32)
    eps_c = sd.eps(params, z, tb, cond)
    eps_u = lax.stop_gradient(sd.eps(params, z, tb, uncond))
    value = eps_u + cfg_scale * (lax.stop_gradient(eps_c) - eps_u)
    return _with_gradient_of(value, eps_c)


@partial(jax.jit, static_argnums=(0, 1), static_argnames=("length", "cfg_scale", "inverse"))
def _chunk(sd, schedule_steps, params, z, first, cond, uncond, *, length, cfg_scale, inverse):
    sch = ddim.make_schedule(schedule_steps)

    def body(z, n):
        if inverse:  # ascending t: step n of the inversion uses the pair of sampling step S-1-n
            i = schedule_steps - 1 - n
            eps = cfg_eps(sd, params, z, sch.timesteps[i], cond, uncond, cfg_scale)
            z_next = ddim.invert_step(z, eps, sch.abar[i], sch.abar_prev[i])
            return z_next, z_next
        eps = cfg_eps(sd, params, z, sch.timesteps[n], cond, uncond, cfg_scale)
        return ddim.step(z, eps, sch.abar[n], sch.abar_prev[n]), z

    return lax.scan(body, z, first + jnp.arange(length))


def _run(sd, z, cond, uncond, num_steps, cfg_scale, chunk, inverse, on_chunk):
    b = z.shape[0]
    cond, uncond = (conditioning.broadcast(c, b) for c in (cond, uncond))
    pieces = []
    done = 0
    while done < num_steps:
        length = min(chunk, num_steps - done)
        z, zs = _chunk(
            sd,
            num_steps,
            sd.params,
            z,
            done,
            cond,
            uncond,
            length=length,
            cfg_scale=float(cfg_scale),
            inverse=inverse,
        )
        done += length
        if not bool(jnp.isfinite(z).all()):
            raise FloatingPointError(f"latents became NaN/inf by DDIM step {done}")
        pieces.append(np.asarray(zs))
        if on_chunk is not None:
            on_chunk(done, num_steps)
    return np.asarray(z), np.concatenate(pieces)


def generate(
    sd,
    z_T,
    cond,
    uncond,
    num_steps: int = Method.steps,
    cfg_scale: float = Method.cfg_scale,
    chunk: int = 50,
    on_chunk: Callable[[int, int], None] | None = None,
) -> Trajectory:
    """Plain DDIM (eta = 0) from z_T f32[B,C,h,w], caching every step's starting latent."""
    z_T = jnp.asarray(z_T, jnp.float32)
    z0, latents = _run(sd, z_T, cond, uncond, num_steps, cfg_scale, chunk, False, on_chunk)
    return Trajectory(np.asarray(z_T), latents, z0)


def encode(sd, images) -> np.ndarray:
    """Images f32[B,H,W,3] in [0, 1] -> VAE posterior mean * scaling factor, f32[B,C,h,w]."""
    images = np.asarray(images, np.float32)
    if images.ndim != 4 or images.shape[-1] != 3:
        raise InputError(f"images must be (B, H, W, 3), got shape {images.shape}")
    f = sd.vae_factor
    if images.shape[1] % f or images.shape[2] % f:
        raise InputError(f"image size must be a multiple of the VAE factor {f}")
    return np.asarray(jax.jit(sd.encode)(sd.params, jnp.asarray(images) * 2.0 - 1.0))


@partial(jax.jit, static_argnums=0)
def _decode01(sd, params, z):
    return jnp.clip(sd.decode(params, z) * 0.5 + 0.5, 0.0, 1.0)


def decode_images(sd, z) -> np.ndarray:
    """Latents f32[B,C,h,w] (scaled, as the sampler keeps them) -> images f32[B,H,W,3] in
    [0, 1]; compiled once per model and shape."""
    return np.asarray(_decode01(sd, sd.params, jnp.asarray(z, jnp.float32)))


def sdedit(
    sd,
    images,
    cond,
    uncond,
    strength: float,
    num_steps: int = 50,
    cfg_scale: float = Method.cfg_scale,
    seed: int = 0,
) -> np.ndarray:
    """SDEdit (Meng et al., ICLR 2022): images f32[B,H,W,3] in [0, 1] -> VAE posterior mean,
    noised to step round((1 - strength) num_steps) of the DDIM schedule (one normal draw of
    PRNGKey(seed)), plain DDIM (eta = 0) back from there -> images f32[B,H,W,3] in [0, 1].
    strength 0 is the autoencoder's round trip, 1 starts at the schedule's noisiest step."""
    if not 0.0 <= strength <= 1.0:
        raise InputError(f"SDEdit strength must be from 0 to 1, got {strength}")
    z0 = jnp.asarray(encode(sd, images))
    start = int(round(num_steps * (1.0 - strength)))
    if start == num_steps:
        return decode_images(sd, z0)
    sch = ddim.make_schedule(num_steps)
    noise = jax.random.normal(jax.random.PRNGKey(seed), z0.shape)
    z = ddim.add_noise(z0, noise, sch.abar[start])
    b = z.shape[0]
    cond, uncond = (conditioning.broadcast(c, b) for c in (cond, uncond))
    z, _ = _chunk(sd, num_steps, sd.params, z, start, cond, uncond, length=num_steps - start,
                  cfg_scale=float(cfg_scale), inverse=False)  # fmt: skip
    return decode_images(sd, z)


def roundtrip(sd, images) -> np.ndarray:
    """Images f32[B,H,W,3] in [0, 1] through the autoencoder (posterior mean, decode), as
    guidance sees a decoded estimate: what the decoder keeps of them."""
    return decode_images(sd, encode(sd, images))


def invert(
    sd,
    images,
    cond,
    uncond,
    num_steps: int = Method.steps,
    cfg_scale: float = Method.cfg_scale,
    chunk: int = 50,
    on_chunk: Callable[[int, int], None] | None = None,
) -> Trajectory:
    """DDIM inversion of real images f32[B,H,W,3] in [0, 1] (the reference uses prompt "")."""
    z0 = encode(sd, images)
    z_T, ascending = _run(
        sd, jnp.asarray(z0), cond, uncond, num_steps, cfg_scale, chunk, True, on_chunk
    )
    return Trajectory(z_T, ascending[::-1].copy(), z0)
