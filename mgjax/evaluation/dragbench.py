"""DragBench (the DragDiffusion benchmark) as a jobs file for `launch.py --jobs`.

  python -m mgjax.evaluation.dragbench DRAGBENCH_ROOT --jobs dragbench.jsonl [--masks DIR]
  python launch.py --jobs dragbench.jsonl --out_dir runs/dragbench --raft_weights ...

Each sample folder holds `original_image.png` and `meta_data.pkl`, a pickled dict with `prompt`,
`points` ([x, y] handle and target points in turn) and `mask` (H x W, non-zero = the region
that may move). The pickle is read by `flow.unpickle` with a whitelist of numpy's array and
scalar constructors: plain containers, numbers, strings and numeric numpy arrays only, so a
hostile file cannot run code. Masks are written as PNGs (`--masks`, default `<jobs>.masks/`).
Every sample becomes one job with `image`, `prompt`, `points` and `object_mask`, named
`<category>__<sample>`.
"""

import json
import os
import pickle
import sys
from pathlib import Path
from typing import Any

import numpy as np

from flow import unpickle
from flow.errors import InputError, run_cli
from flow.files import write_atomic
from flow.schema import check, check_depth, numbers


class _Array:
    """An ndarray being rebuilt: `_reconstruct` makes it, BUILD fills it."""

    array: np.ndarray | None = None


class _Dtype:
    def __init__(self, dtype: np.dtype):
        self.dtype = dtype


def _reconstruct(cls: Any, shape: Any, typecode: Any) -> _Array:
    if cls is not _NDARRAY:
        raise pickle.UnpicklingError("_reconstruct of something other than an ndarray")
    return _Array()


def _make_dtype(name: Any, align: Any = False, copy: Any = False) -> _Dtype:
    dtype = np.dtype(name) if isinstance(name, str) else None
    if dtype is None or dtype.kind not in "biuf":
        raise pickle.UnpicklingError(f"numpy dtype {name!r} (only numbers are read)")
    return _Dtype(dtype)


def _scalar(dtype: Any, data: Any = b"") -> Any:
    if not isinstance(dtype, _Dtype) or not isinstance(data, bytes):
        raise pickle.UnpicklingError("numpy scalar without a numeric dtype")
    return np.frombuffer(data, dtype.dtype, count=1)[0]


def _frombuffer(buf: Any, dtype: Any, shape: Any, order: Any) -> np.ndarray:
    """numpy's protocol-5 array constructor, on in-band bytes only."""
    if not isinstance(dtype, _Dtype) or not isinstance(buf, bytes | bytearray):
        raise pickle.UnpicklingError("an ndarray that is not plain numeric data")
    flat = np.frombuffer(bytes(buf), dtype.dtype)
    return flat.reshape(tuple(shape), order="F" if order == "F" else "C").copy()


def _codecs_encode(text: Any, encoding: Any = "utf-8") -> bytes:
    """Protocol 2 pickles bytes as _codecs.encode(str, 'latin1')."""
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise pickle.UnpicklingError("_codecs.encode other than latin1 text")
    return text.encode("latin1")


_NDARRAY = object()
_GLOBALS = {}
for _module in ("numpy.core.multiarray", "numpy._core.multiarray"):
    _GLOBALS[(_module, "_reconstruct")] = _reconstruct
    _GLOBALS[(_module, "scalar")] = _scalar
for _module in ("numpy.core.numeric", "numpy._core.numeric"):
    _GLOBALS[(_module, "_frombuffer")] = _frombuffer
_GLOBALS[("_codecs", "encode")] = _codecs_encode
_GLOBALS[("numpy", "ndarray")] = _NDARRAY
_GLOBALS[("numpy", "dtype")] = _make_dtype


def _build(target: Any, state: Any) -> None:
    """BUILD: fills rebuilt arrays and dtypes from raw bytes; dict state only otherwise."""
    if isinstance(target, _Dtype) and isinstance(state, tuple) and len(state) > 1:
        if state[1] in ("<", ">"):
            target.dtype = target.dtype.newbyteorder(state[1])
    elif isinstance(target, _Array) and isinstance(state, tuple) and len(state) == 5:
        _, shape, dtype, fortran, raw = state
        if not isinstance(dtype, _Dtype) or not isinstance(raw, bytes):
            raise pickle.UnpicklingError("an ndarray that is not plain numeric data")
        flat = np.frombuffer(raw, dtype.dtype)
        target.array = flat.reshape(tuple(shape), order="F" if fortran else "C").copy()
    elif type(target) is dict and isinstance(state, dict):
        target.update(state)
    else:
        raise pickle.UnpicklingError(f"state set on a {type(target).__name__}")


def _finish(x: Any) -> Any:
    if isinstance(x, _Array):
        if x.array is None:
            raise pickle.UnpicklingError("an ndarray without data")
        return x.array
    if isinstance(x, dict):
        return {k: _finish(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return type(x)(_finish(v) for v in x)
    if isinstance(x, _Dtype):
        return x.dtype
    return x


def read_meta(path: str) -> dict:
    """A DragBench meta_data.pkl, read without executing anything it names."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise InputError(f"{path}: cannot read it ({e.strerror})") from None
    fix = "give the sample's meta_data.pkl as DragBench writes it"
    try:
        loaded = unpickle.load(data, _GLOBALS, build=_build, encoding="latin1")
        check_depth(loaded, path, fix)
        meta = _finish(loaded)
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, IndexError) as e:
        if isinstance(e, InputError):
            raise
        detail = f"refused {e}" if isinstance(e, unpickle.Refused) else e
        raise InputError(
            f"{path}: not a DragBench meta_data.pkl this reader accepts ({detail})"
        ) from None
    missing = [
        k for k in ("prompt", "points", "mask") if not isinstance(meta, dict) or k not in meta
    ]
    if missing:
        raise InputError(f"{path}: no {', '.join(missing)} in it")
    check(meta, {"prompt": str}, path, fix)
    mask = numbers(meta["mask"], f"{path}: mask", fix)
    if mask.ndim == 3:
        mask = mask[..., 0]
    if mask.ndim != 2 or 0 in mask.shape:
        raise InputError(f"{path}: mask must be an H x W array, got shape {mask.shape}; {fix}")
    points = numbers(meta["points"], f"{path}: points", fix)
    return {**meta, "mask": mask, "points": points}


def _pairs(points: np.ndarray, path: str) -> list:
    if points.size % 2 or not np.isfinite(points).all():
        raise InputError(f"{path}: points must be finite [x, y] pairs, got shape {points.shape}")
    pts = points.reshape(-1, 2)
    if len(pts) == 0 or len(pts) % 2:
        raise InputError(f"{path}: points must be handle/target pairs, got {len(pts)} points")
    return [[pts[i].tolist(), pts[i + 1].tolist()] for i in range(0, len(pts), 2)]


def samples(root: str) -> list[str]:
    """Sample folders under root (those holding meta_data.pkl), sorted."""
    found = []
    for folder, _, files in os.walk(root):
        if "meta_data.pkl" in files:
            found.append(folder)
    return sorted(found)


def to_jobs(root: str, jobs_path: str, masks_dir: str | None = None) -> int:
    """Write one job per DragBench sample; returns the number of jobs."""
    from PIL import Image

    if not os.path.isdir(root):
        raise InputError(f"{root}: no such folder (the DragBench root, e.g. drag_bench_data/)")
    folders = samples(root)
    if not folders:
        raise InputError(f"{root}: no sample folders with meta_data.pkl under it")
    masks_dir = masks_dir or jobs_path + ".masks"
    lines = []
    for folder in folders:
        rel = os.path.relpath(folder, root)
        name = rel.replace(os.sep, "__")
        image = os.path.join(folder, "original_image.png")
        if not os.path.isfile(image):
            raise InputError(f"{folder}: no original_image.png")
        meta = read_meta(os.path.join(folder, "meta_data.pkl"))
        mask = meta["mask"]
        lines.append((name, image, str(meta["prompt"]), _pairs(meta["points"], folder), mask != 0))
    made = not os.path.isdir(masks_dir)
    os.makedirs(masks_dir, exist_ok=True)
    text, written = [], []
    try:
        for name, image, prompt, pairs, mask in lines:
            mask_path = os.path.abspath(os.path.join(masks_dir, f"{name}.png"))
            Image.fromarray(mask.astype(np.uint8) * 255).save(mask_path)
            written.append(mask_path)
            job = dict(
                name=name,
                image=os.path.abspath(image),
                prompt=prompt,
                points=pairs,
                object_mask=mask_path,
            )
            text.append(json.dumps(job))
        write_atomic(jobs_path, lambda tmp: Path(tmp).write_text("\n".join(text) + "\n"))
    except BaseException:  # nothing half-written stays
        for p in written:
            os.unlink(p)
        if made:
            os.rmdir(masks_dir)
        raise
    return len(text)


def main(argv: list[str]) -> None:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("root", help="DragBench folder (category/sample/meta_data.pkl)")
    parser.add_argument("--jobs", required=True, help="jobs file to write (JSONL)")
    parser.add_argument("--masks", default=None, help="folder for the mask PNGs")
    args = parser.parse_args(argv)
    n = to_jobs(args.root, args.jobs, args.masks)
    print(f"wrote {n} jobs to {args.jobs}; run them with python launch.py --jobs {args.jobs}")


if __name__ == "__main__":
    run_cli(lambda: main(sys.argv[1:]))
