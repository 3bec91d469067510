"""A single edit from a Config: inputs -> source -> guided sampling -> outputs.

`run(config)` checks every cheap input before loading a model, writes a checkpoint after every
chunk of DDIM steps (so Ctrl-C or a kill loses at most one chunk and `resume` continues to the
identical image), and writes each sample's pictures, metrics and config atomically at the end.
"""

import dataclasses
import os
import time

import numpy as np

from flow.errors import InputError
from mgjax import config as C
from mgjax.edit import rundir
from mgjax.edit.checkpoint import Checkpoint
from mgjax.edit.checks import check
from mgjax.edit.readers import check_frozen, read_frozen, read_mask_image, read_schedule
from mgjax.method import cost
from mgjax.method import numeric as N
from mgjax.method import start as start_lib

CHECKPOINT = "checkpoint.npz"


def resolve_toy(config: C.Config) -> C.Config:
    """With model "toy": the pack's folder and RAFT-small unless raft_weights is given, and,
    when no source and no motion are given, the pack's demo edit (a rendered scene, its object
    mask, prompt and motion). Other models pass through unchanged."""
    from mgjax.toy import pack

    if config.model.model != pack.TOY:
        return config
    if not (pack.PACK / "pack.json").is_file():
        raise InputError(
            f"--model toy: no toy pack in {pack.PACK}; build it with python -m mgjax.toy.pack "
            "(see its --help), or give --model"
        )
    changes = dict(model=pack.sd_folder(), revision=None)
    if not config.model.raft_weights:
        changes["raft_weights"] = pack.raft_file()
    src, mo = config.source, config.motion
    if not (src.image or src.data_dir or src.prompt or mo.motion or mo.flow or mo.drag):
        demo = pack.demo_files()
        changes |= dict(image=demo["image"], prompt=demo["prompt"], motion=demo["motion"])
        if not mo.object_box:
            changes["object_mask"] = mo.object_mask or demo["object_mask"]
    return C.replace(config, **changes)


def load_models(config: C.Config):
    """(mgjax.model.sd.StableDiffusion, flow.raft.Raft) as the model settings say. RAFT first:
    its file is read and checked in a second, where Stable Diffusion takes seconds to minutes,
    so a bad --raft_weights is refused before that wait."""
    from flow.checkpoint import load_raft

    m = config.model
    raft = load_raft(m.raft_weights, context_norm="batch", dtype=m.dtype)
    from mgjax.model import sd as sdm  # imports diffusers: seconds

    sd = sdm.load(
        m.model, revision=m.revision, dtype=m.dtype, from_pt=m.from_pt, attention=m.attention
    )
    return sd, raft


@dataclasses.dataclass
class EditFiles:
    """One edit's inputs, read and checked (nothing written yet)."""

    h: int
    w: int
    image: np.ndarray | None  # f32[1,H,W,3] in [0,1]; None: generated from the prompt
    data: object  # the reference folder's contents, or None
    flow: np.ndarray  # f32[H,W,2]
    obj: np.ndarray | None  # bool[H,W] object mask
    frozen: np.ndarray  # bool[1,C,h,w] or [1,1,h,w]
    schedule: np.ndarray | None  # f32[S] guidance multipliers, or None (all ones)


def target(config: C.Config, data, h: int, w: int):
    """(flow f32[H,W,2], object mask bool[H,W] or None)."""
    from mgjax.edit.motion import box_mask, centroid, grow_mask, motion_flow, parse_motion

    mo, obj = config.motion, None
    if mo.object_mask:
        obj = read_mask_image(mo.object_mask, h, w)  # never empty
    elif mo.object_box:
        obj = box_mask(mo.object_box, h, w)
    if mo.flow:
        from mgjax.edit.readers import read_flow_file

        return read_flow_file(mo.flow, h, w), obj
    # the region the flow moves: the object grown by --mask_grow (its centre stays the object's)
    region = grow_mask(obj, mo.mask_grow) if obj is not None else None
    if mo.drag:
        from mgjax.edit.drag import drag_flow, parse_drag

        return drag_flow(*parse_drag(mo.drag), h, w, region), obj
    if mo.motion:
        center = centroid(obj) if obj is not None else ((w - 1) / 2, (h - 1) / 2)
        return motion_flow(parse_motion(mo.motion, center), h, w, region), obj
    f = data.target_flow[0]
    if f.shape[:2] != (h, w):
        name = config.source.target_flow_name
        raise InputError(f"{name}: flow is {f.shape[:2]}, the image {(h, w)}")
    return f, obj


def read_files(config: C.Config) -> EditFiles:
    """Source image, target flow, masks and schedule of an edit, each checked against the
    model's sizes (read from its config files: no weights are loaded)."""
    from mgjax.edit.motion import auto_frozen_mask, in_frame
    from mgjax.edit.trajectory import source_image
    from mgjax.model.modelinfo import geometry

    sd = geometry(config.model.model, config.model.revision)
    h, w, image, data = source_image(config, sd)
    flow, obj = target(config, data, h, w)
    in_frame(flow)  # whatever the frozen mask: a motion out of the frame leaves nothing to guide
    mo = config.motion
    lat = (1, sd.latent_channels, h // sd.vae_factor, w // sd.vae_factor)
    if mo.frozen_mask == "auto" and data is not None and data.frozen is not None:
        frozen = data.frozen  # the example folder's own mask
        check_frozen(frozen, lat, config.source.edit_mask_name or "the example's frozen mask")
    elif mo.frozen_mask == "auto":
        frozen = auto_frozen_mask(flow, sd.vae_factor, mo.dilate)
    elif mo.frozen_mask == "none":
        frozen = np.zeros(lat, bool)
    else:
        frozen = read_frozen(mo.frozen_mask, lat, sd.vae_factor)
    schedule = read_schedule(config.method.schedule, config.method.steps)
    if schedule is None and data is not None and data.schedule is not None:
        schedule = data.schedule[: config.method.steps]  # the reference folder's own
    return EditFiles(h, w, image, data, flow, obj, frozen, schedule)


def embed(config: C.Config, sd, files: EditFiles):
    """(cond, uncond): the conditioning of the prompt and of "" for this edit's image size (the
    model's pytree with batch 1; SD: f32[1,L,D])."""
    size = (files.h, files.w)
    return sd.embed(config.source.prompt, size), sd.embed("", size)


def make_sampler(config: C.Config, sd, raft):
    from mgjax.method.sampler import Sampler

    return Sampler(sd, raft, config.method, config.speed, snapshot_every=config.output.log_every)


# The models the last run() loaded and the samplers it built on them: a later run() in this
# process with the same model settings and unchanged weight files neither reloads the models
# nor traces its programs again (a sweep in a notebook, a script of edits). One set at a time;
# release() gives the memory back.
_kept: dict = {}


def _files_state(path: str | None):
    """What a weights path holds now: (name, size, mtime) of each file (None: not a local
    path, such as a hub id), so that a rewritten file is loaded again."""
    if not path or not os.path.exists(path):
        return None
    if os.path.isfile(path):
        names = [path]
    else:
        names = sorted(os.path.join(r, n) for r, _, ns in os.walk(path) for n in ns)
    try:
        return tuple((n, st.st_size, st.st_mtime_ns) for n in names for st in [os.stat(n)])
    except OSError:  # changing while it is read: never equal to a kept state
        return (object(),)


def kept_models(config: C.Config):
    """load_models(config), or the models an earlier run() of this process loaded with the
    same settings from the same, unchanged files."""
    m = config.model
    key = (m, _files_state(m.raft_weights), _files_state(m.model))
    if _kept.get("key") != key:
        release()
        models = load_models(config)
        _kept.update(key=key, models=models, samplers={})
    return _kept["models"]


def sampler_of(samplers: dict, config: C.Config, sd, raft):
    """make_sampler(config, sd, raft), made once per method structure, speed and snapshot
    setting and kept in `samplers` (the method's numbers are each edit's inputs, start())."""
    key = (N.structure(config.method), config.speed, config.output.log_every)
    if key not in samplers:
        samplers[key] = make_sampler(config, sd, raft)
    return samplers[key]


def kept_sampler(config: C.Config):
    """sampler_of on the kept models (kept_models first)."""
    return sampler_of(_kept["samplers"], config, *_kept["models"])


def release() -> None:
    """Forget the models and samplers run() keeps for the next run of this process."""
    _kept.clear()


def start(config: C.Config, sampler, files: EditFiles, prompts, source):
    """(GuidanceInputs, SamplerState at the first DDIM step) of an edit's num_samples samples
    (seeds seed, seed + 1, ...); prompts: (cond, uncond) embeddings; source: (image, z_T,
    latents) of mgjax.edit.trajectory.source_trajectory."""
    (cond, uncond), (image, z_T, latents) = prompts, source
    b, sd = config.output.num_samples, sampler.sd
    repeat = lambda x: np.repeat(np.asarray(x), b, axis=0)  # noqa: E731
    lat = (1, sd.latent_channels, files.h // sd.vae_factor, files.w // sd.vae_factor)
    inputs = sampler.prepare(
        repeat(image),
        repeat(files.flow[None]),
        cond,
        uncond,
        frozen=repeat(np.broadcast_to(files.frozen, lat)),
        trajectory=np.repeat(latents, b, axis=1),
        schedule=files.schedule,
        # this config's numbers: the sampler may have been made for another config of the
        # same structure (the editor keeps one per structure)
        numeric=N.of(config.method, b, sampler.dtype),
    )
    seeds = [config.source.seed + n for n in range(b)]
    first = start_lib.initial(config.method, z_T, files.flow[None], sd.vae_factor)
    return inputs, sampler.init(inputs, repeat(first), seeds=seeds)


def enable_compilation_cache(path: str) -> None:
    """JAX's persistent compilation cache in `path`: a rerun with the same shapes and settings
    loads the compiled program instead of compiling it again."""
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as e:
        raise InputError(
            f"--compilation_cache {path}: cannot create it ({e.strerror}); give a writable "
            "folder, or --compilation_cache= to switch the cache off"
        ) from None
    import jax

    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)


def run(config: C.Config, log=print) -> str:
    """The whole edit. Returns the output folder."""
    config = resolve_toy(config)
    check(config)
    files = read_files(config)  # every input file, before any model work
    out = config.output
    t_start = time.perf_counter()
    ckpt = Checkpoint(os.path.join(out.out_dir, CHECKPOINT), C.digest(config))
    if out.resume and rundir.digest_of(out.out_dir) != ckpt.digest:
        raise InputError(
            f"--resume: the settings differ from the run in {out.out_dir}; use the same "
            "flags, or --overwrite to start again"
        )
    if config.speed.compilation_cache:
        enable_compilation_cache(config.speed.compilation_cache)
    made = []  # [whether the folder existed (empty)], once this run claims a folder
    try:
        return _run(config, files, ckpt, log, t_start, made)
    except InputError:
        if made and os.path.isdir(out.out_dir) and not ckpt.exists():
            rundir.clear(out.out_dir, keep_folder=made[0])  # nothing half-written
        raise
    except KeyboardInterrupt:
        if ckpt.exists():
            log(
                f"interrupted: checkpoint at DDIM step {ckpt.step()} in {ckpt.path}; rerun "
                "with --resume to continue"
            )
        elif rundir.is_ours(out.out_dir):
            log(
                f"interrupted before the first checkpoint; rerun with --resume to continue "
                f"{out.out_dir} (what it computed so far is kept)"
            )
        else:
            log("interrupted before anything was written")
        raise
    except Exception:
        # Not an input's fault (every bad input is an InputError before the folder is written):
        # like an interruption, what was computed (the inverted source, checkpoints) is kept.
        if made and rundir.is_ours(out.out_dir):  # the folder this run started
            log(
                f"stopped by an internal error; what was computed is kept in {out.out_dir}: "
                "rerun with --resume to continue it, or --overwrite to start again"
            )
        raise


def _run(config: C.Config, files: EditFiles, ckpt: Checkpoint, log, t_start: float, made):
    from mgjax.edit.progress import Progress
    from mgjax.edit.results import EditResult, save_snapshots, write_samples
    from mgjax.edit.trajectory import source_trajectory
    from mgjax.method import loop
    from mgjax.method.sampler import DivergenceError

    out, method = config.output, config.method
    sd, raft = kept_models(config)
    cond, uncond = embed(config, sd, files)
    if out.overwrite:
        rundir.replace(out.out_dir)  # only now that the inputs were read and checked
    if out.resume:
        rundir.remove_temporaries(out.out_dir)  # of a write that a kill cut short
    if not rundir.is_ours(out.out_dir):  # a new folder, or an empty one of the user's
        made.append(os.path.isdir(out.out_dir))
    rundir.claim(out.out_dir, ckpt.digest)
    image, z_T, latents = source_trajectory(
        config, sd, cond, uncond, out.out_dir, files.image, files.data, log
    )
    sampler = kept_sampler(config)
    inputs, state = start(config, sampler, files, (cond, uncond), (image, z_T, latents))
    logs: dict = {}
    if out.resume and ckpt.exists():
        state, logs, _ = ckpt.load(state)
        log(f"resuming {out.out_dir} at DDIM step {int(state.step)}/{method.steps}")
    elif out.resume:
        log(f"resuming {out.out_dir}: no checkpoint yet, sampling from the first DDIM step")
    chunks = [0]

    def should_stop() -> bool:
        chunks[0] += 1
        return bool(out.stop_after_chunks) and chunks[0] >= out.stop_after_chunks

    progress = Progress(method.steps, cost.evaluations_per_step(method, config.speed), log=log)
    try:
        result = loop.run(
            sampler,
            inputs,
            state,
            logs,
            checkpoint=ckpt.save,
            on_snapshots=lambda snaps: save_snapshots(out.out_dir, snaps),
            progress=progress,
            should_stop=should_stop,
            log=log,
        )
        if not result.finished:
            raise KeyboardInterrupt
    except DivergenceError as e:
        raise InputError(f"{e}; nothing was written for that chunk") from None
    finally:
        progress.close()
    edited = sampler.decode(result.state.z, inputs)
    wall = time.perf_counter() - t_start
    res = EditResult(image[0], files.flow, files.obj, edited, result.logs, result.seconds, wall)
    write_samples(config, sampler, inputs, res)
    log(f"done: {out.out_dir}")
    return out.out_dir
