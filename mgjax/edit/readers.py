"""Reading what a user gives: masks, flows, frozen masks, guidance schedules and source images,
each checked against the size it must have; anything wrong is an InputError naming the file."""

import os

import numpy as np

from flow.errors import InputError
from flow.files import load_npy, read_image


def require(path: str, what: str) -> None:
    """A InputError unless `path` exists."""
    if not os.path.exists(path):
        raise InputError(f"{path}: no such {what}")


# Image modes whose one band is read as it is; every other mode is read as RGBA.
_ONE_BAND = ("1", "L", "I", "I;16", "I;16B", "I;16L", "I;16N", "F")


def _mask(path: str) -> np.ndarray:
    """A mask image or .npy -> bool[H,W], any size. The rule (MASK_RULE): a pixel is object
    where its largest colour channel is above half the largest value in the whole mask, so
    0/1, 0/255, anti-aliased and coloured masks all read as drawn; a transparent pixel (alpha
    at most half) counts as 0. A mask with no value above 0 is empty."""
    require(path, "mask file")
    if path.endswith(".npy"):
        m = load_npy(path, "mask")
    else:
        m = read_image(path, "mask image", lambda mode: None if mode in _ONE_BAND else "RGBA")
        if m.ndim == 3:  # RGBA: colour where opaque
            m = np.where(m[..., 3] > 127, m[..., :3].max(axis=-1), 0)
    m = np.asarray(m)
    if m.ndim == 3:
        m = m.max(axis=-1)
    if m.ndim != 2:
        raise InputError(f"{path}: a mask is one 2-D array (or H x W x channels), got {m.shape}")
    if m.dtype == bool or m.size == 0:
        return m.astype(bool)
    if m.dtype.kind == "f" and not np.isfinite(m).all():
        raise InputError(f"{path}: the mask holds NaN or inf values")
    top = m.max()
    return (m > top / 2) if top > 0 else np.zeros(m.shape, bool)


MASK_RULE = (
    "a pixel is object where its largest channel is above half the mask's largest value "
    "(transparent pixels are not)"
)


def read_mask_image(path: str, h: int, w: int) -> np.ndarray:
    """An object mask image or .npy (see `_mask`) -> bool[H,W] of the image size, with at
    least one object pixel."""
    m = _mask(path)
    if m.shape != (h, w):
        raise InputError(f"{path}: mask is {m.shape[1]}x{m.shape[0]} but the image is {w}x{h}")
    if not m.any():
        raise InputError(f"{path}: the object mask is empty; {MASK_RULE}")
    return m


# A flow moves a pixel by at most this many times the image's longer side: further, every
# pixel has left the frame long before, and larger values only mean a broken file.
MAX_FLOW_SIDES = 16


def read_flow_file(path: str, h: int, w: int) -> np.ndarray:
    """.npy (H,W,2), .flo, or a reference .pth (1,2,H,W) -> f32[H,W,2], finite and at most
    MAX_FLOW_SIDES times the image's longer side in pixels."""
    require(path, "flow file")
    if path.endswith(".npy"):
        f = load_npy(path, "flow")
    elif path.endswith(".flo"):
        from flow.flo import read_flo

        f = read_flo(path)
    elif path.endswith(".pth"):
        from flow.pth import read_pth

        f = read_pth(path)
        if not isinstance(f, np.ndarray) or f.ndim < 3 or f.shape[-3] != 2:
            raise InputError(f"{path}: expected one flow tensor (1, 2, H, W)")
        f = np.transpose(f.reshape((-1,) + f.shape[-3:])[0], (1, 2, 0))
    else:
        raise InputError(f"{path}: flow files must be .npy, .flo or .pth")
    if f.dtype.kind not in "biuf":
        raise InputError(f"{path}: the flow holds {f.dtype} data, not real numbers")
    if f.shape != (h, w, 2):
        raise InputError(f"{path}: flow is {f.shape} but the image needs ({h}, {w}, 2)")
    f = _finite32(f, path, "flow")
    limit = MAX_FLOW_SIDES * max(h, w)
    peak = float(np.abs(f).max()) if f.size else 0.0
    if peak > limit:
        raise InputError(
            f"{path}: the flow moves pixels {peak:.3g} pixels; a flow for a {w}x{h} image moves "
            f"them at most {limit} ({MAX_FLOW_SIDES} times its longer side)"
        )
    return f


def _finite32(a: np.ndarray, path: str, what: str) -> np.ndarray:
    """`a` as float32, refused (without numpy's warnings) if any value is NaN, inf, or too
    large for float32."""
    with np.errstate(over="ignore", invalid="ignore"):
        out = np.asarray(a, np.float32)
    if not np.isfinite(out).all():
        raise InputError(f"{path}: the {what} contains NaN or inf values (or values too large)")
    return out


def read_frozen(path: str, lat_shape, vae_factor: int = 8) -> np.ndarray:
    """A frozen mask file: reference .pth (1,4,h,w) bool, .npy, or a PNG at latent size."""
    require(path, "frozen mask file")
    if path.endswith(".pth"):
        from flow.pth import read_pth

        m = read_pth(path)
        if not isinstance(m, np.ndarray):
            raise InputError(f"{path}: expected one frozen-mask tensor (1, 4, h, w)")
    elif path.endswith(".npy"):
        m = load_npy(path, "frozen mask")
    else:
        m = _mask(path)
    return check_frozen(np.asarray(m).astype(bool), lat_shape, path, vae_factor)


def check_frozen(m: np.ndarray, lat_shape, path: str, vae_factor: int = 8) -> np.ndarray:
    """A frozen mask bool[...] as bool[1,C,h,w] or bool[1,1,h,w] for the latent shape
    (1,C,h,w): its last two sizes the latent grid's, one or C channels, one image; an
    InputError naming the mask otherwise."""
    _, c, h, w = lat_shape
    if (
        m.ndim > 4
        or (m.ndim >= 3 and m.shape[-3] not in (1, c))
        or (m.ndim == 4 and m.shape[0] != 1)
    ):
        raise InputError(
            f"{path}: frozen mask has shape {tuple(m.shape)}; give (1, {c}, {h}, {w}) (one per "
            f"latent channel) or (1, 1, {h}, {w}) or ({h}, {w}) (the same for every channel)"
        )
    m = m.reshape((1,) * (4 - m.ndim) + m.shape)
    if m.shape[-2:] != (h, w):
        raise InputError(
            f"{path}: frozen mask is {m.shape[-1]}x{m.shape[-2]}; a frozen mask is at the latent "
            f"grid's size, {w}x{h} (the image's {w * vae_factor}x{h * vae_factor} / {vae_factor})"
        )
    return m


def read_schedule(path: str | None, steps: int) -> np.ndarray | None:
    """A .npy of guidance multipliers, one per DDIM step, or None without a path."""
    if not path:
        return None
    schedule = load_npy(path, "guidance schedule").reshape(-1)
    if schedule.size != steps:
        raise InputError(
            f"{path}: the guidance schedule has {schedule.size} entries but there are {steps} "
            "DDIM steps; give one multiplier per step"
        )
    schedule = _finite32(schedule, path, "guidance schedule")
    return schedule


MIN_SIZE = 64  # the smallest image side RAFT takes (its 1/8 features, pooled 3 times)


def _resized(image: np.ndarray, h: int, w: int) -> np.ndarray:
    from PIL import Image

    im = Image.fromarray(np.clip(np.rint(image[0] * 255), 0, 255).astype(np.uint8))
    return (np.asarray(im.resize((w, h), Image.LANCZOS), np.float32) / 255.0)[None]


def fit_image(
    image: np.ndarray, factor: int, resize: bool, path: str, native: int | None = None
) -> np.ndarray:
    """f32[1,H,W,3] as is when H and W are multiples of `factor`; else resized to the nearest
    multiples with `resize`, an InputError without. native: the model's image side; an image
    over twice that on its longer side is refused, or with `resize` scaled down to it."""
    h, w = image.shape[1:3]
    if native and max(h, w) > 2 * native:
        if not resize:
            raise InputError(
                f"{path}: {w}x{h} is larger than this model takes (at most {2 * native} pixels "
                f"a side, twice its {native}x{native}); scale it down, or pass --resize to fit "
                f"its longer side to {native}"
            )
        s = native / max(h, w)
        image = _resized(image, max(1, round(h * s)), max(1, round(w * s)))
        h, w = image.shape[1:3]
    if h % factor == 0 and w % factor == 0 and min(h, w) >= MIN_SIZE:
        return image
    low = -(-MIN_SIZE // factor) * factor  # the smallest multiple of factor RAFT takes
    th, tw = max(low, round(h / factor) * factor), max(low, round(w / factor) * factor)
    if min(h, w) < MIN_SIZE and not resize:
        raise InputError(
            f"{path}: {w}x{h} is smaller than the {MIN_SIZE}x{MIN_SIZE} RAFT needs; resize it to "
            f"{tw}x{th} (or pass --resize)"
        )
    if not resize:
        raise InputError(
            f"{path}: {w}x{h} is not a multiple of {factor}; resize it to {tw}x{th} "
            "(or pass --resize)"
        )
    return _resized(image, th, tw)
