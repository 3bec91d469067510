"""Middlebury colour-wheel visualisation of optical flow (numpy)."""

import os

import numpy as np
from PIL import Image

# Hue segments of the Middlebury wheel: red-yellow, yellow-green, green-cyan, cyan-blue,
# blue-magenta, magenta-red.
_SEGMENTS = (15, 6, 4, 11, 13, 6)


def color_wheel() -> np.ndarray:
    """The Middlebury colour wheel, uint8[55,3]: one RGB colour per hue step."""
    ry, yg, gc, cb, bm, mr = _SEGMENTS
    ramps = []
    for n, (channel, rising), fixed in (
        (ry, (1, True), 0),
        (yg, (0, False), 1),
        (gc, (2, True), 1),
        (cb, (1, False), 2),
        (bm, (0, True), 2),
        (mr, (2, False), 0),
    ):
        seg = np.zeros((n, 3), np.int64)
        ramp = np.floor(255 * np.arange(n) / n).astype(np.int64)
        seg[:, fixed] = 255
        seg[:, channel] = ramp if rising else 255 - ramp
        ramps.append(seg)
    return np.concatenate(ramps).astype(np.uint8)


def flow_to_color(flow: np.ndarray, max_norm: float | None = None) -> np.ndarray:
    """Colours a flow field: hue from direction, saturation from magnitude.

    Args:
        flow: f32[H,W,2] (u = dx, v = dy) in pixels; any array type numpy can read.
        max_norm: magnitude mapped to full saturation; default the largest magnitude in `flow`.

    Returns:
        uint8[H,W,3] RGB image; zero flow is white.
    """
    flow = np.asarray(flow, dtype=np.float64)
    if flow.ndim != 3 or flow.shape[-1] != 2:
        raise ValueError(f"flow must be [H,W,2], got shape {flow.shape}")
    # Adding 0.0 turns -0.0 into +0.0, so a zero component never flips the hue across the seam.
    u = flow[..., 0] + 0.0
    v = flow[..., 1] + 0.0
    if max_norm is None:
        scale = float(np.max(np.hypot(u, v), initial=0.0)) + 1e-5
    else:
        if max_norm <= 0:
            raise ValueError(f"max_norm must be positive, got {max_norm}")
        scale = float(max_norm)
    u, v = u / scale, v / scale

    wheel = color_wheel().astype(np.float64) / 255.0
    ncols = wheel.shape[0]
    rad = np.hypot(u, v)
    angle = np.arctan2(-v, -u) / np.pi
    fk = (angle + 1.0) / 2.0 * (ncols - 1)
    k0 = np.floor(fk).astype(np.int64)
    k1 = np.where(k0 + 1 == ncols, 0, k0 + 1)
    f = (fk - k0)[..., None]
    col = (1.0 - f) * wheel[k0] + f * wheel[k1]

    inside = (rad <= 1.0)[..., None]
    col = np.where(inside, 1.0 - rad[..., None] * (1.0 - col), col * 0.75)
    return np.floor(255.0 * col).astype(np.uint8)


def save_flow_png(
    path: str | os.PathLike[str], flow: np.ndarray, max_norm: float | None = None
) -> None:
    """Writes the colour-wheel rendering of `flow` (f32[H,W,2]) to `path` as PNG."""
    Image.fromarray(flow_to_color(flow, max_norm=max_norm)).save(path, format="PNG")
