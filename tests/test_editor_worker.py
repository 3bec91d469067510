"""The editor's worker: one job at a time, first come first served, places, cancel (queued:
dropped; running: stopped at its next should_stop), and errors that leave it running."""

import threading
import time

from flow.errors import InputError
from mgjax.editor.worker import Cancelled, Job, Worker


def gated(order: list, gate: threading.Event, name: str):
    """A job that waits for `gate`, asking should_stop while it waits, then records `name`."""

    def run(job: Job) -> dict:
        while not gate.wait(0.01):
            if job.should_stop():
                raise Cancelled(at="waiting")
        order.append(name)
        return dict(name=name)

    return run


def test_fifo_with_places_and_one_job_at_a_time():
    worker, order, gate = Worker(), [], threading.Event()
    jobs = [Job("edit", n, gated(order, gate, n)) for n in "abc"]
    places = [worker.submit(j) for j in jobs]
    assert places == [1, 2, 3]
    while jobs[0].status != "running":
        time.sleep(0.001)
    assert [worker.place(j) for j in jobs] == [0, 1, 2]  # a runs; b is next
    gate.set()
    for j in jobs:
        assert worker.wait(j, 10)
    assert order == ["a", "b", "c"] and all(j.status == "done" for j in jobs)
    assert jobs[2].events[-1] == {"type": "done", "seq": len(jobs[2].events) - 1, "name": "c"}
    worker.close()


def test_cancel_drops_a_queued_job_and_stops_a_running_one():
    worker, order, gate = Worker(), [], threading.Event()
    running, queued = Job("edit", "a", gated(order, gate, "a")), Job("edit", "b", lambda j: {})
    worker.submit(running)
    worker.submit(queued)
    while running.status != "running":
        time.sleep(0.001)
    worker.cancel(queued)
    assert queued.status == "cancelled" and worker.place(queued) is None
    worker.cancel(running)
    assert worker.wait(running, 10) and running.status == "cancelled"
    assert running.events[-1]["type"] == "cancelled" and running.events[-1]["at"] == "waiting"
    assert order == []
    worker.close()


def test_errors_are_one_sentence_and_the_worker_goes_on():
    worker = Worker()

    def bad_input(job):
        raise InputError("the motion moves the object entirely out of the frame")

    def bug(job):
        raise KeyError("oops")

    jobs = [Job("edit", "x", bad_input), Job("edit", "y", bug), Job("edit", "z", lambda j: {})]
    for j in jobs:
        worker.submit(j)
    for j in jobs:
        assert worker.wait(j, 10)
    assert [j.status for j in jobs] == ["failed", "failed", "done"]
    assert jobs[0].events[-1]["message"] == "the motion moves the object entirely out of the frame"
    assert jobs[1].error.startswith("internal error (KeyError") and "\n" not in jobs[1].error
    worker.close()
