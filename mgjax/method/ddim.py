"""DDIM (Song et al., ICLR 2021) as small pure functions, with the Motion Guidance schedule.

The schedule matches the reference: 1000 training steps, scaled-linear betas 0.00085 -> 0.012,
uniform timesteps with stride 1000 // S and offset 1 (1, 3, ..., 999 for S = 500) sampled from
the noisiest, and abar_prev of the last step = alphas_cumprod[0] (no "alpha to one").
"""

import jax.numpy as jnp
import numpy as np
from flax import struct

from mgjax.model.schedule import alphas_cumprod


@struct.dataclass
class Schedule:
    """Per-step constants, index 0 = the noisiest step (sampling order)."""

    timesteps: jnp.ndarray  # i32[S], descending (999, 997, ..., 1)
    abar: jnp.ndarray  # f32[S], alphas_cumprod[timesteps]
    abar_prev: jnp.ndarray  # f32[S], alphas_cumprod of the next (less noisy) step
    alphas_cumprod: jnp.ndarray  # f32[T]


def make_schedule(
    num_steps: int = 500, train_steps: int = 1000, offset: int = 1, **betas
) -> Schedule:
    """The uniform DDIM schedule over `num_steps` steps (the reference uses 500)."""
    if not 1 <= num_steps <= train_steps:
        raise ValueError(f"num_steps must be in [1, {train_steps}], got {num_steps}")
    ac = alphas_cumprod(train_steps, **betas)
    ratio = train_steps // num_steps
    t = (np.arange(num_steps) * ratio + offset)[::-1]
    t_prev = t - ratio
    abar_prev = np.where(t_prev >= 0, ac[np.maximum(t_prev, 0)], ac[0])
    return Schedule(
        timesteps=jnp.asarray(t, jnp.int32),
        abar=jnp.asarray(ac[t]),
        abar_prev=jnp.asarray(abar_prev, jnp.float32),
        alphas_cumprod=jnp.asarray(ac),
    )


def predict_x0(z, eps, abar):
    """x0 = (z - sqrt(1 - abar) eps) / sqrt(abar)   (DDIM eq. 12, "predicted x0")."""
    return (z - jnp.sqrt(1.0 - abar) * eps) / jnp.sqrt(abar)


def step(z, eps, abar, abar_prev, eta=0.0, noise=None):
    """One DDIM update z_t -> z_prev (DDIM eqs. 12 and 16); eta > 0 needs `noise`. eta is a
    number, or an array (one per image, broadcast against z): then the noise term is always
    added (0 x noise where eta is 0)."""
    x0 = predict_x0(z, eps, abar)
    sigma = eta * jnp.sqrt((1.0 - abar_prev) / (1.0 - abar) * (1.0 - abar / abar_prev))
    z_prev = jnp.sqrt(abar_prev) * x0 + jnp.sqrt(1.0 - abar_prev - sigma**2) * eps
    if isinstance(eta, int | float) and not eta:
        return z_prev
    if noise is None:
        raise ValueError("eta > 0 needs noise")
    return z_prev + sigma * noise


def renoise(z_prev, abar, abar_prev, noise):
    """Back from abar_prev to abar (recursive denoising): q(z_t | z_prev) of the forward chain."""
    ratio = abar / abar_prev
    return jnp.sqrt(ratio) * z_prev + jnp.sqrt(1.0 - ratio) * noise


def add_noise(z0, noise, abar):
    """Forward noising q(z_t | z_0) = N(sqrt(abar) z0, (1 - abar) I)."""
    return jnp.sqrt(abar) * z0 + jnp.sqrt(1.0 - abar) * noise


def invert_step(z, eps, abar, abar_prev):
    """DDIM inversion, one step towards more noise: z at abar_prev -> z at abar, with eps there."""
    return (
        jnp.sqrt(abar / abar_prev) * (z - jnp.sqrt(1.0 - abar_prev) * eps)
        + jnp.sqrt(1.0 - abar) * eps
    )
