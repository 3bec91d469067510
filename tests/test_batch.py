"""Batch editing (--jobs) on 8 simulated CPU devices: batched and sharded equals single edits, a
job count that is not a multiple of the devices, a bad job among good ones, resume of a
half-finished run, and two processes through jax.distributed on localhost. Runs on several
devices are subprocesses (the device count is fixed when JAX starts); one-device runs are here."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from flow.errors import InputError
from mgjax import config as C
from mgjax.batch.jobs import points_to_drag, read_jobs
from mgjax.batch.run import run_jobs
from mgjax.model import sd as sdm
from tests.hostile import png_declaring
from tests.tiny_models import tiny
from tests.torch_raft import image_pair, random_torchvision_raft

ROOT = Path(__file__).resolve().parents[1]
SIZE = 64  # tiny VAE factor 4: latents 4x16x16
FAST = ["--steps=2", "--recursive_steps=1", "--chunk=1", "--guidance_weight=30", "--clip=10"]


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    folder = tmp_path_factory.mktemp("batch")
    sdm.save(tiny(seed=1), folder / "sd")
    torch.save(random_torchvision_raft(small=True, seed=2).state_dict(), folder / "raft.pth")
    for n in range(2):
        a, _ = image_pair(1, SIZE, SIZE, seed=10 + n)
        Image.fromarray(np.round(a[0]).astype(np.uint8)).save(folder / f"image{n}.png")
    mask = np.zeros((SIZE, SIZE), np.uint8)
    mask[20:44, 16:40] = 255
    Image.fromarray(mask).save(folder / "mask.png")
    return folder


def _flags(assets, out):
    """Flags of every run here; one compilation cache for all (shared programs compile once)."""
    return [
        f"--out_dir={out}",
        f"--model={assets / 'sd'}",
        f"--raft_weights={assets / 'raft.pth'}",
        f"--image={assets / 'image0.png'}",
        f"--object_mask={assets / 'mask.png'}",
        f"--compilation_cache={assets / 'xla'}",
        *FAST,
    ]


def _options(assets, out, **kw) -> dict:
    """The same settings as _flags, for runs in this process (explicit values, flat names)."""
    base = dict(
        out_dir=str(out),
        model=str(assets / "sd"),
        raft_weights=str(assets / "raft.pth"),
        image=str(assets / "image0.png"),
        object_mask=str(assets / "mask.png"),
        steps=2,
        recursive_steps=1,
        chunk=1,
        guidance_weight=30.0,
        clip=10.0,
    )
    return base | kw


def _jobs(path: Path, assets, n: int, bad_at: int | None = None) -> Path:
    motions = ["translate:6,0", "translate:-6,2", "rotate:15", "scale:1.2", "translate:0,5"]
    lines = []
    for i in range(n):
        job = {"name": f"e{i}", "seed": i, "motion": motions[i % len(motions)]}
        if i % 2:
            job["image"] = str(assets / "image1.png")
        if i == bad_at:
            job = {"name": f"e{i}", "image": str(assets / "missing.png"), "motion": "rotate:3"}
        lines.append(json.dumps(job))
    path.write_text("\n".join(lines) + "\n")
    return path


def _env(devices: int) -> dict:
    env = dict(os.environ)
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    env["PYTHONPATH"] = str(ROOT)
    return env


def _launch(args, devices, timeout=900):
    cmd = [sys.executable, str(ROOT / "launch.py"), *args]
    return subprocess.run(
        cmd, capture_output=True, text=True, cwd=ROOT, env=_env(devices), timeout=timeout
    )


# Runs a jobs file through the API and keeps the edited images as floats (PNGs are rounded):
# python -c _API OUT.npz [launch.py flags]
_API = """
import sys
import numpy as np
import launch
from mgjax.batch import run as batch
out, sys.argv = sys.argv[1], ["launch.py", *sys.argv[2:]]
launch.FLAGS(sys.argv)
images = {}
batch.run_jobs(launch.FLAGS.jobs, launch.explicit_values(), launch.FLAGS.batch_size,
               lambda s: print(s, flush=True), images=images, preset=launch.FLAGS.preset)
np.savez(out, **images)
"""


def _api(args, out_npz, devices):
    cmd = [sys.executable, "-c", _API, str(out_npz), *args]
    res = subprocess.run(
        cmd, capture_output=True, text=True, cwd=ROOT, env=_env(devices), timeout=900
    )
    assert res.returncode == 0, res.stderr[-3000:]
    return res.stdout, dict(np.load(out_npz))


@pytest.mark.slow
def test_batch_of_eight_equals_single_edits_and_a_bad_job_is_skipped(assets, tmp_path):
    """9 lines: 8 good jobs (two source images, five motions, eight seeds) and one missing image,
    in one batch of 8 over 8 devices. Batch size 1 on one device
    in this (one-device) process gives the single edits.

    Tolerance. With guidance 0 the sharded batch equals the single edits bit for bit (measured).
    Guided edits with these random tiny models amplify rounding: bilinear lookups in RAFT have a
    gradient that jumps at integer coordinates. Measured on single edits, z_T x (1 + 1e-6) moves
    the final image by ~2e-6 (relative L2) for jobs on image0 and by 3-4e-4 for jobs on image1.
    How far sharding's rounding (~1e-5, the UNet gradient's) carries depends on the CPU: on one
    machine image0 jobs moved by ~2e-6 and image1 jobs by ~3e-3; on another all moved by
    2e-6 to 1e-5 but one image0 job by 3.1e-5. So: every edit within 1e-2 (the rtol
    tests/test_sampler.py gives the guidance norm for the same reason), and the image0 jobs,
    which amplify little, within 1e-4. A sharding bug (another image's inputs) would move an
    edit by far more: two different jobs differ by more than 1e-2 (the last check).
    """
    jobs = _jobs(tmp_path / "jobs.jsonl", assets, 9, bad_at=4)
    out8, b8 = _api(
        [*_flags(assets, tmp_path / "b8"), f"--jobs={jobs}", "--batch_size=8"],
        tmp_path / "b8.npz",
        8,
    )
    assert "batches of 8 over 8 local device(s)" in out8, out8
    assert out8.count("compiled the guided sampler") == 1 and "batch 1/1" in out8, out8
    b1, lines = {}, []
    run_jobs(str(jobs), _options(assets, tmp_path / "b1"), 1, lines.append, images=b1)
    assert "batches of 1 over 1 local device(s)" in lines[0]
    names = [f"e{i}" for i in range(9) if i != 4]
    assert sorted(b8) == sorted(b1) == sorted(names)
    rel = [np.linalg.norm(b8[n] - b1[n]) / np.linalg.norm(b1[n]) for n in names]
    print("batched (8 devices) vs single edits, relative L2: " + " ".join(f"{r:.1e}" for r in rel))
    assert max(rel) < 1e-2, rel
    assert max(r for n, r in zip(names, rel, strict=True) if int(n[1:]) % 2 == 0) < 1e-4, rel
    assert np.abs(b8["e0"] - b8["e1"]).max() > 1e-2  # different jobs, different edits
    rows = [json.loads(ln) for ln in (tmp_path / "b8" / "summary.jsonl").read_text().splitlines()]
    assert [r["name"] for r in rows] == [f"e{i}" for i in range(9)]
    status = {r["name"]: r["status"] for r in rows}
    assert status.pop("e4") == "invalid" and set(status.values()) == {"done"}
    assert "missing.png" in rows[4]["error"]
    assert not (tmp_path / "b8" / "e4").exists()  # nothing written for the bad job
    metrics = json.loads((tmp_path / "b8" / "e8" / "sample_00" / "metrics.json").read_text())
    assert metrics["batch_jobs"] == names and metrics["devices"] == 8
    assert metrics["guided_evaluations"] == 2 and metrics["seed"] == 8
    header = (tmp_path / "b8" / "summary.csv").read_text().splitlines()[0]
    assert header.startswith("index,name,status,error")


@pytest.mark.slow
def test_resume_of_a_half_finished_run(assets, tmp_path):
    """3 jobs in batches of 2 (in this process, one device): stop in the second batch; resume
    skips the finished batch's jobs and continues the second batch from its checkpoint, to what
    an uninterrupted run gives (the same PNG bytes)."""
    jobs = str(_jobs(tmp_path / "jobs.jsonl", assets, 3))
    quiet = lambda s: None  # noqa: E731
    run_jobs(jobs, _options(assets, tmp_path / "whole"), 2, quiet)
    cut_dir = tmp_path / "cut"
    with pytest.raises(KeyboardInterrupt):  # in batch 2's second chunk
        run_jobs(jobs, _options(assets, cut_dir, stop_after_chunks=3), 2, quiet)
    assert (cut_dir / "e1" / "sample_00" / "metrics.json").exists()
    assert not (cut_dir / "e2" / "sample_00").exists()
    assert len(list((cut_dir / "_batches").iterdir())) == 1
    with pytest.raises(InputError, match="--resume"):  # no silent overwrite
        run_jobs(jobs, _options(assets, cut_dir), 2, quiet)
    lines = []
    run_jobs(jobs, _options(assets, cut_dir, resume=True), 2, lines.append)
    assert any("batch 1/1: resuming at DDIM step 1/2" in ln for ln in lines), lines
    for name in ("e0", "e1", "e2"):
        a = (tmp_path / "whole" / name / "sample_00" / "edited.png").read_bytes()
        assert (cut_dir / name / "sample_00" / "edited.png").read_bytes() == a, name
    assert not (cut_dir / "_batches").exists()
    rows = (cut_dir / "summary.jsonl").read_text().splitlines()
    assert [json.loads(r)["status"] for r in rows] == ["done"] * 3
    with pytest.raises(InputError, match="num_samples"):
        run_jobs(jobs, _options(assets, tmp_path / "n", num_samples=2), 2, quiet)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_share_the_jobs_through_jax_distributed(assets, tmp_path):
    """Two processes on localhost, two devices each: process p runs jobs p, p + 2, ...; process
    0 writes one summary with every job, including the other process's invalid one. Process 1
    has one good job for two devices: a job count that is not a multiple of the devices, padded
    to a batch of 2. Both processes check the folder before either writes to it, and both exit
    3: a job did not finish."""
    jobs = _jobs(tmp_path / "jobs.jsonl", assets, 4, bad_at=3)
    port = _free_port()
    common = [*_flags(assets, tmp_path / "out"), f"--jobs={jobs}"]
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                str(ROOT / "launch.py"),
                *common,
                f"--coordinator=localhost:{port}",
                "--num_processes=2",
                f"--process_id={p}",
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=ROOT,
            env=_env(2),
        )
        for p in range(2)
    ]
    outs = [p.communicate(timeout=900) for p in procs]
    for p, (_, err) in zip(procs, outs, strict=True):
        assert p.returncode == 3, err[-3000:]  # a job did not finish (e3, invalid)
    assert "4 jobs, 2 for process 0/2" in outs[0][0]
    assert "4 jobs, 2 for process 1/2" in outs[1][0]
    rows = [json.loads(ln) for ln in (tmp_path / "out" / "summary.jsonl").read_text().splitlines()]
    assert [(r["name"], r["process"], r["status"]) for r in rows] == [
        ("e0", 0, "done"),
        ("e1", 1, "done"),
        ("e2", 0, "done"),
        ("e3", 1, "invalid"),
    ]
    assert (tmp_path / "out" / "summary.p1.jsonl").exists()
    metrics = json.loads((tmp_path / "out" / "e1" / "sample_00" / "metrics.json").read_text())
    assert (
        metrics["batch_jobs"] == ["e1"] and metrics["devices"] == 2 and metrics["batch_size"] == 2
    )


def test_jobs_file_problems_are_per_job(tmp_path):
    base = dict(out_dir=str(tmp_path / "out"), image="a.png", motion="translate:1,0")
    lines = [
        '{"name": "ok", "seed": 3, "guidance_weight": 10}',
        "not json",
        '{"name": "ok", "seed": 4}',
        '{"colour": 1}',
        '{"seed": "7"}',
        '{"out_dir": "x"}',
        '["a"]',
        '{"name": "../up"}',
        "# a comment, then a blank line",
        "",
        '{"name": "dragged", "points": [[[1, 2], [5, 2]], [[10, 10], [12, 11.5]]]}',
        '{"name": "fast", "preset": "fast", "clip": 20}',
    ]
    path = tmp_path / "jobs.jsonl"
    path.write_text("\n".join(lines) + "\n")
    jobs = read_jobs(str(path), base)
    by = {j.line: j for j in jobs}
    assert by[1].status == "pending" and by[1].config.source.seed == 3
    assert by[1].config.method.guidance_weight == 10.0
    assert by[1].config.output.out_dir.endswith("/ok")
    assert by[1].config.source.image == "a.png"  # the command line's value
    for line, message in (
        (2, "not JSON"),
        (3, "used by an earlier job"),
        (4, "unknown key(s) ['colour']"),
        (5, 'seed: expected int, got "7"'),
        (6, "belong to the whole run"),
        (7, "a job is a JSON object"),
        (8, "letters, digits"),
    ):
        assert by[line].status == "invalid" and message in by[line].error, (line, by[line].error)
        assert by[line].error.startswith(f"line {line}: ")
    assert by[11].config.motion.drag == "1,2>5,2; 10,10>12,11.5"
    method = by[12].config.method
    # its preset (on the toy pack, the default model, fast is toy_fast) + its own key
    assert method == C.make(**{**C.PRESETS["toy_fast"], "clip": 20}).method
    assert method.steps == C.make(**C.PRESETS["toy_fast"]).method.steps != by[1].config.method.steps
    assert len(jobs) == 10 and [j.index for j in jobs] == list(range(10))
    with pytest.raises(InputError, match="handle, target pairs"):
        points_to_drag([[1, 2, 3]])
    with pytest.raises(InputError, match="cannot read"):
        read_jobs(str(tmp_path / "none.jsonl"), base)
    (tmp_path / "empty.jsonl").write_text("\n# nothing\n")
    with pytest.raises(InputError, match="no jobs"):
        read_jobs(str(tmp_path / "empty.jsonl"), base)


@pytest.mark.slow
def test_a_failing_job_leaves_the_others_and_the_exit_status_says_so(assets, tmp_path):
    """A decompression bomb (a few dozen bytes declaring 30000x30000) and a good job: the good
    one is done, the bomb is in the summary with its error, and launch.py exits 3. Every job
    invalid: exit 3 as well."""
    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(png_declaring(30000, 30000))
    jobs = tmp_path / "jobs.jsonl"
    jobs.write_text(
        json.dumps({"name": "bomb", "image": str(bomb), "motion": "translate:3,0"})
        + "\n"
        + json.dumps({"name": "good", "motion": "translate:3,0"})
        + "\n"
    )
    res = _launch([f"--jobs={jobs}", *_flags(assets, tmp_path / "out")], 1)
    assert res.returncode == 3, res.stderr[-2000:]
    assert "Traceback" not in res.stderr
    rows = [json.loads(r) for r in (tmp_path / "out" / "summary.jsonl").read_text().splitlines()]
    assert [(r["name"], r["status"]) for r in rows] == [("bomb", "invalid"), ("good", "done")]
    assert "pixels allowed" in rows[0]["error"]
    assert (tmp_path / "out" / "good" / "sample_00" / "edited.png").exists()
    jobs.write_text(json.dumps({"name": "bad", "motion": "spin:3"}) + "\n")
    res = _launch([f"--jobs={jobs}", *_flags(assets, tmp_path / "out2")], 1)
    assert res.returncode == 3 and "1 invalid" in res.stdout, res.stdout[-2000:]


@pytest.mark.slow
def test_a_batch_that_fails_is_recorded_and_the_run_goes_on(assets, tmp_path, monkeypatch):
    """An error while a batch runs (XLA out of memory, say) marks that batch's jobs failed with
    the error; the next batch still runs, and the summary says which jobs did not finish."""
    from mgjax.batch.runner import Runner

    ran = []

    def run_batch(self, batch, label):
        ran.append([p.job.name for p in batch])
        if len(ran) == 1:
            raise RuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate\nmore")
        for p in batch:
            p.job.status = "done"
        return []

    monkeypatch.setattr(Runner, "run_batch", run_batch)
    jobs = str(_jobs(tmp_path / "jobs.jsonl", assets, 3))
    lines = []
    rows = run_jobs(jobs, _options(assets, tmp_path / "out"), 2, lines.append)
    assert ran == [["e0", "e1"], ["e2"]]  # batches of 2
    by = {r["name"]: r for r in rows}
    assert by["e0"]["status"] == by["e1"]["status"] == "failed" and by["e2"]["status"] == "done"
    assert by["e0"]["error"].startswith(
        "RuntimeError: RESOURCE_EXHAUSTED: Out of memory while trying to allocate; rerun with "
        "--resume and a smaller --batch_size"
    )
    assert any("failed: RuntimeError" in ln for ln in lines), lines
    summary = (tmp_path / "out" / "summary.csv").read_text()
    assert summary.count(",failed,") == 2


@pytest.mark.slow
def test_jobs_differing_in_numbers_share_one_batch_and_one_compile(assets, tmp_path):
    """Three jobs that differ only in guidance_weight, cfg_scale and clip run as one batch of 3
    with one compile; each job's config.json and summary row have its own numbers, and each
    acts on its own image: weight 0 is what the same job gives alone."""
    numbers = [
        {"guidance_weight": 0.0, "cfg_scale": 1.0},
        {"guidance_weight": 30.0, "cfg_scale": 2.0, "clip": 5.0},
        {"guidance_weight": 60.0, "cfg_scale": 1.0},
    ]
    jobs = tmp_path / "jobs.jsonl"
    lines = [
        json.dumps({"name": f"n{i}", "motion": "translate:6,0", **v}) for i, v in enumerate(numbers)
    ]
    jobs.write_text("\n".join(lines) + "\n")
    log, images = [], {}
    rows = run_jobs(str(jobs), _options(assets, tmp_path / "b3"), 3, log.append, images=images)
    assert [r["status"] for r in rows] == ["done"] * 3, rows
    assert sum("compiled the guided sampler" in s for s in log) == 1, log
    assert any("batch 1/1" in s for s in log) and not any("batch 2/" in s for s in log), log
    for i, v in enumerate(numbers):
        saved = json.loads((tmp_path / "b3" / f"n{i}" / "sample_00" / "config.json").read_text())
        assert {k: saved[k] for k in v} == v and {k: rows[i][k] for k in v} == v
    assert np.abs(images["n2"] - images["n0"]).max() > 1e-2  # the weight acts per image
    alone = {}
    jobs.write_text(lines[0] + "\n")
    run_jobs(str(jobs), _options(assets, tmp_path / "b1"), 1, lambda s: None, images=alone)
    np.testing.assert_allclose(images["n0"], alone["n0"], atol=1e-2)
