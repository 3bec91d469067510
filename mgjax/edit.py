"""The editing workflow behind launch.py: inputs -> source -> guided sampling -> outputs.

`Options` holds every setting (launch.py fills it from flags); `run(options)` validates all
cheap inputs before loading a model, writes a checkpoint after every chunk of DDIM steps (so
Ctrl-C or a kill loses at most one chunk and `resume` continues to the identical image), and
writes each sample's pictures, metrics and config atomically at the end.
"""

import dataclasses
import functools
import hashlib
import json
import os
import platform
import shutil
import time

import numpy as np

from flow.errors import UserError
from flow.files import read_rgb, write_atomic

_PAPER = dict(
    steps=500,
    recursive_steps=10,
    guidance_weight=300.0,
    color_weight=100.0,
    flow_weight=3.0,
    clip=200.0,
    cfg_scale=7.5,
    raft_gradient="detached",
)
# fast: 250 x 4 = 1000 guided evaluations instead of 5000; the weights are the paper's, untuned
# toy: for the 64x64 toy pack (16x16x4 latents, 16x fewer elements than SD's 64x64x4). The
# guidance is the gradient of a mean over pixels, so each latent element's share is 16x larger
# than at 512x512: lambda_g / 16; the clip bounds an L2 norm over 16x fewer elements: clip / 4
# would be the same per-element bound, clip / 8 (half that) keeps the object whole in every
# rounding variant of the demo measured (BENCHMARKS.md); flows are in pixels, 8x smaller for the
# same relative motion: lambda_flow x 8 keeps the flow/colour balance. 100 steps: at 50 the
# demo's object smeared to half its pixels on one CPU's rounding, at 100 it kept 77-96% of them in
# every variant measured (thread count, loop form, source cache; BENCHMARKS.md). No recursion,
# CFG 1 (measured on the demo, BENCHMARKS.md): the toy UNet reconstructs an inverted source exactly
# only at the inversion's CFG 1 and K = 1; with K >= 2 or CFG 3 it regrows the object anywhere
# in the unfrozen region even unguided, so a "moved" object proves nothing. The full gradient
# through RAFT: with the detached one (the reference's) the demo's object is lost.
PRESETS = {
    "paper": _PAPER,
    "fast": dict(_PAPER, steps=250, recursive_steps=4),
    "toy": dict(
        _PAPER,
        steps=100,
        recursive_steps=1,
        guidance_weight=300.0 / 16,
        clip=200.0 / 8,
        flow_weight=3.0 * 8,
        cfg_scale=1.0,
        raft_gradient="full",
    ),
}


def preset_config(preset: str | dict, **overrides):
    """A GuidanceConfig from a preset (a PRESETS name or a dict of its keys) plus overrides."""
    from mgjax.sampler import GuidanceConfig

    values = dict(PRESETS[preset] if isinstance(preset, str) else preset) | overrides
    return GuidanceConfig(num_steps=values.pop("steps"), **values)


@dataclasses.dataclass
class Options:
    out_dir: str
    raft_weights: str | None = None  # None with model "toy": the toy pack's RAFT-small
    image: str | None = None
    prompt: str = ""
    seed: int = 0
    data_dir: str | None = None
    target_flow_name: str | None = None
    edit_mask_name: str | None = None
    resize: bool = False
    model: str = "toy"  # "toy" (the shipped toy pack, the default), a hub id, or a folder
    revision: str | None = "flax"
    from_pt: bool = False
    dtype: str = "float32"
    attention: str = "plain"
    remat: str = "none"
    skip_unguided: bool = True
    loops: str = "auto"
    source_cache: bool = False
    compilation_cache: str = ""
    motion: str | None = None
    drag: str | None = None
    object_mask: str | None = None
    object_box: str | None = None
    flow: str | None = None
    frozen_mask: str = "auto"
    dilate: int = 2
    steps: int = 500
    recursive_steps: int = 10
    guidance_weight: float = 300.0
    color_weight: float = 100.0
    flow_weight: float = 3.0
    clip: float = 200.0
    preserve_weight: float = 0.0  # > 0 adds PreservationEnergy to the paper's energy
    cfg_scale: float = 7.5
    eta: float = 0.0
    occlusion_masking: bool = True
    oracle: bool = False
    schedule: str | None = None
    raft_iters: int = 5
    raft_gradient: str = "detached"
    chunk: int = 10
    num_samples: int = 1
    log_every: int = 0
    resume: bool = False
    overwrite: bool = False
    stop_after_chunks: int = 0  # testing aid: simulate an interruption


# ----------------------------------------------------------------------------- inputs


def _exists(path: str, what: str) -> None:
    if not os.path.exists(path):
        raise UserError(f"{path}: no such {what}")


def read_mask_image(path: str, h: int, w: int) -> np.ndarray:
    """A mask PNG/JPG (non-zero = object) or .npy (bool/0-1) -> bool[H,W] of the image size."""
    _exists(path, "mask file")
    if path.endswith(".npy"):
        m = np.load(path, allow_pickle=False)
    else:
        from PIL import Image, UnidentifiedImageError

        try:
            with Image.open(path) as im:
                m = np.asarray(im.convert("L"))
        except (UnidentifiedImageError, OSError) as e:
            raise UserError(f"{path}: not a readable mask image ({e})") from None
    m = np.asarray(m)
    if m.ndim == 3:
        m = m[..., 0]
    if m.shape != (h, w):
        raise UserError(f"{path}: mask is {m.shape[1]}x{m.shape[0]} but the image is {w}x{h}")
    return m > (127 if m.dtype == np.uint8 else 0.5)


def read_flow_file(path: str, h: int, w: int) -> np.ndarray:
    """.npy (H,W,2), .flo, or a reference .pth (1,2,H,W) -> f32[H,W,2]."""
    _exists(path, "flow file")
    if path.endswith(".npy"):
        f = np.load(path, allow_pickle=False)
    elif path.endswith(".flo"):
        from flow.flo import read_flo

        f = read_flo(path)
    elif path.endswith(".pth"):
        from flow.pth import read_pth

        f = read_pth(path)
        if not isinstance(f, np.ndarray):
            raise UserError(f"{path}: expected one flow tensor (1, 2, H, W)")
        f = np.transpose(f.reshape((-1,) + f.shape[-3:])[0], (1, 2, 0))
    else:
        raise UserError(f"{path}: flow files must be .npy, .flo or .pth")
    f = np.asarray(f, np.float32)
    if f.shape != (h, w, 2):
        raise UserError(f"{path}: flow is {f.shape} but the image needs ({h}, {w}, 2)")
    if not np.isfinite(f).all():
        raise UserError(f"{path}: flow contains NaN or inf values")
    return f


def read_frozen(path: str, lat_shape) -> np.ndarray:
    """A frozen mask file: reference .pth (1,4,h,w) bool, .npy, or a PNG at latent size."""
    _exists(path, "frozen mask file")
    if path.endswith(".pth"):
        from flow.pth import read_pth

        m = read_pth(path)
    elif path.endswith(".npy"):
        m = np.load(path, allow_pickle=False)
    else:
        m = read_mask_image(path, lat_shape[-2], lat_shape[-1])
    m = np.asarray(m).astype(bool)
    m = m.reshape((1,) * (4 - m.ndim) + m.shape)
    if m.shape[-2:] != tuple(lat_shape[-2:]):
        raise UserError(
            f"{path}: frozen mask is {m.shape[-1]}x{m.shape[-2]}, the latent grid is "
            f"{lat_shape[-1]}x{lat_shape[-2]}"
        )
    return m[:1]


METRIC_RAFT_ITERS = 12  # RAFT iterations of the achieved flow in the outputs and metrics

# Settings that may change between a run and its --resume (they do not change the result).
_NOT_IN_DIGEST = (
    "resume",
    "overwrite",
    "stop_after_chunks",
    "out_dir",
    "log_every",
    "compilation_cache",
)


def _config_digest(o: Options) -> str:
    keep = {k: v for k, v in dataclasses.asdict(o).items() if k not in _NOT_IN_DIGEST}
    return hashlib.sha256(json.dumps(keep, sort_keys=True).encode()).hexdigest()[:16]


def resolve_toy(o: Options) -> Options:
    """With model "toy": the pack's folder and RAFT-small unless --raft_weights is
    given, and, when no source and no motion are given, the pack's demo edit (a rendered scene,
    its object mask, prompt and motion). Other models pass through unchanged."""
    from mgjax.toy import pack

    if o.model != pack.TOY:
        return o
    if not (pack.PACK / "pack.json").is_file():
        raise UserError(
            f"--model toy: no toy pack in {pack.PACK}; build it with python -m mgjax.toy.pack "
            "(see its --help), or give --model"
        )
    o = dataclasses.replace(o, model=pack.sd_folder(), revision=None)
    if not o.raft_weights:
        o.raft_weights = pack.raft_file()
    bare = not (o.image or o.data_dir or o.prompt or o.motion or o.flow or o.drag)
    if bare:
        demo = pack.demo_files()
        o.image, o.prompt, o.motion = demo["image"], demo["prompt"], demo["motion"]
        if not o.object_box:
            o.object_mask = o.object_mask or demo["object_mask"]
    return o


def check_options(o: Options) -> None:
    """Everything that can be checked without a model, before anything is loaded or written."""
    kinds = [k for k, v in (("--image", o.image), ("--data_dir", o.data_dir)) if v]
    if len(kinds) > 1:
        raise UserError("give one source: --image (real image), --data_dir, or --prompt alone")
    if not o.image and not o.data_dir and not o.prompt:
        raise UserError("no source: give --image PATH, --data_dir PATH, or --prompt TEXT")
    if o.image:
        _exists(o.image, "image file")
    if o.data_dir:
        _exists(o.data_dir, "data folder")
    motions = [k for k, v in (("--motion", o.motion), ("--flow", o.flow), ("--drag", o.drag)) if v]
    if len(motions) > 1:
        raise UserError(f"give one of --motion, --flow, --drag, not {' and '.join(motions)}")
    if not motions and not (o.data_dir and o.target_flow_name):
        raise UserError(
            "no motion: give --motion (e.g. translate:40,0), --drag 'x,y>X,Y', --flow FILE, or "
            "--data_dir with --target_flow_name"
        )
    if o.drag:
        from mgjax.drag import parse_drag

        parse_drag(o.drag)  # syntax errors now, not after loading models
    if o.object_mask and o.object_box:
        raise UserError("give --object_mask or --object_box, not both")
    if o.motion:
        from mgjax.motion import parse_motion

        parse_motion(o.motion, (0.0, 0.0))  # syntax errors now, not after loading models
    if o.object_mask:
        _exists(o.object_mask, "object mask file")
    if o.flow:
        _exists(o.flow, "flow file")
    if not o.raft_weights:
        raise UserError(
            "--raft_weights is required: download raft-things.pth (princeton-vl/RAFT, "
            "download_models.sh) and pass it, or convert it with python -m flow.convert"
        )
    _exists(o.raft_weights, "RAFT weights file (get raft-things.pth from princeton-vl/RAFT)")
    if o.schedule:
        _exists(o.schedule, "guidance schedule file")
    for name in ("steps", "recursive_steps", "num_samples", "chunk", "raft_iters"):
        if getattr(o, name) < 1:
            raise UserError(f"--{name} must be at least 1")
    if o.log_every < 0 or o.dilate < 0:
        raise UserError("--log_every and --dilate must be >= 0")
    if not o.preserve_weight >= 0:
        raise UserError(f"--preserve_weight must be >= 0 (0 = off), got {o.preserve_weight}")
    from mgjax.levers import ATTENTION, LOOPS, REMAT_POLICIES

    if o.remat not in REMAT_POLICIES:
        raise UserError(f"--remat must be one of {', '.join(REMAT_POLICIES)}, got {o.remat!r}")
    if o.loops not in LOOPS:
        raise UserError(f"--loops must be one of {', '.join(LOOPS)}, got {o.loops!r}")
    if o.attention not in ATTENTION:
        raise UserError(f"--attention must be one of {', '.join(ATTENTION)}, got {o.attention!r}")
    if o.resume and o.overwrite:
        raise UserError("--resume and --overwrite exclude each other")
    if os.path.exists(o.out_dir) and not (o.resume or o.overwrite):
        raise UserError(
            f"{o.out_dir} exists; pass --resume to continue it or --overwrite to replace it"
        )
    if o.resume and not os.path.isfile(os.path.join(o.out_dir, "checkpoint.npz")):
        raise UserError(f"--resume: no checkpoint.npz in {o.out_dir}; start without --resume")


# ----------------------------------------------------------------------------- the run


def _load_models(o: Options):
    from flow.checkpoint import load_raft
    from mgjax import sd as sdm

    if os.path.isdir(o.model) or o.model == "CompVis/stable-diffusion-v1-4" or "/" in o.model:
        sd = sdm.load(
            o.model, revision=o.revision, dtype=o.dtype, from_pt=o.from_pt, attention=o.attention
        )
    else:
        raise UserError(f"--model {o.model}: give a hub id (owner/name) or a local folder")
    raft = load_raft(o.raft_weights, context_norm="batch", dtype=o.dtype)
    return sd, raft


def _source_image(o: Options, sd):
    """(H, W, source image f32[1,H,W,3] in [0,1] or None if generated later, reference data)."""
    from mgjax.reference import read_reference_folder

    if o.data_dir:
        data = read_reference_folder(o.data_dir, o.target_flow_name, o.edit_mask_name, o.steps)
        if data.trajectory is None or data.z_T is None:
            raise UserError(f"{o.data_dir}: needs start_zt.pth and latents/zt.*.pth")
        image = _fit(data.source, sd, False, os.path.join(o.data_dir, "pred.png"))
        return image.shape[1], image.shape[2], image, data
    if o.image:
        image = _fit(read_rgb(o.image)[None] / 255.0, sd, o.resize, o.image)
        return image.shape[1], image.shape[2], image, None
    size = sd.unet.config.sample_size * sd.vae_factor
    return size, size, None, None


def _source(o: Options, sd, uncond, cond, out_dir, log, image, data):
    """(image f32[1,H,W,3] in [0,1], z_T, latents f32[S,1,C,h,w]); cached in out_dir."""
    import jax

    from mgjax import source as src_lib

    cache = os.path.join(out_dir, "source.npz")
    if os.path.isfile(cache):
        with np.load(cache, allow_pickle=False) as z:
            return z["image"], z["z_T"], z["latents"]
    if data is not None:
        z_T, latents = data.z_T, data.trajectory
    elif image is not None:
        log(f"inverting {o.image} over {o.steps} DDIM steps ...")
        # with the prompt, no classifier-free guidance: plain DDIM inversion (with prompt "",
        # the reference's setting for real images, the same as unconditional)
        traj = src_lib.invert(sd, image, cond, uncond, o.steps, 1.0, chunk=50)
        z_T, latents = traj.z_T, traj.latents
    else:
        h = sd.unet.config.sample_size
        z_T = np.asarray(
            jax.random.normal(jax.random.PRNGKey(o.seed), (1, sd.latent_channels, h, h))
        )
        log(f"generating the source from {o.prompt!r}, seed {o.seed} ...")
        traj = src_lib.generate(sd, z_T, cond, uncond, o.steps, o.cfg_scale, chunk=50)
        image = np.rint(src_lib.decode_images(sd, traj.z0) * 255.0) / 255.0  # as its PNG holds it
        latents = traj.latents
    image = np.asarray(image, np.float32)

    def write(tmp):
        with open(tmp, "wb") as f:
            np.savez(
                f,
                image=image,
                z_T=np.asarray(z_T, np.float32),
                latents=np.asarray(latents, np.float32),
            )

    write_atomic(cache, write)
    return image, np.asarray(z_T, np.float32), np.asarray(latents, np.float32)


def _fit(image, sd, resize: bool, path: str):
    factor = sd.vae_factor * 8
    h, w = image.shape[1:3]
    if h % factor == 0 and w % factor == 0:
        return image
    th, tw = max(factor, round(h / factor) * factor), max(factor, round(w / factor) * factor)
    if not resize:
        raise UserError(
            f"{path}: {w}x{h} is not a multiple of {factor}; resize it to {tw}x{th} "
            "(or pass --resize)"
        )
    from PIL import Image

    im = Image.fromarray(np.clip(np.rint(image[0] * 255), 0, 255).astype(np.uint8))
    return (np.asarray(im.resize((tw, th), Image.LANCZOS), np.float32) / 255.0)[None]


def _target(o: Options, data, h: int, w: int):
    """(flow f32[H,W,2], object mask bool[H,W] or None)."""
    from mgjax.motion import box_mask, centroid, motion_flow, parse_motion

    obj = None
    if o.object_mask:
        obj = read_mask_image(o.object_mask, h, w)
        if not obj.any():
            raise UserError(f"{o.object_mask}: the object mask is empty")
    elif o.object_box:
        obj = box_mask(o.object_box, h, w)
    if o.flow:
        return read_flow_file(o.flow, h, w), obj
    if o.drag:
        from mgjax.drag import drag_flow, parse_drag

        return drag_flow(*parse_drag(o.drag), h, w, obj), obj
    if o.motion:
        center = centroid(obj) if obj is not None else ((w - 1) / 2, (h - 1) / 2)
        flow = motion_flow(parse_motion(o.motion, center), h, w, obj)
        return flow, obj
    f = data.target_flow[0]
    if f.shape[:2] != (h, w):
        raise UserError(f"{o.target_flow_name}: flow is {f.shape[:2]}, the image {(h, w)}")
    return f, obj


def default_compilation_cache() -> str:
    """Where compiled samplers are kept between runs: $XDG_CACHE_HOME/mgjax/xla."""
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(root, "mgjax", "xla")


def enable_compilation_cache(path: str) -> None:
    """JAX's persistent compilation cache in `path`: a rerun with the same shapes and settings
    loads the compiled chunk instead of compiling it again."""
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as e:
        raise UserError(
            f"--compilation_cache {path}: cannot create it ({e.strerror}); give a writable "
            "folder, or --compilation_cache= to switch the cache off"
        ) from None
    import jax

    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)


def read_schedule(o: Options) -> np.ndarray | None:
    """The --schedule file's guidance multipliers, or None."""
    if not o.schedule:
        return None
    try:
        return np.load(o.schedule, allow_pickle=False)
    except (OSError, ValueError) as e:
        raise UserError(f"{o.schedule}: not a readable .npy schedule ({e})") from None


def run(o: Options, log=print) -> str:
    """The whole edit. Returns the output folder."""
    o = resolve_toy(o)
    check_options(o)
    t_start = time.perf_counter()
    schedule = read_schedule(o)
    digest = _config_digest(o)
    if o.compilation_cache:
        enable_compilation_cache(o.compilation_cache)
    ckpt_path = os.path.join(o.out_dir, "checkpoint.npz")
    if o.resume:
        with np.load(ckpt_path, allow_pickle=False) as c:
            if str(c["digest"]) != digest:
                raise UserError(
                    f"--resume: the settings differ from the run in {o.out_dir}; use the same "
                    "flags, or --overwrite to start again"
                )

    created = o.overwrite or not os.path.exists(o.out_dir)
    try:
        return _run(o, digest, ckpt_path, schedule, log, t_start)
    except UserError:
        if created and os.path.isdir(o.out_dir) and not os.path.exists(ckpt_path):
            shutil.rmtree(o.out_dir)  # nothing half-written
        raise


@dataclasses.dataclass
class Inputs:
    """One edit's inputs, read and checked (nothing written yet)."""

    h: int
    w: int
    image: np.ndarray | None  # f32[1,H,W,3] in [0,1]; None: generated from the prompt
    data: object  # the reference folder's contents, or None
    flow: np.ndarray  # f32[H,W,2]
    obj: np.ndarray | None  # bool[H,W] object mask
    frozen: np.ndarray  # bool[1,C,h,w] or [1,1,h,w]
    cond: np.ndarray
    uncond: np.ndarray


def read_inputs(o: Options, sd) -> Inputs:
    """Source image, target flow, masks and prompt embeddings of an edit; UserError on bad input."""
    from mgjax.motion import auto_frozen_mask

    h, w, image, data = _source_image(o, sd)
    flow, obj = _target(o, data, h, w)  # cheap checks before the expensive source trajectory
    lat = (1, sd.latent_channels, h // sd.vae_factor, w // sd.vae_factor)
    if o.frozen_mask == "auto" and data is not None and data.frozen is not None:
        frozen = data.frozen  # the example folder's own mask
    elif o.frozen_mask == "auto":
        frozen = auto_frozen_mask(flow, sd.vae_factor, o.dilate)
    elif o.frozen_mask == "none":
        frozen = np.zeros(lat, bool)
    else:
        frozen = read_frozen(o.frozen_mask, lat)
    cond, uncond = sd.embed(o.prompt), sd.embed("")
    return Inputs(h, w, image, data, flow, obj, frozen, cond, uncond)


GUIDANCE_FIELDS = (
    "recursive_steps",
    "guidance_weight",
    "flow_weight",
    "color_weight",
    "clip",
    "cfg_scale",
    "eta",
    "occlusion_masking",
    "oracle",
    "raft_iters",
    "raft_gradient",
    "chunk",
    "remat",
    "skip_unguided",
    "loops",
    "source_cache",
)


def guidance(o: Options):
    """(GuidanceConfig, energy) of an edit's options."""
    from mgjax.sampler import GuidanceConfig

    cfg = GuidanceConfig(
        num_steps=o.steps,
        snapshot_every=o.log_every,
        **{k: getattr(o, k) for k in GUIDANCE_FIELDS},
    )
    energy = cfg.paper_energy()
    if o.preserve_weight:
        from mgjax.energy import PreservationEnergy

        energy = energy + o.preserve_weight * PreservationEnergy()
    return cfg, energy


def source_of(o: Options, sd, inp: Inputs, schedule, log):
    """The edit's source in o.out_dir (which must exist): (image, z_T, source trajectory,
    timestep schedule). A reference folder's own schedule applies unless --schedule gave one."""
    image, z_T, latents = _source(o, sd, inp.uncond, inp.cond, o.out_dir, log, inp.image, inp.data)
    if inp.data is not None and inp.data.schedule is not None and schedule is None:
        schedule = inp.data.schedule[: o.steps]
    return image, z_T, latents, schedule


def _run(o, digest, ckpt_path, schedule, log, t_start):
    import jax
    import jax.numpy as jnp

    from mgjax.sampler import DivergenceError, GuidedSampler, Progress

    sd, raft = _load_models(o)
    inp = read_inputs(o, sd)
    lat = (1, sd.latent_channels, inp.h // sd.vae_factor, inp.w // sd.vae_factor)
    if o.overwrite and os.path.exists(o.out_dir):
        shutil.rmtree(o.out_dir)  # only now that the inputs were read and checked
    os.makedirs(o.out_dir, exist_ok=True)
    image, z_T, latents, schedule = source_of(o, sd, inp, schedule, log)
    flow, obj, frozen, cond, uncond = inp.flow, inp.obj, inp.frozen, inp.cond, inp.uncond

    b = o.num_samples
    cfg, energy = guidance(o)
    sampler = GuidedSampler(sd, raft, cfg, energy=energy)
    rep = lambda x: np.repeat(np.asarray(x), b, axis=0)  # noqa: E731
    edit = sampler.prepare(
        rep(image),
        rep(flow[None]),
        cond,
        uncond,
        frozen=rep(np.broadcast_to(frozen, lat)),
        trajectory=np.repeat(latents, b, axis=1),
        schedule=schedule,
    )
    state = sampler.init(edit, rep(z_T), seeds=[o.seed + n for n in range(b)])
    logs: dict[str, list] = {}
    if o.resume:
        with np.load(ckpt_path, allow_pickle=False) as c:
            state = state.replace(
                z=jnp.asarray(c["z"]), step=jnp.asarray(c["step"]), keys=jnp.asarray(c["keys"])
            )
            logs = {k[4:]: [c[k]] for k in c.files if k.startswith("log_")}
        log(f"resuming {o.out_dir} at DDIM step {int(state.step)}/{o.steps}")

    progress = Progress(o.steps, o.recursive_steps, print_fn=log)
    chunks = 0
    t_run = time.perf_counter()
    try:
        while int(state.step) < o.steps:
            state, chunk_logs, snapshots = sampler.advance(edit, state)
            for k, v in chunk_logs.items():
                logs.setdefault(k, []).append(v)
            _save_checkpoint(ckpt_path, state, logs, digest)
            _save_snapshots(o.out_dir, snapshots, b)
            if chunks == 0:
                took = sampler.compile_seconds
                log(f"compiled the guided sampler ({sampler.loops}) in {took:.1f} s")
            progress(state, chunk_logs)
            chunks += 1
            if o.stop_after_chunks and chunks >= o.stop_after_chunks:
                raise KeyboardInterrupt
    except KeyboardInterrupt:
        log(
            f"interrupted: checkpoint at DDIM step {int(state.step)} in {ckpt_path}; "
            "rerun with --resume to continue"
        )
        raise
    except DivergenceError as e:
        raise UserError(f"{e}; nothing was written for that chunk") from None
    run_s = time.perf_counter() - t_run

    edited = sampler.decode(state.z)
    all_logs = {k: np.concatenate(v) for k, v in logs.items()}
    _write_outputs(
        o,
        sampler,
        edit,
        image,
        flow,
        obj,
        edited,
        all_logs,
        run_s,
        time.perf_counter() - t_start,
        jax,
    )
    log(f"done: {o.out_dir}")
    return o.out_dir


def _save_checkpoint(path, state, logs, digest, **extra):
    """The sampler state, the logs so far (name -> list of chunks) and the settings' digest,
    written atomically; `extra`: more arrays to keep beside them."""
    arrays = {f"log_{k}": np.concatenate(v) for k, v in logs.items()} | extra

    def write(tmp):
        with open(tmp, "wb") as f:
            np.savez(
                f,
                z=np.asarray(state.z),
                step=np.asarray(state.step),
                keys=np.asarray(state.keys),
                digest=np.asarray(digest),
                **arrays,
            )

    write_atomic(path, write)


def _save_snapshots(out_dir, snapshots, b):
    from mgjax.outputs import save_png, snapshot_name, to_uint8

    for step, x in snapshots.items():
        for n in range(b):
            folder = os.path.join(out_dir, f"sample_{n:02d}", "snapshots")
            os.makedirs(folder, exist_ok=True)
            save_png(snapshot_name(folder, step), to_uint8(x[n]))


@functools.cache
def _metric_flow_fn():
    import jax

    return jax.jit(lambda raft, a, b: raft(a, b, iters=METRIC_RAFT_ITERS))


def _metric_flow(raft, a, b):
    """RAFT's flow a -> b at METRIC_RAFT_ITERS iterations (a, b in [0, 255]), compiled once."""
    return _metric_flow_fn()(raft, a, b)


def _write_outputs(
    o, sampler, edit, image, flow, obj, edited, logs, run_s, wall_s, jax, extra=None
):
    from flow.viz import flow_to_color
    from mgjax import outputs as out

    achieved = np.asarray(_metric_flow(sampler.raft, 255.0 * edit.source, 255.0 * edited))
    moving = np.any(flow != 0, axis=-1) if obj is None else obj
    final = sampler.final_energy(edit, edited)
    versions = {"python": platform.python_version()}
    for mod in ("jax", "flax", "diffusers", "transformers", "numpy"):
        versions[mod] = __import__(mod).__version__
    for n in range(len(edited)):
        folder = os.path.join(o.out_dir, f"sample_{n:02d}")
        os.makedirs(folder, exist_ok=True)
        src_u8, ed_u8 = out.to_uint8(image[0]), out.to_uint8(edited[n])
        out.save_png(os.path.join(folder, "source.png"), src_u8)
        out.save_png(os.path.join(folder, "edited.png"), ed_u8)
        norm = max(float(np.linalg.norm(flow, axis=-1).max()), 1e-6)
        out.save_png(os.path.join(folder, "target_flow.png"), flow_to_color(flow, norm))
        out.save_npy(os.path.join(folder, "target_flow.npy"), np.asarray(flow, np.float32))
        if obj is not None:
            out.save_png(os.path.join(folder, "object_mask.png"), obj.astype(np.uint8) * 255)
        out.save_png(os.path.join(folder, "achieved_flow.png"), flow_to_color(achieved[n], norm))
        out.save_png(
            os.path.join(folder, "panel.png"),
            out.panel(image[0], flow, edited[n], achieved[n], norm),
        )
        out.save_toggle_gif(os.path.join(folder, "toggle.gif"), src_u8, ed_u8)
        terms = [k for k in sampler.log_names if k not in ("noise_norm", "guidance_norm")]
        curves = {k: logs[k][..., n].reshape(-1) for k in terms}
        out.save_png(os.path.join(folder, "losses.png"), out.loss_plot(curves))
        energies = logs["energy"][..., n].reshape(-1)
        guided = energies[np.isfinite(energies)]
        epe = np.linalg.norm(achieved[n] - flow, axis=-1)
        metrics = {
            "flow_epe_inside_object": float(epe[moving].mean()) if moving.any() else None,
            "flow_epe_outside_object": float(epe[~moving].mean()) if (~moving).any() else None,
            "flow_l1_final": float(np.abs(achieved[n] - flow).mean()),
            "raft_iters_for_metrics": METRIC_RAFT_ITERS,
            **{f"{k}_final": float(v[n]) for k, v in final.items()},
            "energy_last_evaluation": float(guided[-1]) if guided.size else None,
            "guided_evaluations": int(guided.size),  # steps with guidance 0 are skipped
            "unguided_evaluations": int(logs["energy"][..., n].size - guided.size),
            "sampling_seconds": run_s,
            "compile_seconds": sampler.compile_seconds,
            "loops": sampler.loops,  # what --loops auto resolved to
            "wall_seconds": wall_s,
            "seed": o.seed + n,
            **(extra or {}),
        }
        out.save_json(os.path.join(folder, "metrics.json"), metrics)
        config = dataclasses.asdict(o) | {"sample_seed": o.seed + n, "versions": versions}
        out.save_json(os.path.join(folder, "config.json"), config)
