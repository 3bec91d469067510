"""Target flows from described motions, object masks, and the automatic frozen mask.

A motion is a point map p -> T(p) of the image plane (pixel coordinates: x right, y down);
its flow is the displacement f(p) = T(p) - p, applied inside an object mask and zero outside.
Every primitive is a projective map, held as a 3x3 matrix, so compositions are exact:

  translate:dx,dy               T(p) = p + (dx, dy)
  rotate:deg[@cx,cy]            T(p) = c + R(deg)(p - c): f = (R - I)(p - c), counter-clockwise
                                on screen for positive degrees (R is applied with y down)
  scale:s[@cx,cy]               f = (s - 1)(p - c)
  stretch:s,deg[@cx,cy]         f = (s - 1)((p - c).d) d, d the unit direction at `deg`
                                counter-clockwise on screen from +x
  homography:x1,y1,...,x4,y4:X1,Y1,...,X4,Y4   the projective map taking the 4 source points to
                                the 4 target points

Compose with "+", applied left to right: "rotate:30+translate:50,0" rotates, then translates.
The centre c defaults to the object's centroid (the image centre without an object mask).
"""

from typing import NamedTuple

import numpy as np

from flow.errors import InputError

EXAMPLE = "rotate:30@256,256+translate:40,0"


class Motion(NamedTuple):
    matrix: np.ndarray  # f64[3,3] homogeneous point map in pixel coordinates
    spec: str


def _floats(text: str, n: int | None, what: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",")] if text else []
    except ValueError:
        raise InputError(
            f"--motion {what}: {text!r} is not a list of numbers; e.g. {EXAMPLE}"
        ) from None
    if n is not None and len(values) != n:
        raise InputError(f"--motion {what}: needs {n} numbers, got {len(values)}; e.g. {EXAMPLE}")
    if not np.isfinite(values).all():
        raise InputError(f"--motion {what}: numbers must be finite")
    return values


def about(center, m2: np.ndarray) -> np.ndarray:
    """The 3x3 map p -> c + m2 (p - c)."""
    c = np.asarray(center, np.float64)
    out = np.eye(3)
    out[:2, :2] = m2
    out[:2, 2] = c - m2 @ c
    return out


def rotation(degrees: float) -> np.ndarray:
    """2x2 rotation, counter-clockwise on screen in y-down pixel coordinates."""
    t = np.deg2rad(degrees)
    return np.array([[np.cos(t), np.sin(t)], [-np.sin(t), np.cos(t)]])


def direction(degrees: float) -> np.ndarray:
    """Unit vector at `degrees` counter-clockwise on screen from +x, in y-down coordinates."""
    t = np.deg2rad(degrees)
    return np.array([np.cos(t), -np.sin(t)])


def homography(src, dst) -> np.ndarray:
    """The 3x3 projective map taking 4 points src[k] to dst[k] (direct linear transform)."""
    src, dst = np.asarray(src, np.float64), np.asarray(dst, np.float64)
    rows, rhs = [], []
    for (x, y), (u, v) in zip(src, dst, strict=True):
        rows.append([x, y, 1, 0, 0, 0, -u * x, -u * y])
        rows.append([0, 0, 0, x, y, 1, -v * x, -v * y])
        rhs += [u, v]
    a = np.asarray(rows)
    if abs(np.linalg.det(a)) < 1e-9:
        raise InputError("--motion homography: three of the points are collinear; pick 4 corners")
    h = np.linalg.solve(a, np.asarray(rhs))
    return np.append(h, 1.0).reshape(3, 3)


def _primitive(term: str, default_center) -> np.ndarray:
    name, _, rest = term.partition(":")
    name = name.strip().lower()
    center = default_center
    if name in ("rotate", "scale", "stretch") and "@" in rest:
        rest, _, at = rest.partition("@")
        center = _floats(at, 2, f"{name} centre")
    if name == "translate":
        dx, dy = _floats(rest, 2, "translate:dx,dy")
        out = np.eye(3)
        out[:2, 2] = (dx, dy)
        return out
    if name == "rotate":
        (deg,) = _floats(rest, 1, "rotate:degrees[@cx,cy]")
        return about(center, rotation(deg))
    if name == "scale":
        (s,) = _floats(rest, 1, "scale:s[@cx,cy]")
        if s <= 0:
            raise InputError("--motion scale: s must be > 0")
        return about(center, s * np.eye(2))
    if name == "stretch":
        s, deg = _floats(rest, 2, "stretch:s,degrees[@cx,cy]")
        if s <= 0:
            raise InputError("--motion stretch: s must be > 0")
        d = direction(deg)
        return about(center, np.eye(2) + (s - 1) * np.outer(d, d))
    if name == "homography":
        src, sep, dst = rest.partition(":")
        if not sep:
            raise InputError(
                "--motion homography needs source and target points: "
                "homography:x1,y1,x2,y2,x3,y3,x4,y4:X1,Y1,X2,Y2,X3,Y3,X4,Y4"
            )
        a = np.reshape(_floats(src, 8, "homography source points"), (4, 2))
        b = np.reshape(_floats(dst, 8, "homography target points"), (4, 2))
        return homography(a, b)
    raise InputError(
        f"--motion: unknown motion {name!r}; use translate, rotate, scale, stretch or "
        f"homography, e.g. {EXAMPLE}"
    )


def parse_motion(spec: str, default_center) -> Motion:
    """'rotate:30@256,256+translate:40,0' -> the composed point map (left to right)."""
    terms = [t for t in spec.split("+") if t.strip()]
    if not terms:
        raise InputError(f"--motion is empty; e.g. {EXAMPLE}")
    matrix = np.eye(3)
    for term in terms:
        matrix = _primitive(term, default_center) @ matrix
    return Motion(matrix, spec)


def motion_flow(motion: Motion, height: int, width: int, mask=None) -> np.ndarray:
    """f32[H,W,2] displacement T(p) - p, zero where `mask` (bool[H,W]) is False."""
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float64)
    p = np.stack([xs, ys, np.ones_like(xs)], -1)
    q = p @ motion.matrix.T
    w = q[..., 2:]
    if (np.abs(w) < 1e-9).any() or ((w < 0).any() and (w > 0).any()):
        raise InputError("--motion: the homography sends part of the image to infinity")
    flow = q[..., :2] / w - p[..., :2]
    if mask is not None:
        flow = np.where(np.asarray(mask, bool)[..., None], flow, 0.0)
    return flow.astype(np.float32)


def parse_box(box: str) -> tuple[int, int, int, int]:
    """'x0,y0,x1,y1' (pixels, x1/y1 exclusive) -> the four ints, rounded."""
    x0, y0, x1, y1 = (int(round(v)) for v in _floats(box, 4, "--object_box x0,y0,x1,y1"))
    return x0, y0, x1, y1


def box_mask(box: str, height: int, width: int) -> np.ndarray:
    """'x0,y0,x1,y1' (pixels, x1/y1 exclusive) -> bool[H,W]."""
    x0, y0, x1, y1 = parse_box(box)
    if not (0 <= x0 < x1 <= width and 0 <= y0 < y1 <= height):
        raise InputError(
            f"--object_box {box}: needs 0 <= x0 < x1 <= {width} and 0 <= y0 < y1 <= {height}"
        )
    mask = np.zeros((height, width), bool)
    mask[y0:y1, x0:x1] = True
    return mask


def centroid(mask) -> tuple[float, float]:
    ys, xs = np.nonzero(mask)
    return float(xs.mean()), float(ys.mean())


def landing(flow: np.ndarray, moving: np.ndarray) -> np.ndarray:
    """bool[H,W]: pixels that moving source pixels land on (rounded p + f(p), inside the frame)."""
    h, w = moving.shape
    ys, xs = np.nonzero(moving)
    tx = np.rint(xs + flow[ys, xs, 0].astype(np.float64))
    ty = np.rint(ys + flow[ys, xs, 1].astype(np.float64))
    inside = (tx >= 0) & (tx < w) & (ty >= 0) & (ty < h)  # in float: no huge value is cast
    out = np.zeros((h, w), bool)
    out[ty[inside].astype(np.int64), tx[inside].astype(np.int64)] = True
    return out


def check_in_frame(lands: np.ndarray) -> None:
    """An InputError when a flow's moving pixels land nowhere in the frame (`landing`'s bool[H,W]
    of a flow that moves something): nothing of the object would be left to guide."""
    if not lands.any():
        raise InputError(
            "the motion moves the object entirely out of the frame; use a smaller motion"
        )


def in_frame(flow: np.ndarray) -> None:
    """`check_in_frame` of a flow f32[H,W,2] (a flow that moves nothing passes)."""
    moving = np.any(flow != 0, axis=-1)
    if moving.any():
        check_in_frame(landing(flow, moving))


def dilate_mask(mask: np.ndarray, radius: int) -> np.ndarray:
    """Square dilation of bool[H,W] by `radius` pixels (nothing enters from outside): `radius`
    steps of the 3x3 dilation, stopping once a step changes nothing (the frame is full, or the
    mask is empty), so a radius past the frame's size costs no more than the frame's size."""
    out = mask.copy()
    for _ in range(radius):
        step = out.copy()
        step[1:] |= out[:-1]
        step[:-1] |= out[1:]
        step[:, 1:] |= step[:, :-1].copy()
        step[:, :-1] |= step[:, 1:].copy()
        if np.array_equal(step, out):
            break
        out = step
    return out


def grow_mask(mask: np.ndarray, px: int) -> np.ndarray:
    """bool[H,W] grown by `px` 4-connected steps (pixels within city-block distance `px`;
    nothing enters from outside the frame), stopping once a step changes nothing."""
    out = mask.copy()
    for _ in range(px):
        step = out.copy()
        step[1:] |= out[:-1]
        step[:-1] |= out[1:]
        step[:, 1:] |= out[:, :-1]
        step[:, :-1] |= out[:, 1:]
        if np.array_equal(step, out):
            break
        out = step
    return out


def auto_frozen_mask(flow: np.ndarray, factor: int, dilate: int = 2) -> np.ndarray:
    """Frozen mask bool[1,1,h,w] (True = copied from the source) for a flow f32[H,W,2].

    Editable = where pixels move from, union where they land, pooled to the latent grid (a
    latent pixel is editable if any of its factor x factor pixels is) and dilated by `dilate`
    latent pixels; frozen = the rest. A flow that moves nothing freezes nothing (no mask)."""
    moving = np.any(flow != 0, axis=-1)
    h, w = moving.shape
    if h % factor or w % factor:
        raise InputError(f"image size {h}x{w} is not a multiple of the latent factor {factor}")
    if not moving.any():
        return np.zeros((1, 1, h // factor, w // factor), bool)
    lands = landing(flow, moving)
    check_in_frame(lands)
    touched = (moving | lands).reshape(h // factor, factor, w // factor, factor).any(axis=(1, 3))
    return ~dilate_mask(touched, dilate)[None, None]
