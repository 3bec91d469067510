"""Tensors out of torch's pickles, without torch: the globals a checkpoint's pickle may name
(tensor rebuild functions, storage classes, `torch.Size`, dtypes, `OrderedDict`, `set`) stood in
for by functions that check what they are given, and `load_pickle`, which runs `flow.unpickle`'s
restricted unpickler with exactly these. Anything else is refused.
"""

import collections
import io
import math
from typing import Any

import ml_dtypes
import numpy as np
from numpy.lib.stride_tricks import as_strided

from flow import unpickle as restricted

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


class BadFile(Exception):
    """Internal: the file is not a readable checkpoint; message lacks the path prefix."""


class _StorageType:
    """Stands in for a torch storage class; only carries the element dtype."""

    def __init__(self, name: str, dtype: np.dtype) -> None:
        self.name = name
        self.dtype = dtype


_UNTYPED = _StorageType("UntypedStorage", np.dtype(np.uint8))


class Storage:
    """A loaded storage: a flat array, or None during the legacy dry run."""

    def __init__(self, dtype: np.dtype, array: np.ndarray | None) -> None:
        self.dtype = dtype
        self.array = array


def _check_ints(name: str, values: Any) -> tuple[int, ...]:
    """Validates a tuple of non-negative ints (sizes, strides)."""
    if not isinstance(values, tuple | list) or not all(type(v) is int for v in values):
        raise BadFile(f"bad tensor {name} {values!r}")
    if any(v < 0 for v in values):
        raise BadFile(f"negative tensor {name} {values!r}")
    return tuple(values)


_MAX_REPEAT = 256  # how many times an expanded view may repeat its storage's elements


def _view(flat: np.ndarray, offset: Any, size: Any, stride: Any) -> np.ndarray:
    """Copies the strided view (offset, size, stride in elements) out of a flat storage."""
    if not isinstance(flat, np.ndarray) or flat.ndim != 1 or not flat.flags.c_contiguous:
        raise BadFile("bad tensor storage")
    size = _check_ints("size", size)
    stride = _check_ints("stride", stride)
    if type(offset) is not int or offset < 0 or len(size) != len(stride):
        raise BadFile(f"bad tensor layout (offset {offset!r}, size {size}, stride {stride})")
    if 0 in size:
        return np.zeros(size, dtype=flat.dtype)
    last = offset + sum((n - 1) * s for n, s in zip(size, stride, strict=True))
    if last >= flat.size:
        raise BadFile(f"tensor of size {size} reaches past the end of its storage")
    # A view with more elements than its storage repeats them (an expanded tensor: zero
    # strides). Copying it allocates what the file only declares, so a few bytes could ask for
    # gigabytes: a view may repeat its storage's elements only within a bound.
    if math.prod(size) > max(_MAX_REPEAT * flat.size, 2**20):
        raise BadFile(
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
        raise BadFile(f"unsupported tensor metadata {metadata!r}")
    if metadata.get("neg"):
        array = -array
    if metadata.get("conj"):
        array = np.conj(array)
    return array


def _check_hooks(backward_hooks: Any) -> None:
    if not isinstance(backward_hooks, dict) or backward_hooks:
        raise BadFile("tensor has backward hooks")


def _rebuild_tensor(storage: Any, storage_offset: Any, size: Any, stride: Any) -> Any:
    """Stands in for `torch._utils._rebuild_tensor`."""
    if not isinstance(storage, Storage):
        raise BadFile("tensor without a storage")
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
    if not isinstance(storage, Storage) or not isinstance(dtype, np.dtype):
        raise BadFile("tensor without a storage or dtype")
    if storage.array is None:
        return None
    raw = storage.array.view(np.uint8)
    if raw.size % dtype.itemsize:
        raise BadFile(f"storage of {raw.size} bytes does not hold whole {dtype} elements")
    return _apply_metadata(_view(raw.view(dtype), storage_offset, size, stride), metadata)


def _rebuild_parameter(data: Any, requires_grad: Any, backward_hooks: Any) -> Any:
    """Stands in for `torch._utils._rebuild_parameter`: a parameter is its tensor."""
    _check_hooks(backward_hooks)
    if data is not None and not isinstance(data, np.ndarray):
        raise BadFile("parameter without a tensor")
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
        raise restricted.Refused("_codecs.encode")
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
        raise restricted.Refused(f"state set on a {type(target).__name__}")


def load_pickle(data: bytes | io.BytesIO, load_storage: Any = None) -> Any:
    """Runs the restricted unpickler over bytes or an open buffer (advanced past the pickle).

    `load_storage(dtype, *rest)` resolves torch's persistent ids `("storage", type, *rest)`.
    """

    def persistent_load(pid: Any) -> Any:
        if not isinstance(pid, tuple) or not pid:
            raise BadFile(f"bad persistent id {pid!r}")
        kind = pid[0].decode("ascii") if isinstance(pid[0], bytes) else pid[0]
        if kind == "module":  # a whole nn.Module class pickled by the legacy format
            raise restricted.Refused(str(pid[1])[:80])
        if kind != "storage" or load_storage is None:
            raise BadFile(f"unexpected persistent id {kind!r}")
        if not isinstance(pid[1], _StorageType):
            raise BadFile(f"bad storage type {pid[1]!r}")
        return load_storage(pid[1].dtype, *pid[2:])

    return restricted.load(
        data, _GLOBALS, build=_build, persistent_load=persistent_load, encoding="utf-8"
    )
