"""Reading and writing Middlebury .flo optical-flow files."""

import os
from pathlib import Path

import numpy as np

from flow.errors import InputError

MAGIC = np.float32(202021.25)
_HEADER_BYTES = 12


def read_flo(path: str | os.PathLike[str]) -> np.ndarray:
    """Reads a .flo file into f32[H,W,2] (u, v); any malformation raises InputError."""
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        raise InputError(f"{path}: no such .flo file") from None
    except OSError as e:
        raise InputError(f"{path}: cannot read .flo file ({e.strerror})") from None
    if len(data) < _HEADER_BYTES:
        raise InputError(f"{path}: truncated .flo file ({len(data)} bytes, header needs 12)")
    magic = np.frombuffer(data, "<f4", count=1)[0]
    if magic != MAGIC:
        raise InputError(f"{path}: not a .flo file (magic {magic!r}, expected 202021.25)")
    width, height = (int(d) for d in np.frombuffer(data, "<i4", count=2, offset=4))
    if width < 0 or height < 0:
        raise InputError(f"{path}: corrupt .flo header (width {width}, height {height})")
    expected = _HEADER_BYTES + 4 * 2 * width * height
    if len(data) < expected:
        raise InputError(
            f"{path}: truncated .flo file ({len(data)} bytes, {width}x{height} needs {expected})"
        )
    if len(data) > expected:
        raise InputError(
            f"{path}: {len(data) - expected} unexpected trailing bytes after {width}x{height} flow"
        )
    flow = np.frombuffer(data, "<f4", count=2 * width * height, offset=_HEADER_BYTES)
    return flow.reshape(height, width, 2).astype(np.float32)


def write_flo(path: str | os.PathLike[str], flow: np.ndarray) -> None:
    """Writes f32[H,W,2] (u, v) to `path` as .flo, atomically (temp file + rename)."""
    flow = np.asarray(flow)
    if flow.ndim != 3 or flow.shape[-1] != 2:
        raise InputError(f"{path}: flow to write must be [H,W,2], got shape {flow.shape}")
    height, width, _ = flow.shape
    payload = b"".join(
        (
            np.array([MAGIC], "<f4").tobytes(),
            np.array([width, height], "<i4").tobytes(),
            np.ascontiguousarray(flow, dtype="<f4").tobytes(),
        )
    )
    from flow.files import write_atomic

    def write(tmp):
        with open(tmp, "wb") as f:
            f.write(payload)

    write_atomic(str(path), write)
