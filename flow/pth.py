"""Safe, torch-free reader for PyTorch `.pth` checkpoints (never runs pickled code).

Both formats written by `torch.save` are supported: the zip format (default since torch 1.6)
and the legacy stream of pickles (`_use_new_zipfile_serialization=False`). The pickles are
read by `flow.unpickle` with a whitelist of globals (tensor rebuild functions, storage
classes, `torch.Size`, dtypes, `OrderedDict`, `set`); anything else is refused.
Tensors come back as numpy arrays; `torch.<dtype>` objects come back as `numpy.dtype`.
"""

import collections
import io
import math
import struct
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np
from numpy.lib.stride_tricks import as_strided

from flow import unpickle
from flow.errors import InputError

_MAGIC_NUMBER = 0x1950A86A20F9469CFC6C
_PROTOCOL_VERSION = 1001
_STATE_DICT_KEYS = ("state_dict", "model", "params")
_TRUNCATED = "not a readable PyTorch checkpoint (truncated: tensor data missing)"
_REFUSE_HINT = (
    "not only tensors; re-save it as a plain state dict or convert it with python -m flow.convert"
)

# Legacy typed storage classes (`torch.FloatStorage`, ...) -> element dtype.
_STORAGE_DTYPES = {
    "FloatStorage": np.dtype(np.float32),
    "HalfStorage": np.dtype(np.float16),
    "BFloat16Storage": np.dtype(ml_dtypes.bfloat16),
    "DoubleStorage": np.dtype(np.float64),
    "LongStorage": np.dtype(np.int64),
    "IntStorage": np.dtype(np.int32),
    "ShortStorage": np.dtype(np.int16),
    "CharStorage": np.dtype(np.int8),
    "ByteStorage": np.dtype(np.uint8),
    "BoolStorage": np.dtype(np.bool_),
    "ComplexFloatStorage": np.dtype(np.complex64),
    "ComplexDoubleStorage": np.dtype(np.complex128),
}

# `torch.<name>` dtype globals (pickled for `_rebuild_tensor_v3` and for bare dtype values).
_TORCH_DTYPES = {
    "float32": np.float32,
    "float16": np.float16,
    "bfloat16": ml_dtypes.bfloat16,
    "float64": np.float64,
    "int64": np.int64,
    "int32": np.int32,
    "int16": np.int16,
    "int8": np.int8,
    "uint8": np.uint8,
    "uint16": np.uint16,
    "uint32": np.uint32,
    "uint64": np.uint64,
    "bool": np.bool_,
    "complex64": np.complex64,
    "complex128": np.complex128,
    "float8_e4m3fn": ml_dtypes.float8_e4m3fn,
    "float8_e5m2": ml_dtypes.float8_e5m2,
    "float8_e4m3fnuz": ml_dtypes.float8_e4m3fnuz,
    "float8_e5m2fnuz": ml_dtypes.float8_e5m2fnuz,
    "float8_e8m0fnu": ml_dtypes.float8_e8m0fnu,
}


class _BadFile(Exception):
    """Internal: the file is not a readable checkpoint; message lacks the path prefix."""


class _StorageType:
    """Stands in for a torch storage class; only carries the element dtype."""

    def __init__(self, name: str, dtype: np.dtype) -> None:
        self.name = name
        self.dtype = dtype


_UNTYPED = _StorageType("UntypedStorage", np.dtype(np.uint8))


class _Storage:
    """A loaded storage: a flat array, or None during the legacy dry run."""

    def __init__(self, dtype: np.dtype, array: np.ndarray | None) -> None:
        self.dtype = dtype
        self.array = array


def _check_ints(name: str, values: Any) -> tuple[int, ...]:
    """Validates a tuple of non-negative ints (sizes, strides)."""
    if not isinstance(values, tuple | list) or not all(type(v) is int for v in values):
        raise _BadFile(f"bad tensor {name} {values!r}")
    if any(v < 0 for v in values):
        raise _BadFile(f"negative tensor {name} {values!r}")
    return tuple(values)


_MAX_REPEAT = 256  # how many times an expanded view may repeat its storage's elements


def _view(flat: np.ndarray, offset: Any, size: Any, stride: Any) -> np.ndarray:
    """Copies the strided view (offset, size, stride in elements) out of a flat storage."""
    if not isinstance(flat, np.ndarray) or flat.ndim != 1 or not flat.flags.c_contiguous:
        raise _BadFile("bad tensor storage")
    size = _check_ints("size", size)
    stride = _check_ints("stride", stride)
    if type(offset) is not int or offset < 0 or len(size) != len(stride):
        raise _BadFile(f"bad tensor layout (offset {offset!r}, size {size}, stride {stride})")
    if 0 in size:
        return np.zeros(size, dtype=flat.dtype)
    last = offset + sum((n - 1) * s for n, s in zip(size, stride, strict=True))
    if last >= flat.size:
        raise _BadFile(f"tensor of size {size} reaches past the end of its storage")
    # A view with more elements than its storage repeats them (an expanded tensor: zero
    # strides). Copying it allocates what the file only declares, so a few bytes could ask for
    # gigabytes: a view may repeat its storage's elements only within a bound.
    if math.prod(size) > max(_MAX_REPEAT * flat.size, 2**20):
        raise _BadFile(
            f"tensor of size {size} repeats its storage of {flat.size} element(s) more than "
            f"{_MAX_REPEAT}x; re-save it with .contiguous() if it is meant"
        )
    strides = tuple(s * flat.itemsize for s in stride)
    return as_strided(flat[offset:], shape=size, strides=strides, writeable=False).copy()


def _apply_metadata(array: np.ndarray, metadata: Any) -> np.ndarray:
    """Applies the torch conj/neg view bits recorded in tensor metadata."""
    if not metadata:
        return array
    if not isinstance(metadata, dict) or not set(metadata) <= {"neg", "conj"}:
        raise _BadFile(f"unsupported tensor metadata {metadata!r}")
    if metadata.get("neg"):
        array = -array
    if metadata.get("conj"):
        array = np.conj(array)
    return array


def _check_hooks(backward_hooks: Any) -> None:
    if not isinstance(backward_hooks, dict) or backward_hooks:
        raise _BadFile("tensor has backward hooks")


def _rebuild_tensor(storage: Any, storage_offset: Any, size: Any, stride: Any) -> Any:
    """Stands in for `torch._utils._rebuild_tensor`."""
    if not isinstance(storage, _Storage):
        raise _BadFile("tensor without a storage")
    if storage.array is None:  # legacy dry run: storage bytes are not read yet
        return None
    return _view(storage.array, storage_offset, size, stride)


def _rebuild_tensor_v2(
    storage: Any,
    storage_offset: Any,
    size: Any,
    stride: Any,
    requires_grad: Any,
    backward_hooks: Any,
    metadata: Any = None,
) -> Any:
    """Stands in for `torch._utils._rebuild_tensor_v2`."""
    _check_hooks(backward_hooks)
    array = _rebuild_tensor(storage, storage_offset, size, stride)
    return None if array is None else _apply_metadata(array, metadata)


def _rebuild_tensor_v3(
    storage: Any,
    storage_offset: Any,
    size: Any,
    stride: Any,
    requires_grad: Any,
    backward_hooks: Any,
    dtype: Any,
    metadata: Any = None,
) -> Any:
    """Stands in for `torch._utils._rebuild_tensor_v3` (untyped storage plus a dtype)."""
    _check_hooks(backward_hooks)
    if not isinstance(storage, _Storage) or not isinstance(dtype, np.dtype):
        raise _BadFile("tensor without a storage or dtype")
    if storage.array is None:
        return None
    raw = storage.array.view(np.uint8)
    if raw.size % dtype.itemsize:
        raise _BadFile(f"storage of {raw.size} bytes does not hold whole {dtype} elements")
    return _apply_metadata(_view(raw.view(dtype), storage_offset, size, stride), metadata)


def _rebuild_parameter(data: Any, requires_grad: Any, backward_hooks: Any) -> Any:
    """Stands in for `torch._utils._rebuild_parameter`: a parameter is its tensor."""
    _check_hooks(backward_hooks)
    if data is not None and not isinstance(data, np.ndarray):
        raise _BadFile("parameter without a tensor")
    return data


def _rebuild_parameter_with_state(
    data: Any, requires_grad: Any, backward_hooks: Any, state: Any
) -> Any:
    """Stands in for `torch._utils._rebuild_parameter_with_state`; the state is dropped."""
    return _rebuild_parameter(data, requires_grad, backward_hooks)


def _size(dims: Any = ()) -> tuple[int, ...]:
    """Stands in for `torch.Size`: a plain tuple of ints."""
    return _check_ints("size", tuple(dims) if isinstance(dims, list) else dims)


def _codecs_encode(text: Any, encoding: Any = "utf-8") -> bytes:
    """Stands in for `_codecs.encode`, which protocol-2 pickles use for bytes (latin1 only)."""
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise unpickle.Refused("_codecs.encode")
    return text.encode("latin1")


_GLOBALS: dict[tuple[str, str], Any] = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
    ("torch._utils", "_rebuild_tensor_v3"): _rebuild_tensor_v3,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter_with_state,
    ("torch", "Size"): _size,
    ("torch.storage", "UntypedStorage"): _UNTYPED,
    ("torch", "UntypedStorage"): _UNTYPED,
    ("builtins", "set"): set,
    ("builtins", "frozenset"): frozenset,
    ("__builtin__", "set"): set,
    ("__builtin__", "frozenset"): frozenset,
    ("_codecs", "encode"): _codecs_encode,
}
_GLOBALS.update({("torch", n): _StorageType(n, d) for n, d in _STORAGE_DTYPES.items()})
_GLOBALS.update({("torch", n): np.dtype(d) for n, d in _TORCH_DTYPES.items()})


def _build(target: Any, state: Any) -> None:
    """BUILD opcode: allowed only on dicts (a state dict's `_metadata`), whose state is dropped.

    Anything else could mutate shared objects (e.g. numpy's dtype singletons) in place.
    """
    if type(target) not in (dict, collections.OrderedDict):
        raise unpickle.Refused(f"state set on a {type(target).__name__}")


def _unpickle(data: bytes | io.BytesIO, load_storage: Any = None) -> Any:
    """Runs the restricted unpickler over bytes or an open buffer (advanced past the pickle).

    `load_storage(dtype, *rest)` resolves torch's persistent ids `("storage", type, *rest)`.
    """

    def persistent_load(pid: Any) -> Any:
        if not isinstance(pid, tuple) or not pid:
            raise _BadFile(f"bad persistent id {pid!r}")
        kind = pid[0].decode("ascii") if isinstance(pid[0], bytes) else pid[0]
        if kind == "module":  # a whole nn.Module class pickled by the legacy format
            raise unpickle.Refused(str(pid[1])[:80])
        if kind != "storage" or load_storage is None:
            raise _BadFile(f"unexpected persistent id {kind!r}")
        if not isinstance(pid[1], _StorageType):
            raise _BadFile(f"bad storage type {pid[1]!r}")
        return load_storage(pid[1].dtype, *pid[2:])

    return unpickle.load(
        data, _GLOBALS, build=_build, persistent_load=persistent_load, encoding="utf-8"
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
        raise _BadFile("not a readable PyTorch checkpoint (truncated or corrupt zip)") from e
    with zf:
        names = set(zf.namelist())
        pickles = sorted(
            (n for n in names if n == "data.pkl" or n.endswith("/data.pkl")),
            key=lambda n: (n.count("/"), n),
        )
        if not pickles:
            raise _BadFile("not a PyTorch checkpoint (zip archive without data.pkl)")
        prefix = pickles[0][: -len("data.pkl")]
        if f"{prefix}constants.pkl" in names:
            raise _BadFile(
                "is a TorchScript archive (torch.jit.save), not a torch.save checkpoint; "
                "re-save its state_dict() with torch.save"
            )
        order = zf.read(f"{prefix}byteorder") if f"{prefix}byteorder" in names else b"little"
        if order not in (b"little", b"big"):
            raise _BadFile(f"unknown byte order {order[:20]!r}")
        cache: dict[str, _Storage] = {}

        def load_storage(dtype: np.dtype, key: Any, location: Any, numel: Any) -> _Storage:
            if key in cache:
                return cache[key]
            name = f"{prefix}data/{key}"
            if not isinstance(key, str) or name not in names:
                raise _BadFile(f"missing tensor data {key!r}")
            if type(numel) is not int or numel < 0:
                raise _BadFile(f"bad storage size {numel!r}")
            nbytes = numel * dtype.itemsize
            held = zf.getinfo(name).file_size  # checked before anything is allocated
            if held != nbytes:
                what = "is truncated" if held < nbytes else "is longer than its storage"
                raise _BadFile(
                    f"tensor data {key!r} {what} ({held:,} bytes; its storage declares {nbytes:,})"
                )
            with zf.open(name) as fh:
                raw = fh.read(nbytes)
            if len(raw) != nbytes:
                raise _BadFile(f"tensor data {key!r} is truncated")
            array = _finish_storage(np.frombuffer(raw, np.uint8), dtype, order == b"big")
            cache[key] = _Storage(dtype, array)
            return cache[key]

        return _unpickle(zf.read(pickles[0]), load_storage)


def _read_legacy(data: bytes) -> Any:
    """Reads the legacy format: magic, protocol, sys_info, main pickle, keys, raw storages."""
    buf = io.BytesIO(data)
    if _unpickle(buf) != _MAGIC_NUMBER:
        raise _BadFile("not a PyTorch checkpoint (bad magic number)")
    if _unpickle(buf) != _PROTOCOL_VERSION:
        raise _BadFile("unsupported legacy checkpoint protocol version")
    sys_info = _unpickle(buf)
    big_endian = isinstance(sys_info, dict) and sys_info.get("little_endian") is False
    main_start = buf.tell()

    # Dry run: learn each storage's dtype (needed to size its bytes) without building tensors.
    dtypes: dict[Any, np.dtype] = {}

    def record(dtype: np.dtype, key: Any, location: Any, numel: Any, view: Any) -> _Storage:
        dtypes.setdefault(key, dtype)
        return _Storage(dtype, None)

    _unpickle(buf, record)
    keys = _unpickle(buf)
    if not isinstance(keys, list):
        raise _BadFile("bad storage key list")
    offset = buf.tell()
    roots: dict[Any, np.ndarray] = {}
    for key in keys:
        if key not in dtypes:
            raise _BadFile(f"storage {key!r} is not used by any tensor")
        dtype = dtypes[key]
        if offset + 8 > len(data):
            raise _BadFile(_TRUNCATED)
        (numel,) = struct.unpack_from(">q" if big_endian else "<q", data, offset)
        offset += 8
        nbytes = numel * dtype.itemsize
        if numel < 0 or offset + nbytes > len(data):
            raise _BadFile(_TRUNCATED)
        raw = np.frombuffer(data, np.uint8, count=nbytes, offset=offset)
        roots[key] = _finish_storage(raw, dtype, big_endian)
        offset += nbytes
    if set(dtypes) - set(roots):
        raise _BadFile(_TRUNCATED)

    def load(dtype: np.dtype, key: Any, location: Any, numel: Any, view: Any) -> _Storage:
        array = roots[key]
        if view is not None:
            if not isinstance(view, tuple) or len(view) != 3:
                raise _BadFile(f"bad storage view {view!r}")
            _, start, count = view
            if type(start) is not int or type(count) is not int or start < 0 or count < 0:
                raise _BadFile(f"bad storage view {view!r}")
            array = array[start : start + count]
        return _Storage(dtype, array)

    buf.seek(main_start)
    return _unpickle(buf, load)


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
                raise _BadFile("uses the pre-1.0 tar checkpoint format, which is not supported")
            if not head.startswith(b"\x80"):
                raise _BadFile("not a PyTorch checkpoint (unrecognized file header)")
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
    except _BadFile as e:
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
