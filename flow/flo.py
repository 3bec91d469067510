"""Reading and writing Middlebury .flo optical-flow files."""

import os
import stat

import numpy as np

from flow.errors import InputError
from flow.files import MAX_PIXELS, regular_file, write_atomic

MAGIC = np.float32(202021.25)
_HEADER_BYTES = 12


def read_flo(path: str | os.PathLike[str]) -> np.ndarray:
    """Reads a .flo file into f32[H,W,2] (u, v); any malformation raises InputError. The
    12-byte header is checked against the file's real size before the flow is read, and only
    regular files are opened (a pipe or a device has no size to check)."""
    path = os.fspath(path)
    regular_file(path, ".flo")
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except OSError as e:
        raise InputError(f"{path}: cannot read .flo file ({e.strerror})") from None
    with os.fdopen(fd, "rb") as f:
        try:
            size = os.fstat(f.fileno()).st_size
            if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
                raise InputError(f"{path}: not a regular file; give the path of a .flo file")
            header = f.read(_HEADER_BYTES)
            if len(header) < _HEADER_BYTES:
                raise InputError(
                    f"{path}: truncated .flo file ({len(header)} bytes, header needs 12)"
                )
            magic = np.frombuffer(header, "<f4", count=1)[0]
            if magic != MAGIC:
                raise InputError(f"{path}: not a .flo file (magic {magic!r}, expected 202021.25)")
            width, height = (int(d) for d in np.frombuffer(header, "<i4", count=2, offset=4))
            if width < 1 or height < 1 or width * height > MAX_PIXELS:
                raise InputError(
                    f"{path}: corrupt .flo header (width {width}, height {height}; a flow is "
                    f"at least 1x1 and at most {MAX_PIXELS:,} pixels)"
                )
            expected = _HEADER_BYTES + 4 * 2 * width * height
            if size < expected:
                raise InputError(
                    f"{path}: truncated .flo file ({size} bytes, {width}x{height} needs {expected})"
                )
            if size > expected:
                raise InputError(
                    f"{path}: {size - expected} unexpected trailing bytes after {width}x{height} "
                    "flow"
                )
            data = f.read(expected - _HEADER_BYTES)
        except OSError as e:
            raise InputError(f"{path}: cannot read .flo file ({e.strerror})") from None
    if len(data) != expected - _HEADER_BYTES:
        raise InputError(f"{path}: truncated .flo file (it shrank while being read)")
    flow = np.frombuffer(data, "<f4", count=2 * width * height)
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

    def write(tmp):
        with open(tmp, "wb") as f:
            f.write(payload)

    write_atomic(str(path), write)
