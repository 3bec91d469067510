"""Differentiable bilinear sampling and backward warping in pixel coordinates (NHWC).

The semantics follow `torch.nn.functional.grid_sample(mode="bilinear", align_corners=True)`:
pixel centres sit at integer coordinates, `x` indexes columns and `y` indexes rows. Gradients
with respect to the image and the coordinates follow torch's conventions, including a zero
coordinate gradient where padding clips a coordinate onto the border.
"""

from typing import Literal

import jax
import jax.numpy as jnp

Padding = Literal["zeros", "border", "reflection"]
PADDINGS: tuple[str, ...] = ("zeros", "border", "reflection")


def _clip(coord: jax.Array, size: int) -> jax.Array:
    """Clips to [0, size-1] with zero gradient on and beyond both ends, like torch."""
    high = float(size - 1)
    clipped = jnp.where(coord >= high, jnp.asarray(high, coord.dtype), coord)
    return jnp.where(coord <= 0, jnp.zeros_like(coord), clipped)


def _reflect(coord: jax.Array, size: int) -> jax.Array:
    """Reflects about 0 and size-1 until the coordinate lies in [0, size-1]."""
    if size == 1:
        return jnp.zeros_like(coord)
    span = float(size - 1)
    twice_span = 2.0 * span
    negative = coord < 0
    magnitude = jnp.where(negative, -coord, coord)
    double_flips = jax.lax.stop_gradient(jnp.trunc(magnitude / twice_span))
    extra = magnitude - double_flips * twice_span
    return jnp.where(extra > span, twice_span - extra, extra)


def _source_coord(coord: jax.Array, size: int, padding: str) -> jax.Array:
    """Maps a sampling coordinate onto the coordinate actually read, per padding mode."""
    if padding == "zeros":
        return coord
    if padding == "border":
        return _clip(coord, size)
    return _clip(_reflect(coord, size), size)


def bilinear_sample(
    image: jax.Array, x: jax.Array, y: jax.Array, padding: Padding = "zeros"
) -> jax.Array:
    """Samples `image` bilinearly at pixel coordinates (`x` column, `y` row).

    Args:
        image: f32[B,H,W,C].
        x: f32[B,...] column coordinates in pixels.
        y: f32[B,...] row coordinates in pixels, same shape as `x`.
        padding: "zeros" (out-of-range corners read 0), "border" (coordinates clipped to the
            image) or "reflection" (coordinates reflected about the first and last pixel).

    Returns:
        f32[B,...,C]: the samples.
    """
    if padding not in PADDINGS:
        raise ValueError(f"padding must be one of {PADDINGS}, got {padding!r}")
    if image.ndim != 4:
        raise ValueError(f"image must be [B,H,W,C], got shape {image.shape}")
    if x.shape != y.shape or x.shape[:1] != image.shape[:1]:
        raise ValueError(f"x {x.shape} and y {y.shape} must share shape [B,...] with image")
    b, h, w, c = image.shape
    dtype = jnp.result_type(image.dtype, x.dtype, y.dtype, jnp.float32)
    image = image.astype(dtype)
    xs = _source_coord(x.reshape(b, -1).astype(dtype), w, padding)
    ys = _source_coord(y.reshape(b, -1).astype(dtype), h, padding)

    x0 = jax.lax.stop_gradient(jnp.floor(xs))
    y0 = jax.lax.stop_gradient(jnp.floor(ys))
    wx1 = xs - x0
    wy1 = ys - y0
    wx0 = 1.0 - wx1
    wy0 = 1.0 - wy1

    flat = image.reshape(b, h * w, c)

    def corner(cx: jax.Array, cy: jax.Array) -> jax.Array:
        """Reads f32[B,N,C] at integer-valued corners, zero where outside the image."""
        valid = (cx >= 0) & (cx <= w - 1) & (cy >= 0) & (cy <= h - 1)
        ix = jnp.clip(cx, 0, w - 1).astype(jnp.int32)
        iy = jnp.clip(cy, 0, h - 1).astype(jnp.int32)
        values = jnp.take_along_axis(flat, (iy * w + ix)[..., None], axis=1)
        return jnp.where(valid[..., None], values, jnp.zeros_like(values))

    out = (
        corner(x0, y0) * (wx0 * wy0)[..., None]
        + corner(x0 + 1, y0) * (wx1 * wy0)[..., None]
        + corner(x0, y0 + 1) * (wx0 * wy1)[..., None]
        + corner(x0 + 1, y0 + 1) * (wx1 * wy1)[..., None]
    )
    return out.reshape(*x.shape, c)


def coords_grid(b: int, h: int, w: int, dtype=jnp.float32) -> jax.Array:
    """Pixel coordinates of every pixel, f32[B,H,W,2] with channel 0 = x (column), 1 = y (row)."""
    ys, xs = jnp.meshgrid(jnp.arange(h, dtype=dtype), jnp.arange(w, dtype=dtype), indexing="ij")
    grid = jnp.stack([xs, ys], axis=-1)
    return jnp.broadcast_to(grid[None], (b, h, w, 2))


def warp(image: jax.Array, flow: jax.Array, padding: Padding = "reflection") -> jax.Array:
    """Backward-warps `image` by `flow`: out(p) = image sampled at p + flow(p).

    Args:
        image: f32[B,H,W,C].
        flow: f32[B,H,W,2] displacement in pixels, channel 0 = dx, 1 = dy.
        padding: see `bilinear_sample`.

    Returns:
        f32[B,H,W,C]: the warped image.
    """
    if flow.ndim != 4 or flow.shape[-1] != 2:
        raise ValueError(f"flow must be [B,H,W,2], got shape {flow.shape}")
    b, h, w, _ = flow.shape
    coords = coords_grid(b, h, w, flow.dtype) + flow
    return bilinear_sample(image, coords[..., 0], coords[..., 1], padding=padding)
