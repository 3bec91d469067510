"""Ground-truth quality measures for toy edits, and the forward-warp baseline.

An edit of a shapes-world scene moves object k by a known map; the ground truth is the scene
rendered with the object moved. Measures (images f32[H,W,3] in [0, 1]):
  placement error: distance between the centroids of the edited object's pixels and of the
    ground truth's (px). An object's pixels are found by colour (`object_pixels`): within
    SEARCH px of where it was or should be, of its own colour (as rendered: the median over its
    true mask), and closer to that colour than to the clean plate (the scene without the
    object), so that background texture and other objects of a similar colour are not taken
    for it;
  IoU of the edit's object pixels with the ground truth's;
  PSNR of the region that should not change (1 px away from the object before and after);
  PSNR of the disoccluded region (the object before, not after) against the ground truth;
  whether the object is found at all, the share of the requested displacement achieved along
  its direction, and the object's colour error.
"""

import dataclasses

import numpy as np

from mgjax.edit.motion import dilate_mask
from mgjax.toy import shapes

# Scene seeds (shapes.sample_scene(np.random.default_rng(seed))) kept apart: the benches and the
# figures measure on HELDOUT_SEEDS, the settings are tuned on TUNING_SEEDS, and training draws
# its scenes from streams seeded otherwise (np.random.default_rng([seed, stage])).
HELDOUT_SEEDS = range(1_000_000, 1_010_000)
TUNING_SEEDS = range(2_000_000, 2_010_000)


def psnr(a, b, region) -> float | None:
    """PSNR (dB, at most 60) of a vs b over the pixels of bool[H,W] `region`; None if empty."""
    if not region.any():
        return None
    mse = float(np.mean(np.square(a[region] - b[region])))
    return float(10 * np.log10(1.0 / max(mse, 1e-6)))  # capped at 60 dB (exact copies)


SEARCH = 6  # px around the object's place before and after in which its pixels are looked for


def _rms(image, color) -> np.ndarray:
    return np.sqrt(np.mean(np.square(image - np.asarray(color)), axis=-1))


def segment(image, color, tolerance: float = 0.2) -> np.ndarray:
    """bool[H,W]: pixels whose colour is within `tolerance` (RMS over RGB) of `color`."""
    return _rms(image, color) < tolerance


SHADES = (0.4, 1.1)  # the brightness range of a colour in the world: 0.75 +- 0.2 textures
# and +- 0.125 ramps for backgrounds, 0.6-1.0 for dotted fills, and room for what a model draws


def shade_distance(image, color, shades=SHADES) -> np.ndarray:
    """f32[H,W]: RMS distance of each pixel to the nearest shade s * `color`, s within
    `shades`: how far a pixel is from anything a surface of that colour shows when it is lit
    darker or brighter (closed form: the projection onto the colour's ray, clipped)."""
    c = np.asarray(color, np.float32)
    s = np.clip((image @ c) / max(float(c @ c), 1e-6), *shades)
    return _rms(image, s[..., None] * c)


def object_pixels(image, color, plate=None, region=None, tolerance: float = 0.2) -> np.ndarray:
    """bool[H,W]: the pixels of `image` that show an object of colour `color`: within
    `tolerance` of it, inside bool[H,W] `region` (when given), and closer to it than to
    `plate` f32[H,W,3], the scene without the object (NaN where unknown: no test there)."""
    found = segment(image, color, tolerance)
    if region is not None:
        found &= region
    if plate is not None:
        # a NaN plate compares False: the pixel stays
        found &= ~(_rms(image, plate) <= _rms(image, color))
    return found


def silhouette(mask, gap: int = 2) -> np.ndarray:
    """bool[H,W]: the object that a colour mask bool[H,W] shows, as one would paint it to move
    it: the mask's largest 8-connected part with gaps of up to `gap` px closed and its holes
    filled (a dotted or textured object's off-colour pixels are part of it). All False for an
    empty mask."""
    from scipy import ndimage

    padded = np.pad(mask, gap)  # closing near the frame's edge must not erode the object
    closed = ndimage.binary_closing(padded, iterations=gap)[gap:-gap, gap:-gap] | mask
    parts, count = ndimage.label(closed, structure=np.ones((3, 3)))
    if count == 0:
        return np.zeros_like(mask, bool)
    largest = 1 + int(np.argmax(ndimage.sum_labels(closed, parts, range(1, count + 1))))
    return ndimage.binary_fill_holes(parts == largest)


def soft_edge(image, moving, color, px: int, share: float = 0.2) -> np.ndarray:
    """bool[H,W]: silhouette bool[H,W] `moving` of the object of RGB `color` in f32[H,W,3]
    `image`, grown by up to `px` px (4-connected steps) into the pixels that blend its colour
    with the background's: a pixel joins when it lies at least `share` of the way from the
    local background colour (the mean of the band 3 px beyond the reach, within 6 px) towards
    the object's, measured along the line between the two. The decoder's blurred rim is
    taken; a background of another colour next to the object is not."""
    from scipy import ndimage

    if px <= 0:  # scipy reads 0 iterations as "until nothing changes"
        return moving.copy()
    reach = ndimage.binary_dilation(moving, iterations=px)
    band = ndimage.binary_dilation(reach, iterations=3) & ~reach
    weight = ndimage.uniform_filter(band.astype(np.float64), 13)
    total = np.stack([ndimage.uniform_filter(image[..., c] * band, 13) for c in range(3)], -1)
    fallback = np.median(image[band], axis=0) if band.any() else np.zeros(3)
    background = np.where(weight[..., None] > 1e-6, total / np.maximum(weight, 1e-6)[..., None],
                          fallback)  # fmt: skip
    towards = np.asarray(color, np.float64) - background
    along = ((image - background) * towards).sum(-1) / np.maximum((towards**2).sum(-1), 1e-6)
    blended = along >= share
    grown = moving.copy()
    for _ in range(px):
        grown |= ndimage.binary_dilation(grown) & blended
    return grown


def plate_of(scene: shapes.Scene, k: int) -> np.ndarray:
    """The scene rendered without object k (what its pixels would show if it were gone)."""
    others = tuple(o for i, o in enumerate(scene.objects) if i != k)
    return shapes.render(dataclasses.replace(scene, objects=others))["image"]


def object_kept(image, other, mask, window: int = 3) -> float:
    """IoU of an object's colour mask (`segment`, its median colour over bool[H,W] `mask` in
    `image`) in `other` with that in `image`, both within `window` px of the object: 1 when
    `other` draws the object as `image` does."""
    color = np.median(image[mask], axis=0)
    near = dilate_mask(mask, window)
    return iou(segment(image, color) & near, segment(other, color) & near) or 0.0


def centroid(mask) -> np.ndarray | None:
    ys, xs = np.nonzero(mask)
    return None if xs.size == 0 else np.array([xs.mean(), ys.mean()])


def iou(a, b) -> float | None:
    """Intersection over union of two bool[H,W] masks; None when both are empty."""
    union = (a | b).sum()
    return float((a & b).sum() / union) if union else None


def move_mask(mask, matrix) -> np.ndarray:
    """bool[H,W] mask moved by the 3x3 point map: out(p) = mask(matrix^-1 p), nearest pixel."""
    h, w = mask.shape
    ys, xs = np.mgrid[0:h, 0:w].astype(np.float64)
    inv = np.linalg.inv(np.asarray(matrix, np.float64))
    d = inv[2, 0] * xs + inv[2, 1] * ys + inv[2, 2]
    sx = np.rint((inv[0, 0] * xs + inv[0, 1] * ys + inv[0, 2]) / d).astype(int)
    sy = np.rint((inv[1, 0] * xs + inv[1, 1] * ys + inv[1, 2]) / d).astype(int)
    ok = (sx >= 0) & (sx < w) & (sy >= 0) & (sy < h)
    return ok & mask[np.clip(sy, 0, h - 1), np.clip(sx, 0, w - 1)]


def scores(edited, reference, before, after, color, truth=None, tolerance: float = 0.2,
           plate=None, exclude=None, want=None) -> dict:  # fmt: skip
    """The measures for `edited` (f32[H,W,3]) of an object (bool[H,W] masks `before` in the
    source and `after` where it should land, whole; RGB `color` its typical colour).
    `reference` is the image the unchanged region is compared with (the ground truth, or the
    source); `truth` the exact edited image, when known (else no disoccluded PSNR, and the IoU
    is taken with `want`: bool[H,W] the object's pixels where it should land, `after` when not
    given); `plate` the scene without the object (`object_pixels`; NaN where unknown);
    `exclude` bool[H,W] pixels that are not drawn at all (a forward warp's holes).

    found: the object's pixels cover at least 30% of its target area within 3 px of it;
    displacement_share: the found object's centroid shift along the requested one, as a share
    of it (for motions that move the centroid by 2 px or more, else None); color_error: RMS
    over RGB (in /255) of the edit's median colour inside the target (1 px in from its edge)
    against the object's."""
    region = dilate_mask(before | after, SEARCH)
    found = object_pixels(edited, color, plate, region, tolerance)
    if exclude is not None:
        found &= ~exclude
    if truth is not None:
        want = object_pixels(truth, color, plate, region, tolerance)
    elif want is None:
        want = after
    c_found, c_target, c_source = centroid(found), centroid(after), centroid(before)
    c_want = centroid(want) if want.any() else c_target
    placement = None if c_found is None else float(np.linalg.norm(c_found - c_want))
    requested = c_target - c_source
    share = None
    if c_found is not None and np.linalg.norm(requested) >= 2.0:
        share = float((c_found - c_source) @ requested / (requested @ requested))
    inner = ~dilate_mask(~after, 1)
    inner = inner if inner.any() else after
    median = np.median(edited[inner], axis=0)
    still = ~dilate_mask(before | after, 1)  # anti-aliased edges belong to the object
    return {
        "found": float((found & dilate_mask(after, 3)).sum() >= 0.3 * after.sum()),
        "placement_px": placement,
        "displacement_share": share,
        "iou": iou(found, want) or 0.0,
        "color_error": float(255 * np.sqrt(np.mean(np.square(median - np.asarray(color))))),
        "psnr_unchanged": psnr(edited, reference, still),
        "psnr_disoccluded": None if truth is None else psnr(edited, truth, before & ~after),
    }


def edit_scores(edited, scene: shapes.Scene, k: int, matrix) -> dict:
    """The measures for `edited` (f32[H,W,3]) against moving object k of `scene` by `matrix`,
    with the exact ground truth (the scene rendered with the object moved)."""
    before = shapes.render(scene)
    after = shapes.render(scene, {k: matrix})
    color = np.median(before["image"][before["masks"][k]], axis=0)
    return scores(edited, after["image"], before["masks"][k], after["masks"][k], color,
                  after["image"], plate=plate_of(scene, k))  # fmt: skip


def forward_warp(image, flow, moving) -> tuple[np.ndarray, np.ndarray]:
    """Splat the `moving` pixels of image (f32[H,W,3]) to p + flow(p), bilinearly, over the
    source with the moved pixels' old places cleared. Returns (warped image, hole mask bool[H,W]:
    pixels the object left that nothing lands on; they are black in the image)."""
    h, w, _ = image.shape
    acc = np.zeros((h, w, 3))
    weight = np.zeros((h, w))
    ys, xs = np.nonzero(moving)
    tx, ty = xs + flow[ys, xs, 0], ys + flow[ys, xs, 1]
    x0, y0 = np.floor(tx).astype(int), np.floor(ty).astype(int)
    for dx in (0, 1):
        for dy in (0, 1):
            cx, cy = x0 + dx, y0 + dy
            wgt = (1 - np.abs(tx - cx)) * (1 - np.abs(ty - cy))
            ok = (cx >= 0) & (cx < w) & (cy >= 0) & (cy < h) & (wgt > 0)
            np.add.at(acc, (cy[ok], cx[ok]), wgt[ok, None] * image[ys[ok], xs[ok]])
            np.add.at(weight, (cy[ok], cx[ok]), wgt[ok])
    reached = weight > 0.5
    out = np.where(moving[..., None], 0.0, image)
    out[reached] = acc[reached] / weight[reached, None]
    holes = moving & ~reached
    return out.astype(np.float32), holes
