"""Files for the command lines: images in (with a pixel limit), atomic writes out."""

import math
import os
import stat
import tempfile
import warnings
import zipfile
import zlib
from collections.abc import Callable

import numpy as np
from PIL import Image, UnidentifiedImageError

from flow.errors import InputError

# The most pixels an input image may declare (8192 x 8192): its header is checked before any
# pixel is decoded, so a small file declaring a huge image is refused without the memory.
MAX_PIXELS = 8192 * 8192


def regular_file(path: str, what: str) -> None:
    """An InputError unless `path` (its symlinks followed) is a regular file: a missing path, a
    folder, a pipe or a device is refused before anything is opened, so nothing blocks on a
    pipe or reads a device without end."""
    try:
        info = os.stat(path)
    except (OSError, ValueError):
        raise InputError(f"{path}: no such {what} file") from None
    if not stat.S_ISREG(info.st_mode):
        kind = "a folder" if stat.S_ISDIR(info.st_mode) else "a pipe or device"
        raise InputError(f"{path}: is {kind}, not a {what} file; give the path of a file")


def read_image(
    path: str, what: str = "image", mode: str | Callable[[str], str | None] | None = None
) -> np.ndarray:
    """The pixels of an image file (converted to `mode` if given; a callable picks the mode
    from the file's own) as a numpy array; a missing, unreadable or oversized file is an
    InputError naming `what` it should have been."""
    return _read(path, what, mode)[0]


def _read(path: str, what: str, mode):
    regular_file(path, what)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                w, h = im.size
                if w * h > MAX_PIXELS:
                    raise InputError(
                        f"{path}: the {what} declares {w}x{h} pixels, more than the "
                        f"{MAX_PIXELS:,} allowed; resize it first"
                    )
                im.load()
                target = mode(im.mode) if callable(mode) else mode
                return np.asarray(im if target is None else im.convert(target)), im.mode
    except Image.DecompressionBombError:
        raise InputError(
            f"{path}: the {what} declares more than the {MAX_PIXELS:,} pixels allowed; resize it "
            "first"
        ) from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        if isinstance(e, InputError):
            raise
        raise InputError(f"{path}: not a readable {what} ({e})") from None


def read_rgb(path: str) -> np.ndarray:
    """f32[H,W,3] in [0, 255] from an RGB image file; anything else is an InputError."""
    arr, mode = _read(path, "image", None)
    if mode != "RGB":
        bands = 1 if arr.ndim == 2 else arr.shape[-1]
        raise InputError(
            f"{path}: has {bands} channel(s) ({mode}); RAFT takes 3-channel RGB images: "
            "convert it, e.g. PIL Image.convert('RGB')"
        )
    return arr.astype(np.float32)


# dtypes an array file may hold: numbers and booleans (an object array would need pickle)
_NUMERIC = "biuf"


class _Refused(ValueError):
    """A .npy header that is well formed but declares what the reader refuses."""


def _npy_header(f, where: str, kinds: str) -> tuple[tuple[int, ...], bool, np.dtype, int]:
    """(shape, fortran order, dtype, data bytes) from the .npy header at f's position; the
    dtype must be of `kinds` (numpy dtype kind letters) and the byte count is exact (Python
    integers: a shape whose product overflows is not mistaken for a small one)."""
    version = np.lib.format.read_magic(f)
    read = np.lib.format.read_array_header_1_0
    if version != (1, 0):
        read = np.lib.format.read_array_header_2_0
    shape, fortran, dtype = read(f, max_header_size=10000)
    if dtype.hasobject or dtype.kind not in kinds or dtype.fields is not None:
        raise _Refused(f"{where} holds {dtype} data, not {_KIND_NAMES.get(kinds, 'numbers')}")
    if any(d < 0 for d in shape):
        raise _Refused(f"{where} declares the negative shape {shape}")
    return tuple(shape), fortran, dtype, math.prod(shape) * dtype.itemsize


_KIND_NAMES = {"f": "real floating-point numbers", "u": "unsigned integers", "iu": "integers",
               "U": "text", _NUMERIC: "numbers"}  # fmt: skip


def _array(data: bytes, shape, fortran: bool, dtype: np.dtype) -> np.ndarray:
    """A writable array of `data` read as a .npy body."""
    return np.frombuffer(data, dtype).reshape(shape, order="F" if fortran else "C").copy()


def load_npy(path: str, what: str = "array") -> np.ndarray:
    """A numeric .npy array, never unpickled; a missing, corrupt or object-dtype file is an
    InputError naming `what` it should have been. The header's shape is checked against the
    file's size before the data is read, and exactly that many bytes are read."""
    regular_file(path, what)
    try:
        with open(path, "rb") as f:
            shape, fortran, dtype, need = _npy_header(f, "it", _NUMERIC)
            left = os.fstat(f.fileno()).st_size - f.tell()
            if need != left:
                raise ValueError(
                    f"its header declares {need:,} bytes of data but it holds {left:,}"
                )
            data = f.read(need)
            if len(data) != need:
                raise ValueError(f"it holds {len(data):,} bytes of data, not {need:,}")
        return _array(data, shape, fortran, dtype)
    except (OSError, ValueError, EOFError) as e:
        raise InputError(
            f"{path}: not a readable .npy {what} ({e}); write it with numpy.save"
        ) from None


class NpzFile:
    """The arrays of an .npz (a zip of .npy members) read one at a time, each checked before
    its data is read: the member names come from the zip's directory alone, and each member's
    .npy header (dtype, shape) goes to the caller's check before at most the bytes it declares
    are inflated. Nothing is unpickled; every refusal is an InputError naming the file.

    max_bytes: the most data bytes all members together may declare (None: no limit beyond the
    caller's shape checks)."""

    _ERRORS = (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error, RuntimeError,
               NotImplementedError)  # fmt: skip

    def __init__(self, path: str, what: str, fix: str, max_bytes: int | None = None):
        self.path, self.what, self.fix, self.max_bytes, self.used = path, what, fix, max_bytes, 0
        regular_file(path, what)
        try:
            self._zip = zipfile.ZipFile(path)
        except self._ERRORS as e:
            raise self.error(f"not a readable {what} ({e})") from None
        self._members: dict[str, zipfile.ZipInfo] = {}
        for info in self._zip.infolist():
            key = info.filename.removesuffix(".npy")
            if key == info.filename or key in self._members:
                self.close()
                raise self.error(f"its member {info.filename!r} is not one array of an .npz")
            self._members[key] = info
        self.keys = list(self._members)

    def error(self, message: str) -> InputError:
        return InputError(f"{self.path}: {message}; {self.fix}")

    def read(
        self,
        key: str,
        check: Callable[[tuple[int, ...], np.dtype], str | None],
        kinds: str = _NUMERIC,
    ) -> np.ndarray:
        """The array `key`: `check(shape, dtype)` returns why it is refused (None: accepted)
        and runs before any of its data is read; dtypes outside `kinds` are refused first."""
        info = self._members[key]
        try:
            with self._zip.open(info) as f:
                shape, fortran, dtype, need = _npy_header(f, f"its {key!r}", kinds)
                why = check(shape, dtype)
                if why:
                    raise self.error(f"its {key!r} {why}")
                self.used += need
                if self.max_bytes is not None and self.used > self.max_bytes:
                    raise self.error(
                        f"its arrays declare more than the {self.max_bytes:,} bytes it can hold"
                    )
                if info.file_size != f.tell() + need:
                    raise self.error(
                        f"its {key!r} declares {need:,} bytes of data but the zip says "
                        f"{info.file_size - f.tell():,}"
                    )
                data = f.read(need)
                if len(data) != need or f.read(1):
                    raise self.error(f"its {key!r} does not hold the {need:,} bytes it declares")
        except InputError:
            raise
        except _Refused as e:
            raise self.error(str(e)) from None
        except self._ERRORS as e:
            raise self.error(f"its {key!r} is unreadable ({e})") from None
        return _array(data, shape, fortran, dtype)

    def close(self) -> None:
        self._zip.close()

    def __enter__(self) -> "NpzFile":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _file_mode() -> int:
    """The mode a new file gets under the process's umask (as open() would create it)."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


_FIX = "free some space or fix the folder, then run again (with --resume for an edit)"


TEMPORARY = ".tmp-"  # the name prefix of write_atomic's temporary files


def write_atomic(path: str, write: Callable[[str], None]) -> None:
    """Calls write(tmp) on a temporary file beside `path`, then renames it into place with the
    permissions a plainly created file would have (the umask's, not mkstemp's 0600)."""
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise InputError(f"{path}: folder {folder} does not exist; create it first")
    suffix = os.path.splitext(path)[1]
    try:
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=TEMPORARY, suffix=suffix)
    except OSError as e:
        raise InputError(f"{path}: cannot write it ({e.strerror}); {_FIX}") from None
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, _file_mode())
        os.replace(tmp, path)
    except BaseException as e:
        if os.path.exists(tmp):
            os.unlink(tmp)
        if isinstance(e, OSError) and e.errno is not None:  # a full disk, a lost mount, ...
            raise InputError(f"{path}: cannot write it ({e.strerror}); {_FIX}") from None
        raise
