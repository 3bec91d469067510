"""Batch editing: many edits from a jobs file, run in batches sharded over the local devices, with
the jobs shared among processes (hosts).

  python launch.py --jobs jobs.jsonl --out_dir runs/batch [any flag: the default of every job]

A jobs file has one JSON object per line (blank lines and lines starting with # are skipped).
Its keys are launch.py's flag names (`image`, `prompt`, `seed`, `motion`, `object_mask`,
`guidance_weight`, ...) and they override the command line for that job. The extra keys are:
`name` (its output folder, default job_00000, ...), `preset` (a preset's values for the keys the
job does not give), and `points` (drag pairs [[[x, y], [X, Y]], ...], the same as `drag`).

Jobs whose settings compile to the same program run together, in batches of `batch_size`.
That needs the same model, image size and guidance settings. The batch axis is sharded over the
local devices (`jax.jit` + `NamedSharding`, no pmap). A short last batch is padded with copies
of its last job, so every batch of a group has one shape and one compile. Each job writes what
a single edit writes to OUT/<name>/sample_00/. Process p of P takes jobs p, p + P, ... Every
process writes summary.p<p>.jsonl; process 0 gathers all of them (through the distributed
key-value store when there are several) into summary.jsonl and summary.csv.
"""

import csv
import dataclasses
import hashlib
import io
import json
import os
import re
import shutil
import time
import typing
from pathlib import Path

import numpy as np

from flow.errors import UserError
from mgjax import edit as ed
from mgjax.outputs import save_text

# Options that belong to the whole run, not to a job.
RUN_ONLY = (
    "out_dir",
    "resume",
    "overwrite",
    "stop_after_chunks",
    "num_samples",
    "compilation_cache",
)
JOB_ONLY = ("name", "preset", "points")
SUMMARY_METRICS = (
    "flow_epe_inside_object",
    "flow_epe_outside_object",
    "energy_final",
    "guided_evaluations",
    "sampling_seconds",
)
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


@dataclasses.dataclass
class Job:
    index: int  # position among the jobs (0-based)
    name: str
    line: int  # line number in the jobs file
    options: ed.Options | None
    status: str = "pending"  # pending | done | invalid | diverged
    error: str | None = None
    metrics: dict | None = None


# ----------------------------------------------------------------------------- jobs file


def points_to_drag(points) -> str:
    """[[[x, y], [X, Y]], ...] -> the --drag string "x,y>X,Y; ..."."""
    try:
        pairs = [(tuple(map(float, h)), tuple(map(float, t))) for h, t in points]
        if not pairs or any(len(h) != 2 or len(t) != 2 for h, t in pairs):
            raise ValueError
    except (TypeError, ValueError):
        raise UserError(
            f"points must be [[[x, y], [X, Y]], ...] (handle, target pairs), got {points!r}"
        ) from None
    return "; ".join(f"{h[0]:g},{h[1]:g}>{t[0]:g},{t[1]:g}" for h, t in pairs)


def _coerce(name: str, value, hint):
    args = typing.get_args(hint)
    if value is None and type(None) in args:
        return None
    kind = next((a for a in args if a is not type(None)), hint) if args else hint
    ok = {
        bool: isinstance(value, bool),
        int: isinstance(value, int) and not isinstance(value, bool),
        float: isinstance(value, int | float) and not isinstance(value, bool),
        str: isinstance(value, str),
    }.get(kind, False)
    if not ok:
        raise UserError(f"{name}: expected {kind.__name__}, got {json.dumps(value)}")
    return float(value) if kind is float else value


def read_jobs(path: str, base: ed.Options) -> list[Job]:
    """Parse a jobs file against the run's options. A bad line becomes an invalid job (reported,
    skipped), not an error of the whole run; a file that cannot be read is one."""
    try:
        lines = Path(path).read_text().splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"--jobs {path}: cannot read it ({e})") from None
    hints = typing.get_type_hints(ed.Options)
    allowed = set(hints) - set(RUN_ONLY)
    jobs: list[Job] = []
    seen: set[str] = set()
    for number, line in enumerate(lines, start=1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        index = len(jobs)
        name = f"job_{index:05d}"
        try:
            try:
                spec = json.loads(line)
            except json.JSONDecodeError as e:
                raise UserError(f"not JSON ({e.msg} at column {e.colno})") from None
            if not isinstance(spec, dict):
                raise UserError('a job is a JSON object, e.g. {"image": "a.png", ...}')
            name = spec.pop("name", name)
            if not isinstance(name, str) or not _NAME.match(name):
                raise UserError(f"name {name!r}: letters, digits, '.', '_' and '-' only")
            if name in seen:
                raise UserError(f"name {name!r} is used by an earlier job")
            seen.add(name)
            run_only = sorted(set(spec) & set(RUN_ONLY))
            if run_only:
                raise UserError(f"{run_only} belong to the whole run: give them as flags")
            unknown = sorted(set(spec) - allowed - set(JOB_ONLY))
            if unknown:
                raise UserError(f"unknown key(s) {unknown}; job keys are launch.py's flag names")
            if "points" in spec:
                if "drag" in spec:
                    raise UserError("give points or drag, not both")
                spec["drag"] = points_to_drag(spec.pop("points"))
            values = {}
            preset = spec.pop("preset", None)
            if preset is not None:
                if preset not in ed.PRESETS:
                    raise UserError(f"preset {preset!r}: one of {', '.join(ed.PRESETS)}")
                values.update(ed.PRESETS[preset])
            values.update({k: _coerce(k, v, hints[k]) for k, v in spec.items()})
            options = dataclasses.replace(
                base, out_dir=os.path.join(base.out_dir, name), num_samples=1, **values
            )
            jobs.append(Job(index, name, number, options))
        except UserError as e:
            seen.add(name)
            jobs.append(Job(index, name, number, None, "invalid", f"line {number}: {e}"))
    if not jobs:
        raise UserError(f"--jobs {path}: no jobs in it (one JSON object per line)")
    return jobs


def _finished(job: Job) -> dict | None:
    path = os.path.join(job.options.out_dir, "sample_00", "metrics.json")
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return json.load(f)


# ----------------------------------------------------------------------------- devices


def initialize_distributed(coordinator: str, num_processes: int, process_id: int) -> None:
    """jax.distributed: explicit (--coordinator ...) or automatic on a multi-host Cloud TPU.
    Must run before anything touches a JAX backend."""
    import jax

    if coordinator:
        if num_processes < 1 or not 0 <= process_id < num_processes:
            raise UserError(
                f"--process_id {process_id} with --num_processes {num_processes}: each process "
                "needs an id in 0 .. num_processes - 1"
            )
        jax.distributed.initialize(coordinator, num_processes, process_id)
    elif "," in os.environ.get("TPU_WORKER_HOSTNAMES", ""):  # a pod slice: several hosts
        jax.distributed.initialize()


def local_mesh(batch_size: int):
    """A 1-D mesh ("batch") over as many local devices as divide the batch size."""
    import jax
    from jax.sharding import Mesh

    devices = jax.local_devices()
    n = max(d for d in range(1, len(devices) + 1) if batch_size % d == 0)
    return Mesh(np.array(devices[:n]), ("batch",))


def _sharded(x, mesh, axis: int | None):
    import jax
    from jax.sharding import NamedSharding, PartitionSpec

    spec = [None] * np.ndim(x)
    if axis is not None:
        spec[axis] = "batch"
    return jax.device_put(x, NamedSharding(mesh, PartitionSpec(*spec)))


def shard_edit(edit, mesh):
    """The edit's per-image arrays split over the mesh on their batch axis, the rest replicated."""
    from mgjax.sampler import map_images

    edit = map_images(edit, lambda x, axis: _sharded(x, mesh, axis))
    return edit.replace(schedule=_sharded(edit.schedule, mesh, None))


def shard_state(state, mesh):
    return state.replace(
        z=_sharded(state.z, mesh, 0),
        keys=_sharded(state.keys, mesh, 0),
        step=_sharded(state.step, mesh, None),
    )


def one_edit(edit, j: int):
    """Image j of a batched edit, on the host (numpy arrays)."""
    import jax

    from mgjax.sampler import map_images

    host = jax.tree_util.tree_map(np.asarray, edit)
    return map_images(host, lambda x, axis: np.take(x, [j], axis=axis))


# ----------------------------------------------------------------------------- preparing jobs


@dataclasses.dataclass
class Prepared:
    job: Job
    inputs: ed.Inputs
    image: np.ndarray  # f32[1,H,W,3]
    z_T: np.ndarray  # f32[1,C,h,w]
    latents: np.ndarray  # f32[S,1,C,h,w]
    schedule: np.ndarray | None
    group: tuple


class _Models:
    """Models loaded once per (model, dtype, attention, RAFT) and replicated on the mesh."""

    def __init__(self, mesh):
        self.mesh, self._cache = mesh, {}

    def get(self, o: ed.Options):
        key = (o.model, o.revision, o.from_pt, o.dtype, o.attention, o.raft_weights)
        if key not in self._cache:
            sd, raft = ed._load_models(o)
            sd.params = _sharded_tree(sd.params, self.mesh)
            raft = _sharded_tree(raft, self.mesh)
            self._cache[key] = (sd, raft)
        return key, self._cache[key]


def _sharded_tree(tree, mesh):
    import jax

    return jax.tree_util.tree_map(lambda x: _sharded(x, mesh, None), tree)


def _prepare(job: Job, models: _Models, log) -> Prepared:
    o = ed.resolve_toy(job.options)
    job.options = o
    # the run manages the job folders: skip single-edit checks of out_dir
    ed.check_options(dataclasses.replace(o, resume=False, overwrite=True))
    key, (sd, _) = models.get(o)
    inp = ed.read_inputs(o, sd)
    os.makedirs(o.out_dir, exist_ok=True)
    image, z_T, latents, schedule = ed.source_of(o, sd, inp, ed.read_schedule(o), log)
    cfg, energy = ed.guidance(o)
    sched_id = (
        None
        if schedule is None
        else hashlib.sha256(np.asarray(schedule, np.float32).tobytes()).hexdigest()
    )
    group = (key, inp.h, inp.w, cfg, energy, sched_id)
    return Prepared(job, inp, image, z_T, latents, schedule, group)


# ----------------------------------------------------------------------------- running


class Runner:
    def __init__(self, out_dir: str, batch_size: int, log, process_id: int = 0):
        self.out_dir, self.batch_size, self.log = out_dir, batch_size, log
        self.process_id = process_id
        self.mesh = local_mesh(batch_size)
        self.models = _Models(self.mesh)
        self.samplers: dict = {}
        self.stop_after_chunks = 0  # testing aid: interrupt after this many chunks in all
        self.chunks_run = 0
        self.images: dict[str, np.ndarray] = {}  # job name -> edited f32[H,W,3] in [0, 1]

    def sampler(self, group, prepared: Prepared):
        from mgjax.sampler import GuidedSampler

        if group not in self.samplers:
            o = prepared.job.options
            _, (sd, raft) = self.models.get(o)
            cfg, energy = ed.guidance(o)
            self.samplers[group] = GuidedSampler(sd, raft, cfg, energy=energy)
        return self.samplers[group]

    def run_batch(self, batch: list[Prepared], label: str) -> list[Prepared]:
        """Run one batch to the end and write its jobs' outputs. Returns the jobs to run again
        (the others of a batch in which some diverged)."""
        import jax
        import jax.numpy as jnp

        from mgjax.sampler import DivergenceError, Progress

        real = len(batch)
        batch = batch + [batch[-1]] * (self.batch_size - real)  # padding: same shape always
        first = batch[0]
        o = first.job.options
        sampler = self.sampler(first.group, first)
        cat = lambda xs, axis=0: np.concatenate(xs, axis=axis)  # noqa: E731
        lat = (1, sampler.sd.latent_channels) + first.latents.shape[-2:]
        edit = sampler.prepare(
            cat([p.image for p in batch]),
            cat([p.inputs.flow[None] for p in batch]),
            cat([np.asarray(p.inputs.cond) for p in batch]),
            cat([np.asarray(p.inputs.uncond) for p in batch]),
            frozen=cat([np.broadcast_to(p.inputs.frozen, lat) for p in batch]),
            trajectory=cat([p.latents for p in batch], 1),
            schedule=first.schedule,
            encode=False,  # source_cache: encoded below, once sharded
        )
        state = sampler.init(edit, cat([p.z_T for p in batch]), [p.job.options.seed for p in batch])
        edit, state = shard_edit(edit, self.mesh), shard_state(state, self.mesh)
        edit = sampler.encode_source(edit)  # source_cache: each device its own, as single edits
        names = [p.job.name for p in batch]
        digest = hashlib.sha256(
            json.dumps([names, ed._config_digest(o), repr(first.group)]).encode()
        ).hexdigest()[:16]
        ckpt = os.path.join(self.out_dir, "_batches", f"{digest}.npz")
        logs: dict[str, list] = {}
        if os.path.isfile(ckpt):
            with np.load(ckpt, allow_pickle=False) as c:
                state = shard_state(
                    state.replace(
                        z=jnp.asarray(c["z"]),
                        step=jnp.asarray(c["step"]),
                        keys=jnp.asarray(c["keys"]),
                    ),
                    self.mesh,
                )
                logs = {k[4:]: [c[k]] for k in c.files if k.startswith("log_")}
            self.log(f"{label}: resuming at DDIM step {int(state.step)}/{o.steps}")
        progress = Progress(
            o.steps, o.recursive_steps, print_fn=lambda s: self.log(f"{label}: {s}")
        )
        t_run, chunks, compiled_before = time.perf_counter(), 0, sampler.compile_seconds
        while int(state.step) < o.steps:
            try:
                state, chunk_logs, snapshots = sampler.advance(edit, state)
            except DivergenceError as e:
                bad = {names[i] for i in e.bad if i < real}
                for p in batch[:real]:
                    if p.job.name in bad:
                        p.job.status, p.job.error = "diverged", str(e)
                if os.path.isfile(ckpt):
                    os.remove(ckpt)
                self.log(f"{label}: {e}; the other jobs of the batch run again")
                return [p for p in batch[:real] if p.job.name not in bad]
            for k, v in chunk_logs.items():
                logs.setdefault(k, []).append(v)
            os.makedirs(os.path.dirname(ckpt), exist_ok=True)
            ed._save_checkpoint(ckpt, state, logs, digest)
            for n, p in enumerate(batch[:real]):
                ed._save_snapshots(
                    p.job.options.out_dir, {s: x[n : n + 1] for s, x in snapshots.items()}, 1
                )
            if chunks == 0 and sampler.compile_seconds > compiled_before:
                took = sampler.compile_seconds - compiled_before
                self.log(f"{label}: compiled the guided sampler ({sampler.loops}) in {took:.1f} s")
            progress(state, chunk_logs)
            chunks += 1
            self.chunks_run += 1
            if self.stop_after_chunks and self.chunks_run >= self.stop_after_chunks:
                raise KeyboardInterrupt
        run_s = time.perf_counter() - t_run
        edited = sampler.decode(state.z)
        all_logs = {k: np.concatenate(v) for k, v in logs.items()}
        for n, p in enumerate(batch[:real]):
            job_logs = {k: v[..., n : n + 1] for k, v in all_logs.items()}
            ed._write_outputs(
                p.job.options,
                sampler,
                one_edit(edit, n),
                p.image,
                p.inputs.flow,
                p.inputs.obj,
                edited[n : n + 1],
                job_logs,
                run_s,
                run_s,
                jax,
                extra={
                    "batch_size": self.batch_size,
                    "batch_jobs": names[:real],
                    "devices": self.mesh.size,
                },
            )
            p.job.status, p.job.metrics = "done", _finished(p.job)
            self.images[p.job.name] = edited[n]
        os.remove(ckpt)
        return []


def run_jobs(
    jobs_path: str,
    base: ed.Options,
    batch_size: int = 0,
    log=print,
    process_id: int = 0,
    num_processes: int = 1,
    kv=None,
    images: dict | None = None,
) -> list[dict]:
    """Run a jobs file. Returns the summary rows (all jobs on process 0, its own elsewhere);
    `images`, when given, receives name -> edited f32[H,W,3] of the jobs run now."""
    import jax

    if batch_size < 0:
        raise UserError(f"--batch_size must be >= 1 (0: one per local device), got {batch_size}")
    batch_size = batch_size or jax.local_device_count()
    if base.compilation_cache:
        ed.enable_compilation_cache(base.compilation_cache)
    jobs = read_jobs(jobs_path, base)
    mine = [j for j in jobs if j.index % num_processes == process_id]
    out = base.out_dir
    summary_part = os.path.join(out, f"summary.p{process_id}.jsonl")
    if os.path.exists(out) and not (base.resume or base.overwrite):
        if any(os.scandir(out)):
            raise UserError(
                f"{out} exists; pass --resume to continue its jobs or --overwrite to start again"
            )
    if base.resume and base.overwrite:
        raise UserError("--resume and --overwrite exclude each other")
    if base.num_samples != 1:
        raise UserError(
            "--num_samples does not apply to --jobs: give each sample its own job (its own seed)"
        )
    if base.overwrite:  # each process clears its own share
        for j in mine:
            shutil.rmtree(os.path.join(out, j.name), ignore_errors=True)
        for f in (
            summary_part,
            os.path.join(out, "summary.jsonl"),
            os.path.join(out, "summary.csv"),
        ):
            if os.path.exists(f):
                os.remove(f)
    os.makedirs(out, exist_ok=True)
    runner = Runner(out, batch_size, log, process_id)
    runner.stop_after_chunks = base.stop_after_chunks
    log(
        f"{len(jobs)} jobs, {len(mine)} for process {process_id}/{num_processes}; batches of "
        f"{batch_size} over {runner.mesh.size} local device(s)"
    )
    groups: dict[tuple, list[Prepared]] = {}
    for job in mine:
        if job.status != "pending":
            log(f"{job.name}: invalid: {job.error}")
            continue
        done = _finished(job) if base.resume else None
        if done is not None:
            job.status, job.metrics = "done", done
            job.error = None
            continue
        try:
            p = _prepare(job, runner.models, lambda s, n=job.name: log(f"{n}: {s}"))
        except UserError as e:
            job.status, job.error = "invalid", str(e)
            log(f"{job.name}: invalid: {e}")
            continue
        groups.setdefault(p.group, []).append(p)
    _write_part(summary_part, mine, process_id)
    n_batches = sum(-(-len(g) // batch_size) for g in groups.values())
    count = 0
    for queue in groups.values():
        while queue:
            batch, queue = queue[:batch_size], queue[batch_size:]
            count += 1
            again = runner.run_batch(batch, f"batch {count}/{n_batches}")
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


def _row(job: Job, process_id: int) -> dict:
    m = job.metrics or {}
    return {
        "index": job.index,
        "name": job.name,
        "status": job.status,
        "error": job.error,
        "process": process_id,
        "out_dir": job.options.out_dir if job.options else None,
        **{k: m.get(k) for k in SUMMARY_METRICS},
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
        raise UserError("several processes need jax.distributed (--coordinator ...)")
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
