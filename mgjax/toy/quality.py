"""Ground-truth quality measures for toy edits, and the forward-warp baseline.

An edit of a shapes-world scene moves object k by a known map; the ground truth is the scene
rendered with the object moved. Measures (images f32[H,W,3] in [0, 1]):
  placement error: distance between the centroids of the edited object's mask and of the
    ground-truth mask (px); the edited mask is found by colour (the object's own colour);
  IoU of the two masks;
  PSNR of the region that should not change (1 px away from the object before and after);
  PSNR of the disoccluded region (the object before, not after) against the ground truth.
"""

import numpy as np

from mgjax.motion import dilate_mask
from mgjax.toy import shapes


def psnr(a, b, region) -> float | None:
    """PSNR (dB) of a vs b over the pixels of bool[H,W] `region`; None if it is empty."""
    if not region.any():
        return None
    mse = float(np.mean(np.square(a[region] - b[region])))
    return float(10 * np.log10(1.0 / max(mse, 1e-10)))


def color_mask(image, scene: shapes.Scene, k: int, tolerance: float = 0.2) -> np.ndarray:
    """Pixels whose colour is within `tolerance` (RMS over RGB) of object k's base colour, as
    rendered (solid fills vary by +-10%, dots by +-20%: the median over its true mask is used)."""
    truth = shapes.render(scene)
    ref = np.median(truth["image"][truth["masks"][k]], axis=0)
    dist = np.sqrt(np.mean(np.square(image - ref), axis=-1))
    return dist < tolerance


def centroid(mask) -> np.ndarray | None:
    ys, xs = np.nonzero(mask)
    return None if xs.size == 0 else np.array([xs.mean(), ys.mean()])


def edit_scores(edited, scene: shapes.Scene, k: int, matrix) -> dict:
    """The measures above for `edited` (f32[H,W,3]) against moving object k by `matrix`."""
    before = shapes.render(scene)
    after = shapes.render(scene, {k: matrix})
    found = color_mask(edited, scene, k)
    target = after["masks"][k]
    c_found, c_target = centroid(found), centroid(target)
    placement = None if c_found is None else float(np.linalg.norm(c_found - c_target))
    union = (found | target).sum()
    still = ~dilate_mask(before["masks"][k] | target, 1)  # anti-aliased edges belong to the object
    uncovered = before["masks"][k] & ~target
    return {
        "placement_px": placement,
        "iou": float((found & target).sum() / union) if union else None,
        "psnr_unchanged": psnr(edited, after["image"], still),
        "psnr_disoccluded": psnr(edited, after["image"], uncovered),
    }


def forward_warp(image, flow, moving) -> tuple[np.ndarray, np.ndarray]:
    """Splat the `moving` pixels of image (f32[H,W,3]) to p + flow(p), bilinearly, over the
    source with the moved pixels' old places cleared. Returns (warped image, hole mask bool[H,W]:
    pixels the object left that nothing landed on; they are black in the image)."""
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
    landed = weight > 0.5
    out = np.where(moving[..., None], 0.0, image)
    out[landed] = acc[landed] / weight[landed, None]
    holes = moving & ~landed
    return out.astype(np.float32), holes
