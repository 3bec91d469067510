"""Tests for flow.pth, the torch-free and code-free .pth reader (torch is the reference)."""

import collections
import io
import os
import pickle
import zipfile
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np
import pytest
import torch

from flow.errors import InputError
from flow.pth import read_pth, read_state_dict

_NP_DTYPES = {
    torch.float16: np.float16,
    torch.bfloat16: ml_dtypes.bfloat16,
    torch.float32: np.float32,
    torch.float64: np.float64,
    torch.int8: np.int8,
    torch.int16: np.int16,
    torch.int32: np.int32,
    torch.int64: np.int64,
    torch.uint8: np.uint8,
    torch.uint16: np.uint16,
    torch.bool: np.bool_,
}
_FORMATS = {"zip": {}, "legacy": {"_use_new_zipfile_serialization": False}}


def _save(obj: Any, path: Path, fmt: str) -> Path:
    torch.save(obj, path, **_FORMATS[fmt])
    return path


def _assert_matches(ours: Any, ref: Any, where: str = "obj") -> None:
    """Asserts that what read_pth returned equals what torch.load returned."""
    if isinstance(ref, torch.Tensor):
        assert isinstance(ours, np.ndarray), where
        assert ours.dtype == _NP_DTYPES[ref.dtype], where
        assert ours.shape == tuple(ref.shape), where
        ref = ref.detach().resolve_neg()
        if ref.dtype in (torch.bfloat16, torch.uint16):
            ours, ref = ours.astype(np.float64), ref.double()
        np.testing.assert_array_equal(ours, ref.numpy(), err_msg=where)
    elif isinstance(ref, torch.Size):
        assert type(ours) is tuple and ours == tuple(ref), where
    elif isinstance(ref, dict):
        assert type(ours) is type(ref), where
        assert list(ours) == list(ref), where
        for key in ref:
            _assert_matches(ours[key], ref[key], f"{where}[{key!r}]")
    elif isinstance(ref, list | tuple):
        assert type(ours) is type(ref) and len(ours) == len(ref), where
        for i, (a, b) in enumerate(zip(ours, ref, strict=True)):
            _assert_matches(a, b, f"{where}[{i}]")
    else:
        assert type(ours) is type(ref) and ours == ref, where


def _roundtrip(obj: Any, path: Path, fmt: str) -> Any:
    """Saves obj with torch, reads it back both ways, checks they agree; returns ours."""
    _save(obj, path, fmt)
    ours = read_pth(path)
    _assert_matches(ours, torch.load(path, weights_only=True))
    return ours


def _dtype_tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    out = {}
    for dtype in _NP_DTYPES:
        if dtype.is_floating_point:
            t = torch.randn(3, 5, generator=g).to(dtype)
        elif dtype == torch.bool:
            t = torch.rand(3, 5, generator=g) > 0.5
        else:
            info = torch.iinfo(dtype)
            t = torch.randint(max(info.min, -1000), min(info.max, 1000), (3, 5), generator=g)
            t = t.to(dtype)
        out[str(dtype)] = t
    out["int64_extremes"] = torch.tensor([torch.iinfo(torch.int64).min, -1, 0, 2**62])
    out["float32_special"] = torch.tensor([float("inf"), -0.0, 1e-40, 3.4e38])
    return out


@pytest.mark.parametrize("fmt", _FORMATS)
def test_all_dtypes(tmp_path: Path, fmt: str) -> None:
    tensors = _dtype_tensors()
    uint16 = tensors.pop("torch.uint16")
    ours = _roundtrip(tensors, tmp_path / "dtypes.pth", fmt)
    assert ours["torch.bfloat16"].dtype == np.dtype(ml_dtypes.bfloat16)
    # uint16 is pickled as _rebuild_tensor_v3(UntypedStorage, ..., torch.uint16); torch 2.14
    # cannot torch.load that from a legacy-format file, so compare with the source tensor.
    ours = read_pth(_save({"u": uint16, "tail": uint16[1:]}, tmp_path / "u16.pth", fmt))
    _assert_matches(ours, {"u": uint16, "tail": uint16[1:]})


@pytest.mark.parametrize("fmt", _FORMATS)
def test_scalars_views_and_containers(tmp_path: Path, fmt: str) -> None:
    base = torch.arange(24, dtype=torch.float32).reshape(2, 3, 4)
    obj = {
        "scalar_f": torch.tensor(3.5),
        "scalar_i": torch.tensor(-7),
        "scalar_b": torch.tensor(True),
        "transposed": base[0].t(),
        "sliced": base[1, 1:, 2:],
        "permuted": base.permute(2, 0, 1),
        "every_other": base[:, :, ::2],
        "expanded": torch.arange(3.0).reshape(3, 1).expand(3, 4),
        "empty": torch.zeros(0, 3),
        "neg_view": torch._neg_view(base[0]),
        "param": torch.nn.Parameter(torch.ones(2, 2)),
        "mask": torch.rand(1, 4, 64, 64, generator=torch.Generator().manual_seed(1)) > 0.5,
        "size": base.shape,
        "nested": collections.OrderedDict(
            items=[base[0, 0], (base[1, 2], 3, "x")],
            none=None,
            flags=(True, False),
            number=1.5,
            text="ünïcode",
        ),
    }
    ours = _roundtrip(obj, tmp_path / "views.pth", fmt)
    assert ours["sliced"].shape == (2, 2) and ours["sliced"][0, 0] == 18.0
    assert ours["scalar_f"].shape == () and ours["mask"].shape == (1, 4, 64, 64)
    arrays = [v for v in ours.values() if isinstance(v, np.ndarray)]
    assert all(a.flags.c_contiguous and a.flags.writeable for a in arrays)


@pytest.mark.parametrize("fmt", _FORMATS)
@pytest.mark.parametrize("protocol", [4, 5])
def test_newer_pickle_protocols(tmp_path: Path, fmt: str, protocol: int) -> None:
    obj = {"t": torch.arange(6.0).reshape(2, 3).t(), "set": {1, 2}, "bytes": b"\x00\xff"}
    path = tmp_path / "proto.pth"
    torch.save(obj, path, pickle_protocol=protocol, **_FORMATS[fmt])
    _assert_matches(read_pth(path), obj)


@pytest.mark.parametrize("fmt", _FORMATS)
def test_shared_storage(tmp_path: Path, fmt: str) -> None:
    x = torch.arange(10, dtype=torch.float64)
    obj = {"whole": x, "tail": x[5:], "matrix": x.view(2, 5), "again": x}
    ours = _roundtrip(obj, tmp_path / "shared.pth", fmt)
    np.testing.assert_array_equal(ours["tail"], [5, 6, 7, 8, 9])


@pytest.mark.parametrize("fmt", _FORMATS)
def test_raft_state_dict(tmp_path: Path, fmt: str) -> None:
    torchvision = pytest.importorskip("torchvision")
    sd = torchvision.models.optical_flow.raft_small().state_dict()
    ours = _roundtrip(sd, tmp_path / "raft.pth", fmt)
    assert type(ours) is collections.OrderedDict
    loaded = read_state_dict(tmp_path / "raft.pth")
    assert list(loaded) == list(sd)
    assert all(isinstance(v, np.ndarray) for v in loaded.values())


@pytest.mark.parametrize("fmt", _FORMATS)
def test_batchnorm_state_dict(tmp_path: Path, fmt: str) -> None:
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4))
    net(torch.randn(2, 3, 8, 8))  # updates running stats and num_batches_tracked
    _roundtrip(net.state_dict(), tmp_path / "bn.pth", fmt)
    loaded = read_state_dict(tmp_path / "bn.pth")
    assert loaded["1.num_batches_tracked"].dtype == np.int64
    assert loaded["1.num_batches_tracked"].shape == () and loaded["1.num_batches_tracked"] == 1


def test_read_state_dict_unwraps_checkpoint(tmp_path: Path) -> None:
    sd = {"w": torch.ones(2), "b": torch.zeros(1)}
    torch.save({"epoch": 3, "state_dict": sd, "optimizer": {}}, tmp_path / "ckpt.pth")
    loaded = read_state_dict(tmp_path / "ckpt.pth")
    assert list(loaded) == ["w", "b"] and isinstance(loaded["w"], np.ndarray)
    torch.save(sd, tmp_path / "plain.pth")
    assert list(read_state_dict(tmp_path / "plain.pth")) == ["w", "b"]
    torch.save({"w": torch.ones(2), "lr": 0.1}, tmp_path / "mixed.pth")
    with pytest.raises(InputError, match="'lr' is a float"):
        read_state_dict(tmp_path / "mixed.pth")
    torch.save([torch.ones(1)], tmp_path / "list.pth")
    with pytest.raises(InputError, match="expected a state dict"):
        read_state_dict(tmp_path / "list.pth")


def test_zip_prefix_and_big_endian(tmp_path: Path) -> None:
    t = torch.tensor([1.5, -2.0, 3.25], dtype=torch.float32)
    src = _save({"t": t, "i": torch.tensor([1, -2], dtype=torch.int16)}, tmp_path / "x.pth", "zip")
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(tmp_path / "big.pth", "w") as zout:
        for name in zin.namelist():
            rest = name.split("/", 1)[1]
            data = zin.read(name)
            if rest == "byteorder":
                data = b"big"
            elif rest == "data/0":
                data = np.frombuffer(data, "<f4").astype(">f4").tobytes()
            elif rest == "data/1":
                data = np.frombuffer(data, "<i2").astype(">i2").tobytes()
            zout.writestr(f"some_other_name/{rest}", data)
    ours = read_pth(tmp_path / "big.pth")
    np.testing.assert_array_equal(ours["t"], t.numpy())
    np.testing.assert_array_equal(ours["i"], [1, -2])
    assert ours["t"].dtype == np.dtype("=f4")


class _Evil:
    def __init__(self, target: Path) -> None:
        self.target = target

    def __reduce__(self) -> tuple:
        return (os.system, (f"echo pwned > {self.target}",))


class _Custom:
    pass


@pytest.mark.parametrize("fmt", _FORMATS)
def test_refuses_code(tmp_path: Path, fmt: str) -> None:
    target = tmp_path / "SOMEFILE"
    path = _save({"w": torch.ones(2), "x": _Evil(target)}, tmp_path / "evil.pth", fmt)
    refused = r"evil.pth: refusing to load: the file contains pickled code \((posix|nt)\.system\)"
    with pytest.raises(InputError, match=refused):
        read_pth(path)
    assert not target.exists()
    with pytest.raises(InputError, match="evil.pth: refusing"):
        read_state_dict(path)
    assert not target.exists()

    path = _save({"obj": _Custom()}, tmp_path / "custom.pth", fmt)
    with pytest.raises(InputError, match=r"_Custom"):
        read_pth(path)
    path = _save(torch.nn.Linear(2, 2), tmp_path / "module.pth", fmt)
    with pytest.raises(InputError, match="refusing to load"):
        read_pth(path)


def _write_zip(path: Path, pkl: bytes, storages: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("archive/data.pkl", pkl)
        for key, data in storages.items():
            zf.writestr(f"archive/data/{key}", data)
    return path


class _StorageRef:
    def __init__(self, numel: int) -> None:
        self.numel = numel


class _Rebuild:
    def __init__(self, *args: Any) -> None:
        self.args = args

    def __reduce__(self) -> tuple:
        return (torch._utils._rebuild_tensor_v2, self.args)


def _craft_pickle(obj: Any) -> bytes:
    """Pickles obj the way torch does, with _StorageRef as storage '0' of FloatStorage."""

    class _Pickler(pickle.Pickler):
        def persistent_id(self, o: Any) -> Any:
            if isinstance(o, _StorageRef):
                return ("storage", torch.FloatStorage, "0", "cpu", o.numel)
            return None

    buf = io.BytesIO()
    _Pickler(buf, protocol=2).dump(obj)
    return buf.getvalue()


def test_rejects_out_of_bounds_views(tmp_path: Path) -> None:
    storage = np.arange(4, dtype=np.float32).tobytes()
    hooks = collections.OrderedDict()
    ok = _Rebuild(_StorageRef(4), 1, (3,), (1,), False, hooks)
    path = _write_zip(tmp_path / "ok.pth", _craft_pickle({"t": ok}), {"0": storage})
    np.testing.assert_array_equal(read_pth(path)["t"], [1, 2, 3])
    bad_layouts = [
        (0, (5,), (1,)),  # longer than the storage
        (2, (2, 2), (2, 1)),  # strided past the end
        (-1, (2,), (1,)),  # negative offset
        (0, (2,), (-1,)),  # negative stride
        (0, (2, 2), (1,)),  # rank mismatch
    ]
    for offset, size, stride in bad_layouts:
        bad = _Rebuild(_StorageRef(4), offset, size, stride, False, hooks)
        path = _write_zip(tmp_path / "bad.pth", _craft_pickle({"t": bad}), {"0": storage})
        with pytest.raises(InputError, match="bad.pth: "):
            read_pth(path)
    short = _Rebuild(_StorageRef(8), 0, (8,), (1,), False, hooks)
    path = _write_zip(tmp_path / "short.pth", _craft_pickle(short), {"0": storage})
    with pytest.raises(InputError, match="truncated"):
        read_pth(path)


def test_refuses_state_on_shared_objects(tmp_path: Path) -> None:
    # BUILD on the `torch.float32` global would mutate numpy's float32 dtype singleton in place.
    state = pickle.dumps((3, ">", None, None, None, -1, -1, 0), protocol=2)[2:-1]
    pkl = b"\x80\x02ctorch\nfloat32\n" + state + b"b."
    path = _write_zip(tmp_path / "build.pth", pkl, {})
    with pytest.raises(InputError, match="refusing to load"):
        read_pth(path)
    assert np.dtype(np.float32).byteorder == "="


@pytest.mark.parametrize("fmt", _FORMATS)
def test_truncated(tmp_path: Path, fmt: str) -> None:
    data = _save({"w": torch.randn(64, 64)}, tmp_path / "full.pth", fmt).read_bytes()
    for cut in (len(data) // 2, len(data) - 1, 40, 3):
        path = tmp_path / "half.pth"
        path.write_bytes(data[:cut])
        with pytest.raises(InputError, match=r"^\S*half.pth: ") as info:
            read_pth(path)
        assert "\n" not in str(info.value)


def test_garbage_and_missing(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    for i, head in enumerate([b"", b"\x80\x02", b"PK\x03\x04", b"\x80\x02\x8a\x0a", b"x"]):
        path = tmp_path / f"junk{i}.pth"
        path.write_bytes(head + rng.bytes(1000))
        with pytest.raises(InputError, match=f"junk{i}.pth: ") as info:
            read_pth(path)
        assert "\n" not in str(info.value)
    plain = tmp_path / "plain.pkl"
    plain.write_bytes(pickle.dumps({"a": 1}, protocol=2))
    with pytest.raises(InputError, match="bad magic number"):
        read_pth(plain)
    with pytest.raises(InputError, match="no such file"):
        read_pth(tmp_path / "missing.pth")
    with pytest.raises(InputError, match="is a directory"):
        read_pth(tmp_path)
    with zipfile.ZipFile(tmp_path / "other.zip", "w") as zf:
        zf.writestr("hello.txt", "hi")
    with pytest.raises(InputError, match="without data.pkl"):
        read_pth(tmp_path / "other.zip")


def test_declared_sizes_are_not_trusted(tmp_path: Path) -> None:
    """A 1.5 kB file whose tensor is one element expanded to 10^9 (4 GB as a copy) is refused
    before anything is allocated; so is a zip member shorter than its storage declares."""
    path = tmp_path / "expanded.pth"
    torch.save({"w": torch.zeros(1).expand(10**9)}, path)
    assert path.stat().st_size < 4096
    with pytest.raises(InputError, match="repeats its storage of 1 element"):
        read_pth(path)
    hooks = collections.OrderedDict()
    storage = np.arange(4, dtype=np.float32).tobytes()
    huge = _Rebuild(_StorageRef(2**40), 0, (4,), (1,), False, hooks)
    path = _write_zip(tmp_path / "huge.pth", _craft_pickle({"t": huge}), {"0": storage})
    with pytest.raises(
        InputError, match="truncated .16 bytes; its storage declares 4,398,046,511,104"
    ):
        read_pth(path)
