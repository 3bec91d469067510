"""Drag points to a dense target flow.

`--drag "x1,y1>X1,Y1; x2,y2>X2,Y2"` lists handle -> target pairs (pixels, x right, y down). The
flow is a similarity transform fitted to the pairs (least squares; exact for one or two pairs)
plus a thin-plate spline of the remaining residuals, which makes it pass exactly through every
given displacement and stay smooth between them:

  one pair              a translation
  two pairs             the rotation + scale + translation they imply (exact)
  three or more         the best similarity, bent by the spline through the residuals

It applies inside the object mask (or box) when one is given, else to the whole image.
"""

import numpy as np

from flow.errors import InputError

EXAMPLE = "120,200>160,200; 120,260>150,270"


def parse_drag(text: str) -> tuple[np.ndarray, np.ndarray]:
    """'x1,y1>X1,Y1; ...' -> (handles f64[N,2], targets f64[N,2])."""
    pairs = [p for p in text.replace("\n", ";").split(";") if p.strip()]
    if not pairs:
        raise InputError(f"--drag is empty; e.g. --drag '{EXAMPLE}'")
    handles, targets = [], []
    for pair in pairs:
        ends = pair.split(">")
        try:
            if len(ends) != 2:
                raise ValueError
            a, b = ([float(v) for v in end.split(",")] for end in ends)
            if len(a) != 2 or len(b) != 2:
                raise ValueError
        except ValueError:
            raise InputError(
                f"--drag: {pair.strip()!r} is not 'x,y>X,Y'; e.g. --drag '{EXAMPLE}'"
            ) from None
        handles.append(a)
        targets.append(b)
    h, t = np.asarray(handles), np.asarray(targets)
    if not (np.isfinite(h).all() and np.isfinite(t).all()):
        raise InputError("--drag: coordinates must be finite numbers")
    if len({tuple(p) for p in h}) < len(h):
        raise InputError("--drag: two pairs share a handle point; give each handle once")
    return h, t


def fit_similarity(handles, targets) -> np.ndarray:
    """The 3x3 map p -> s R p + t (rotation, uniform scale, translation) closest to taking
    handles to targets in least squares; exact for one (a translation) or two pairs."""
    h, t = np.asarray(handles, np.float64), np.asarray(targets, np.float64)
    out = np.eye(3)
    if len(h) == 1:
        out[:2, 2] = t[0] - h[0]
        return out
    # unknowns (a, b, tx, ty): x' = a x + b y + tx, y' = -b x + a y + ty
    rows = []
    for x, y in h:
        rows.append([x, y, 1.0, 0.0])
        rows.append([y, -x, 0.0, 1.0])
    a, b, tx, ty = np.linalg.lstsq(np.asarray(rows), t.reshape(-1), rcond=None)[0]
    out[:2] = [[a, b, tx], [-b, a, ty]]
    return out


def _tps_kernel(r2):
    return np.where(r2 > 0, 0.5 * r2 * np.log(np.maximum(r2, 1e-300)), 0.0)  # r^2 log r


def drag_flow(handles, targets, height: int, width: int, mask=None) -> np.ndarray:
    """f32[H,W,2]: the flow through the drag pairs (see the module doc), zero outside `mask`."""
    h, t = np.asarray(handles, np.float64), np.asarray(targets, np.float64)
    inside = (h >= 0).all(axis=1) & (h[:, 0] <= width - 1) & (h[:, 1] <= height - 1)
    if not inside.all():
        bad = h[~inside][0]
        raise InputError(
            f"--drag: handle {bad[0]:g},{bad[1]:g} is outside the {width}x{height} image"
        )
    if mask is not None:
        mask = np.asarray(mask, bool)
        hit = mask[np.rint(h[:, 1]).astype(int), np.rint(h[:, 0]).astype(int)]
        if not hit.all():
            bad = h[~hit][0]
            raise InputError(
                f"--drag: handle {bad[0]:g},{bad[1]:g} is outside the object mask; put handles "
                "on the object or widen the mask"
            )
    sim = fit_similarity(h, t)
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float64)
    p = np.stack([xs, ys], -1)
    flow = p @ sim[:2, :2].T + sim[:2, 2] - p
    residual = t - (h @ sim[:2, :2].T + sim[:2, 2])
    if len(h) >= 3 and np.abs(residual).max() > 1e-9:
        # thin-plate spline through the residuals: kernel weights + an affine part
        n = len(h)
        k = _tps_kernel(np.sum(np.square(h[:, None] - h[None]), -1))
        poly = np.concatenate([np.ones((n, 1)), h], axis=1)
        system = np.zeros((n + 3, n + 3))
        system[:n, :n], system[:n, n:], system[n:, :n] = k, poly, poly.T
        rhs = np.zeros((n + 3, 2))
        rhs[:n] = residual
        coef = np.linalg.lstsq(system, rhs, rcond=None)[0]
        d2 = np.sum(np.square(p[:, :, None] - h[None, None]), -1)
        flow = flow + _tps_kernel(d2) @ coef[:n] + coef[n] + p @ coef[n + 1 :]
    if mask is not None:
        flow = np.where(mask[..., None], flow, 0.0)
    return flow.astype(np.float32)
