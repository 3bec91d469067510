"""The editor's web application and `serve`.

Starlette on uvicorn: an ASGI toolkit small enough to read in an afternoon, with a test client,
static files and streaming responses (server-sent events for progress) built in; the page is
plain HTML/CSS/JavaScript with canvases, so nothing is built, bundled or fetched from elsewhere.
Uploads are raw request bodies (the page sends the file's bytes), so no form-parsing library is
needed. Request handlers run model-free work in daemon threads (bounded in number; a request's
work is bounded in size by mgjax.editor.authoring.check_work); the models run only in the worker
thread. Every value a request gives is checked as launch.py checks it (mgjax.config, then
mgjax.edit.checks and the input readers) before a job is queued, and no message names a
server-side path.

  GET  /                       the page
  GET  /api/info               model, presets, limits, toy scenes
  POST /api/upload             a raw PNG/JPEG body -> a stored source
  GET  /api/images/{id}        a stored image
  POST /api/scene              a toy-pack scene as a source
  POST /api/preview            the authored edit's target flow and frozen mask
  POST /api/run                queue an edit;   POST /api/generate: queue a generated source
  GET  /api/jobs[/{id}]        the queue, one job
  GET  /api/jobs/{id}/events   server-sent events (every event of the job, then live ones)
  POST /api/jobs/{id}/cancel   drop it from the queue, or stop it after the current chunk
  GET  /api/jobs/{id}/files/{path}, /api/jobs/{id}/zip   the run folder's files, all as a zip
"""

import asyncio
import datetime
import io
import itertools
import json
import os
import shutil
import signal
import threading
import zipfile
from pathlib import Path

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response, StreamingResponse
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from flow.errors import InputError
from flow.schema import parse_json
from mgjax import config as C
from mgjax.edit.checks import check
from mgjax.editor import authoring
from mgjax.editor.guard import Access, Guard, for_bind
from mgjax.editor.limits import Limits, Refused, Streams, check_disk
from mgjax.editor.worker import Job, Worker

STATIC = Path(__file__).resolve().parent / "static"
DEFAULT_LIMITS, LOOPBACK = Limits(), Access()
ZIP_SKIP = ("checkpoint.npz", "source.npz")  # large and internal: resumption caches
REQUEST_THREADS = 8  # requests whose model-free work runs at once; the others wait their turn
GRACE_S = 3.0  # on SIGTERM / Ctrl-C: how long open requests and event streams may finish


class Editor:
    """What the handlers share: the engine (models), the store, the worker and the settings the
    server was started with."""

    def __init__(
        self,
        engine,  # mgjax.editor.runner.Engine, or anything with its attributes (tests)
        store: authoring.Store,
        worker: Worker,
        explicit: dict,
        preset: str,
        out_root: str,
        launcher: str,
        limits: Limits = DEFAULT_LIMITS,
    ):
        self.engine, self.store, self.worker = engine, store, worker
        self.explicit, self.preset, self.out_root = dict(explicit), preset, out_root
        self.launcher, self.limits = launcher, limits
        self.streams = Streams(limits.max_event_streams)
        self.count = itertools.count(1)

    def run_name(self) -> str:
        now = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
        while True:
            name = f"edit-{now}-{next(self.count):03d}"
            if not os.path.exists(os.path.join(self.out_root, name)):
                return name


def _error(message: str, status: int = 400) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


async def _body(request: Request) -> bytes:
    """The request body, refused past authoring.MAX_UPLOAD_BYTES (by its declared length when
    given, else while it arrives)."""
    limit = authoring.MAX_UPLOAD_BYTES
    mb = f"{limit / 2**20:.0f} MB"
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise _TooLarge(f"the upload is {int(declared) / 2**20:.1f} MB, more than the {mb} allowed")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise _TooLarge(f"the upload is more than the {mb} allowed")
        chunks.append(chunk)
    return b"".join(chunks)


class _TooLarge(Exception):
    pass


async def _in_thread(slots: asyncio.Semaphore, fn, *args):
    """fn(*args) in a daemon thread: the event loop stays free, and a request that is dropped
    (the server stopping) is not waited for, so no request's work can hold the process."""
    loop = asyncio.get_running_loop()
    done: asyncio.Future = loop.create_future()

    def settle(result, error) -> None:
        if not done.done():  # the request may have been dropped meanwhile
            done.set_exception(error) if error is not None else done.set_result(result)

    def target() -> None:
        try:
            result, error = fn(*args), None
        except BaseException as e:  # noqa: BLE001 - handed to the request that asked
            result, error = None, e
        try:
            loop.call_soon_threadsafe(settle, result, error)
        except RuntimeError:  # the loop has closed: the server stopped
            pass

    async with slots:
        threading.Thread(target=target, name="mgjax-editor-request", daemon=True).start()
        return await done


async def _json(request: Request) -> dict:
    return parse_json(await _body(request), "the request")


def create_app(editor: Editor, access: Access = LOOPBACK) -> Starlette:
    """The application over `editor` (tests build one around their own engine and folders),
    behind the Guard middleware that admits what `access` allows."""
    engine, store, worker = editor.engine, editor.store, editor.worker
    slots = asyncio.Semaphore(REQUEST_THREADS)
    run_roots = (editor.out_root,)
    worker.relabel = lambda text: authoring.relabel(text, store.root, run_roots)

    def run_in_threadpool(fn, *args):
        return _in_thread(slots, fn, *args)

    async def index(request):
        return FileResponse(STATIC / "index.html")

    toy = editor.explicit.get("model", C.Model().model) == C.TOY_MODEL
    scenes = authoring.toy_scenes() if toy else []

    async def info(request):
        presets = {}
        for name in ("auto", *sorted(C.PRESETS)):
            cfg = authoring.resolve(editor.explicit, name, {})
            flat = C.flat(cfg)
            presets[name] = {k: flat[k] for k in (*authoring.PAGE_SETTINGS, "cfg_scale")}
            presets[name]["resolved"] = C.preset_for(name, cfg.model.model)
        return JSONResponse(
            dict(
                model=editor.explicit.get("model", C.Model().model),
                toy=toy,
                native=engine.native,
                factor=engine.factor,
                preset=editor.preset,
                presets=presets,
                scenes=scenes,
                limits=authoring.limits(store) | editor.limits.info(),
                token=bool(access.token),
                out_root=os.path.abspath(editor.out_root),
            )
        )

    async def upload(request):
        body = await _body(request)
        if not body:
            raise InputError("the upload is empty; choose a PNG or JPEG file")
        return JSONResponse(
            await run_in_threadpool(store.add_source, body, engine.native, engine.factor)
        )

    async def image(request):
        return FileResponse(store.path(request.path_params["ident"]), media_type="image/png")

    async def scene(request):
        spec = await _json(request)
        return JSONResponse(await run_in_threadpool(authoring.toy_scene, store, spec.get("seed")))

    def authored(spec: dict):
        job, h, w = authoring.job_values(spec, store, engine.native)
        config = authoring.resolve(editor.explicit, editor.preset, job)
        authoring.check_work(config, h, w, engine.vae_factor)
        return config, job, h, w

    async def preview(request):
        spec = await _json(request)

        def work():
            config, _, h, w = authored(spec)
            return authoring.preview(config, h, w, engine.vae_factor)

        return JSONResponse(await run_in_threadpool(work))

    async def run(request):
        spec = await _json(request)
        return JSONResponse(await run_in_threadpool(submit_edit, spec))

    def submit_edit(spec: dict) -> dict:
        from mgjax.edit.workflow import read_files, resolve_toy
        from mgjax.editor import runner

        config, job_line, h, w = authored(spec)
        if not (config.motion.motion or config.motion.drag):
            raise InputError("no motion yet: drag on the image with a tool, or type a motion")
        check_disk(editor.out_root, editor.limits.min_free_disk_mb)
        worker.check_room()
        name = editor.run_name()
        out_dir = os.path.join(editor.out_root, name)
        every = config.output.log_every or max(1, config.method.steps // 10)
        config = resolve_toy(C.replace(config, out_dir=out_dir, log_every=every))
        authoring.preview(config, h, w, engine.vae_factor)  # the motion's errors, before writing
        check(config)  # then everything launch.py checks before it loads a model
        read_files(config)
        os.makedirs(out_dir)
        try:
            config, line = runner.write_inputs(config, job_line)
            runner.claim(config)
            runner.write_reproduction(
                config, line, editor.explicit, editor.launcher, h, w, engine.vae_factor
            )
            title = f"{name}: {config.motion.motion or config.motion.drag}"
            job = Job("edit", title, lambda job: engine.edit(config, job), folder=out_dir)
            place = worker.submit(job)
        except BaseException:
            shutil.rmtree(out_dir)  # created above: nothing half-written stays
            raise
        return dict(id=job.id, name=name, place=place, folder=out_dir)

    async def generate(request):
        spec = await _json(request)

        def submit() -> dict:
            prompt = authoring.text(spec, "prompt") or ""
            if not prompt:
                raise InputError("type a prompt to generate a source from")
            job_line = {"prompt": prompt}
            job_line |= {k: spec[k] for k in ("steps", "seed") if spec.get(k) is not None}
            if spec.get("preset"):
                job_line["preset"] = spec["preset"]
            config = authoring.resolve(editor.explicit, editor.preset, job_line)

            def work(job: Job) -> dict:
                image = engine.generate(config, job)
                ident = store.put("gen", image)
                h, w = image.shape[:2]
                return dict(image=ident, width=w, height=h, prompt=prompt, seed=config.source.seed)

            job = Job("generate", f"generate: {prompt}", work)
            return dict(id=job.id, place=worker.submit(job))

        return JSONResponse(await run_in_threadpool(submit))

    def find(request) -> Job:
        job = worker.jobs.get(request.path_params["job"])
        if job is None:
            raise InputError("no such job (the server was restarted?); run the edit again")
        return job

    async def jobs(request):
        return JSONResponse([j.summary(worker.place(j)) for j in worker.jobs.values()])

    async def job_info(request):
        job = find(request)
        return JSONResponse(job.summary(worker.place(job)))

    async def events(request):
        job = find(request)
        editor.streams.open()

        async def stream():
            try:
                sent, last_place = 0, None
                while True:
                    while sent < len(job.events):
                        yield f"data: {json.dumps(job.events[sent])}\n\n"
                        sent += 1
                    place = worker.place(job)
                    if job.status == "queued" and place != last_place:
                        yield f"data: {json.dumps({'type': 'place', 'place': place})}\n\n"
                        last_place = place
                    if job.finished and sent == len(job.events):
                        yield "event: end\ndata: {}\n\n"
                        return
                    if await request.is_disconnected():
                        return
                    await asyncio.sleep(0.2)
            finally:
                editor.streams.close()

        headers = {"Cache-Control": "no-store", "X-Accel-Buffering": "no"}
        return StreamingResponse(stream(), media_type="text/event-stream", headers=headers)

    async def cancel(request):
        job = find(request)
        worker.cancel(job)
        return JSONResponse(job.summary(worker.place(job)))

    def job_file(job: Job, rel: str) -> str:
        root = os.path.realpath(job.folder) if job.folder else ""
        path = os.path.realpath(os.path.join(root, rel))
        if not root or os.path.commonpath([root, path]) != root or not os.path.isfile(path):
            raise _NotFound(rel)
        return path

    async def files(request):
        job = find(request)
        return FileResponse(
            job_file(job, request.path_params["path"]), headers={"Cache-Control": "no-store"}
        )

    async def archive(request):
        job = find(request)
        if job.kind != "edit" or job.status != "done":
            raise InputError("the edit has not finished; download it once it is done")
        data = await run_in_threadpool(zip_folder, job.folder)
        name = os.path.basename(job.folder)
        headers = {"Content-Disposition": f'attachment; filename="{name}.zip"'}
        return Response(data, media_type="application/zip", headers=headers)

    def message(exc: Exception) -> str:
        return authoring.relabel(str(exc), store.root, run_roots)

    async def input_error(request, exc):
        return _error(message(exc))

    async def too_large(request, exc):
        return _error(message(exc), 413)

    async def not_found(request, exc):
        return _error("no such file", 404)

    async def refused(request, exc):
        return _error(message(exc), exc.status)

    routes = [
        Route("/", index),
        Route("/api/info", info),
        Route("/api/upload", upload, methods=["POST"]),
        Route("/api/images/{ident}", image),
        Route("/api/scene", scene, methods=["POST"]),
        Route("/api/preview", preview, methods=["POST"]),
        Route("/api/run", run, methods=["POST"]),
        Route("/api/generate", generate, methods=["POST"]),
        Route("/api/jobs", jobs),
        Route("/api/jobs/{job}", job_info),
        Route("/api/jobs/{job}/events", events),
        Route("/api/jobs/{job}/cancel", cancel, methods=["POST"]),
        Route("/api/jobs/{job}/files/{path:path}", files),
        Route("/api/jobs/{job}/zip", archive),
        Mount("/static", StaticFiles(directory=STATIC), name="static"),
    ]
    handlers = {
        InputError: input_error,
        _TooLarge: too_large,
        _NotFound: not_found,
        Refused: refused,
    }
    guard = [Middleware(Guard, access=access)]
    return Starlette(routes=routes, exception_handlers=handlers, middleware=guard)


class _NotFound(Exception):
    pass


def zip_folder(folder: str) -> bytes:
    """The run folder as a zip (under the folder's name), without the resumption caches."""
    buf, name = io.BytesIO(), os.path.basename(os.path.normpath(folder))
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
        for root, dirs, names in os.walk(folder):
            dirs.sort()
            for n in sorted(names):
                if n in ZIP_SKIP or n.startswith("."):
                    continue
                path = os.path.join(root, n)
                z.write(path, os.path.join(name, os.path.relpath(path, folder)))
    return buf.getvalue()


def serve(
    explicit: dict,
    preset: str,
    host: str,
    port: int,
    launcher: str,
    log=print,
    allowed_hosts: tuple[str, ...] = (),
    token: str | None = None,
    limits: Limits = DEFAULT_LIMITS,
) -> None:
    """Load the models once, then serve the editor at http://host:port/ until interrupted; a
    token is required (generated unless given) when `host` is reachable beyond loopback."""
    import tempfile

    from mgjax.edit.rundir import check_writable
    from mgjax.editor.authoring import Store
    from mgjax.editor.runner import Engine

    config = authoring.resolve(explicit, preset, {})
    out_root = config.output.out_dir or os.path.join("runs", "editor")
    check_writable(out_root)
    os.makedirs(out_root, exist_ok=True)
    if config.speed.compilation_cache:
        from mgjax.edit.workflow import enable_compilation_cache

        enable_compilation_cache(config.speed.compilation_cache)
    scratch = tempfile.mkdtemp(prefix="mgjax-editor-")
    try:
        log(f"loading {config.model.model} ...")
        engine = Engine(config, os.path.join(scratch, "generated"))
        worker = Worker(limits.max_queue)
        store = Store(scratch, limits.max_uploads, limits.upload_store_mb * 2**20)
        editor = Editor(engine, store, worker, explicit, preset, out_root, launcher, limits)
        access = for_bind(host, port, allowed_hosts, token)
        shown = f"[{host}]" if ":" in host else host
        url = f"http://{shown}:{port}/" + (f"?token={access.token}" if access.token else "")
        log(f"mgjax editor: {url}  (runs are written to {out_root}; Ctrl-C stops)")
        try:
            run_server(create_app(editor, access), host, port)
        finally:
            worker.close()  # a running edit stops after its chunk; its thread is a daemon
    finally:
        shutil.rmtree(scratch, ignore_errors=True)  # the server's own uploads and caches


def run_server(app: Starlette, host: str, port: int, grace: float = GRACE_S) -> None:
    """Serve `app` until SIGINT or SIGTERM: open requests and event streams get `grace` seconds,
    then are dropped (their threads are daemons, the worker's too), so a long preview or a
    running edit never keeps the server up. SIGTERM then ends the process with status 143
    through SystemExit, so the caller's cleanup runs."""
    import uvicorn

    def terminated(sig, frame):
        raise SystemExit(128 + sig)

    main = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, terminated) if main else None
    try:
        uvicorn.run(app, host=host, port=port, log_level="warning", timeout_graceful_shutdown=grace)
    finally:
        if main:
            signal.signal(signal.SIGTERM, previous)
