"""Optical-flow error metrics (jnp; numpy arrays work too)."""

import jax
import jax.numpy as jnp


def epe(pred: jax.Array, target: jax.Array, mask: jax.Array | None = None) -> jax.Array:
    """Mean end-point error: mean over points of the Euclidean norm of `pred - target`.

    Args:
        pred: f32[...,2] predicted flow.
        target: f32[...,2] reference flow, same shape.
        mask: optional weights f32[...] (or bool) broadcastable to `pred.shape[:-1]`; the mean
            is then weighted by it, and 0 when the mask is all zero.

    Returns:
        f32[] scalar error. Differentiable, with gradient 0 where pred equals target.
    """
    sq = jnp.sum(jnp.square(jnp.asarray(pred) - jnp.asarray(target)), axis=-1)
    positive = sq > 0
    err = jnp.where(positive, jnp.sqrt(jnp.where(positive, sq, 1.0)), 0.0)
    if mask is None:
        return jnp.mean(err)
    weights = jnp.broadcast_to(jnp.asarray(mask, err.dtype), err.shape)
    total = jnp.sum(weights)
    return jnp.sum(err * weights) / jnp.where(total > 0, total, 1.0)
