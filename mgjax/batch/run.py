"""Batch editing: many edits from a jobs file, run in batches sharded over the local devices, with
the jobs shared among processes (hosts).

  python launch.py --jobs jobs.jsonl --out_dir runs/batch [any flag: the default of every job]

The jobs file's format is described in mgjax.batch.jobs; devices and hosts are handled by
mgjax.batch.sharding.

Jobs whose settings compile to the same program run together, in batches of `batch_size`.
That needs the same model, image size, speed settings and method structure
(mgjax.method.numeric.structure: steps, K, the energy's form, ...); the method's numbers
(guidance weight, CFG scale, clip, eta, the energy's weights) are data of the compiled program,
one value per image, so jobs that differ only in them share batches and one compile. Each job's
own numbers are in its config.json and in the summary. The batch axis is sharded over the
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

import os

from flow.errors import InputError
from mgjax import config as C
from mgjax.batch.jobs import Job, read_jobs
from mgjax.batch.runner import Prepared, Runner, prepare_job, read_job
from mgjax.batch.summary import client, describe, finished, gather, row, write_part, write_summary
from mgjax.edit import rundir


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
        from mgjax.edit.workflow import enable_compilation_cache

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
        (kv or client()).wait_at_barrier("mgjax/checked", 15 * 60 * 1000)
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
        done = finished(job) if base.resume else None
        if done is not None:
            job.status, job.metrics = "done", done
            job.error = None
            continue
        files = _isolated(job, log, lambda j=job: read_job(j))
        if files is not None:
            read.append((job, files))
    groups: dict[tuple, list[Prepared]] = {}
    for job, files in read:
        say = lambda s, n=job.name: log(f"{n}: {s}")  # noqa: E731
        work = lambda j=job, f=files, say=say: prepare_job(j, f, runner.models, say)  # noqa: E731
        p = _isolated(job, log, work)
        if p is not None:
            groups.setdefault(p.group, []).append(p)
    write_part(summary_part, mine, process_id)
    n_batches = sum(-(-len(g) // batch_size) for g in groups.values())
    count = 0
    for queue in groups.values():
        while queue:
            batch, queue = queue[:batch_size], queue[batch_size:]
            count += 1
            try:
                again = runner.run_batch(batch, f"batch {count}/{n_batches}")
            except Exception as e:  # noqa: BLE001 - out of memory, a bug: the other batches run
                again, error = [], describe(e)
                if "RESOURCE_EXHAUSTED" in str(e) or "out of memory" in str(e).lower():
                    error += (
                        "; rerun with --resume and a smaller --batch_size, or the memory "
                        "levers (--remat, --dtype bfloat16), to run the jobs that did not finish"
                    )
                for p in batch:
                    p.job.status, p.job.error = "failed", error
                log(f"batch {count}/{n_batches} failed: {error}")
            queue = again + queue
            write_part(summary_part, mine, process_id)
    if images is not None:
        images.update(runner.images)
    batches = os.path.join(out, "_batches")
    if os.path.isdir(batches) and not os.listdir(batches):
        os.rmdir(batches)
    rows = [row(j, process_id) for j in mine]
    if num_processes == 1:
        rows = sorted(rows, key=lambda r: r["index"])
        write_summary(out, rows)
        return rows
    return gather(out, rows, process_id, num_processes, kv)


def _isolated(job: Job, log, work):
    """work() or, when it fails, None with the job recorded as invalid (bad input) or failed
    (anything else): one job's failure never ends the run."""
    try:
        return work()
    except InputError as e:
        job.status, job.error = "invalid", str(e)
    except Exception as e:  # noqa: BLE001 - recorded in the summary; the other jobs run
        job.status, job.error = "failed", describe(e)
    log(f"{job.name}: {job.status}: {job.error}")
    return None
