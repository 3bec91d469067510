"""Real edits through the editor on the toy pack: the run folder as launch.py writes it, the
zip, progress and x0 events, a second edit of the same shape compiling nothing, and Cancel
stopping after a chunk."""

import base64
import io
import json
import os
import time
import zipfile

import numpy as np
import pytest
from PIL import Image
from starlette.testclient import TestClient

from mgjax.editor import app as A
from mgjax.editor import authoring
from mgjax.editor.runner import Engine
from mgjax.editor.worker import Worker

pytestmark = pytest.mark.slow


def events(client, job_id: str) -> list[dict]:
    with client.stream("GET", f"/api/jobs/{job_id}/events") as stream:
        lines = [json.loads(x[6:]) for x in stream.iter_lines() if x.startswith("data: ")]
    return lines[:-1]  # the last is the "end" event


def _editor(explicit: dict, tmp_path):
    """(Engine, Worker, TestClient) of an editor on the toy pack, its folders under tmp_path."""
    engine = Engine(authoring.resolve(explicit, "auto", {}), str(tmp_path / "generated"))
    worker = Worker()
    store = authoring.Store(str(tmp_path / "store"))
    editor = A.Editor(engine, store, worker, explicit, "auto", str(tmp_path / "runs"), "launch.py")
    return engine, worker, TestClient(A.create_app(editor), base_url="http://127.0.0.1:8765")


def test_edit_cancel_and_programs_reused(tmp_path):
    explicit = {"chunk": 1, "compilation_cache": ""}
    engine, worker, client = _editor(explicit, tmp_path)
    scene = client.post("/api/scene", json={"seed": None}).json()
    mask = base64.b64encode(base64.b64decode(scene["mask"].split(",")[1])).decode()
    spec = {
        "image": scene["id"],
        "prompt": scene["prompt"],
        "mask": mask,
        "motion": "translate:8,0",
        "steps": 4,
    }
    r = client.post("/api/run", json=spec)
    assert r.status_code == 200, r.text
    job_id, folder = r.json()["id"], r.json()["folder"]
    got = events(client, job_id)
    kinds = [e["type"] for e in got]
    assert kinds[-1] == "done", got[-1]
    assert [e["done"] for e in got if e["type"] == "progress"] == [1, 2, 3, 4]
    x0 = [e["file"] for e in got if e["type"] == "x0"]
    assert x0 and all(os.path.isfile(os.path.join(folder, f)) for f in x0)
    sample = os.path.join(folder, "sample_00")
    for name in ("edited.png", "source.png", "panel.png", "achieved_flow.png", "losses.png"):
        assert os.path.isfile(os.path.join(sample, name)), name
    edited = np.asarray(Image.open(os.path.join(sample, "edited.png")))
    assert edited.shape == (64, 64, 3) and edited.std() > 0
    metrics = json.load(open(os.path.join(sample, "metrics.json")))
    assert metrics == got[-1]["metrics"][0] and metrics["guided_evaluations"] == 4
    config = json.load(open(os.path.join(sample, "config.json")))
    assert config["motion"] == "translate:8,0" and config["steps"] == 4 and config["chunk"] == 1

    z = zipfile.ZipFile(io.BytesIO(client.get(f"/api/jobs/{job_id}/zip").content))
    name = os.path.basename(folder)
    names = set(z.namelist())
    for part in (
        "inputs/object_mask.png",
        "inputs/target_flow.npy",
        "job.jsonl",
        "reproduce.txt",
        "sample_00/edited.png",
        "sample_00/metrics.json",
    ):
        assert f"{name}/{part}" in names, part
    assert not any(n.endswith(("checkpoint.npz", "source.npz")) for n in names)

    (sampler,) = engine.samplers.values()
    compiled, traces = sampler.compile_seconds, sampler.traces
    r = client.post("/api/run", json={**spec, "motion": "translate:-6,2"})
    job = worker.jobs[r.json()["id"]]
    while not any(e["type"] == "progress" for e in job.events) and not job.finished:
        time.sleep(0.01)
    client.post(f"/api/jobs/{job.id}/cancel", json={})
    assert worker.wait(job, 120)
    last = job.events[-1]
    assert last["type"] == "cancelled" and 1 <= last["step"] < 4, last
    assert (sampler.compile_seconds, sampler.traces) == (compiled, traces)  # nothing recompiled
    assert list(engine.samplers.values()) == [sampler]
    worker.close()


def test_generated_source_is_the_one_the_edit_uses(tmp_path):
    explicit = {"chunk": 2, "compilation_cache": ""}
    engine, worker, client = _editor(explicit, tmp_path)
    prompt = "a red square on a striped blue background"
    r = client.post("/api/generate", json={"prompt": prompt, "seed": 3, "steps": 2})
    assert r.status_code == 200, r.text
    job = worker.jobs[r.json()["id"]]
    assert worker.wait(job, 300) and job.status == "done", job.error
    made = job.events[-1]
    generated = np.asarray(
        Image.open(io.BytesIO(client.get(f"/api/images/{made['image']}").content))
    )
    assert generated.shape == (64, 64, 3) and made["seed"] == 3

    spec = {"image": None, "prompt": prompt, "seed": 3, "steps": 2, "box": "8,8,30,30"}
    r = client.post("/api/run", json={**spec, "motion": "translate:4,0"})
    assert r.status_code == 200, r.text
    edit = worker.jobs[r.json()["id"]]
    assert worker.wait(edit, 300) and edit.status == "done", edit.error
    logs = [e["text"] for e in edit.events if e["type"] == "log"]
    assert not any("generating" in line for line in logs)  # the page's generation, reused
    source = np.asarray(Image.open(os.path.join(r.json()["folder"], "sample_00", "source.png")))
    np.testing.assert_array_equal(source, generated)
    line = json.loads(open(os.path.join(r.json()["folder"], "job.jsonl")).read())
    assert "image" not in line and (line["prompt"], line["seed"]) == (prompt, 3)
    worker.close()


def test_new_guidance_weight_and_cfg_scale_compile_nothing(tmp_path):
    """Two edits of the demo that differ in the guidance weight and the CFG scale run on the same
    Sampler and its compiled programs: no new trace, no compile time (the numbers are data of
    the program, mgjax.method.numeric); each edit's config.json keeps its own numbers."""
    from mgjax.edit.workflow import resolve_toy
    from mgjax.editor import runner
    from mgjax.editor.worker import Job
    from mgjax.toy import pack

    explicit = {"chunk": 1, "compilation_cache": "", "steps": 2}
    engine = Engine(authoring.resolve(explicit, "auto", {}), str(tmp_path / "generated"))
    demo = pack.demo_files()
    base = {k: demo[k] for k in ("image", "prompt", "motion", "object_mask")}
    counts = []
    for n, (weight, cfg) in enumerate(((18.75, 1.5), (30.0, 2.0))):
        job = {**base, "guidance_weight": weight, "cfg_scale": cfg}
        out_dir = str(tmp_path / f"e{n}")
        config = resolve_toy(authoring.resolve({**explicit, "out_dir": out_dir}, "auto", job))
        os.makedirs(config.output.out_dir)
        runner.claim(config)
        engine.edit(config, Job("edit", f"e{n}", lambda job: {}))
        (sampler,) = engine.samplers.values()
        counts.append((sampler.traces, sampler.compile_seconds))
        saved = json.load(open(tmp_path / f"e{n}" / "sample_00" / "config.json"))
        assert (saved["guidance_weight"], saved["cfg_scale"]) == (weight, cfg)
    assert counts[0][0] > 0 and counts[1] == counts[0], counts
