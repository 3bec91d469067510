"""The editor under load, on 127.0.0.1 only: several clients upload, preview, list the queue
and follow events, first with the server idle, then while a toy edit runs. Prints request
latencies (p50/p95) for each phase and any 5xx answers (there should be none).

  python -m bench.editor_load [--clients 4] [--seconds 10] [--steps 20]
"""

import argparse
import io
import json
import socket
import threading
import time
import urllib.error
import urllib.request

import numpy as np
from PIL import Image


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LocalServer:
    """An editor app served by uvicorn on 127.0.0.1 in a thread, until stop()."""

    def __init__(self, app):
        import uvicorn

        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        end = time.monotonic() + 30
        while not self.server.started and time.monotonic() < end:
            time.sleep(0.05)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(30)


def call(base: str, path: str, body=None, kind: str = "application/json", timeout=60):
    """(status, body bytes, seconds) of one request."""
    data = json.dumps(body).encode() if isinstance(body, dict) else body
    headers = {"Content-Type": kind} if data is not None else {}
    request = urllib.request.Request(base + path, data=data, headers=headers)
    start = time.perf_counter()
    try:
        with urllib.request.urlopen(request, timeout=timeout) as r:
            return r.status, r.read(), time.perf_counter() - start
    except urllib.error.HTTPError as e:
        return e.code, e.read(), time.perf_counter() - start


def png(seed: int) -> bytes:
    buf = io.BytesIO()
    rgb = np.random.default_rng(seed).integers(0, 256, (64, 64, 3), np.uint8)
    Image.fromarray(rgb).save(buf, format="PNG")
    return buf.getvalue()


class Clients:
    """`n` threads looping over upload, preview, the queue and a job's events until stop()."""

    def __init__(self, base: str, n: int, follow: str | None = None):
        self.base, self.follow = base, follow
        self.times: list[float] = []
        self.statuses: list[tuple[str, int]] = []
        self.lock, self.stopping = threading.Lock(), threading.Event()
        self.threads = [threading.Thread(target=self.loop, args=(i,)) for i in range(n)]
        for t in self.threads:
            t.start()

    def record(self, path: str, status: int, seconds: float) -> None:
        with self.lock:
            self.times.append(seconds)
            self.statuses.append((path, status))

    def loop(self, i: int) -> None:
        k = 0
        while not self.stopping.is_set():
            k += 1
            status, body, dt = call(self.base, "/api/upload", png(i * 1000 + k), "image/png")
            self.record("/api/upload", status, dt)
            if status == 200:
                spec = {"image": json.loads(body)["id"], "box": "8,8,40,40"}
                spec["motion"] = "translate:4,0"
                self.record("/api/preview", *call(self.base, "/api/preview", spec)[::2])
            self.record("/api/jobs", *call(self.base, "/api/jobs")[::2])
            if self.follow:  # the whole event stream so far (it ends with the job)
                path = f"/api/jobs/{self.follow}"
                self.record(path, *call(self.base, path)[::2])

    def stop(self) -> None:
        self.stopping.set()
        for t in self.threads:
            t.join(120)

    def server_errors(self) -> list:
        return [(p, s) for p, s in self.statuses if s >= 500]


def percentiles(times: list[float]) -> str:
    if not times:
        return "no requests"
    ms = np.asarray(times) * 1000
    p50, p95 = np.percentile(ms, [50, 95])
    return f"{len(ms)} requests, p50 {p50:.0f} ms, p95 {p95:.0f} ms"


def toy_editor(folder: str, explicit: dict):
    """(Editor, app) on the toy pack with its folders under `folder`."""
    import os

    from mgjax.editor import app as A
    from mgjax.editor import authoring
    from mgjax.editor.runner import Engine
    from mgjax.editor.worker import Worker

    engine = Engine(authoring.resolve(explicit, "auto", {}), os.path.join(folder, "generated"))
    store = authoring.Store(os.path.join(folder, "store"))
    editor = A.Editor(
        engine, store, Worker(), explicit, "auto", os.path.join(folder, "runs"), "launch.py"
    )
    return editor, A.create_app(editor)


def demo_spec(base: str, steps: int) -> dict:
    """A run of the pack's demo scene: its object moved 8 px right."""
    import base64

    _, body, _ = call(base, "/api/scene", {"seed": None})
    scene = json.loads(body)
    mask = base64.b64encode(base64.b64decode(scene["mask"].split(",")[1])).decode()
    return dict(
        image=scene["id"], prompt=scene["prompt"], mask=mask, motion="translate:8,0", steps=steps
    )


def main() -> None:
    import tempfile

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--seconds", type=float, default=10)
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        editor, app = toy_editor(folder, {"chunk": 1})
        server = LocalServer(app)
        try:
            idle = Clients(server.base, args.clients)
            time.sleep(args.seconds)
            idle.stop()
            print(f"idle server, {args.clients} clients: {percentiles(idle.times)}")
            _, body, _ = call(server.base, "/api/run", demo_spec(server.base, args.steps))
            job = json.loads(body)["id"]
            busy = Clients(server.base, args.clients, follow=job)
            time.sleep(args.seconds)
            busy.stop()
            print(f"an edit running, {args.clients} clients: {percentiles(busy.times)}")
            errors = idle.server_errors() + busy.server_errors()
            print(f"5xx answers: {len(errors)} {errors[:5]}")
            editor.worker.wait(editor.worker.jobs[job], 600)
        finally:
            editor.worker.close()
            server.stop()


if __name__ == "__main__":
    main()
