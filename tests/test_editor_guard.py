"""The editor lets no other web page or host in and keeps its resources bounded: Host, Origin /
Sec-Fetch-Site, content types, the token beyond loopback, the security headers, and the queue,
upload store, disk and event-stream bounds; through Starlette's TestClient and a real uvicorn on
127.0.0.1. The edit is a stand-in (test_editor_run runs real ones)."""

import base64
import json
import os
import re
import threading
import time
import urllib.error
import urllib.request

import numpy as np
import pytest
from starlette.testclient import TestClient

from mgjax.editor import app as A
from mgjax.editor import authoring
from mgjax.editor.guard import Access, for_bind
from mgjax.editor.limits import Limits
from mgjax.editor.worker import Worker
from tests.test_editor_app import PNG, Engine, png

LOCAL = "http://127.0.0.1:8765"
EVIL = {"Origin": "https://evil.example", "Content-Type": "text/plain"}


class SlowEngine(Engine):
    """An edit that waits for `release` (a job that keeps running while the test looks)."""

    def __init__(self):
        super().__init__()
        self.release = threading.Event()

    def edit(self, config, job):
        self.release.wait(30)
        return super().edit(config, job)


def make(tmp_path, access=None, limits=Limits(), engine=None, store=None):  # noqa: B008
    worker = Worker(limits.max_queue)
    store = store or authoring.Store(str(tmp_path / "store"))
    ed = A.Editor(
        engine or Engine(), store, worker, {}, "auto", str(tmp_path / "runs"), "launch.py", limits
    )
    ed.client = TestClient(A.create_app(ed, access or Access()), base_url=LOCAL)
    return ed


@pytest.fixture
def editor(tmp_path):
    ed = make(tmp_path)
    yield ed
    ed.worker.close()


def one_sentence(r) -> str:
    message = r.json()["error"]
    assert "\n" not in message and "Traceback" not in message and message
    return message


def scene(editor) -> str:
    return editor.client.post("/api/scene", json={"seed": None}).json()["id"]


def run_spec(ident: str) -> dict:
    return {"image": ident, "box": "1,1,9,9", "motion": "translate:1,0", "steps": 2}


def snapshot(editor) -> tuple:
    runs = sorted(os.listdir(editor.out_root)) if os.path.isdir(editor.out_root) else []
    return sorted(os.listdir(editor.store.root)), runs, sorted(editor.worker.jobs)


def test_cross_site_simple_posts_are_refused_and_change_nothing(editor):
    ident = scene(editor)
    job = editor.client.post("/api/run", json=run_spec(ident)).json()["id"]
    editor.worker.wait(editor.worker.jobs[job], 30)
    before = snapshot(editor)
    bodies = {
        "/api/upload": png(np.zeros((64, 64, 3), np.uint8)),
        "/api/scene": json.dumps({"seed": 3}),
        "/api/preview": json.dumps(run_spec(ident)),
        "/api/run": json.dumps(run_spec(ident)),
        "/api/generate": json.dumps({"prompt": "a cat"}),
        f"/api/jobs/{job}/cancel": "{}",
    }
    for path, body in bodies.items():
        for headers in (EVIL, {**EVIL, "Content-Type": "application/json"}):
            r = editor.client.post(path, content=body, headers=headers)
            assert r.status_code == 403 and "another site" in one_sentence(r), (path, r.text)
        r = editor.client.post(path, content=body, headers={"Sec-Fetch-Site": "cross-site"})
        assert r.status_code == 403, path
    assert snapshot(editor) == before
    for path in (f"/api/images/{ident}", f"/api/jobs/{job}/files/job.jsonl", "/api/jobs"):
        r = editor.client.get(path, headers={"Sec-Fetch-Site": "cross-site"})
        assert r.status_code == 403, path
        assert (
            editor.client.get(path, headers={"Origin": "http://localhost:8765"}).status_code == 403
        )
        same = {"Origin": LOCAL, "Sec-Fetch-Site": "same-origin"}
        assert editor.client.get(path, headers=same).status_code == 200, path


def test_bodies_must_say_what_they_are(editor):
    r = editor.client.post(
        "/api/scene", content='{"seed": 1}', headers={"Content-Type": "text/plain"}
    )
    assert r.status_code == 415 and "application/json" in one_sentence(r)
    r = editor.client.post("/api/upload", content=png(np.zeros((8, 8, 3), np.uint8)))
    assert r.status_code == 415 and "image/png" in one_sentence(r)
    headers = {"Origin": LOCAL, "Content-Type": "application/json; charset=utf-8"}
    assert (
        editor.client.post("/api/scene", content='{"seed": 1}', headers=headers).status_code == 200
    )


@pytest.mark.parametrize(
    "host", ["evil.example:8765", "evil.example", "127.0.0.1.evil.example", ""]
)
def test_a_foreign_host_is_refused_before_any_route(editor, host):
    r = editor.client.get("/api/jobs", headers={"Host": host})
    assert r.status_code == 403 and "host name" in one_sentence(r)
    assert editor.client.get("/", headers={"Host": host}).status_code == 403


def test_loopback_names_and_allowed_hosts_are_answered(tmp_path):
    ed = make(tmp_path, Access(allowed_hosts=("editor.lan",)))
    for host in ("127.0.0.1:8765", "localhost:8765", "[::1]:8765", "editor.lan:8765", "LOCALHOST"):
        assert ed.client.get("/api/jobs", headers={"Host": host}).status_code == 200, host
    ed.worker.close()


def test_a_token_is_required_beyond_loopback(tmp_path):
    access = for_bind("0.0.0.0", 8765, ("editor.lan",))
    assert len(access.token) >= 32 and not for_bind("127.0.0.1", 8765).token
    ed = make(tmp_path, access)
    c = ed.client
    r = c.get("/api/jobs", headers={"Host": "editor.lan"})
    assert r.status_code == 403 and "token" in one_sentence(r)
    assert c.get("/").status_code == 403
    r = c.get("/api/info", headers={"Authorization": "token wrong"})
    assert r.status_code == 403
    assert c.get("/api/info", headers={"Authorization": f"token {access.token}"}).status_code == 200
    r = c.get(f"/?token={access.token}", follow_redirects=False)  # the printed URL
    assert r.status_code == 303 and r.headers["location"] == "/"
    cookie = r.headers["set-cookie"]
    assert "HttpOnly" in cookie and "SameSite=Strict" in cookie
    c.cookies.set(access.cookie, access.token)
    assert c.get("/").status_code == 200
    assert c.post("/api/scene", json={"seed": None}).status_code == 200
    assert c.get("/api/info").json()["token"] is True
    ed.worker.close()


def test_every_answer_carries_the_security_headers(editor):
    for r in (
        editor.client.get("/"),
        editor.client.get("/static/editor.js"),
        editor.client.get("/api/jobs", headers={"Host": "evil.example"}),
        editor.client.get("/api/jobs/nope"),
    ):
        csp = r.headers["content-security-policy"]
        assert "script-src 'self'" in csp and "frame-ancestors 'none'" in csp
        assert "'unsafe-inline'" not in csp and "default-src 'none'" in csp
        assert r.headers["x-frame-options"] == "DENY"
        assert r.headers["x-content-type-options"] == "nosniff"
        assert r.headers["referrer-policy"] == "no-referrer"


def test_the_page_has_nothing_inline_that_the_policy_blocks():
    for name in os.listdir(A.STATIC):
        if name.endswith(".html"):
            text = (A.STATIC / name).read_text()
            assert not re.search(r"<script(?![^>]*\bsrc=)", text), name
            assert "<style" not in text and not re.search(r"\sstyle=", text), name
            assert not re.search(r"\son[a-z]+=", text), name  # inline event handlers
        if name.endswith(".js"):
            assert 'setAttribute("style"' not in (A.STATIC / name).read_text(), name


def test_a_full_queue_is_429_and_loses_nothing(tmp_path):
    engine = SlowEngine()
    ed = make(tmp_path, limits=Limits(max_queue=2), engine=engine)
    ident = scene(ed)
    ids = [ed.client.post("/api/run", json=run_spec(ident)).json()["id"] for _ in range(3)]
    r = ed.client.post("/api/run", json=run_spec(ident))  # 1 running, 2 waiting
    assert r.status_code == 429 and "queue is full" in one_sentence(r)
    assert len(os.listdir(ed.out_root)) == 3  # the refused edit wrote nothing
    assert ed.client.get("/api/info").json()["limits"]["max_queue"] == 2
    engine.release.set()
    for i in ids:
        assert ed.worker.wait(ed.worker.jobs[i], 30) and ed.worker.jobs[i].status == "done"
    assert len(engine.configs) == 3
    ed.worker.close()


def test_the_upload_store_keeps_the_most_recently_used(tmp_path):
    store = authoring.Store(str(tmp_path / "store"), max_images=2, max_bytes=10**9)
    ed = make(tmp_path, limits=Limits(max_uploads=2), store=store)
    rng = np.random.default_rng(0)
    ups = [
        ed.client.post(
            "/api/upload", content=png(rng.integers(0, 256, (64, 64, 3), np.uint8)), headers=PNG
        ).json()["id"]
        for _ in range(2)
    ]
    assert ed.client.get(f"/api/images/{ups[0]}").status_code == 200  # used: kept over ups[1]
    third = png(rng.integers(0, 256, (64, 64, 3), np.uint8))
    ups.append(ed.client.post("/api/upload", content=third, headers=PNG).json()["id"])
    assert len(os.listdir(store.root)) == 2
    r = ed.client.post("/api/preview", json={"image": ups[1], "box": "1,1,9,9"})
    assert r.status_code == 400 and "removed from the server" in one_sentence(r)
    assert (
        ed.client.post("/api/preview", json={"image": ups[0], "box": "1,1,9,9"}).status_code == 200
    )
    small = authoring.Store(str(tmp_path / "small"), max_images=100, max_bytes=30_000)
    for _ in range(5):
        small.put("src", rng.integers(0, 256, (64, 64, 3), np.uint8))
    assert (
        sum(os.path.getsize(os.path.join(small.root, n)) for n in os.listdir(small.root)) <= 30_000
    )
    ed.worker.close()


def test_a_nearly_full_disk_refuses_the_run_before_writing(tmp_path):
    ed = make(tmp_path, limits=Limits(min_free_disk_mb=2**40))
    r = ed.client.post("/api/run", json=run_spec(scene(ed)))
    assert r.status_code == 507 and "MB free" in one_sentence(r)
    assert not os.path.exists(ed.out_root) or not os.listdir(ed.out_root)
    assert not ed.worker.jobs
    ed.worker.close()


def test_event_streams_are_bounded(tmp_path):
    engine = SlowEngine()
    ed = make(tmp_path, limits=Limits(max_event_streams=1), engine=engine)
    job = ed.client.post("/api/run", json=run_spec(scene(ed))).json()["id"]
    with ed.client.stream("GET", f"/api/jobs/{job}/events") as first:
        lines = first.iter_lines()
        assert next(lines).startswith("data: ")
        r = ed.client.get(f"/api/jobs/{job}/events")
        assert r.status_code == 429 and "streams are open" in one_sentence(r)
        engine.release.set()
        assert any(line.startswith("event: end") for line in lines)
    deadline = time.monotonic() + 10
    while ed.streams.count and time.monotonic() < deadline:
        time.sleep(0.05)
    with ed.client.stream("GET", f"/api/jobs/{job}/events") as again:
        assert again.status_code == 200
    ed.worker.close()


def test_info_shows_every_limit(editor):
    limits = editor.client.get("/api/info").json()["limits"]
    for key in ("max_queue", "max_uploads", "upload_store_mb", "min_free_disk_mb"):
        assert key in limits
    assert "max_event_streams" in limits and "upload_store_bytes" in limits


def test_a_real_uvicorn_on_loopback(tmp_path):
    import socket

    import uvicorn

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ed = make(tmp_path, Access("127.0.0.1", port, (), "secret-token"))
    app = A.create_app(ed, Access("127.0.0.1", port, (), "secret-token"))
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{port}"
    try:
        for _ in range(100):
            if server.started:
                break
            time.sleep(0.05)

        def call(path, headers=(), body=None):
            req = urllib.request.Request(base + path, data=body, headers=dict(headers))
            try:
                with urllib.request.urlopen(req, timeout=10) as r:
                    return r.status, r.headers, r.read()
            except urllib.error.HTTPError as e:
                return e.code, e.headers, e.read()

        token = {"Authorization": "token secret-token"}
        assert call("/api/info")[0] == 403
        status, headers, _ = call("/api/info", token)
        assert status == 200 and "frame-ancestors 'none'" in headers["Content-Security-Policy"]
        assert call("/api/jobs", {**token, "Host": f"evil.example:{port}"})[0] == 403
        evil = {**token, **EVIL}
        assert call("/api/scene", evil, b'{"seed": 1}')[0] == 403
        own = {**token, "Content-Type": "application/json", "Origin": base}
        status, _, body = call("/api/scene", own, b'{"seed": 1}')
        assert status == 200 and json.loads(body)["id"].startswith("src-")
    finally:
        server.should_exit = True
        thread.join(10)
        ed.worker.close()


def test_mask_data_is_checked_before_use(editor):
    ident = scene(editor)
    for mask in (123, ["a"], {"x": 1}, "not base64 !!", base64.b64encode(b"GIF89a").decode()):
        r = editor.client.post("/api/preview", json={"image": ident, "mask": mask})
        assert r.status_code == 400, (mask, r.text)
        one_sentence(r)


STUCK_SERVER = """
import pathlib, sys, time
from mgjax.editor import app as A, authoring
from mgjax.editor.guard import Access
from mgjax.editor.worker import Worker
from tests.test_editor_app import Engine

folder, port = pathlib.Path(sys.argv[1]), int(sys.argv[2])
preview = authoring.preview

def spinning(config, h, w, vae_factor):  # a preview that never ends, busy on the CPU
    if config.motion.mask_grow != 7:
        return preview(config, h, w, vae_factor)
    (folder / "preview").write_text("busy")
    while True:
        sum(range(10000))

class Stuck(Engine):  # an edit that never ends
    def edit(self, config, job):
        (folder / "edit").write_text("busy")
        while True:
            time.sleep(0.01)

authoring.preview = spinning
worker = Worker()
ed = A.Editor(Stuck(), authoring.Store(str(folder / "store")), worker, {}, "auto",
              str(folder / "runs"), "launch.py")
try:
    A.run_server(A.create_app(ed, Access("127.0.0.1", port)), "127.0.0.1", port, grace=0.5)
finally:
    worker.close()
    print("stopped", flush=True)
"""


@pytest.mark.parametrize("sig", ["SIGTERM", "SIGINT"])
def test_the_server_stops_on_a_signal_while_a_preview_and_an_edit_are_busy(
    tmp_path, repo_root, sig
):
    import signal
    import socket
    import subprocess
    import sys

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, PYTHONPATH=repo_root, JAX_PLATFORMS="cpu")
    proc = subprocess.Popen(
        [sys.executable, "-c", STUCK_SERVER, str(tmp_path), str(port)],
        cwd=repo_root,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    base = f"http://127.0.0.1:{port}"

    def dropped(path, spec):  # a request the stopping server drops
        try:
            post(path, spec)
        except OSError:
            pass

    def post(path, spec, timeout=60):
        headers = {"Content-Type": "application/json", "Origin": base}
        req = urllib.request.Request(base + path, json.dumps(spec).encode(), headers)
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return json.loads(r.read())

    try:
        for _ in range(600):
            try:
                urllib.request.urlopen(base + "/api/info", timeout=1).close()
                break
            except OSError:
                assert proc.poll() is None, proc.stdout.read()
                time.sleep(0.05)
        spec = {"prompt": "x", "box": "10,10,20,20", "motion": "translate:1,0"}
        post("/api/run", spec)  # the worker runs it, and it never ends
        threading.Thread(
            target=dropped, args=("/api/preview", {**spec, "mask_grow": 7}), daemon=True
        ).start()
        for _ in range(600):
            if (tmp_path / "preview").exists() and (tmp_path / "edit").exists():
                break
            time.sleep(0.05)
        assert (tmp_path / "preview").exists() and (tmp_path / "edit").exists()
        start = time.monotonic()
        proc.send_signal(getattr(signal, sig))
        out, _ = proc.communicate(timeout=20)
        assert time.monotonic() - start < 10
        assert "stopped" in out
        if sig == "SIGTERM":
            assert proc.returncode == 143, out  # 128 + SIGTERM, after the cleanup
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.mark.parametrize("second", ["", "evil.example", "127.0.0.1:8765"])
def test_a_request_with_two_host_headers_is_refused(editor, second):
    r = editor.client.get("/api/jobs", headers=[("Host", "127.0.0.1:8765"), ("Host", second)])
    assert r.status_code == 400 and "one Host header" in one_sentence(r)
