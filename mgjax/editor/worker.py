"""The editor's one worker thread: jobs run one at a time in the order they came (FIFO), each
with its place in the queue, a cancel flag (asked after every chunk of DDIM steps, through
mgjax.method.loop.run's should_stop) and a list of events that any number of pages can follow.

One worker, because one accelerator runs one edit at a time: two edits at once would share its
memory and time without finishing either sooner.
"""

import collections
import logging
import math
import threading
import time
import traceback
import uuid
from collections.abc import Callable

from flow.errors import InputError
from mgjax.editor.limits import Refused

log = logging.getLogger("mgjax.editor")


def _finite(value):
    """JSON has no NaN or inf: they are sent as null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value


class Cancelled(Exception):
    """Raised by a job's run when it stopped because it was asked to (should_stop)."""

    def __init__(self, **data):
        super().__init__("cancelled")
        self.data = data


class Job:
    """One queued piece of work: `run(job)` returns the result (a dict) or raises."""

    def __init__(self, kind: str, title: str, run: Callable[["Job"], dict], folder: str = ""):
        self.id = uuid.uuid4().hex[:16]
        self.kind, self.title, self.run, self.folder = kind, title, run, folder
        self.status = "queued"  # queued | running | done | cancelled | failed
        self.events: list[dict] = []
        self.cancel_requested = False
        self.result: dict | None = None
        self.error: str | None = None
        self.created = time.time()

    @property
    def finished(self) -> bool:
        return self.status in ("done", "cancelled", "failed")

    def emit(self, kind: str, **data) -> None:
        """Append an event; pages following this job receive it (and every earlier one)."""
        self.events.append(_finite({"type": kind, "seq": len(self.events), **data}))

    def log(self, text: str) -> None:
        log.info("[%s] %s", self.id, text)
        self.emit("log", text=text)

    def should_stop(self) -> bool:
        return self.cancel_requested

    def summary(self, place: int | None) -> dict:
        return dict(
            id=self.id,
            kind=self.kind,
            title=self.title,
            status=self.status,
            place=place,
            error=self.error,
            events=len(self.events),
        )


class Worker:
    """A FIFO queue of Jobs and the thread that runs them."""

    def __init__(self, max_queue: int = 16):
        self.max_queue = max_queue  # jobs waiting; one more is refused (429)
        self.jobs: dict[str, Job] = {}
        self.queue: collections.deque[Job] = collections.deque()
        self.current: Job | None = None
        self.cond = threading.Condition()
        self.closed = False
        self.relabel: Callable[[str], str] = lambda text: text  # a failed job's message shown
        self.thread = threading.Thread(target=self._loop, name="mgjax-editor-worker", daemon=True)
        self.thread.start()

    def check_room(self) -> None:
        """Refuse (429) when the queue is full, before any work for a new job is done."""
        if len(self.queue) >= self.max_queue:
            raise Refused(
                f"the queue is full ({self.max_queue} jobs waiting, --max_queue); wait for one "
                "to finish or cancel one",
                429,
            )

    def submit(self, job: Job) -> int:
        """Queue `job`; returns its place (1: next to run)."""
        with self.cond:
            if self.closed:
                raise InputError("the server is shutting down; start it again")
            self.check_room()
            self.jobs[job.id] = job
            self.queue.append(job)
            job.emit("queued", place=len(self.queue))
            self.cond.notify_all()
            return len(self.queue)

    def place(self, job: Job) -> int | None:
        """1-based place among the queued jobs, 0 while it runs, None once finished."""
        with self.cond:
            if job is self.current:
                return 0
            try:
                return self.queue.index(job) + 1
            except ValueError:
                return None

    def cancel(self, job: Job) -> None:
        """A queued job is dropped at once; a running one stops after its current chunk."""
        with self.cond:
            if job in self.queue:
                self.queue.remove(job)
                job.status = "cancelled"
                job.emit("cancelled", message="cancelled before it started")
            elif not job.finished:
                job.cancel_requested = True
                job.emit("cancelling", message="stopping after the current chunk")

    def wait(self, job: Job, timeout: float | None = None) -> bool:
        """Block until `job` is finished (tests, shutdown); True if it is."""
        end = None if timeout is None else time.monotonic() + timeout
        with self.cond:
            while not job.finished:
                left = None if end is None else end - time.monotonic()
                if left is not None and left <= 0:
                    return False
                self.cond.wait(left)
        return True

    def close(self) -> None:
        """Cancel everything and let the thread end after the running job's chunk."""
        with self.cond:
            self.closed = True
            for job in list(self.queue):
                self.cancel(job)
            if self.current is not None:
                self.current.cancel_requested = True
            self.cond.notify_all()

    def _loop(self) -> None:
        while True:
            with self.cond:
                while not self.queue and not self.closed:
                    self.cond.wait()
                if self.closed and not self.queue:
                    return
                job = self.current = self.queue.popleft()
                job.status = "running"
            job.emit("started")
            try:
                result, status = job.run(job), "done"  # a cancel after the last chunk: done
            except Cancelled as e:
                result, status = e.data, "cancelled"
            except InputError as e:  # a bad input, a divergence: the page shows the sentence
                status, result, job.error = "failed", None, self.relabel(str(e))
            except Exception as e:  # anything else: one line on the page, the trace in the log
                log.error("[%s] %s", job.id, traceback.format_exc())
                status, result = "failed", None
                job.error = self.relabel(
                    f"internal error ({type(e).__name__}: {e}); the server log has details"
                )
            with self.cond:
                job.result, job.status, self.current = result, status, None
                if status == "failed":
                    job.emit("failed", message=job.error)
                elif status == "cancelled":
                    job.emit("cancelled", message="cancelled", **(result or {}))
                else:
                    job.emit("done", **(result or {}))
                self.cond.notify_all()
