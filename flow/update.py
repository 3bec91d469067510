"""Motion encoders, recurrent units, flow head and upsampling-mask head (upstream update.py)."""

from typing import Any

import jax.numpy as jnp
from flax import linen as nn

from flow.layers import acc_dtype, conv


class MotionEncoder(nn.Module):
    """Encodes (correlation features, current flow); output ends with the flow itself.

    Large: convc1 1x1 256, convc2 3x3 192, convf1 7x7 128, convf2 3x3 64, conv 3x3 126.
    Small: convc1 1x1 96, convf1 7x7 64, convf2 3x3 32, conv 3x3 80.
    """

    small: bool
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, flow, corr):
        c = lambda f, k, name: conv(f, k, name=name, dtype=self.dtype)  # noqa: E731
        cor = nn.relu(c(96 if self.small else 256, 1, "convc1")(corr))
        if not self.small:
            cor = nn.relu(c(192, 3, "convc2")(cor))
        flo = nn.relu(c(64 if self.small else 128, 7, "convf1")(flow))
        flo = nn.relu(c(32 if self.small else 64, 3, "convf2")(flo))
        out = nn.relu(c(80 if self.small else 126, 3, "conv")(jnp.concatenate([cor, flo], -1)))
        return jnp.concatenate([out, flow.astype(out.dtype)], -1)


def _gru(h, x, kernel, suffix: str, dtype, hidden: int):
    """One convolutional GRU update (convz/convr/convq + suffix)."""
    hx = jnp.concatenate([h, x], -1)
    z = nn.sigmoid(conv(hidden, kernel, name=f"convz{suffix}", dtype=dtype)(hx))
    r = nn.sigmoid(conv(hidden, kernel, name=f"convr{suffix}", dtype=dtype)(hx))
    q = jnp.tanh(
        conv(hidden, kernel, name=f"convq{suffix}", dtype=dtype)(jnp.concatenate([r * h, x], -1))
    )
    return (1 - z) * h + z * q


class SepConvGRU(nn.Module):
    """Large model: a horizontal (1x5) then a vertical (5x1) GRU update."""

    hidden: int = 128
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, h, x):
        h = _gru(h, x, (1, 5), "1", self.dtype, self.hidden)
        return _gru(h, x, (5, 1), "2", self.dtype, self.hidden)


class ConvGRU(nn.Module):
    """Small model: one 3x3 GRU update."""

    hidden: int = 96
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, h, x):
        return _gru(h, x, 3, "", self.dtype, self.hidden)


class FlowHead(nn.Module):
    """3x3 conv, relu, 3x3 conv to the 2-channel flow update."""

    hidden: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        x = nn.relu(conv(self.hidden, 3, name="conv1", dtype=self.dtype)(x))
        return conv(2, 3, name="conv2", dtype=self.dtype)(x)


class UpdateBlock(nn.Module):
    """One refinement: (hidden, context, corr, flow) -> (hidden, delta flow), fp32 (fp64) out."""

    small: bool
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, net, inp, corr, flow):
        d = self.dtype
        motion = MotionEncoder(self.small, d, name="encoder")(flow.astype(d), corr.astype(d))
        x = jnp.concatenate([inp.astype(d), motion], -1)
        if self.small:
            net = ConvGRU(96, d, name="gru")(net.astype(d), x)
        else:
            net = SepConvGRU(128, d, name="gru")(net.astype(d), x)
        delta = FlowHead(128 if self.small else 256, d, name="flow_head")(net)
        acc = acc_dtype(d)
        return net.astype(acc), delta.astype(acc)


class MaskHead(nn.Module):
    """Large model: logits of the convex 8x upsampling weights, 0.25 * conv(relu(conv(h)))."""

    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, net):
        x = nn.relu(conv(256, 3, name="mask_0", dtype=self.dtype)(net.astype(self.dtype)))
        return 0.25 * conv(64 * 9, 1, name="mask_2", dtype=self.dtype)(x).astype(
            acc_dtype(self.dtype)
        )
