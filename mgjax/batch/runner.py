"""One batch of jobs: each job's inputs read and prepared (prompt embeddings, source
trajectory), models loaded once and replicated on the local mesh, and a batch of prepared jobs
run to the end, sharded, with its outputs written as a single edit writes them."""

import dataclasses
import hashlib
import json
import os

import numpy as np

from mgjax import config as C
from mgjax.batch.jobs import Job
from mgjax.batch.sharding import local_mesh, one_edit, replicate, shard_inputs, shard_state
from mgjax.batch.summary import finished
from mgjax.edit import rundir
from mgjax.method import cost, start
from mgjax.method import numeric as N
from mgjax.model import conditioning


@dataclasses.dataclass
class Prepared:
    job: Job
    files: object  # mgjax.edit.workflow.EditFiles
    cond: object  # the prompt's conditioning (the model's pytree, batch 1; SD: f32[1,L,D])
    uncond: object  # the same for ""
    image: np.ndarray  # f32[1,H,W,3]
    z_T: np.ndarray  # f32[1,C,h,w]
    latents: np.ndarray  # f32[S,1,C,h,w]
    group: tuple


class Models:
    """Models loaded once per (model, dtype, attention, RAFT) and replicated on the mesh."""

    def __init__(self, mesh):
        self.mesh, self._cache = mesh, {}

    def get(self, config: C.Config):
        from mgjax.edit.workflow import load_models

        key = dataclasses.astuple(config.model)
        if key not in self._cache:
            sd, raft = load_models(config)
            sd.params = replicate(sd.params, self.mesh)
            raft = replicate(raft, self.mesh)
            self._cache[key] = (sd, raft)
        return key, self._cache[key]


def read_job(job: Job):
    """The job's input files, read and checked (no model work): mgjax.edit.workflow.EditFiles."""
    from mgjax.edit.checks import check
    from mgjax.edit.workflow import read_files, resolve_toy

    config = job.config = resolve_toy(job.config)
    check(config, out_dir_free=False)  # the run manages the job folders
    return read_files(config)


def prepare_job(job: Job, files, models: Models, log) -> Prepared:
    """The job's prompt embeddings and source trajectory (inverted or generated, or read from
    the job folder's cache)."""
    from mgjax.edit.trajectory import source_trajectory
    from mgjax.edit.workflow import embed

    config = job.config
    key, (sd, _) = models.get(config)
    cond, uncond = embed(config, sd, files)
    if config.output.resume:
        rundir.remove_temporaries(config.output.out_dir)  # of a write that a kill cut short
    rundir.claim(config.output.out_dir, C.digest(config))
    image, z_T, latents = source_trajectory(
        config, sd, cond, uncond, config.output.out_dir, files.image, files.data, log
    )
    schedule_id = (
        None
        if files.schedule is None
        else hashlib.sha256(np.asarray(files.schedule, np.float32).tobytes()).hexdigest()
    )
    # the method's structure only: its numbers travel as data, one value per job (numeric)
    group = (key, files.h, files.w, N.structure(config.method), config.speed, schedule_id)
    return Prepared(job, files, cond, uncond, image, z_T, latents, group)


class Runner:
    def __init__(self, out_dir: str, batch_size: int, log, process_id: int = 0):
        self.out_dir, self.batch_size, self.log = out_dir, batch_size, log
        self.process_id = process_id
        self.mesh = local_mesh(batch_size)
        self.models = Models(self.mesh)
        self.samplers: dict = {}
        self.stop_after_chunks = 0  # interrupt after this many chunks in all (0: never)
        self.chunks_run = 0
        self.images: dict[str, np.ndarray] = {}  # job name -> edited f32[H,W,3] in [0, 1]

    def sampler(self, prepared: Prepared):
        from mgjax.edit.workflow import make_sampler

        if prepared.group not in self.samplers:
            config = prepared.job.config
            _, (sd, raft) = self.models.get(config)
            self.samplers[prepared.group] = make_sampler(config, sd, raft)
        return self.samplers[prepared.group]

    def run_batch(self, batch: list[Prepared], label: str) -> list[Prepared]:
        """Run one batch to the end and write its jobs' outputs. Returns the jobs to run again
        (the others of a batch in which some diverged)."""
        from mgjax.edit.checkpoint import Checkpoint
        from mgjax.edit.progress import Progress
        from mgjax.edit.results import EditResult, save_snapshots, write_samples
        from mgjax.method import loop
        from mgjax.method.sampler import DivergenceError

        real = len(batch)
        batch = batch + [batch[-1]] * (self.batch_size - real)  # padding: same shape always
        first = batch[0]
        config = first.job.config
        sampler = self.sampler(first)
        concat = lambda xs, axis=0: np.concatenate(xs, axis=axis)  # noqa: E731
        lat = (1, sampler.sd.latent_channels) + first.latents.shape[-2:]
        inputs = sampler.prepare(
            concat([p.image for p in batch]),
            concat([p.files.flow[None] for p in batch]),
            conditioning.concat([p.cond for p in batch], np),
            conditioning.concat([p.uncond for p in batch], np),
            frozen=concat([np.broadcast_to(p.files.frozen, lat) for p in batch]),
            trajectory=concat([p.latents for p in batch], 1),
            schedule=first.files.schedule,
            numeric=N.of([p.job.config.method for p in batch], dtype=sampler.dtype),
            encode=False,  # source_cache: encoded below, once sharded
        )
        seeds = [p.job.config.source.seed for p in batch]
        factor = sampler.sd.vae_factor
        first_latents = [
            start.initial(p.job.config.method, p.z_T, p.files.flow[None], factor) for p in batch
        ]
        state = sampler.init(inputs, concat(first_latents), seeds)
        inputs, state = shard_inputs(inputs, self.mesh), shard_state(state, self.mesh)
        inputs = sampler.encode_source(inputs)  # source_cache: each device its own images
        names = [p.job.name for p in batch]
        digests = [C.digest(p.job.config) for p in batch]  # each job's own numbers included
        digest = hashlib.sha256(
            json.dumps([names, digests, repr(first.group)]).encode()
        ).hexdigest()[:16]
        ckpt = Checkpoint(os.path.join(self.out_dir, "_batches", f"{digest}.npz"), digest)
        logs: dict = {}
        if ckpt.exists():
            state, logs, _ = ckpt.load(state)
            state = shard_state(state, self.mesh)
            self.log(f"{label}: resuming at DDIM step {int(state.step)}/{config.method.steps}")
        os.makedirs(os.path.dirname(ckpt.path), exist_ok=True)
        say = lambda s: self.log(f"{label}: {s}")  # noqa: E731

        def on_snapshots(snapshots):
            for n, p in enumerate(batch[:real]):
                one = {s: x[n : n + 1] for s, x in snapshots.items()}
                save_snapshots(p.job.config.output.out_dir, one)

        def should_stop() -> bool:
            self.chunks_run += 1
            return bool(self.stop_after_chunks) and self.chunks_run >= self.stop_after_chunks

        progress = Progress(
            config.method.steps, cost.evaluations_per_step(config.method, config.speed), log=say
        )
        try:
            result = loop.run(
                sampler,
                inputs,
                state,
                logs,
                checkpoint=ckpt.save,
                on_snapshots=on_snapshots,
                progress=progress,
                should_stop=should_stop,
                log=say,
            )
        except DivergenceError as e:
            bad = {names[i] for i in e.bad if i < real}
            for p in batch[:real]:
                if p.job.name in bad:
                    p.job.status, p.job.error = "diverged", str(e)
            ckpt.remove()
            self.log(f"{label}: {e}; the other jobs of the batch run again")
            return [p for p in batch[:real] if p.job.name not in bad]
        finally:
            progress.close()
        if not result.finished:
            raise KeyboardInterrupt
        edited = sampler.decode(result.state.z, inputs)
        for n, p in enumerate(batch[:real]):
            job_logs = {k: v[..., n : n + 1] for k, v in result.logs.items()}
            res = EditResult(
                p.image[0],
                p.files.flow,
                p.files.obj,
                edited[n : n + 1],
                job_logs,
                result.seconds,
                result.seconds,
            )
            extra = {"batch_size": self.batch_size, "batch_jobs": names[:real]}
            extra["devices"] = self.mesh.size
            write_samples(p.job.config, sampler, one_edit(inputs, n), res, extra=extra)
            p.job.status, p.job.metrics = "done", finished(p.job)
            self.images[p.job.name] = edited[n]
        ckpt.remove()
        return []
