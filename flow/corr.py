"""All-pairs correlation pyramid and its windowed lookup (upstream core/corr.py), NHWC."""

import math

import jax.numpy as jnp
from jax import lax


def build_pyramid(fmap1: jnp.ndarray, fmap2: jnp.ndarray, num_levels: int) -> list[jnp.ndarray]:
    """Correlation volume <f1(p), f2(q)> / sqrt(C) in fp32, then 2x2 average-pooled levels.

    Args:
      fmap1, fmap2: f[B,h,w,C] feature maps.
    Returns:
      num_levels arrays f32[B*h*w, h/2^l, w/2^l]: one correlation image per source pixel.
    """
    b, h, w, c = fmap1.shape
    acc = jnp.promote_types(fmap1.dtype, jnp.float32)
    f1 = fmap1.astype(acc).reshape(b, h * w, c)
    f2 = fmap2.astype(acc).reshape(b, h * w, c)
    corr = jnp.einsum("bpc,bqc->bpq", f1, f2, precision=lax.Precision.HIGHEST)
    corr = (corr / math.sqrt(c)).reshape(b * h * w, h, w)
    pyramid = [corr]
    for _ in range(num_levels - 1):
        n, hh, ww = corr.shape
        # torch avg_pool2d(2, 2) drops an odd last row/column.
        corr = corr[:, : hh // 2 * 2, : ww // 2 * 2]
        corr = corr.reshape(n, hh // 2, 2, ww // 2, 2).mean(axis=(2, 4))
        pyramid.append(corr)
    return pyramid


def _window(corr: jnp.ndarray, cx: jnp.ndarray, cy: jnp.ndarray, radius: int) -> jnp.ndarray:
    """Bilinear samples of corr[n] at (cx[n] + i, cy[n] + j) for i, j in [-r, r].

    Equals grid_sample(align_corners=True, padding_mode="zeros") at those points: the integer
    offsets share one set of bilinear weights, so a (2r+2)^2 integer window is gathered once.

    Args:
      corr: f[N,H,W]; cx, cy: f[N] pixel coordinates (fp32, or fp64 in tests).
    Returns:
      f32[N,(2r+1)^2], channel = i_x * (2r+1) + j_y (x offset outer, y offset inner, as upstream).
    """
    n, h, w = corr.shape
    x0, y0 = jnp.floor(cx), jnp.floor(cy)
    fx, fy = (cx - x0)[:, None, None], (cy - y0)[:, None, None]
    offsets = jnp.arange(-radius, radius + 2, dtype=cx.dtype)
    xs, ys = x0[:, None] + offsets, y0[:, None] + offsets  # f32[N,2r+2]
    valid = ((ys >= 0) & (ys <= h - 1))[:, :, None] & ((xs >= 0) & (xs <= w - 1))[:, None, :]
    xi = jnp.clip(xs, 0, w - 1).astype(jnp.int32)
    yi = jnp.clip(ys, 0, h - 1).astype(jnp.int32)
    flat = (yi[:, :, None] * w + xi[:, None, :]).reshape(n, -1)
    vals = jnp.take_along_axis(corr.reshape(n, h * w), flat, axis=1)
    vals = jnp.where(valid, vals.reshape(valid.shape), 0.0)  # f32[N,y,x]
    out = (
        (1 - fy) * (1 - fx) * vals[:, :-1, :-1]
        + (1 - fy) * fx * vals[:, :-1, 1:]
        + fy * (1 - fx) * vals[:, 1:, :-1]
        + fy * fx * vals[:, 1:, 1:]
    )
    return out.transpose(0, 2, 1).reshape(n, -1)


def lookup(pyramid: list[jnp.ndarray], coords: jnp.ndarray, radius: int) -> jnp.ndarray:
    """Correlation features around coords at every level.

    Args:
      pyramid: from build_pyramid.
      coords: f32[B,h,w,2] (x, y) positions in the second image at feature resolution.
    Returns:
      f32[B,h,w,levels*(2r+1)^2], level 0 first.
    """
    b, h, w, _ = coords.shape
    c = coords.reshape(b * h * w, 2)
    feats = []
    for level, corr in enumerate(pyramid):
        scale = 2.0**level
        feats.append(_window(corr, c[:, 0] / scale, c[:, 1] / scale, radius))
    return jnp.concatenate(feats, axis=-1).reshape(b, h, w, -1)
