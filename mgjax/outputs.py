"""What an edit leaves on disk for people to look at: images, panel, toggle GIF, loss curves.

Everything is drawn with PIL (no plotting dependency) and written atomically.
"""

import json
import os

import numpy as np
from PIL import Image, ImageDraw

from flow.files import write_atomic
from flow.viz import flow_to_color


def to_uint8(image: np.ndarray) -> np.ndarray:
    """f[H,W,3] in [0, 1] -> u8[H,W,3]."""
    return np.clip(np.rint(np.asarray(image, np.float64) * 255.0), 0, 255).astype(np.uint8)


def save_png(path: str, image_u8: np.ndarray) -> None:
    write_atomic(path, lambda tmp: Image.fromarray(image_u8).save(tmp, format="PNG"))


def save_npy(path: str, array: np.ndarray) -> None:
    def write(tmp):
        with open(tmp, "wb") as f:
            np.save(f, array, allow_pickle=False)

    write_atomic(path, write)


def save_text(path: str, text: str) -> None:
    def write(tmp):
        with open(tmp, "w", newline="") as f:
            f.write(text)

    write_atomic(path, write)


def save_json(path: str, obj) -> None:
    def write(tmp):
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=2, sort_keys=True, default=float)
            f.write("\n")

    write_atomic(path, write)


def panel(source, target_flow, edited, achieved_flow, max_norm=None) -> np.ndarray:
    """source | target flow | edit | achieved flow | |edit - source|, with labels, u8."""
    norm = max_norm or max(
        float(np.linalg.norm(target_flow, axis=-1).max()), 1e-6
    )  # one colour scale for both flows, set by the target
    diff = np.abs(edited.astype(np.float64) - source.astype(np.float64))
    diff = diff / max(diff.max(), 1e-6)
    tiles = [
        to_uint8(source),
        flow_to_color(target_flow, max_norm=norm),
        to_uint8(edited),
        flow_to_color(achieved_flow, max_norm=norm),
        to_uint8(diff),
    ]
    h, w, _ = tiles[0].shape
    labels = ["source", "target flow", "edit", "achieved flow (RAFT)", "|edit - source|"]
    if w < 150:  # small images (the toy world): labels that fit their tiles
        labels = ["source", "target", "edit", "RAFT", "diff"]
    bar = 14
    out = Image.new("RGB", (5 * w, h + bar), "white")
    draw = ImageDraw.Draw(out)
    for n, (tile, label) in enumerate(zip(tiles, labels, strict=True)):
        out.paste(Image.fromarray(tile), (n * w, bar))
        draw.text((n * w + 3, 1), label, fill="black")
    return np.asarray(out)


def save_toggle_gif(path: str, source_u8, edited_u8, ms: int = 600) -> None:
    frames = [Image.fromarray(source_u8), Image.fromarray(edited_u8)]

    def write(tmp):
        frames[0].save(
            tmp, format="GIF", save_all=True, append_images=frames[1:], duration=ms, loop=0
        )

    write_atomic(path, write)


def loss_plot(curves: dict[str, np.ndarray], size=(640, 420)) -> np.ndarray:
    """One panel per curve (x = guided evaluation), drawn with PIL; returns u8[H,W,3]."""
    w, h = size
    names = list(curves)
    out = Image.new("RGB", (w, h), "white")
    draw = ImageDraw.Draw(out)
    rows = len(names)
    ph = h // rows
    for r, name in enumerate(names):
        y = np.asarray(curves[name], np.float64).reshape(-1)
        top, left, right, bottom = r * ph + 14, 50, w - 10, (r + 1) * ph - 14
        draw.rectangle((left, top, right, bottom), outline="black")
        finite = y[np.isfinite(y)]
        lo, hi = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
        hi = hi if hi > lo else lo + 1.0
        draw.text((left, top - 13), f"{name}  (last {y[-1]:.4g})", fill="black")
        draw.text((2, top), f"{hi:.3g}", fill="black")
        draw.text((2, bottom - 10), f"{lo:.3g}", fill="black")
        if y.size > 1:
            xs = left + (right - left) * np.arange(y.size) / (y.size - 1)
            ys = bottom - (bottom - top) * (np.nan_to_num(y, nan=lo) - lo) / (hi - lo)
            draw.line(list(zip(xs.tolist(), ys.tolist(), strict=True)), fill=(200, 30, 30))
    return np.asarray(out)


def snapshot_name(folder: str, step: int) -> str:
    return os.path.join(folder, f"x0_step{step:04d}.png")
