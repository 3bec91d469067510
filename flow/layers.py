"""Shared building blocks: torch-style convolutions and the three RAFT normalisations."""

import jax.numpy as jnp
from flax import linen as nn

NORM_EPS = 1e-5  # torch InstanceNorm2d / BatchNorm2d default


def acc_dtype(dtype) -> jnp.dtype:
    """Accumulation dtype for a compute dtype: float32, or float64 for float64 (tests)."""
    return jnp.promote_types(dtype, jnp.float32)


def conv(features: int, kernel, stride: int = 1, *, name: str, dtype) -> nn.Conv:
    """A torch-style Conv2d (zero padding (k-1)//2 per side, with bias) on NHWC input."""
    kh, kw = (kernel, kernel) if isinstance(kernel, int) else kernel
    return nn.Conv(
        features,
        (kh, kw),
        strides=(stride, stride),
        padding=(((kh - 1) // 2, (kh - 1) // 2), ((kw - 1) // 2, (kw - 1) // 2)),
        dtype=dtype,
        param_dtype=jnp.float32,
        name=name,
    )


def _normalize(x: jnp.ndarray, mean: jnp.ndarray, var: jnp.ndarray) -> jnp.ndarray:
    return (x - mean) * jnp.reciprocal(jnp.sqrt(var + NORM_EPS))


def instance_norm(x: jnp.ndarray) -> jnp.ndarray:
    """torch InstanceNorm2d defaults: per image and channel over H,W; biased var; no affine."""
    x32 = x.astype(acc_dtype(x.dtype))
    mean = x32.mean(axis=(1, 2), keepdims=True)
    var = jnp.square(x32 - mean).mean(axis=(1, 2), keepdims=True)
    return _normalize(x32, mean, var).astype(x.dtype)


class ContextNorm(nn.Module):
    """RAFT's context-encoder BatchNorm2d, with the statistics chosen explicitly.

    mode "batch": the statistics of each image on its own (torch train() mode called with one
    image, which is what the Motion Guidance reference does); a batch of B images equals B calls.
    mode "running": the checkpoint's running statistics (torch eval() mode).
    """

    mode: str

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        c = x.shape[-1]
        scale = self.param("scale", nn.initializers.ones, (c,), jnp.float32)
        bias = self.param("bias", nn.initializers.zeros, (c,), jnp.float32)
        running_mean = self.variable("batch_stats", "mean", jnp.zeros, (c,), jnp.float32)
        running_var = self.variable("batch_stats", "var", jnp.ones, (c,), jnp.float32)
        x32 = x.astype(acc_dtype(x.dtype))
        if self.mode == "batch":
            mean = x32.mean(axis=(1, 2), keepdims=True)
            var = jnp.square(x32 - mean).mean(axis=(1, 2), keepdims=True)
        elif self.mode == "running":
            mean, var = running_mean.value, running_var.value
        else:
            raise ValueError(f"context_norm must be 'batch' or 'running', got {self.mode!r}")
        return (_normalize(x32, mean, var) * scale + bias).astype(x.dtype)


def norm_layer(kind: str, name: str):
    """The normalisation `kind` ("instance", "batch", "running", "none") as a callable."""
    if kind == "instance":
        return instance_norm
    if kind == "none":
        return lambda x: x
    return ContextNorm(kind, name=name)
