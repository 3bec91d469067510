"""RAFT weights: PyTorch state dicts (upstream or torchvision layout) -> our variables, and our
own torch-free file format (a .npz with allow_pickle=False plus a JSON header)."""

import json
import os
import re
import zipfile

import jax
import numpy as np

from flow.errors import InputError
from flow.files import NpzFile, write_atomic
from flow.raft import Raft, RaftConfig, init_raft
from flow.schema import Optional, check, optional, parse_json

FORMAT = "mgjax-raft"
VERSION = 1
_META = "__meta__"

# torchvision names -> upstream (princeton-vl) names; applied in order.
_TORCHVISION_TO_UPSTREAM = [
    (r"^feature_encoder\.", "fnet."),
    (r"^context_encoder\.", "cnet."),
    (r"^(fnet|cnet)\.convnormrelu\.0\.", r"\1.conv1."),
    (r"^(fnet|cnet)\.convnormrelu\.1\.", r"\1.norm1."),
    (r"^(fnet|cnet)\.conv\.", r"\1.conv2."),
    (r"\.convnormrelu(\d)\.0\.", r".conv\1."),
    (r"\.convnormrelu(\d)\.1\.", r".norm\1."),
    (r"^update_block\.motion_encoder\.", "update_block.encoder."),
    (r"\.encoder\.convcorr(\d)\.0\.", r".encoder.convc\1."),
    (r"\.encoder\.convflow(\d)\.0\.", r".encoder.convf\1."),
    (r"\.encoder\.conv\.0\.", ".encoder.conv."),
    (r"^mask_predictor\.convrelu\.0\.", "update_block.mask.0."),
    (r"^mask_predictor\.conv\.", "update_block.mask.2."),
]


def detect(state: dict[str, np.ndarray]) -> tuple[str, bool]:
    """(layout, small) of a state dict: layout "upstream" or "torchvision"."""
    keys = [k.removeprefix("module.") for k in state]
    if any(k.startswith("feature_encoder.") for k in keys):
        layout, stem = "torchvision", "feature_encoder.convnormrelu.0.weight"
    elif any(k.startswith("fnet.") for k in keys):
        layout, stem = "upstream", "fnet.conv1.weight"
    else:
        raise InputError(
            "unknown checkpoint layout: expected RAFT weights from princeton-vl/RAFT "
            "(fnet.*, cnet.*, update_block.*) or torchvision (feature_encoder.*, ...)"
        )
    w = state.get(stem, state.get("module." + stem))
    if w is None or np.ndim(w) != 4 or w.shape[0] not in (32, 64):
        raise InputError(
            f"unknown RAFT variant: {stem} should be a (32 or 64, 3, 7, 7) conv weight"
        )
    return layout, w.shape[0] == 32


def to_upstream_names(state: dict[str, np.ndarray]) -> tuple[dict[str, np.ndarray], bool]:
    """Any supported layout -> upstream names without "module.", duplicate norms removed."""
    layout, small = detect(state)
    out = {}
    for key, value in state.items():
        name = key.removeprefix("module.")
        if layout == "torchvision":
            for pattern, repl in _TORCHVISION_TO_UPSTREAM:
                name = re.sub(pattern, repl, name)
            gru = r"^update_block\.recurrent_block\.convgru(\d)\.conv([zrq])\."
            name = re.sub(
                gru, (r"update_block.gru.conv\2." if small else r"update_block.gru.conv\2\1."), name
            )
        out[name] = np.asarray(value)
    # Upstream registers the shortcut's norm twice: as norm3 (residual) / norm4 (bottleneck) and
    # as downsample.1. Keep downsample.1, after checking that the copies agree.
    dup = "norm4" if small else "norm3"
    for name in [n for n in out if f".{dup}." in n]:
        twin = name.replace(f".{dup}.", ".downsample.1.")
        if twin in out:
            if not np.array_equal(out[name], out[twin]):
                raise InputError(f"checkpoint is inconsistent: {name} differs from {twin}")
            del out[name]
    return out, small


def to_variables(state: dict[str, np.ndarray]) -> tuple[dict, RaftConfig]:
    """A PyTorch RAFT state dict (arrays) -> (Flax variables, config with defaults)."""
    upstream, small = to_upstream_names(state)
    variables: dict = {}
    for name, value in upstream.items():
        parts = name.split(".")
        leaf, path = parts[-1], []
        for p in parts[:-1]:
            if p.isdigit() and path:
                path[-1] = f"{path[-1]}_{p}"
            else:
                path.append(p)
        if leaf == "num_batches_tracked":
            continue
        if leaf == "weight" and value.ndim == 4:
            collection, leaf, value = "params", "kernel", value.transpose(2, 3, 1, 0)  # OIHW->HWIO
        elif leaf == "weight":
            collection, leaf = "params", "scale"
        elif leaf == "bias":
            collection = "params"
        elif leaf in ("running_mean", "running_var"):
            collection, leaf = "batch_stats", leaf.removeprefix("running_")
        else:
            raise InputError(f"unexpected tensor {name!r} in a RAFT checkpoint")
        node = variables.setdefault(collection, {})
        for p in path:
            node = node.setdefault(p, {})
        node[leaf] = np.ascontiguousarray(value, dtype=np.float32)
    config = RaftConfig(small=small)
    check_variables(variables, config)
    return variables, config


def flatten(tree: dict, prefix: str = "") -> dict[str, np.ndarray]:
    """Nested dict -> {"a/b/c": leaf}."""
    out = {}
    for k, v in tree.items():
        key = f"{prefix}/{k}" if prefix else k
        out.update(flatten(v, key) if isinstance(v, dict) else {key: v})
    return out


def check_variables(variables: dict, config: RaftConfig) -> None:
    """Every expected tensor present with the expected shape, nothing extra."""
    want = expected_shapes(config)
    got = {k: tuple(np.shape(v)) for k, v in flatten(variables).items()}
    model = "RAFT-small" if config.small else "RAFT-large"
    missing, extra = sorted(set(want) - set(got)), sorted(set(got) - set(want))
    if missing or extra:
        raise InputError(
            f"checkpoint does not match {model}: missing {missing[:3]}, unexpected {extra[:3]}"
        )
    for k in want:
        if want[k] != got[k]:
            raise InputError(
                f"checkpoint does not match {model}: {k} has shape {got[k]}, want {want[k]}"
            )


def save(path: str, variables: dict, config: RaftConfig, source: str = "") -> None:
    """Writes our format to exactly `path`, atomically (nothing half-written on failure)."""
    arrays = {k: np.asarray(v, np.float32) for k, v in flatten(variables).items()}
    meta = {"format": FORMAT, "version": VERSION, "small": config.small, "source": source}
    if config.input_scale != 1:
        meta["input_scale"] = config.input_scale
    arrays[_META] = np.frombuffer(json.dumps(meta).encode(), np.uint8)

    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)

    write_atomic(path, write)


_HEADER = {"format": str, "version": int, "small": bool, "input_scale": Optional(int)}


def _is_ours(path: str) -> bool:
    try:
        with zipfile.ZipFile(path) as z:
            return f"{_META}.npy" in z.namelist()
    except (zipfile.BadZipFile, OSError):
        return False


def read_torch_checkpoint(path: str) -> tuple[dict, RaftConfig, str]:
    """A PyTorch RAFT .pth -> (variables, config, layout); errors name the file."""
    from flow.pth import read_state_dict

    state = read_state_dict(path)
    try:
        layout, _ = detect(state)
        variables, config = to_variables(state)
    except InputError as e:
        raise InputError(f"{path}: {e}") from None
    return variables, config, layout


# The most bytes a weights file's JSON header may take (it holds a few short fields).
_MAX_HEADER = 64 * 1024


def expected_shapes(config: RaftConfig) -> dict[str, tuple[int, ...]]:
    """{"params/fnet/conv1/kernel": shape, ...}: every tensor RAFT with `config` holds."""
    ref = jax.eval_shape(lambda: init_raft(config, jax.random.PRNGKey(0)))
    return {k: tuple(v.shape) for k, v in flatten(ref).items()}


def load_variables(path: str) -> tuple[dict, RaftConfig]:
    """Our format or a PyTorch .pth (read without torch, without executing pickled code).

    Our format is read member by member: the names in the zip's directory must be exactly
    the tensors the header's RAFT holds, and each tensor's .npy header must declare real
    floating-point data of the shape RAFT gives it, before any of its data is inflated; every
    tensor must be finite."""
    if not os.path.isfile(path):
        raise InputError(f"{path}: no such weights file; convert one with python -m flow.convert")
    if not _is_ours(path):
        variables, config, _ = read_torch_checkpoint(path)
        return variables, config
    fix = "convert the weights again with python -m flow.convert"
    with NpzFile(path, "weights file", fix) as z:
        if _META not in z.keys:
            raise z.error("it holds no header")
        raw = z.read(_META, lambda shape, dtype: _header_shape(shape, dtype), "u")
        meta = parse_json(raw.tobytes(), f"{path}: its header", fix)
        if meta.get("format") != FORMAT or meta.get("version") != VERSION:
            raise InputError(f"{path}: not an {FORMAT} v{VERSION} file; {fix}")
        check(meta, _HEADER, f"{path}: its header", fix)
        input_scale = optional(meta, "input_scale", 1)
        if input_scale not in (1, 2, 4):
            raise InputError(f"{path}: its header's input_scale must be 1, 2 or 4; {fix}")
        config = RaftConfig(small=bool(meta["small"]), input_scale=int(input_scale))
        want = expected_shapes(config)
        model = "RAFT-small" if config.small else "RAFT-large"
        got = [k for k in z.keys if k != _META]
        missing, extra = sorted(set(want) - set(got)), sorted(set(got) - set(want))
        if missing or extra:
            raise z.error(
                f"it does not match {model}: missing {missing[:3]}, unexpected {extra[:3]}"
            )
        variables: dict = {}
        for key in got:
            value = z.read(key, lambda shape, dtype, k=key: _tensor_shape(shape, want[k]), "f")
            with np.errstate(over="ignore", invalid="ignore"):
                value = value.astype(np.float32)
            if not np.isfinite(value).all():
                raise z.error(f"its {key!r} holds NaN or inf values (or values beyond float32)")
            *path_parts, leaf = key.split("/")
            node = variables
            for p in path_parts:
                node = node.setdefault(p, {})
            node[leaf] = value
    return variables, config


def _header_shape(shape: tuple[int, ...], dtype: np.dtype) -> str | None:
    if dtype != np.uint8 or len(shape) != 1:
        return f"is a {dtype} array of shape {shape}, not a header's bytes"
    if shape[0] > _MAX_HEADER:
        return f"declares {shape[0]:,} bytes, more than a header's {_MAX_HEADER:,}"
    return None


def _tensor_shape(shape: tuple[int, ...], want: tuple[int, ...]) -> str | None:
    return None if shape == want else f"has shape {shape}, want {want}"


def load_raft(path: str, context_norm: str = "batch", dtype: str = "float32") -> Raft:
    """RAFT from our weights file or a PyTorch checkpoint, ready to call.

    Args:
      path: written by `python -m flow.convert`, or an upstream / torchvision .pth.
      context_norm: "batch" (per-image statistics, as the Motion Guidance reference) or "running".
      dtype: compute dtype, "float32" or "bfloat16" ("float64" under jax_enable_x64, for tests).
    """
    variables, config = load_variables(path)
    config = RaftConfig(
        small=config.small, context_norm=context_norm, dtype=dtype, input_scale=config.input_scale
    )
    return Raft(
        jax.tree_util.tree_map(lambda v: jax.numpy.asarray(v, config.acc_dtype), variables), config
    )
