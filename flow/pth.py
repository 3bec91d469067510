"""Safe, torch-free reader for PyTorch `.pth` checkpoints (never runs pickled code).

Both formats written by `torch.save` are supported: the zip format (default since torch 1.6)
and the legacy stream of pickles (`_use_new_zipfile_serialization=False`). The pickles are
read by `flow.pth_tensors` (`flow.unpickle` with a whitelist of globals: tensor rebuild
functions, storage classes, `torch.Size`, dtypes, `OrderedDict`, `set`); anything else is
refused.
Tensors come back as numpy arrays; `torch.<dtype>` objects come back as `numpy.dtype`.
"""

import io
import struct
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from flow import unpickle
from flow.errors import InputError
from flow.pth_tensors import BadFile, Storage, load_pickle

_MAGIC_NUMBER = 0x1950A86A20F9469CFC6C
_PROTOCOL_VERSION = 1001
_STATE_DICT_KEYS = ("state_dict", "model", "params")
_TRUNCATED = "not a readable PyTorch checkpoint (truncated: tensor data missing)"
_REFUSE_HINT = (
    "not only tensors; re-save it as a plain state dict or convert it with python -m flow.convert"
)


def _byteswap(array: np.ndarray) -> np.ndarray:
    """Swaps each element's bytes (each component's, for complex numbers)."""
    unit = array.itemsize // 2 if array.dtype.kind == "c" else array.itemsize
    if unit == 1:
        return array
    return array.view(f"u{unit}").byteswap().view(array.dtype)


def _finish_storage(raw: np.ndarray, dtype: np.dtype, big_endian: bool) -> np.ndarray:
    """Turns raw storage bytes into a flat array of dtype in native order."""
    if dtype == np.bool_:
        return raw.view(np.uint8) != 0
    array = raw.view(dtype)
    return _byteswap(array) if big_endian else array


def _read_zip(path: Path) -> Any:
    """Reads the zip format: <prefix>data.pkl plus raw storages under <prefix>data/<key>."""
    try:
        zf = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, EOFError, ValueError) as e:
        raise BadFile("not a readable PyTorch checkpoint (truncated or corrupt zip)") from e
    with zf:
        names = set(zf.namelist())
        pickles = sorted(
            (n for n in names if n == "data.pkl" or n.endswith("/data.pkl")),
            key=lambda n: (n.count("/"), n),
        )
        if not pickles:
            raise BadFile("not a PyTorch checkpoint (zip archive without data.pkl)")
        prefix = pickles[0][: -len("data.pkl")]
        if f"{prefix}constants.pkl" in names:
            raise BadFile(
                "is a TorchScript archive (torch.jit.save), not a torch.save checkpoint; "
                "re-save its state_dict() with torch.save"
            )
        order = zf.read(f"{prefix}byteorder") if f"{prefix}byteorder" in names else b"little"
        if order not in (b"little", b"big"):
            raise BadFile(f"unknown byte order {order[:20]!r}")
        cache: dict[str, Storage] = {}

        def load_storage(dtype: np.dtype, key: Any, location: Any, numel: Any) -> Storage:
            if key in cache:
                return cache[key]
            name = f"{prefix}data/{key}"
            if not isinstance(key, str) or name not in names:
                raise BadFile(f"missing tensor data {key!r}")
            if type(numel) is not int or numel < 0:
                raise BadFile(f"bad storage size {numel!r}")
            nbytes = numel * dtype.itemsize
            held = zf.getinfo(name).file_size  # checked before anything is allocated
            if held != nbytes:
                what = "is truncated" if held < nbytes else "is longer than its storage"
                raise BadFile(
                    f"tensor data {key!r} {what} ({held:,} bytes; its storage declares {nbytes:,})"
                )
            with zf.open(name) as fh:
                raw = fh.read(nbytes)
            if len(raw) != nbytes:
                raise BadFile(f"tensor data {key!r} is truncated")
            array = _finish_storage(np.frombuffer(raw, np.uint8), dtype, order == b"big")
            cache[key] = Storage(dtype, array)
            return cache[key]

        return load_pickle(zf.read(pickles[0]), load_storage)


def _read_legacy(data: bytes) -> Any:
    """Reads the legacy format: magic, protocol, sys_info, main pickle, keys, raw storages."""
    buf = io.BytesIO(data)
    if load_pickle(buf) != _MAGIC_NUMBER:
        raise BadFile("not a PyTorch checkpoint (bad magic number)")
    if load_pickle(buf) != _PROTOCOL_VERSION:
        raise BadFile("unsupported legacy checkpoint protocol version")
    sys_info = load_pickle(buf)
    big_endian = isinstance(sys_info, dict) and sys_info.get("little_endian") is False
    main_start = buf.tell()

    # Dry run: learn each storage's dtype (needed to size its bytes) without building tensors.
    dtypes: dict[Any, np.dtype] = {}

    def record(dtype: np.dtype, key: Any, location: Any, numel: Any, view: Any) -> Storage:
        dtypes.setdefault(key, dtype)
        return Storage(dtype, None)

    load_pickle(buf, record)
    keys = load_pickle(buf)
    if not isinstance(keys, list):
        raise BadFile("bad storage key list")
    offset = buf.tell()
    roots: dict[Any, np.ndarray] = {}
    for key in keys:
        if key not in dtypes:
            raise BadFile(f"storage {key!r} is not used by any tensor")
        dtype = dtypes[key]
        if offset + 8 > len(data):
            raise BadFile(_TRUNCATED)
        (numel,) = struct.unpack_from(">q" if big_endian else "<q", data, offset)
        offset += 8
        nbytes = numel * dtype.itemsize
        if numel < 0 or offset + nbytes > len(data):
            raise BadFile(_TRUNCATED)
        raw = np.frombuffer(data, np.uint8, count=nbytes, offset=offset)
        roots[key] = _finish_storage(raw, dtype, big_endian)
        offset += nbytes
    if set(dtypes) - set(roots):
        raise BadFile(_TRUNCATED)

    def load(dtype: np.dtype, key: Any, location: Any, numel: Any, view: Any) -> Storage:
        array = roots[key]
        if view is not None:
            if not isinstance(view, tuple) or len(view) != 3:
                raise BadFile(f"bad storage view {view!r}")
            _, start, count = view
            if type(start) is not int or type(count) is not int or start < 0 or count < 0:
                raise BadFile(f"bad storage view {view!r}")
            array = array[start : start + count]
        return Storage(dtype, array)

    buf.seek(main_start)
    return load_pickle(buf, load)


def read_pth(path: str | Path) -> Any:
    """Reads a `torch.save` file without torch and without running pickled code.

    Args:
        path: the `.pth` file (zip or legacy format).

    Returns:
        The saved object; tensors become numpy arrays (copies, C-contiguous), parameters
        become their arrays, `torch.Size` becomes a tuple and `torch.<dtype>` a numpy dtype.

    Raises:
        InputError: the file is missing, unreadable, corrupt, not a torch checkpoint, or
            references anything but tensors and plain containers.
    """
    path = Path(path)
    try:
        with open(path, "rb") as fh:
            head = fh.read(512)
            if head.startswith(b"PK"):
                return _read_zip(path)
            if head[257:262] == b"ustar":
                raise BadFile("uses the pre-1.0 tar checkpoint format, which is not supported")
            if not head.startswith(b"\x80"):
                raise BadFile("not a PyTorch checkpoint (unrecognized file header)")
            return _read_legacy(head + fh.read())
    except FileNotFoundError:
        raise InputError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise InputError(f"{path}: is a directory, not a checkpoint file") from None
    except OSError as e:
        raise InputError(f"{path}: cannot read ({e.strerror or e})") from None
    except unpickle.Refused as e:
        raise InputError(
            f"{path}: refusing to load: the file contains pickled code ({e}), {_REFUSE_HINT}"
        ) from None
    except BadFile as e:
        raise InputError(f"{path}: {e}") from None
    except EOFError:
        raise InputError(f"{path}: not a readable PyTorch checkpoint (truncated)") from None
    except (RecursionError, MemoryError) as e:
        raise InputError(
            f"{path}: not a readable PyTorch checkpoint ({type(e).__name__})"
        ) from None
    except Exception as e:  # noqa: BLE001  (a corrupt file may fail anywhere: never a traceback)
        detail = " ".join(f"{type(e).__name__}: {e}".split())[:200]
        raise InputError(
            f"{path}: not a readable PyTorch checkpoint (truncated or corrupt: {detail})"
        ) from None


def read_state_dict(path: str | Path) -> dict[str, np.ndarray]:
    """Reads a state dict (names -> arrays) from a `.pth` file.

    A checkpoint dict that nests the weights under "state_dict", "model" or "params"
    (e.g. alongside an epoch count or optimizer state) is unwrapped.

    Raises:
        InputError: the file cannot be read or does not hold a mapping of names to tensors.
    """
    obj = read_pth(path)
    if not isinstance(obj, Mapping):
        raise InputError(
            f"{path}: expected a state dict (names -> tensors), got {type(obj).__name__}"
        )
    if not all(isinstance(v, np.ndarray) for v in obj.values()):
        for key in _STATE_DICT_KEYS:
            if isinstance(obj.get(key), Mapping):
                obj = obj[key]
                break
    for key, value in obj.items():
        if not isinstance(key, str) or not isinstance(value, np.ndarray):
            raise InputError(
                f"{path}: expected a state dict (names -> tensors), but entry {key!r} "
                f"is a {type(value).__name__}"
            )
    return dict(obj)
