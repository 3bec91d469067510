"""The editor's endpoints through Starlette's TestClient, without models: uploads (limits, bad
files, resizing), the target-flow preview against numpy's flows, toy scenes, paths the client
cannot reach, and a queued edit's written inputs and jobs-file line (the edit itself is a
stand-in here; test_editor_run runs real ones)."""

import base64
import io
import json
import os
import struct
import time
import zlib

import numpy as np
import pytest
from PIL import Image
from starlette.testclient import TestClient

from flow.errors import InputError
from flow.viz import flow_to_color
from mgjax import config as C
from mgjax.batch import jobs
from mgjax.edit.workflow import resolve_toy
from mgjax.editor import app as A
from mgjax.editor import authoring
from mgjax.editor.worker import Worker
from mgjax.toy import pack

LOCAL = "http://127.0.0.1:8765"
PNG = {"Content-Type": "image/png"}


class Engine:
    """The toy pack's sizes, and an edit that records its config instead of sampling."""

    native, factor, vae_factor = 64, 32, 4

    def __init__(self):
        self.configs = []

    def edit(self, config, job):
        self.configs.append(config)
        job.emit("progress", done=1, total=1, energy=float("nan"))
        return dict(samples=[], metrics=[], folder=config.output.out_dir)


@pytest.fixture
def editor(tmp_path):
    worker = Worker()
    ed = A.Editor(
        Engine(),
        authoring.Store(str(tmp_path / "store")),
        worker,
        {},
        "auto",
        str(tmp_path / "runs"),
        "launch.py",
    )
    with TestClient(A.create_app(ed), base_url=LOCAL) as client:
        ed.client = client
        yield ed
    worker.close()


def png(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def decode(url: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1]))))


def demo(editor) -> str:
    r = editor.client.post("/api/scene", json={"seed": None})
    assert r.status_code == 200, r.text
    return r.json()["id"]


def test_page_and_static_files_load_nothing_from_elsewhere(editor):
    page = editor.client.get("/")
    assert page.status_code == 200 and "<canvas" in page.text
    for name in os.listdir(A.STATIC):
        text = (A.STATIC / name).read_text()
        assert "http://" not in text and "https://" not in text, name
        assert "//fonts." not in text and "@import" not in text, name
        assert editor.client.get(f"/static/{name}").status_code == 200


def test_upload_is_fitted_to_the_model(editor):
    rgb = np.random.default_rng(0).integers(0, 256, (70, 100, 3), np.uint8)
    r = editor.client.post("/api/upload", content=png(rgb), headers=PNG)
    assert r.status_code == 200, r.text
    got = r.json()
    assert got["width"] % 32 == 0 and got["height"] % 32 == 0
    assert max(got["width"], got["height"]) <= 64 and "resized from 100x70" in got["note"]
    back = np.asarray(Image.open(io.BytesIO(editor.client.get(f"/api/images/{got['id']}").content)))
    assert back.shape == (got["height"], got["width"], 3)


def test_upload_of_the_model_size_is_kept_as_sent(editor):
    rgb = np.random.default_rng(1).integers(0, 256, (64, 64, 3), np.uint8)
    got = editor.client.post("/api/upload", content=png(rgb), headers=PNG).json()
    back = Image.open(io.BytesIO(editor.client.get(f"/api/images/{got['id']}").content))
    np.testing.assert_array_equal(np.asarray(back), rgb)
    assert got["note"] == ""


def _bomb_png(w: int, h: int) -> bytes:
    """A PNG header declaring w x h pixels, with no pixel data."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(b""))
        + chunk(b"IEND", b"")
    )


@pytest.mark.parametrize(
    "body, status, words",
    [
        (b"hello, this is text", 400, "not a PNG or JPEG"),
        (b"\x89PNG\r\n\x1a\n" + b"\0" * 100, 400, "not a readable image"),
        (_bomb_png(100_000, 100_000), 400, "more than the"),
        (b"", 400, "empty"),
    ],
    ids=["text", "corrupt-png", "pixel-bomb", "empty"],
)
def test_bad_uploads_are_one_sentence(editor, body, status, words):
    r = editor.client.post("/api/upload", content=body, headers=PNG)
    assert r.status_code == status
    message = r.json()["error"]
    assert words in message and "\n" not in message and "Traceback" not in message
    assert not [n for n in os.listdir(editor.store.root) if n.startswith("upload-")]


def test_upload_over_the_limit_is_refused_unread(editor, monkeypatch):
    monkeypatch.setattr(authoring, "MAX_UPLOAD_BYTES", 1000)
    r = editor.client.post("/api/upload", content=b"\x89PNG\r\n\x1a\n" + b"x" * 2000, headers=PNG)
    assert r.status_code == 413 and "more than the" in r.json()["error"]

    def chunks():  # no declared length: counted while it arrives
        yield b"\x89PNG\r\n\x1a\n"
        yield b"x" * 2000

    r = editor.client.post("/api/upload", content=chunks(), headers=PNG)
    assert r.status_code == 413


def test_scene_is_the_packs_demo(editor):
    got = editor.client.post("/api/scene", json={"seed": None}).json()
    image = np.asarray(
        Image.open(io.BytesIO(editor.client.get(f"/api/images/{got['id']}").content))
    )
    np.testing.assert_array_equal(image, np.asarray(Image.open(pack.demo_files()["image"])))
    assert got["prompt"] == pack.info()["demo"]["prompt"]
    other = editor.client.post("/api/scene", json={"seed": 3}).json()
    assert other["id"] != got["id"] and other["prompt"]
    for seed in (True, -1, 2**31, 1.5, "3"):  # JSON true is not the seed 1
        r = editor.client.post("/api/scene", json={"seed": seed})
        assert r.status_code == 400 and "seed from 0 to 2^31 - 1" in r.json()["error"], seed


def test_preview_translation_in_a_box_is_numpys_flow(editor):
    src = demo(editor)
    r = editor.client.post(
        "/api/preview", json={"image": src, "box": "10,12,30,40", "motion": "translate:5,-2"}
    )
    assert r.status_code == 200, r.text
    expected = np.zeros((64, 64, 2), np.float32)
    expected[12:40, 10:30] = (5, -2)
    norm = float(np.linalg.norm(expected, axis=-1).max())  # as target_flow.png is scaled
    colours = decode(r.json()["flow"])
    np.testing.assert_array_equal(colours[..., :3], flow_to_color(expected, norm))
    np.testing.assert_array_equal(colours[..., 3] > 0, np.any(expected != 0, axis=-1))
    frozen = decode(r.json()["frozen"]) > 127  # latent grid 16x16: the box's cells are editable
    assert frozen.shape == (16, 16)
    assert (
        not frozen[12 // 4 : 40 // 4, 10 // 4 : 30 // 4].any() and frozen[0, -1] and frozen[-1, 0]
    )


def test_preview_rotation_about_a_painted_masks_centroid(editor):
    src = demo(editor)
    mask = np.zeros((64, 64), np.uint8)
    mask[20:36, 24:44] = 255
    encoded = base64.b64encode(png(mask)).decode()
    r = editor.client.post(
        "/api/preview", json={"image": src, "mask": encoded, "motion": "rotate:30"}
    )
    assert r.status_code == 200, r.text
    ys, xs = np.nonzero(mask)
    c = np.array([xs.mean(), ys.mean()])
    assert r.json()["center"] == pytest.approx(c.tolist())
    t = np.deg2rad(30.0)  # counter-clockwise on screen, y down
    rot = np.array([[np.cos(t), np.sin(t)], [-np.sin(t), np.cos(t)]])
    yy, xx = np.mgrid[0:64, 0:64]
    p = np.stack([xx, yy], -1).astype(np.float64) - c
    expected = np.where(mask[..., None] > 0, p @ rot.T - p, 0.0).astype(np.float32)
    norm = float(np.linalg.norm(expected, axis=-1).max())
    got = decode(r.json()["flow"])[..., :3].astype(int)
    assert np.abs(got - flow_to_color(expected, norm).astype(int)).max() <= 1  # float32 rounding
    assert r.json()["moving_pixels"] == int((mask > 0).sum())


def test_preview_grows_the_box_by_mask_grow(editor):
    src = demo(editor)
    spec = {"image": src, "box": "10,12,30,40", "motion": "translate:5,-2", "mask_grow": 2}
    r = editor.client.post("/api/preview", json=spec)
    assert r.status_code == 200, r.text
    box = np.zeros((64, 64), bool)
    box[12:40, 10:30] = True
    yy, xx = np.mgrid[0:64, 0:64]  # within city-block distance 2 of the box
    near = (
        np.maximum(0, np.maximum(10 - xx, xx - 29)) + np.maximum(0, np.maximum(12 - yy, yy - 39))
    ) <= 2
    assert r.json()["moving_pixels"] == int(near.sum()) == box.sum() + 2 * 2 * (20 + 28) + 4
    np.testing.assert_array_equal(decode(r.json()["flow"])[..., 3] > 0, near)
    # the centre the tools use stays the box's own
    assert r.json()["center"] == pytest.approx([19.5, 25.5])
    bad = editor.client.post("/api/preview", json=dict(spec, mask_grow=-1))
    assert bad.status_code == 400 and "mask_grow" in bad.json()["error"]


@pytest.mark.parametrize(
    "spec, words",
    [
        ({"box": "10,10,20,20", "motion": "translate:200,0"}, "out of the frame"),
        ({"box": "10,10,20,20", "motion": "spin:3"}, "unknown motion"),
        ({"box": "10,10,90,20", "motion": "translate:1,0"}, "--object_box"),
        (
            {
                "mask": base64.b64encode(png(np.zeros((8, 8), np.uint8))).decode(),
                "motion": "scale:2",
            },
            "mask is 8x8",
        ),
        ({"mask": "not base64 !", "motion": "scale:2"}, "base64"),
        ({"box": "10,10,20,20", "motion": "translate:1,0", "drag": "1,1>2,2"}, "not both"),
        ({"drag": "70,10>80,10"}, "outside the 64x64 image"),
    ],
    ids=["leaves-frame", "unknown", "box-outside", "mask-size", "mask-data", "two-motions", "drag"],
)
def test_preview_errors_are_one_sentence(editor, spec, words):
    r = editor.client.post("/api/preview", json={"image": demo(editor), **spec})
    assert r.status_code == 400
    assert words in r.json()["error"] and "\n" not in r.json()["error"]


@pytest.mark.parametrize(
    "path",
    ["/api/images/..%2F..%2Fetc%2Fpasswd", "/api/images/src-0123", "/api/images/mask-" + "0" * 32],
)
def test_client_names_are_never_paths(editor, path):
    assert editor.client.get(path).status_code in (400, 404)


def test_run_writes_inputs_and_a_jobs_line_that_reproduces_the_config(editor, monkeypatch):
    src = demo(editor)
    mask = np.zeros((64, 64), np.uint8)
    mask[20:36, 24:44] = 255
    spec = {
        "image": src,
        "prompt": "a green diamond",
        "mask": base64.b64encode(png(mask)).decode(),
        "motion": "rotate:20+translate:4,0",
        "preset": "toy",
        "steps": 3,
        "seed": 5,
    }
    r = editor.client.post("/api/run", json=spec)
    assert r.status_code == 200, r.text
    job = editor.worker.jobs[r.json()["id"]]
    assert editor.worker.wait(job, 30) and job.status == "done"
    with editor.client.stream("GET", f"/api/jobs/{job.id}/events") as events:
        lines = [json.loads(x[6:]) for x in events.iter_lines() if x.startswith("data: ")]
        assert lines.pop() == {}  # the "end" event
    kinds = [e["type"] for e in lines]
    assert kinds[0] == "queued" and "started" in kinds and kinds[-1] == "done"
    assert [e for e in lines if e["type"] == "progress"][0]["energy"] is None  # NaN -> null

    (config,) = editor.engine.configs
    folder = r.json()["folder"]
    assert config.output.out_dir == folder and config.method.steps == 3
    assert config.source.image == os.path.join(folder, "inputs", "source.png")
    assert np.array_equal(np.asarray(Image.open(config.motion.object_mask)) > 127, mask > 0)
    flow = np.load(os.path.join(folder, "inputs", "target_flow.npy"))
    assert flow.shape == (64, 64, 2) and (np.any(flow != 0, -1) == (mask > 0)).all()

    monkeypatch.chdir(folder)  # the line's paths are relative to the run folder
    (parsed,) = jobs.read_jobs("job.jsonl", {}, "auto")
    again = C.flat(resolve_toy(parsed.config))
    ran = C.flat(config)
    for key in ("image", "object_mask"):
        assert os.path.samefile(again.pop(key), ran.pop(key))
    for key in C.RUN_LEVEL:
        again.pop(key), ran.pop(key)
    assert again == ran
    assert "--jobs job.jsonl" in open("reproduce.txt").read()


@pytest.mark.parametrize(
    "spec, words",
    [
        ({"box": "1,1,9,9"}, "no motion"),
        ({"box": "1,1,9,9", "motion": "translate:100,0"}, "out of the frame"),
        ({"box": "1,1,9,9", "drag": "30,30>40,30"}, "outside the object mask"),
        ({"box": "1,1,9,9", "motion": "translate:1,0", "steps": 0}, "steps must be"),
    ],
    ids=["no-motion", "leaves-frame", "handle-off-object", "zero-steps"],
)
def test_bad_runs_are_refused_before_anything_is_written(editor, spec, words):
    r = editor.client.post("/api/run", json={"image": demo(editor), **spec})
    assert r.status_code == 400 and words in r.json()["error"], r.text
    assert not os.path.exists(editor.out_root) or not os.listdir(editor.out_root)
    assert not editor.worker.jobs


def test_unknown_job_and_files_outside_the_run(editor):
    assert editor.client.get("/api/jobs/nope").status_code == 400
    r = editor.client.post(
        "/api/run", json={"image": demo(editor), "box": "1,1,9,9", "motion": "translate:1,0"}
    )
    job = editor.worker.jobs[r.json()["id"]]
    editor.worker.wait(job, 30)
    base = f"/api/jobs/{job.id}/files"
    assert editor.client.get(f"{base}/job.jsonl").status_code == 200
    assert editor.client.get(f"{base}/../../../etc/passwd").status_code == 404
    assert editor.client.get(f"{base}/%2E%2E/%2E%2E/etc/passwd").status_code == 404


def test_serve_with_jobs_is_one_error_line(tmp_path, repo_root):
    import subprocess
    import sys

    done = subprocess.run(
        [sys.executable, "launch.py", "--serve", "--jobs", str(tmp_path / "j.jsonl")],
        cwd=repo_root,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2 and done.stderr.strip().splitlines() == [
        "error: --serve and --jobs exclude each other"
    ]


DRAG_33 = "; ".join(f"{x},{y}>{x + 1},{y}" for x in range(2, 13) for y in (2, 3, 4))
MOTION_33 = "+".join(["translate:0.1,0"] * 33)


@pytest.mark.parametrize("endpoint", ["/api/run", "/api/preview", "/api/generate"])
@pytest.mark.parametrize(
    "values, words",
    [
        ({"steps": 0}, "steps must be"),
        ({"steps": -3}, "steps must be"),
        ({"steps": 1.5}, "steps: expected int"),
        ({"steps": 10**400}, "got a number of 401 digits"),
        ({"seed": "7"}, "seed: expected int"),
        ({"recursive_steps": 0}, "recursive_steps must be"),
        ({"guidance_weight": "1e400"}, "guidance_weight must be a finite number"),
        ({"mask_grow": -1}, "mask_grow must be"),
        ({"preset": "nope"}, "preset 'nope'"),
    ],
    ids=[
        "steps0",
        "steps-neg",
        "steps-float",
        "steps-huge",
        "seed-text",
        "K0",
        "inf",
        "grow",
        "preset",
    ],
)
def test_values_the_command_line_refuses_are_refused_before_queueing(
    editor, endpoint, values, words
):
    if endpoint == "/api/generate" and not set(values) <= {"steps", "seed", "preset"}:
        pytest.skip("a generation takes the steps, seed and preset alone")
    spec = {"image": demo(editor), "prompt": "x", "box": "1,1,9,9", "motion": "translate:1,0"}
    body = json.dumps({**spec, **values}).replace('"1e400"', "1e400")  # JSON's number
    r = editor.client.post(endpoint, content=body, headers={"Content-Type": "application/json"})
    assert r.status_code == 400 and words in r.json()["error"], r.text
    assert "\n" not in r.json()["error"]
    assert not editor.worker.jobs
    assert not os.path.exists(editor.out_root) or not os.listdir(editor.out_root)


@pytest.mark.parametrize("endpoint", ["/api/run", "/api/preview", "/api/generate"])
def test_a_bound_of_the_configuration_reaches_every_request(editor, endpoint, monkeypatch):
    """The editor checks a request with mgjax.config's own checks, the command line's: a bound
    there is a bound here."""
    checks = C.Method.__post_init__

    def bounded(self):
        checks(self)
        if self.steps > 500:  # tighter than the configuration's own bound
            raise ValueError(f"steps must be at most 500, got {self.steps}")

    monkeypatch.setattr(C.Method, "__post_init__", bounded)
    spec = {"image": demo(editor), "prompt": "x", "box": "1,1,9,9", "motion": "translate:1,0"}
    r = editor.client.post(endpoint, json={**spec, "steps": 700})
    assert r.status_code == 400, r.text
    assert r.json()["error"] == "steps must be at most 500, got 700"
    assert not editor.worker.jobs and not os.path.exists(editor.out_root)
    assert editor.client.post(endpoint, json={**spec, "steps": 500}).status_code == 200


@pytest.mark.parametrize("endpoint", ["/api/run", "/api/preview"])
@pytest.mark.parametrize(
    "values, words",
    [
        ({"mask_grow": 10**9}, "mask_grow must be from 0 to 4096"),
        ({"mask_grow": 129}, "mask_grow 129 is more than the 64x64 image's 128 pixels"),
        ({"motion": None, "box": None, "drag": DRAG_33}, "33 pairs"),
        ({"motion": MOTION_33}, "composes 33 motions"),
    ],
    ids=["grow-huge", "grow-past-frame", "drag-pairs", "motion-terms"],
)
def test_values_that_size_the_request_s_own_work_are_bounded(editor, endpoint, values, words):
    spec = {"image": demo(editor), "box": "10,10,20,20", "motion": "translate:1,0", **values}
    start = time.perf_counter()
    r = editor.client.post(endpoint, json={k: v for k, v in spec.items() if v is not None})
    assert r.status_code == 400 and words in r.json()["error"], r.text
    assert time.perf_counter() - start < 5
    assert not editor.worker.jobs


def test_the_bounds_leave_the_whole_frame_reachable(editor):
    spec = {"image": demo(editor), "box": "10,10,20,20", "motion": "translate:1,0"}
    r = editor.client.post("/api/preview", json={**spec, "mask_grow": 128})
    assert r.status_code == 200 and r.json()["moving_pixels"] == 64 * 64, r.text
    drag = "; ".join(DRAG_33.split("; ")[:32])
    r = editor.client.post("/api/preview", json={"image": spec["image"], "drag": drag})
    assert r.status_code == 200, r.text


def test_a_server_started_with_a_huge_dilate_refuses_rather_than_spins(tmp_path):
    ed = A.Editor(
        Engine(),
        authoring.Store(str(tmp_path / "s")),
        Worker(),
        {"dilate": 400},  # within the configuration's bound, past this image's latent grid
        "auto",
        str(tmp_path / "runs"),
        "launch.py",
    )
    with TestClient(A.create_app(ed), base_url=LOCAL) as client:
        ed.client = client
        spec = {"image": demo(ed), "box": "10,10,20,20", "motion": "translate:1,0"}
        r = client.post("/api/preview", json=spec)
        assert r.status_code == 400 and "--dilate 400" in r.json()["error"], r.text
    ed.worker.close()


def test_messages_never_name_server_side_paths(editor):
    ident = demo(editor)
    empty = base64.b64encode(png(np.zeros((64, 64), np.uint8))).decode()
    for endpoint in ("/api/preview", "/api/run"):
        r = editor.client.post(
            endpoint, json={"image": ident, "mask": empty, "motion": "translate:1,0"}
        )
        assert r.status_code == 400, r.text
        assert r.json()["error"].startswith("the mask: the object mask is empty;")
    root = editor.store.root

    def broken(config, job):
        raise InputError(f"{config.motion.object_mask}: unreadable; {config.output.out_dir}/x")

    editor.engine.edit = broken
    mask = np.zeros((64, 64), np.uint8)
    mask[8:24, 8:24] = 255
    r = editor.client.post(
        "/api/run",
        json={
            "image": ident,
            "mask": base64.b64encode(png(mask)).decode(),
            "motion": "translate:1,0",
        },
    )
    assert r.status_code == 200, r.text
    job = editor.worker.jobs[r.json()["id"]]
    assert editor.worker.wait(job, 30) and job.status == "failed"
    name = r.json()["name"]
    assert job.error == f"the mask: unreadable; the run folder {name} (x)", job.error
    for message in (job.error, *(e.get("message", "") for e in job.events)):
        assert root not in message and editor.out_root not in message
    assert (
        authoring.relabel(f"{root}/upload-1: bad; {root}xyz", root) == f"the upload: bad; {root}xyz"
    )
