"""File helpers for the command lines: RGB images in, atomic writes out."""

import os
import tempfile
from collections.abc import Callable

import numpy as np
from PIL import Image, UnidentifiedImageError

from flow.errors import UserError


def read_rgb(path: str) -> np.ndarray:
    """f32[H,W,3] in [0, 255] from an RGB image file; anything else is a UserError."""
    if not os.path.isfile(path):
        raise UserError(f"{path}: no such image file")
    try:
        with Image.open(path) as im:
            im.load()
            mode, bands = im.mode, im.getbands()
            arr = np.asarray(im)
    except (UnidentifiedImageError, OSError, SyntaxError) as e:
        raise UserError(f"{path}: not a readable image ({e})") from None
    if mode != "RGB":
        raise UserError(
            f"{path}: has {len(bands)} channel(s) ({mode}); RAFT takes 3-channel RGB images: "
            "convert it, e.g. PIL Image.convert('RGB')"
        )
    return arr.astype(np.float32)


def write_atomic(path: str, write: Callable[[str], None]) -> None:
    """Calls write(tmp) on a temporary file beside `path`, then renames it into place."""
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise UserError(f"{path}: folder {folder} does not exist; create it first")
    suffix = os.path.splitext(path)[1]
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=suffix)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
