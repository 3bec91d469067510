"""The checkpoint converter: upstream (princeton-vl) and torchvision layouts, both model sizes.

The upstream checkpoints are built here from torchvision state dicts by an independent renaming
(`upstream_name`, written from the upstream module definitions), with the "module." prefix and
the twice-registered shortcut BatchNorm that real upstream files carry.
"""

import dataclasses
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from flow.checkpoint import detect, flatten, load_raft, load_variables, to_variables
from flow.convert import convert
from flow.errors import InputError
from tests.torch_raft import image_pair, random_torchvision_raft

_ENCODERS = {"feature_encoder": "fnet", "context_encoder": "cnet"}
_MOTION = {"convcorr": "convc", "convflow": "convf"}


def upstream_name(name: str, small: bool) -> str:
    """torchvision RAFT parameter name -> princeton-vl RAFT name (without "module.")."""
    top, *rest = name.split(".")
    if top in _ENCODERS:  # BasicEncoder / SmallEncoder
        if rest[0] == "convnormrelu":  # stem: conv1 + norm1
            rest = [{"0": "conv1", "1": "norm1"}[rest[1]], *rest[2:]]
        elif rest[0] == "conv":  # output 1x1 conv
            rest = ["conv2", *rest[1:]]
        else:  # layerN.B.{convnormreluK.I | downsample.I}.leaf
            layer, block, sub, idx, leaf = rest
            if sub.startswith("convnormrelu"):
                k = sub.removeprefix("convnormrelu")
                rest = [layer, block, ("conv" if idx == "0" else "norm") + k, leaf]
            else:
                assert sub == "downsample", name
        return ".".join([_ENCODERS[top], *rest])
    if top == "update_block":
        module, *rest = rest
        if module == "motion_encoder":  # BasicMotionEncoder / SmallMotionEncoder
            sub, idx, leaf = rest
            assert idx == "0", name
            kind = sub.rstrip("0123456789")
            conv = "conv" if sub == "conv" else _MOTION[kind] + sub.removeprefix(kind)
            return f"update_block.encoder.{conv}.{leaf}"
        if module == "recurrent_block":  # SepConvGRU (large) / ConvGRU (small)
            gru, conv, leaf = rest
            suffix = "" if small else gru.removeprefix("convgru")
            return f"update_block.gru.{conv}{suffix}.{leaf}"
        assert module == "flow_head", name
        return name
    assert top == "mask_predictor", (
        name
    )  # upstream: update_block.mask = Sequential(conv, relu, conv)
    index = {"convrelu": "0", "conv": "2"}[rest[0]]
    return f"update_block.mask.{index}.{rest[-1]}"


def upstream_state_dict(state: dict[str, torch.Tensor], small: bool) -> dict[str, torch.Tensor]:
    """An upstream-layout checkpoint as DataParallel saves it, duplicate shortcut norms included."""
    out = {}
    for name, value in state.items():
        up = upstream_name(name, small)
        out["module." + up] = value
        if ".downsample.1." in up:  # only BatchNorm shortcuts (large cnet) have a downsample.1
            assert not small and up.startswith("cnet.")
            out["module." + up.replace(".downsample.1.", ".norm3.")] = value  # same tensor
    return out


def as_numpy(state: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
    return {k: v.detach().numpy().copy() for k, v in state.items()}


@dataclasses.dataclass(frozen=True)
class Files:
    small: bool
    torchvision: dict[str, np.ndarray]  # torchvision state dict
    upstream: dict[str, np.ndarray]  # upstream layout with "module." and duplicates
    tv_pth: str
    up_pth: str
    tv_converted: str
    up_converted: str


@pytest.fixture(scope="session", params=["large", "small"])
def files(request, tmp_path_factory) -> Files:
    small = request.param == "small"
    state = random_torchvision_raft(small, seed=3).state_dict()
    upstream = upstream_state_dict(state, small)
    folder = tmp_path_factory.mktemp(f"convert-{request.param}")
    tv_pth, up_pth = str(folder / "tv.pth"), str(folder / "up.pth")
    torch.save(state, tv_pth)
    torch.save(upstream, up_pth)
    tv_out, up_out = str(folder / "tv.mgjax"), str(folder / "up.mgjax")
    convert(tv_pth, tv_out)
    convert(up_pth, up_out)
    return Files(small, as_numpy(state), as_numpy(upstream), tv_pth, up_pth, tv_out, up_out)


def test_oracle_produces_real_upstream_names(files: Files) -> None:
    """Spot checks of the test's renaming against names in princeton-vl checkpoints."""
    keys = set(files.upstream)
    assert all(k.startswith("module.") for k in keys)
    if files.small:
        expected = [
            "fnet.conv1.weight",
            "fnet.layer1.0.conv3.bias",
            "fnet.layer2.0.downsample.0.weight",
            "cnet.conv2.weight",
            "update_block.encoder.convc1.weight",
            "update_block.encoder.convf2.bias",
            "update_block.encoder.conv.weight",
            "update_block.gru.convz.weight",
            "update_block.gru.convq.bias",
            "update_block.flow_head.conv2.weight",
        ]
        assert not any("mask" in k or "norm" in k for k in keys)
    else:
        expected = [
            "fnet.conv1.weight",
            "fnet.layer3.1.conv2.weight",
            "cnet.norm1.running_var",
            "cnet.layer1.0.norm2.num_batches_tracked",
            "cnet.layer2.0.norm3.weight",
            "cnet.layer3.0.norm3.running_mean",
            "cnet.layer3.0.downsample.1.running_mean",
            "update_block.encoder.convc2.weight",
            "update_block.gru.convr1.weight",
            "update_block.gru.convq2.bias",
            "update_block.mask.0.weight",
            "update_block.mask.2.bias",
        ]
        assert not any(".norm3." in k for k in keys if k.startswith("module.fnet."))
    assert {"module." + k for k in expected} <= keys
    assert len(keys) == len(files.torchvision) + (0 if files.small else 10)  # 2 blocks x 5


def test_detect(files: Files) -> None:
    assert detect(files.torchvision) == ("torchvision", files.small)
    assert detect(files.upstream) == ("upstream", files.small)
    unprefixed = {k.removeprefix("module."): v for k, v in files.upstream.items()}
    assert detect(unprefixed) == ("upstream", files.small)


def test_both_layouts_convert_to_identical_files(files: Files) -> None:
    tv_vars, tv_config = load_variables(files.tv_converted)
    up_vars, up_config = load_variables(files.up_converted)
    assert tv_config.small == up_config.small == files.small
    tv_flat, up_flat = flatten(tv_vars), flatten(up_vars)
    assert sorted(tv_flat) == sorted(up_flat)
    for key, value in tv_flat.items():
        assert value.dtype == np.float32, key
        np.testing.assert_array_equal(value, up_flat[key], err_msg=key)
    for path in (files.tv_pth, files.up_pth):  # the .pth read directly: the same variables
        pth_flat = flatten(load_variables(path)[0])
        assert sorted(pth_flat) == sorted(tv_flat)
        for key, value in pth_flat.items():
            np.testing.assert_array_equal(value, tv_flat[key], err_msg=f"{path}: {key}")


def _expected_entry(name: str, value: np.ndarray, small: bool) -> tuple[str, np.ndarray]:
    """(key, array) a torchvision tensor should become in our file.

    The key is the upstream name as a Flax path: an index joins the module before it
    ("layer2.0.downsample.1" -> "layer2_0/downsample_1"); the leaf is renamed Flax-style.
    """
    *modules, leaf = upstream_name(name, small).split(".")
    path: list[str] = []
    for part in modules:
        if part.isdigit():
            path[-1] += "_" + part
        else:
            path.append(part)
    if leaf == "weight" and value.ndim == 4:
        collection, leaf, value = "params", "kernel", value.transpose(2, 3, 1, 0)  # OIHW -> HWIO
    else:
        collection, leaf = {
            "weight": ("params", "scale"),
            "bias": ("params", "bias"),
            "running_mean": ("batch_stats", "mean"),
            "running_var": ("batch_stats", "var"),
        }[leaf]
    return "/".join([collection, *path, leaf]), value


def test_every_tensor_round_trips_exactly_once(files: Files) -> None:
    with np.load(files.tv_converted, allow_pickle=False) as z:
        stored = {k: z[k] for k in z.files}
    meta = json.loads(stored.pop("__meta__").tobytes().decode())
    assert meta["format"] == "mgjax-raft" and meta["small"] is files.small
    wanted = {k: v for k, v in files.torchvision.items() if not k.endswith("num_batches_tracked")}
    matched: set[str] = set()
    for name, value in wanted.items():
        key, expected = _expected_entry(name, value, files.small)
        hits = [
            k
            for k, v in stored.items()
            if v.shape == expected.shape and np.array_equal(v, expected)
        ]
        assert hits == [key], f"{name}: expected once as {key}, found as {hits}"
        assert stored[key].dtype == np.float32
        matched.add(key)
    assert matched == set(stored)  # nothing else in the file
    assert len(stored) == len(wanted)
    assert sum(v.size for v in stored.values()) == sum(v.size for v in wanted.values())


@pytest.mark.slow
def test_load_raft_takes_pth_directly(files: Files) -> None:
    a, b = image_pair(1, 128, 128)
    ref = np.asarray(load_raft(files.tv_converted, context_norm="running")(a, b, iters=2))
    assert ref.shape == (1, 128, 128, 2) and np.isfinite(ref).all() and np.abs(ref).max() > 0
    for path in (files.tv_pth, files.up_pth):
        flow = np.asarray(load_raft(path, context_norm="running")(a, b, iters=2))
        np.testing.assert_array_equal(flow, ref, err_msg=path)


@pytest.mark.parametrize("files", ["large"], indirect=True)  # RAFT-small has no BatchNorm
def test_inconsistent_duplicate_norm_is_refused(files: Files) -> None:
    state = dict(files.upstream)
    key = "module.cnet.layer3.0.norm3.running_var"
    state[key] = state[key] + 0.5
    with pytest.raises(InputError, match=r"inconsistent.*cnet\.layer3\.0\.norm3\.running_var"):
        to_variables(state)
    without = {k: v for k, v in files.upstream.items() if ".norm3." not in k}
    flat = flatten(to_variables(without)[0])  # the duplicates are redundant: fine without them
    assert sorted(flat) == sorted(flatten(to_variables(files.upstream)[0]))


def test_unknown_layout_is_refused() -> None:
    with pytest.raises(InputError, match="unknown checkpoint layout"):
        detect({"foo.weight": np.zeros((3, 3), np.float32), "foo.bias": np.zeros(3, np.float32)})
    with pytest.raises(InputError, match="unknown checkpoint layout"):
        to_variables({"foo.weight": np.zeros((3, 3), np.float32)})


@pytest.mark.parametrize("layout", ["torchvision", "upstream"])
def test_missing_tensor_is_named(files: Files, layout: str) -> None:
    state = dict(getattr(files, layout))
    prefix = "module." if layout == "upstream" else ""
    del state[prefix + "update_block.flow_head.conv2.weight"]
    with pytest.raises(InputError, match=r"missing .*flow_head/conv2/kernel"):
        to_variables(state)


@pytest.mark.parametrize("layout", ["torchvision", "upstream"])
def test_wrong_shape_is_refused(files: Files, layout: str, tmp_path: Path) -> None:
    state = dict(getattr(files, layout))
    key = ("module." if layout == "upstream" else "") + "update_block.flow_head.conv1.bias"
    state[key] = np.zeros(state[key].shape[0] + 1, np.float32)
    with pytest.raises(InputError, match=r"flow_head/conv1/bias has shape"):
        to_variables(state)
    src, out = tmp_path / "bad.pth", tmp_path / "out"
    torch.save({k: torch.from_numpy(v) for k, v in state.items()}, src)
    out.mkdir()
    with pytest.raises(InputError, match="shape"):
        convert(str(src), str(out / "bad.mgjax"))
    assert os.listdir(out) == []  # nothing written, no temp file left


def test_convert_writes_exactly_dst(files: Files, tmp_path: Path) -> None:
    summary = convert(files.up_pth, str(tmp_path / "weights.mgjax"))
    assert (
        "upstream layout" in summary and ("RAFT-small" if files.small else "RAFT-large") in summary
    )
    convert(files.tv_pth, str(tmp_path / "weights"))
    convert(files.tv_pth, str(tmp_path / "weights"))  # overwriting is fine
    assert sorted(os.listdir(tmp_path)) == ["weights", "weights.mgjax"]  # no .npz, no temp files
    for name in ("weights", "weights.mgjax"):
        _, config = load_variables(str(tmp_path / name))
        assert config.small == files.small
