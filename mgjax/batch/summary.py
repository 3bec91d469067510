"""A batch run's summary: one row per job (status, error, metrics), written by each process as
it goes and gathered by process 0 into summary.jsonl and summary.csv, and its report on the
terminal."""

import csv
import io
import json
import os

from flow.errors import InputError
from mgjax.batch.jobs import Job
from mgjax.edit.outputs import save_text
from mgjax.method import numeric as N

SUMMARY_METRICS = (
    "flow_epe_inside_object",
    "flow_epe_outside_object",
    "energy_final",
    "guided_evaluations",
    "sampling_seconds",
)


def finished(job: Job) -> dict | None:
    """The metrics a finished job wrote, or None."""
    path = os.path.join(job.config.output.out_dir, "sample_00", "metrics.json")
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return json.load(f)


def describe(error: BaseException) -> str:
    """One line naming an unexpected error: its type and the first line of its message."""
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0][:300]}" if lines else type(error).__name__


def row(job: Job, process_id: int) -> dict:
    """The summary row of a job."""
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


def write_part(path: str, jobs: list[Job], process_id: int) -> None:
    """One process's rows so far (summary.p<p>.jsonl)."""
    save_text(path, "".join(json.dumps(row(j, process_id)) + "\n" for j in jobs))


def write_summary(out: str, rows: list[dict]) -> None:
    """summary.jsonl and summary.csv of all rows."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    save_text(os.path.join(out, "summary.jsonl"), "".join(json.dumps(r) + "\n" for r in rows))
    save_text(os.path.join(out, "summary.csv"), buf.getvalue())


def client():
    """The distributed key-value store of jax.distributed."""
    from jax._src import distributed

    client = distributed.global_state.client
    if client is None:
        raise InputError("several processes need jax.distributed (--coordinator ...)")
    return client


def gather(out, rows, process_id, num_processes, kv=None) -> list[dict]:
    """Every process posts its rows to the distributed key-value store; process 0 waits for
    all of them and writes the one summary."""
    store = kv or client()
    store.key_value_set(f"mgjax/summary/{process_id}", json.dumps(rows))
    if process_id != 0:
        return rows
    week_ms = 7 * 24 * 3600 * 1000
    everything = []
    for p in range(num_processes):
        everything += json.loads(store.blocking_key_value_get(f"mgjax/summary/{p}", week_ms))
    everything.sort(key=lambda r: r["index"])
    write_summary(out, everything)
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
