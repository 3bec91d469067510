"""Feature and context encoders (upstream core/extractor.py), NHWC."""

from typing import Any

import jax.numpy as jnp
from flax import linen as nn

from flow.layers import conv, norm_layer


def _shortcut(x, planes: int, stride: int, norm: str, dtype):
    """Identity, or a strided 1x1 conv + norm (called inside a block's compact scope)."""
    if stride == 1:
        return x
    x = conv(planes, 1, stride, name="downsample_0", dtype=dtype)(x)
    return norm_layer(norm, "downsample_1")(x)


class ResidualBlock(nn.Module):
    """Two 3x3 conv-norm-relu layers plus a projected shortcut when strided."""

    planes: int
    stride: int
    norm: str
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        y = conv(self.planes, 3, self.stride, name="conv1", dtype=self.dtype)(x)
        y = nn.relu(norm_layer(self.norm, "norm1")(y))
        y = conv(self.planes, 3, name="conv2", dtype=self.dtype)(y)
        y = nn.relu(norm_layer(self.norm, "norm2")(y))
        # Upstream registers the shortcut norm twice (norm3 and downsample.1); we keep one.
        return nn.relu(_shortcut(x, self.planes, self.stride, self.norm, self.dtype) + y)


class BottleneckBlock(nn.Module):
    """1x1 -> 3x3 (strided) -> 1x1 conv-norm-relu layers plus a projected shortcut when strided."""

    planes: int
    stride: int
    norm: str
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        q = self.planes // 4
        y = conv(q, 1, name="conv1", dtype=self.dtype)(x)
        y = nn.relu(norm_layer(self.norm, "norm1")(y))
        y = conv(q, 3, self.stride, name="conv2", dtype=self.dtype)(y)
        y = nn.relu(norm_layer(self.norm, "norm2")(y))
        y = conv(self.planes, 1, name="conv3", dtype=self.dtype)(y)
        y = nn.relu(norm_layer(self.norm, "norm3")(y))
        # Upstream registers the shortcut norm twice (norm4 and downsample.1); we keep one.
        return nn.relu(_shortcut(x, self.planes, self.stride, self.norm, self.dtype) + y)


class Encoder(nn.Module):
    """RAFT's encoder: 7x7/2 stem, three stages of two blocks (/1, /2, /2), 1x1 head: H/8 x W/8.

    widths = (stem, stage1, stage2, stage3); large uses ResidualBlock with (64, 64, 96, 128),
    small uses BottleneckBlock with (32, 32, 64, 96).
    """

    output_dim: int
    norm: str
    small: bool
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        """f[B,H,W,3] in [-1, 1] -> f[B,H/8,W/8,output_dim]."""
        widths = (32, 32, 64, 96) if self.small else (64, 64, 96, 128)
        block = BottleneckBlock if self.small else ResidualBlock
        x = conv(widths[0], 7, 2, name="conv1", dtype=self.dtype)(x.astype(self.dtype))
        x = nn.relu(norm_layer(self.norm, "norm1")(x))
        for stage, (planes, stride) in enumerate(zip(widths[1:], (1, 2, 2), strict=True), start=1):
            x = block(planes, stride, self.norm, self.dtype, name=f"layer{stage}_0")(x)
            x = block(planes, 1, self.norm, self.dtype, name=f"layer{stage}_1")(x)
        return conv(self.output_dim, 1, name="conv2", dtype=self.dtype)(x)
