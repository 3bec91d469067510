"""Batch editing: many edits from a jobs file, run in batches sharded over the local devices, with
the jobs shared among processes (hosts).

  python launch.py --jobs jobs.jsonl --out_dir runs/batch [any flag: the default of every job]

The jobs file's format is described in mgjax.jobs; devices and hosts are handled by
mgjax.sharding.

Jobs whose settings compile to the same program run together, in batches of `batch_size`.
That needs the same model, image size, speed settings and method structure
(mgjax.numeric.structure: steps, K, the energy's form, ...); the method's numbers (guidance
weight, CFG scale, clip, eta, the energy's weights) are data of the compiled program, one value
per image, so jobs that differ only in them share batches and one compile. Each job's own
numbers are in its config.json and in the summary. The batch axis is sharded over the
local devices (`jax.jit` + `NamedSharding`, no pmap). A short last batch is padded with copies
of its last job, so every batch of a group has one shape and one compile. Each job writes what
a single edit writes to OUT/<name>/sample_00/. Process p of P takes jobs p, p + P, ... Every
process writes summary.p<p>.jsonl; process 0 gathers all of them (through the distributed
key-value store when there are several) into summary.jsonl and summary.csv.

A job that fails in any way is recorded in the summary with its status and error, and the
other jobs run: "invalid" (a bad line or input, found before its batch runs), "diverged" (NaN
or inf; the rest of its batch runs again without it) or "failed" (an unexpected error while
preparing it, or while running its batch, such as XLA running out of memory: that batch's
jobs). launch.py exits with status 0 when every job is done and 3 otherwise.
"""

import csv
import dataclasses
import hashlib
import io
import json
import os

import numpy as np

from flow.errors import InputError
from mgjax import conditioning, rundir
from mgjax import config as C
from mgjax import numeric as N
from mgjax.jobs import Job, read_jobs
from mgjax.outputs import save_text
from mgjax.sharding import local_mesh, one_edit, replicate, shard_inputs, shard_state

SUMMARY_METRICS = (
    "flow_epe_inside_object",
    "flow_epe_outside_object",
    "energy_final",
    "guided_evaluations",
    "sampling_seconds",
)


def _finished(job: Job) -> dict | None:
    path = os.path.join(job.config.output.out_dir, "sample_00", "metrics.json")
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return json.load(f)


@dataclasses.dataclass
class Prepared:
    job: Job
    files: object  # mgjax.workflow.EditFiles
    cond: object  # the prompt's conditioning (the model's pytree, batch 1; SD: f32[1,L,D])
    uncond: object  # the same for ""
    image: np.ndarray  # f32[1,H,W,3]
    z_T: np.ndarray  # f32[1,C,h,w]
    latents: np.ndarray  # f32[S,1,C,h,w]
    group: tuple


class _Models:
    """Models loaded once per (model, dtype, attention, RAFT) and replicated on the mesh."""

    def __init__(self, mesh):
        self.mesh, self._cache = mesh, {}

    def get(self, config: C.Config):
        from mgjax.workflow import load_models

        key = dataclasses.astuple(config.model)
        if key not in self._cache:
            sd, raft = load_models(config)
            sd.params = replicate(sd.params, self.mesh)
            raft = replicate(raft, self.mesh)
            self._cache[key] = (sd, raft)
        return key, self._cache[key]


def _read(job: Job):
    """The job's input files, read and checked (no model work): mgjax.workflow.EditFiles."""
    from mgjax.checks import check
    from mgjax.workflow import read_files, resolve_toy

    config = job.config = resolve_toy(job.config)
    check(config, out_dir_free=False)  # the run manages the job folders
    return read_files(config)


def _prepare(job: Job, files, models: _Models, log) -> Prepared:
    """The job's prompt embeddings and source trajectory (inverted or generated, or read from
    the job folder's cache)."""
    from mgjax.trajectory import source_trajectory
    from mgjax.workflow import embed

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
    # the method's structure only: its numbers travel as data, one value per job (mgjax.numeric)
    group = (key, files.h, files.w, N.structure(config.method), config.speed, schedule_id)
    return Prepared(job, files, cond, uncond, image, z_T, latents, group)


# ----------------------------------------------------------------------------- running


class Runner:
    def __init__(self, out_dir: str, batch_size: int, log, process_id: int = 0):
        self.out_dir, self.batch_size, self.log = out_dir, batch_size, log
        self.process_id = process_id
        self.mesh = local_mesh(batch_size)
        self.models = _Models(self.mesh)
        self.samplers: dict = {}
        self.stop_after_chunks = 0  # interrupt after this many chunks in all (0: never)
        self.chunks_run = 0
        self.images: dict[str, np.ndarray] = {}  # job name -> edited f32[H,W,3] in [0, 1]

    def sampler(self, prepared: Prepared):
        from mgjax.workflow import make_sampler

        if prepared.group not in self.samplers:
            config = prepared.job.config
            _, (sd, raft) = self.models.get(config)
            self.samplers[prepared.group] = make_sampler(config, sd, raft)
        return self.samplers[prepared.group]

    def run_batch(self, batch: list[Prepared], label: str) -> list[Prepared]:
        """Run one batch to the end and write its jobs' outputs. Returns the jobs to run again
        (the others of a batch in which some diverged)."""
        from mgjax import loop
        from mgjax.checkpoint import Checkpoint
        from mgjax.progress import Progress
        from mgjax.results import EditResult, save_snapshots, write_samples
        from mgjax.sampler import DivergenceError

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
        state = sampler.init(inputs, concat([p.z_T for p in batch]), seeds)
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

        progress = Progress(config.method.steps, config.method.recursive_steps, log=say)
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
        edited = sampler.decode(result.state.z)
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
            p.job.status, p.job.metrics = "done", _finished(p.job)
            self.images[p.job.name] = edited[n]
        ckpt.remove()
        return []


def run_jobs(
    jobs_path: str,
    explicit: dict,
    batch_size: int = 0,
    log=print,
    process_id: int = 0,
    num_processes: int = 1,
    kv=None,
    images: dict | None = None,
    preset: str = "auto",
) -> list[dict]:
    """Run a jobs file; `explicit` and `preset` are the command line's (mgjax.config.resolve),
    every job's defaults. Returns the summary rows (all jobs on process 0, its own elsewhere);
    `images`, when given, receives name -> edited f32[H,W,3] of the jobs run now."""
    import jax

    if batch_size < 0:
        raise InputError(f"--batch_size must be >= 1 (0: one per local device), got {batch_size}")
    batch_size = batch_size or jax.local_device_count()
    try:
        run_config = C.resolve(explicit, preset)
    except ValueError as e:
        raise InputError(str(e)) from None
    base, cache = run_config.output, run_config.speed.compilation_cache
    if not base.out_dir:
        raise InputError("--out_dir is required")
    if cache:
        from mgjax.workflow import enable_compilation_cache

        enable_compilation_cache(cache)
    jobs = read_jobs(jobs_path, explicit, preset)
    mine = [j for j in jobs if j.index % num_processes == process_id]
    out = base.out_dir
    summary_part = os.path.join(out, f"summary.p{process_id}.jsonl")
    rundir.check_writable(out)
    if base.resume and base.overwrite:
        raise InputError("--resume and --overwrite exclude each other")
    if os.path.isdir(out) and os.listdir(out):
        if not rundir.is_ours(out):
            raise InputError(f"{out} exists and was not written by mgjax; give a new --out_dir")
        if not (base.resume or base.overwrite):
            raise InputError(
                f"{out} exists; pass --resume to continue its jobs or --overwrite to start again"
            )
    if base.num_samples != 1:
        raise InputError(
            "--num_samples does not apply to --jobs: give each sample its own job (its own seed)"
        )
    if num_processes > 1:  # every process checks the folder before any of them writes to it
        (kv or _client()).wait_at_barrier("mgjax/checked", 15 * 60 * 1000)
    if base.overwrite:  # each process clears its own share, only folders mgjax wrote
        for j in mine:
            rundir.replace(os.path.join(out, j.name))
        for f in (
            summary_part,
            os.path.join(out, "summary.jsonl"),
            os.path.join(out, "summary.csv"),
        ):
            if os.path.exists(f):
                os.remove(f)
    rundir.claim(out)
    runner = Runner(out, batch_size, log, process_id)
    runner.stop_after_chunks = base.stop_after_chunks
    log(
        f"{len(jobs)} jobs, {len(mine)} for process {process_id}/{num_processes}; batches of "
        f"{batch_size} over {runner.mesh.size} local device(s)"
    )
    read = []  # every job's inputs are checked before any model loads
    for job in mine:
        if job.status != "pending":
            log(f"{job.name}: invalid: {job.error}")
            continue
        done = _finished(job) if base.resume else None
        if done is not None:
            job.status, job.metrics = "done", done
            job.error = None
            continue
        files = _isolated(job, log, lambda j=job: _read(j))
        if files is not None:
            read.append((job, files))
    groups: dict[tuple, list[Prepared]] = {}
    for job, files in read:
        say = lambda s, n=job.name: log(f"{n}: {s}")  # noqa: E731
        p = _isolated(job, log, lambda j=job, f=files, say=say: _prepare(j, f, runner.models, say))
        if p is not None:
            groups.setdefault(p.group, []).append(p)
    _write_part(summary_part, mine, process_id)
    n_batches = sum(-(-len(g) // batch_size) for g in groups.values())
    count = 0
    for queue in groups.values():
        while queue:
            batch, queue = queue[:batch_size], queue[batch_size:]
            count += 1
            try:
                again = runner.run_batch(batch, f"batch {count}/{n_batches}")
            except Exception as e:  # noqa: BLE001 - out of memory, a bug: the other batches run
                again, error = [], _describe(e)
                if "RESOURCE_EXHAUSTED" in str(e) or "out of memory" in str(e).lower():
                    error += (
                        "; rerun with --resume and a smaller --batch_size, or the memory "
                        "levers (--remat, --dtype bfloat16), to run the jobs that did not finish"
                    )
                for p in batch:
                    p.job.status, p.job.error = "failed", error
                log(f"batch {count}/{n_batches} failed: {error}")
            queue = again + queue
            _write_part(summary_part, mine, process_id)
    if images is not None:
        images.update(runner.images)
    batches = os.path.join(out, "_batches")
    if os.path.isdir(batches) and not os.listdir(batches):
        os.rmdir(batches)
    rows = [_row(j, process_id) for j in mine]
    if num_processes == 1:
        rows = sorted(rows, key=lambda r: r["index"])
        _write_summary(out, rows)
        return rows
    return _gather(out, rows, process_id, num_processes, kv)


def _isolated(job: Job, log, work):
    """work() or, when it fails, None with the job recorded as invalid (bad input) or failed
    (anything else): one job's failure never ends the run."""
    try:
        return work()
    except InputError as e:
        job.status, job.error = "invalid", str(e)
    except Exception as e:  # noqa: BLE001 - recorded in the summary; the other jobs run
        job.status, job.error = "failed", _describe(e)
    log(f"{job.name}: {job.status}: {job.error}")
    return None


def _describe(error: BaseException) -> str:
    """One line naming an unexpected error: its type and the first line of its message."""
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0][:300]}" if lines else type(error).__name__


def _row(job: Job, process_id: int) -> dict:
    m = job.metrics or {}
    return {
        "index": job.index,
        "name": job.name,
        "status": job.status,
        "error": job.error,
        "process": process_id,
        "out_dir": job.config.output.out_dir if job.config else None,
        **{k: m.get(k) for k in SUMMARY_METRICS},
        # the job's own numbers (jobs of one batch may differ in them)
        **{k: getattr(job.config.method, k) if job.config else None for k in N.FIELDS},
    }


def _write_part(path: str, jobs: list[Job], process_id: int) -> None:
    save_text(path, "".join(json.dumps(_row(j, process_id)) + "\n" for j in jobs))


def _write_summary(out: str, rows: list[dict]) -> None:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    save_text(os.path.join(out, "summary.jsonl"), "".join(json.dumps(r) + "\n" for r in rows))
    save_text(os.path.join(out, "summary.csv"), buf.getvalue())


def _client():
    from jax._src import distributed

    client = distributed.global_state.client
    if client is None:
        raise InputError("several processes need jax.distributed (--coordinator ...)")
    return client


def _gather(out, rows, process_id, num_processes, kv=None) -> list[dict]:
    """Every process posts its rows to the distributed key-value store; process 0 waits for
    all of them and writes the one summary."""
    client = kv or _client()
    client.key_value_set(f"mgjax/summary/{process_id}", json.dumps(rows))
    if process_id != 0:
        return rows
    week_ms = 7 * 24 * 3600 * 1000
    everything = []
    for p in range(num_processes):
        everything += json.loads(client.blocking_key_value_get(f"mgjax/summary/{p}", week_ms))
    everything.sort(key=lambda r: r["index"])
    _write_summary(out, everything)
    return everything


def report(rows: list[dict], log=print) -> None:
    """One line per status, and each job that did not finish."""
    counts: dict[str, int] = {}
    for r in rows:
        counts[r["status"]] = counts.get(r["status"], 0) + 1
    log("jobs: " + ", ".join(f"{n} {s}" for s, n in sorted(counts.items())))
    for r in rows:
        if r["status"] != "done":
            log(f"  {r['name']}: {r['status']}: {r['error']}")
