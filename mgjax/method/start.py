"""The guided sampler's first latent: the source's z_T, or that z_T moved by the target flow.

DDIM inversion keeps a source's layout in its z_T: the noise of a latent pixel is what draws
that place's content back, so a sampler started from it first redraws the object where it was,
and the guidance pulls it away against the UNet's own reading of the noise. `warped` moves the
noise with the object instead: each latent pixel the object lands on starts from the noise of
the latent pixel it comes from, and each one the object leaves from the noise of the nearest
latent pixel that holds neither (the background's), so the sampler starts from noise that holds
the object where the flow puts it and the guidance shapes what it draws there
(`Method.warp_start`; BENCHMARKS.md, "A warped start"). Host-side numpy, before the first step:
the compiled program is the same either way.
"""

import numpy as np

from mgjax.config import Method


def source_cells(flow: np.ndarray, factor: int) -> np.ndarray:
    """int[h*w]: for each latent pixel (row-major) of an image whose target flow is f32[H,W,2]
    (pixels, x then y), the latent pixel whose noise it starts from.

    A pixel moves when its flow is not 0; it lands on its flow's end rounded to the pixel grid
    (within the frame). A latent pixel on which at least half of its factor x factor pixels
    land takes the latent pixel most of them come from (the first of a tie); one that the
    object leaves (a moving pixel in it, under half landing on it) takes the nearest latent
    pixel with no moving pixel and none landing (the first of a tie); the rest keep their own."""
    flow = np.asarray(flow, np.float64)
    big_h, big_w, _ = flow.shape
    h, w = big_h // factor, big_w // factor
    cells = np.arange(h * w)
    moving = np.any(flow != 0, axis=-1)
    if not moving.any():
        return cells
    ys, xs = np.nonzero(moving)
    tx = np.rint(xs + flow[ys, xs, 0]).astype(np.int64)
    ty = np.rint(ys + flow[ys, xs, 1]).astype(np.int64)
    inside = (tx >= 0) & (tx < big_w) & (ty >= 0) & (ty < big_h)
    source = (ys // factor) * w + xs // factor
    target = (ty[inside] // factor) * w + tx[inside] // factor
    pair, n = np.unique(target * (h * w) + source[inside], return_counts=True)
    to, fro = np.divmod(pair, h * w)  # [target cell, source cell] pairs and their pixels
    covered = 2 * np.bincount(to, weights=n, minlength=h * w) >= factor * factor
    order = np.lexsort((fro, -n, to))  # per target cell: most pixels first, then the first cell
    to, fro = to[order], fro[order]
    best = np.r_[True, to[1:] != to[:-1]] & covered[to]
    out = cells.copy()
    out[to[best]] = fro[best]
    moved_from = np.bincount(source, minlength=h * w) > 0
    reached = np.bincount(target, minlength=h * w) > 0
    left = moved_from & ~covered
    free = ~(moved_from | reached)
    if left.any() and free.any():
        row, col = np.divmod(cells, w)
        d = (row[left, None] - row[None, free]) ** 2 + (col[left, None] - col[None, free]) ** 2
        out[left] = np.flatnonzero(free)[d.argmin(axis=1)]
    return out


def warped(z_T: np.ndarray, flow: np.ndarray, factor: int) -> np.ndarray:
    """z_T f32[B,C,h,w] with each image's noise moved by its target flow f32[B,H,W,2]
    (`source_cells`)."""
    z_T = np.asarray(z_T)
    flow = np.asarray(flow)
    b, c, h, w = z_T.shape
    if flow.shape[0] != b or flow.shape[1:3] != (h * factor, w * factor):
        raise ValueError(f"flow {flow.shape} does not match z_T {z_T.shape} at factor {factor}")
    flat = z_T.reshape(b, c, h * w)
    moved = [flat[n][:, source_cells(flow[n], factor)] for n in range(b)]
    return np.stack(moved).reshape(z_T.shape)


def initial(method: Method, z_T: np.ndarray, flow: np.ndarray, factor: int) -> np.ndarray:
    """The first latent of the edits of `method`: `warped` with `method.warp_start`, else z_T."""
    return warped(z_T, flow, factor) if method.warp_start else np.asarray(z_T)
