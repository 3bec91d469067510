"""Everything about an edit's configuration that can be checked without a model, before
anything is loaded or written."""

import os

from flow.errors import InputError
from mgjax.config import Config
from mgjax.edit.readers import require
from mgjax.edit.rundir import check_replaceable, check_writable, is_ours


def check(config: Config, out_dir_free: bool = True) -> None:
    """A InputError naming the first problem; out_dir_free: also check that the output folder
    can be created (or resumed, or replaced)."""
    src, mo, out = config.source, config.motion, config.output
    if src.image and src.data_dir:
        raise InputError("give one source: --image (real image), --data_dir, or --prompt alone")
    if not src.image and not src.data_dir and not src.prompt:
        raise InputError("no source: give --image PATH, --data_dir PATH, or --prompt TEXT")
    if src.image:
        require(src.image, "image file")
    if src.data_dir:
        require(src.data_dir, "data folder")
    motions = [
        k for k, v in (("--motion", mo.motion), ("--flow", mo.flow), ("--drag", mo.drag)) if v
    ]
    if len(motions) > 1:
        raise InputError(f"give one of --motion, --flow, --drag, not {' and '.join(motions)}")
    if not motions and not (src.data_dir and src.target_flow_name):
        raise InputError(
            "no motion: give --motion (e.g. translate:40,0), --drag 'x,y>X,Y', --flow FILE, or "
            "--data_dir with --target_flow_name"
        )
    if mo.drag:
        from mgjax.edit.drag import parse_drag

        parse_drag(mo.drag)  # syntax errors now, not after loading models
    if mo.object_mask and mo.object_box:
        raise InputError("give --object_mask or --object_box, not both")
    if mo.object_box:
        from mgjax.edit.motion import parse_box

        parse_box(mo.object_box)  # syntax errors now; the bounds once the image size is known
    if mo.motion:
        from mgjax.edit.motion import parse_motion

        parse_motion(mo.motion, (0.0, 0.0))  # syntax errors now, not after loading models
    if mo.object_mask:
        require(mo.object_mask, "object mask file")
    if mo.flow:
        require(mo.flow, "flow file")
    model = config.model.model
    if not (os.path.isdir(model) or "/" in model):
        raise InputError(f"--model {model}: give a hub id (owner/name) or a local folder")
    if not config.model.raft_weights:
        raise InputError(
            "--raft_weights is required: download raft-things.pth (princeton-vl/RAFT, "
            "download_models.sh) and pass it, or convert it with python -m flow.convert"
        )
    require(
        config.model.raft_weights, "RAFT weights file (get raft-things.pth from princeton-vl/RAFT)"
    )
    if config.method.schedule:
        require(config.method.schedule, "guidance schedule file")
    if mo.dilate < 0:
        raise InputError("--dilate must be >= 0")
    if not out.out_dir:
        raise InputError("--out_dir is required")
    if out.resume and out.overwrite:
        raise InputError("--resume and --overwrite exclude each other")
    if not out_dir_free:
        return
    check_writable(out.out_dir)
    used = os.path.isdir(out.out_dir) and bool(os.listdir(out.out_dir))  # an empty one is free
    if used and not (out.resume or out.overwrite):
        if not is_ours(out.out_dir):
            raise InputError(
                f"{out.out_dir} exists and was not written by mgjax; give a new --out_dir"
            )
        raise InputError(
            f"{out.out_dir} exists; pass --resume to continue it or --overwrite to replace it"
        )
    if out.overwrite:
        check_replaceable(out.out_dir)
    if out.resume and not is_ours(out.out_dir):
        raise InputError(
            f"--resume: {out.out_dir} holds no run of mgjax's to continue; start without --resume"
        )
