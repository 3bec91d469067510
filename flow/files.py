"""Files for the command lines: images in (with a pixel limit), atomic writes out."""

import os
import tempfile
import warnings
from collections.abc import Callable

import numpy as np
from PIL import Image, UnidentifiedImageError

from flow.errors import InputError

# The most pixels an input image may declare (8192 x 8192): its header is checked before any
# pixel is decoded, so a small file declaring a huge image is refused without the memory.
MAX_PIXELS = 8192 * 8192


def read_image(path: str, what: str = "image", mode: str | None = None) -> np.ndarray:
    """The pixels of an image file (converted to `mode` if given) as a numpy array; a missing,
    unreadable or oversized file is an InputError naming `what` it should have been."""
    return _read(path, what, mode)[0]


def _read(path: str, what: str, mode: str | None):
    if not os.path.isfile(path):
        raise InputError(f"{path}: no such {what} file")
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
                return np.asarray(im if mode is None else im.convert(mode)), im.mode
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


def load_npy(path: str, what: str = "array") -> np.ndarray:
    """A numeric .npy array, never unpickled; a missing, corrupt or object-dtype file is an
    InputError naming `what` it should have been. The header's shape is checked against the
    file's size before the data is read."""
    if not os.path.isfile(path):
        raise InputError(f"{path}: no such {what} file")
    try:
        with open(path, "rb") as f:
            version = np.lib.format.read_magic(f)
            read = np.lib.format.read_array_header_1_0
            if version != (1, 0):
                read = np.lib.format.read_array_header_2_0
            shape, _, dtype = read(f, max_header_size=10000)
            if dtype.kind not in _NUMERIC:
                raise ValueError(f"it holds {dtype} data, not numbers")
            need = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
            left = os.fstat(f.fileno()).st_size - f.tell()
            if need != left:
                raise ValueError(
                    f"its header declares {need:,} bytes of data but it holds {left:,}"
                )
        return np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError) as e:
        raise InputError(
            f"{path}: not a readable .npy {what} ({e}); write it with numpy.save"
        ) from None


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
