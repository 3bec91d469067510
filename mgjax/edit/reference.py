"""Reader for the authors' example data folders, without torch and without running pickles.

Layout (MOTION_GUIDANCE.md, "Reference data folder"):
  pred.png                          512x512 RGB source image
  start_zt.pth                      f32 (1,4,64,64) z_T
  latents/zt.00000.pth ...          f32 (1,4,64,64) each, sampling order (00000 = noisiest)
  flows/NAME.pth                    f32 (1,2,512,512) target flow in pixels
  flows/NAME.mask.pth               bool (1,4,64,64) frozen mask (True = frozen)
  guidance_schedule.npy             one multiplier per DDIM step (optional)
Tensors are read by `flow.pth` (a whitelisting unpickler). Flows come back NHWC, latents NCHW.
"""

import os
from pathlib import Path
from typing import NamedTuple

import numpy as np

from flow.errors import InputError
from flow.files import load_npy, read_rgb
from flow.pth import read_pth


class ReferenceData(NamedTuple):
    source: np.ndarray  # f32[1,H,W,3] in [0, 1]
    z_T: np.ndarray | None  # f32[1,C,h,w]
    trajectory: np.ndarray | None  # f32[S,1,C,h,w]
    target_flow: np.ndarray | None  # f32[1,H,W,2]
    frozen: np.ndarray | None  # bool[1,C,h,w]
    schedule: np.ndarray | None  # f32[S]


def _tensor(path: Path, ndim: int, what: str) -> np.ndarray:
    obj = read_pth(path)
    if not isinstance(obj, np.ndarray):
        raise InputError(f"{path}: expected one tensor ({what}), got {type(obj).__name__}")
    if obj.ndim == ndim - 1:
        obj = obj[None]
    if obj.ndim != ndim:
        raise InputError(f"{path}: expected a {ndim}-d tensor ({what}), got shape {obj.shape}")
    return obj


def _in_flows(folder: Path, name: str) -> Path:
    for candidate in (folder / "flows" / name, folder / name):
        if candidate.is_file():
            return candidate
    raise InputError(f"{folder}: no {name} in flows/ or the folder itself")


def read_reference_folder(
    folder,
    target_flow_name: str | None = None,
    edit_mask_name: str | None = None,
    num_steps: int | None = None,
) -> ReferenceData:
    """Read what is present; `num_steps` limits the latents read (default: all zt.*.pth)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise InputError(f"{folder}: no such data folder")
    if not (folder / "pred.png").is_file():
        raise InputError(f"{folder}: no pred.png (the source image) in the data folder")
    source = read_rgb(str(folder / "pred.png"))[None] / 255.0
    z_T = None
    if (folder / "start_zt.pth").is_file():
        z_T = _tensor(folder / "start_zt.pth", 4, "z_T").astype(np.float32)
    trajectory = None
    latents = folder / "latents"
    if latents.is_dir():
        names = sorted(n for n in os.listdir(latents) if n.startswith("zt.") and n.endswith(".pth"))
        expected = [f"zt.{i:05d}.pth" for i in range(len(names))]
        if names != expected:
            raise InputError(f"{latents}: latents must be zt.00000.pth, zt.00001.pth, ... gap-free")
        if num_steps is not None:
            if len(names) < num_steps:
                raise InputError(
                    f"{latents}: {len(names)} cached latents but {num_steps} DDIM steps"
                )
            names = names[:num_steps]
        tensors = [_tensor(latents / n, 4, "latent").astype(np.float32) for n in names]
        shapes = sorted({t.shape for t in tensors})
        if len(shapes) > 1:
            raise InputError(f"{latents}: the latents differ in shape ({shapes[0]}, {shapes[1]})")
        trajectory = np.stack(tensors) if tensors else None
    flow = None
    if target_flow_name:
        f = _tensor(_in_flows(folder, target_flow_name), 4, "flow")
        if f.shape[1] != 2:
            raise InputError(f"{target_flow_name}: flow must be (1, 2, H, W), got {f.shape}")
        flow = np.transpose(f.astype(np.float32), (0, 2, 3, 1))
    frozen = None
    if edit_mask_name:
        m = _tensor(_in_flows(folder, edit_mask_name), 4, "frozen mask")
        frozen = m.astype(bool)
    schedule = None
    if (folder / "guidance_schedule.npy").is_file():
        schedule = load_npy(str(folder / "guidance_schedule.npy"), "guidance schedule")
        schedule = np.asarray(schedule, np.float32).reshape(-1)
    return ReferenceData(source.astype(np.float32), z_T, trajectory, flow, frozen, schedule)
