"""What an edit leaves on disk for people to look at: images, panel, toggle GIF, loss curves.

Images and the panel are drawn with PIL, loss curves with matplotlib on an off-screen Agg canvas
(no pyplot, no global backend); everything is written atomically.
"""

import json
import os

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
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


# Pictures meant to be looked at (panel.png, toggle.gif) show an image narrower than this many
# pixels enlarged by a whole factor, nearest neighbour: a 64x64 toy edit becomes 192 px wide,
# every pixel a 3x3 block, readable at a glance without inventing detail. The images written as
# data (source.png, edited.png, the flows) keep their size.
VIEW_WIDTH = 192


def view_zoom(width: int) -> int:
    """The whole factor by which a picture shows an image `width` pixels wide."""
    return max(1, -(-VIEW_WIDTH // max(int(width), 1)))


def enlarge(tile_u8: np.ndarray, zoom: int) -> np.ndarray:
    """Each pixel of an image u8[H,W,C] as a zoom x zoom block (nearest neighbour)."""
    return np.repeat(np.repeat(tile_u8, zoom, axis=0), zoom, axis=1)


def panel(source, target_flow, edited, achieved_flow, max_norm=None) -> np.ndarray:
    """source | target flow | edit | achieved flow | |edit - source|, with labels, u8; small
    images enlarged (`view_zoom`)."""
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
    zoom = view_zoom(tiles[0].shape[1])
    tiles = [enlarge(t, zoom) for t in tiles]
    h, w, _ = tiles[0].shape
    labels = ["source", "target flow", "edit", "achieved flow (RAFT)", "|edit - source|"]
    if w < 150:  # narrow tiles: labels that fit them
        labels = ["source", "target", "edit", "RAFT", "diff"]
    bar = 14
    out = Image.new("RGB", (5 * w, h + bar), "white")
    draw = ImageDraw.Draw(out)
    for n, (tile, label) in enumerate(zip(tiles, labels, strict=True)):
        out.paste(Image.fromarray(tile), (n * w, bar))
        draw.text((n * w + 3, 1), label, fill="black")
    return np.asarray(out)


def save_toggle_gif(path: str, source_u8, edited_u8, ms: int = 600) -> None:
    """The source and the edit in turn, small images enlarged (`view_zoom`)."""
    zoom = view_zoom(source_u8.shape[1])
    frames = [Image.fromarray(enlarge(x, zoom)) for x in (source_u8, edited_u8)]

    def write(tmp):
        frames[0].save(
            tmp, format="GIF", save_all=True, append_images=frames[1:], duration=ms, loop=0
        )

    write_atomic(path, write)


def loss_plot(
    curves: dict[str, np.ndarray], size=(640, 420), xlabel: str = "guided evaluation"
) -> np.ndarray:
    """One panel per curve (x = index in the curve), drawn with matplotlib; returns u8[H,W,3].

    NaN entries (evaluations without guidance log NaN energies) are left out and the finite
    ones joined, so a curve guided every other step still shows its trend; a curve without a
    finite entry gets an empty panel that says so.
    """
    w, h = size
    dpi = 100
    # Agg truncates the figure's size to whole pixels: a quarter pixel more keeps it w x h.
    fig = Figure(figsize=((w + 0.25) / dpi, (h + 0.25) / dpi), dpi=dpi, layout="constrained")
    canvas = FigureCanvasAgg(fig)
    names = list(curves) or [""]
    cols = 1 if len(names) <= 2 else 2
    rows = -(-len(names) // cols)
    for n, name in enumerate(names):
        ax = fig.add_subplot(rows, cols, n + 1)
        y = np.asarray(curves.get(name, []), np.float64).reshape(-1)
        x = np.arange(y.size)
        ok = np.isfinite(y)
        if ok.any():
            few = ok.sum() <= 60  # markers while single points are still told apart
            label = f"{name}  (last {y[ok][-1]:.4g})"
            ax.plot(x[ok], y[ok], color="tab:red", lw=1.2, marker="." if few else None, ms=4)
            ax.legend([label], loc="upper right", fontsize=8, frameon=False)
            pad = 0.02 * max(y.size - 1, 1)  # the whole curve's range, unguided tail included
            ax.set_xlim(-pad, y.size - 1 + pad)
        else:
            msg = f"{name}: no finite values" if name else "no curves"
            ax.text(0.5, 0.5, msg, ha="center", va="center", transform=ax.transAxes, fontsize=9)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3, lw=0.5)
        if n >= len(names) - cols:  # the bottom row names the x axis
            ax.set_xlabel(xlabel, fontsize=8)
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[:h, :w, :3].copy()


def snapshot_name(folder: str, step: int) -> str:
    return os.path.join(folder, f"x0_step{step:04d}.png")
