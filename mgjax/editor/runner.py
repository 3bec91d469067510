"""Running the editor's work on models loaded once: an edit written to its run folder exactly as
launch.py writes it (mgjax.edit.workflow's readers, mgjax.method.loop.run,
mgjax.edit.results' writers), and a source generated from a prompt. One Sampler is kept per method
structure/speed/snapshot setting (mgjax.method.numeric.structure: the guidance weight, CFG scale and
the other numbers are data of its compiled programs), and a Sampler keeps its compiled programs per
shape, so a second edit of the same size and structure compiles nothing, whatever its weights.
"""

import hashlib
import io
import json
import os
import shlex
import shutil
import time

import numpy as np

from flow.errors import InputError
from mgjax import config as C
from mgjax.edit import outputs, rundir, workflow
from mgjax.edit.checkpoint import Checkpoint
from mgjax.edit.motion import auto_frozen_mask
from mgjax.editor.worker import Cancelled, Job
from mgjax.method import cost

INPUTS = "inputs"  # the authored source, mask, flow and frozen mask, inside the run folder
JOB_LINE = "job.jsonl"
REPRODUCE = "reproduce.txt"
_PATH_KEYS = {"image": "source.png", "object_mask": "object_mask.png"}


class Engine:
    """The command line's models, loaded once, and the samplers built on them."""

    def __init__(self, config: C.Config, cache: str):
        self.config = workflow.resolve_toy(config)
        self.sd, self.raft = workflow.load_models(self.config)
        self.vae_factor = int(self.sd.vae_factor)
        self.samplers: dict = {}
        self.cache = cache  # generated sources, by what they depend on

    @property
    def native(self) -> int:
        """The side of the images the model generates (64 for the toy pack, 512 for SD)."""
        return int(self.sd.unet.config.sample_size) * int(self.sd.vae_factor)

    @property
    def factor(self) -> int:
        """Image sides must be multiples of this (the VAE's factor x the UNet's 8)."""
        return int(self.sd.vae_factor) * 8

    def sampler(self, config: C.Config):
        """The Sampler of config's method structure, speed and snapshot setting (made once;
        the method's numbers are each edit's inputs, mgjax.edit.workflow.start)."""
        return workflow.sampler_of(self.samplers, config, self.sd, self.raft)

    def edit(self, config: C.Config, job: Job) -> dict:
        """The edit of `config` into config.output.out_dir; events: progress after every chunk,
        x0 (a snapshot's file) every log_every steps. Returns what the page shows."""
        from mgjax.edit.progress import Progress
        from mgjax.edit.results import EditResult, save_snapshots, write_samples
        from mgjax.edit.trajectory import source_trajectory
        from mgjax.method import loop
        from mgjax.method.sampler import DivergenceError

        out_dir, method = config.output.out_dir, config.method
        t_start = time.perf_counter()
        files = workflow.read_files(config)
        cond, uncond = workflow.embed(config, self.sd, files)
        cached = os.path.join(self.generation_folder(config), "source.npz")
        if not config.source.image and os.path.isfile(cached):
            shutil.copy(cached, os.path.join(out_dir, "source.npz"))  # generated on the page
        job.emit("phase", text="preparing the source")
        source = source_trajectory(
            config, self.sd, cond, uncond, out_dir, files.image, None, job.log
        )
        sampler = self.sampler(config)
        inputs, state = workflow.start(config, sampler, files, (cond, uncond), source)
        progress = Progress(
            method.steps, cost.evaluations_per_step(method, config.speed), stream=io.StringIO()
        )
        job.emit("phase", text="sampling (the first chunk compiles)")

        def on_snapshots(snapshots: dict) -> None:
            save_snapshots(out_dir, snapshots)
            for step in sorted(snapshots):
                name = os.path.basename(outputs.snapshot_name("", step))
                job.emit("x0", step=step, file=f"sample_00/snapshots/{name}")

        ckpt = Checkpoint(os.path.join(out_dir, workflow.CHECKPOINT), C.digest(config))
        try:
            result = loop.run(
                sampler,
                inputs,
                state,
                {},
                checkpoint=ckpt.save,
                on_snapshots=on_snapshots,
                progress=lambda s, logs: job.emit("progress", **progress.measure(s, logs)),
                should_stop=job.should_stop,
                log=job.log,
            )
        except DivergenceError as e:
            raise InputError(f"the edit diverged ({e}); lower the guidance weight") from None
        if not result.finished:  # the checkpoint stays: launch.py --resume continues it
            raise Cancelled(step=int(result.state.step), folder=out_dir)
        job.emit("phase", text="writing the outputs")
        edited = sampler.decode(result.state.z, inputs)
        wall = time.perf_counter() - t_start
        res = EditResult(
            source[0][0], files.flow, files.obj, edited, result.logs, result.seconds, wall
        )
        write_samples(config, sampler, inputs, res)
        samples = sorted(d for d in os.listdir(out_dir) if d.startswith("sample_"))
        metrics = [json.load(open(os.path.join(out_dir, s, "metrics.json"))) for s in samples]
        return dict(samples=samples, metrics=metrics, folder=out_dir)

    def generation_folder(self, config: C.Config) -> str:
        """Where a prompt's generated source is cached (by what the generation depends on)."""
        s, m = config.source, config.method
        key = json.dumps([s.prompt, s.seed, m.steps, m.cfg_scale, C.flat(self.config)["model"]])
        return os.path.join(self.cache, hashlib.sha256(key.encode()).hexdigest()[:24])

    def generate(self, config: C.Config, job: Job) -> np.ndarray:
        """The source launch.py generates from config's prompt and seed: u8[H,W,3]."""
        from mgjax.edit.trajectory import source_trajectory

        folder = self.generation_folder(config)
        os.makedirs(folder, exist_ok=True)
        cond, uncond = self.sd.embed(config.source.prompt), self.sd.embed("")  # native size
        image, _, _ = source_trajectory(config, self.sd, cond, uncond, folder, None, None, job.log)
        return outputs.to_uint8(image[0])


def write_inputs(config: C.Config, job_line: dict) -> tuple[C.Config, dict]:
    """Copy the authored source and mask into the run folder's inputs/. Returns the config that
    reads the copies and the jobs-file line with their paths relative to the run folder."""
    out_dir = config.output.out_dir
    folder = os.path.join(out_dir, INPUTS)
    os.makedirs(folder, exist_ok=True)
    copies, line = {}, dict(job_line)
    for key, name in _PATH_KEYS.items():
        path = getattr(config.source if key == "image" else config.motion, key)
        if path:
            shutil.copy(path, os.path.join(folder, name))
            copies[key] = os.path.abspath(os.path.join(folder, name))
            line[key] = f"{INPUTS}/{name}"
    config = C.replace(config, **copies)
    line.pop("num_samples", None)  # a jobs file runs one sample per job
    return config, line


def write_reproduction(
    config: C.Config, line: dict, explicit: dict, launcher: str, h: int, w: int, vae_factor: int
) -> None:
    """inputs/target_flow.npy and frozen_mask.png (what the edit uses, as launch.py makes them),
    job.jsonl (a jobs-file line of this edit) and reproduce.txt (the launch.py commands)."""
    from mgjax.edit.workflow import target

    out_dir = config.output.out_dir
    flow, _ = target(config, None, h, w)
    outputs.save_npy(os.path.join(out_dir, INPUTS, "target_flow.npy"), flow)
    frozen = auto_frozen_mask(flow, vae_factor, config.motion.dilate)[0, 0]
    outputs.save_png(
        os.path.join(out_dir, INPUTS, "frozen_mask.png"), frozen.astype(np.uint8) * 255
    )
    name = os.path.basename(os.path.normpath(out_dir))
    outputs.save_text(os.path.join(out_dir, JOB_LINE), json.dumps({"name": name, **line}) + "\n")
    base = {k: v for k, v in explicit.items() if k not in C.RUN_LEVEL}
    single = {**base, **{k: v for k, v in line.items() if k != "preset"}}
    single["num_samples"] = config.output.num_samples
    if config.output.log_every:
        single["log_every"] = config.output.log_every
    preset = line.get("preset") or explicit.get("preset")
    text = (
        "# This edit again, run from this folder (it holds inputs/ and job.jsonl).\n"
        "# As a jobs file (one job, sample_00 only: a jobs file runs one sample per job):\n"
        f"python {shlex.quote(launcher)} --jobs {JOB_LINE} --out_dir again"
        f"{_flags(base)}\n"
        "# As a single edit:\n"
        f"python {shlex.quote(launcher)} --out_dir again_single"
        f"{_flags(single)}{f' --preset {preset}' if preset else ''}\n"
    )
    outputs.save_text(os.path.join(out_dir, REPRODUCE), text)


def _flags(values: dict) -> str:
    parts = []
    for k, v in values.items():
        if isinstance(v, bool):
            parts.append(f"--{k}" if v else f"--no{k}")
        elif v is not None:
            parts.append(f"--{k}={shlex.quote(str(v))}")
    return "".join(" " + p for p in parts)


def claim(config: C.Config) -> None:
    """Mark the run folder as mgjax's (so --resume and --overwrite know it), as launch.py does."""
    rundir.claim(config.output.out_dir, C.digest(config))
