"""The toy-world quality bench end to end on the pack, cut short (2 edits, 2 DDIM steps): every
method scores each edit, the generated source moves its whole silhouette, a run resumes to the
same scores, and a changed setting is refused before any model work."""

import hashlib
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

import bench.toy_quality as TQ
from mgjax.model import sd as sdm
from mgjax.toy import pack, quality, shapes


def _bench(out, *extra):
    cmd = [sys.executable, "-m", "bench.toy_quality", "--edits", "2", "--steps", "2"]
    cmd += ["--batch", "2", "--no_models_report", "--out", str(out), *extra]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_the_bench_scores_every_method_and_resumes(tmp_path):
    out = tmp_path / "tq"
    run = _bench(out, "--methods", "toy,warp")
    assert run.returncode == 0, run.stderr[-2000:]
    saved = json.loads((out / "results.json").read_text())
    assert "models" not in saved  # --no_models_report
    for method in ("toy", "warp"):
        rows = saved["results"][method]
        assert [r["edit"] for r in rows] == [0, 1]
        assert [r["rendered"] for r in rows] == [True, False]
        assert all(r["motion"].startswith("translate") for r in rows)
        assert (out / f"edits_{method}.png").exists()
    # the warp moves the rendered object exactly: placement within a pixel, all of the way
    warp = saved["results"]["warp"][0]
    assert warp["placement_px"] < 1.0 and warp["displacement_share"] > 0.9
    # a rerun of the same settings scores nothing again; other settings are refused up front
    again = _bench(out, "--methods", "toy,warp", "--resume")
    assert again.returncode == 0 and again.stdout.count("scored in an earlier run") == 2
    other = _bench(out, "--methods", "toy", "--resume", "--set", "clip=10")
    assert other.returncode != 0 and "was run with" in other.stderr
    assert "Traceback" not in other.stderr
    narrower = _bench(out, "--methods", "toy", "--resume", "--dilate", "1")
    assert narrower.returncode != 0 and "was run with" in narrower.stderr
    assert "--dilate" in narrower.stderr and "Traceback" not in narrower.stderr
    grown = _bench(out, "--methods", "toy", "--resume", "--grow", "1")
    assert grown.returncode != 0 and "--grow" in grown.stderr and "Traceback" not in grown.stderr
    negative = _bench(tmp_path / "other", "--methods", "toy", "--dilate", "-1")
    assert negative.returncode != 0 and "--dilate: dilate must be >= 0" in negative.stderr


@pytest.mark.parametrize(
    "args, words",
    [
        (["--set", "clip=nan"], "clip must be >= 0"),
        (["--set", "steps=0"], "steps must be at least 1"),
        (["--set", "cfg_scale=inf"], "cfg_scale must be a finite number"),
        (["--steps", "-3"], "--steps -3: give 1 or more"),
        (["--edits", "100000"], "the heldout split has"),
        (["--minutes", "nan"], "--minutes nan: give minutes of 0 or more"),
        (["--minutes", "-1"], "--minutes -1.0: give minutes of 0 or more"),
        (["--set", "warp_start=maybe"], "takes true or false"),
    ],
)
def test_bad_settings_are_refused_before_anything_is_written(tmp_path, monkeypatch, args, words):
    """Every method's settings are checked by the config's own rules, and the bench's numbers
    by theirs, before the output folder exists or a model loads."""
    out = tmp_path / "tq"
    argv = ["toy_quality", "--out", str(out), "--methods", "toy,none", *args]
    monkeypatch.setattr(sys, "argv", argv)
    with pytest.raises(SystemExit) as refused:
        TQ.main()
    assert words in str(refused.value.code), refused.value.code
    assert not out.exists()


def test_the_rounding_bench_refuses_bad_settings_and_stops_on_a_failed_run(tmp_path, capfd):
    """bench.toy_stability: --edits and --cpus checked before anything runs; a condition whose
    toy_quality run fails (here: its folder holds a run of other settings) ends the bench with
    one line naming it, not a traceback."""
    import bench.toy_stability as TS

    for args, words in (
        (["--edits", "0"], "--edits 0: give 1 to"),
        (["--cpus", "0,0"], "give two of this process's cores"),
        (["--cpus", "0,4096"], "give two of this process's cores"),
    ):
        with pytest.raises(SystemExit) as refused:
            TS.main(["--out", str(tmp_path / "none"), *args])
        assert words in str(refused.value.code), refused.value.code
    assert not (tmp_path / "none").exists()
    cores = sorted(os.sched_getaffinity(0))
    if len(cores) < 2 or shutil.which("taskset") is None:
        pytest.skip("the rounding bench's runs need two cores and taskset")
    first = tmp_path / "st" / TS.condition_name(1, 1)
    first.mkdir(parents=True)
    (first / "run.json").write_text(json.dumps({"edits": 1}))  # another run's settings
    with pytest.raises(SystemExit) as stopped:
        TS.main(["--out", str(tmp_path / "st"), "--edits", "2", "--cpus", f"{cores[0]},{cores[1]}"])
    assert "batch1_threads1: bench.toy_quality exited with status" in str(stopped.value.code)
    assert "was run with" in capfd.readouterr().err  # toy_quality's own line, above it


@pytest.mark.slow
def test_a_generated_source_moves_its_silhouette():
    sd = sdm.load(pack.sd_folder())
    case = TQ.Case(1, 64, quality.HELDOUT_SEEDS)
    assert not case.rendered
    image, traj, mask, moving, color, seed = TQ.build_source(case, sd, 2, 1.0)
    assert seed in [case.generation_seed(a) for a in range(TQ.GENERATE_TRIES)]
    assert image.shape == (64, 64, 3) and traj.latents.shape[0] == 2
    # the object's pixels lie inside the region that moves, which is one part without holes
    assert mask.any() and not (mask & ~moving).any()
    np.testing.assert_array_equal(quality.silhouette(moving), moving)


@pytest.mark.slow
def test_grow_widens_a_generated_objects_moving_region_only():
    from scipy import ndimage

    sd = sdm.load(pack.sd_folder())
    cases = [TQ.Case(n, 64, quality.HELDOUT_SEEDS) for n in (0, 1)]
    preset = dict(steps=2, cfg_scale=1.0)
    keep = lambda *a: 1.0  # noqa: E731
    plain, grown = (TQ.prepare(cases, sd, preset, keep, grow=g) for g in (0, 2))
    rendered, generated = zip(plain, grown, strict=True)
    np.testing.assert_array_equal(rendered[0]["moving"], rendered[1]["moving"])
    np.testing.assert_array_equal(rendered[0]["flow"], rendered[1]["flow"])
    want = ndimage.binary_dilation(generated[0]["moving"], iterations=2)
    np.testing.assert_array_equal(generated[1]["moving"], want)
    assert generated[1]["moving"].sum() > generated[0]["moving"].sum()
    # the object's own pixels, and so the IoU's reference, stay as they are
    np.testing.assert_array_equal(generated[0]["mask"], generated[1]["mask"])
    assert (generated[1]["flow"] != 0).any(-1).sum() > (generated[0]["flow"] != 0).any(-1).sum()


def test_a_generation_counts_only_when_it_draws_one_object():
    ys, xs = np.mgrid[0:64, 0:64]
    red, grey = np.array([0.9, 0.1, 0.1]), np.array([0.5, 0.5, 0.5])

    def image_of(region):
        return np.where(region[..., None], red, grey).astype(np.float32)

    disc = np.hypot(xs - 30, ys - 30) <= 10
    mask, moving = TQ.generated_object(image_of(disc), red)
    np.testing.assert_array_equal(mask, disc)
    np.testing.assert_array_equal(moving, disc)
    # scattered pieces of the colour, none of them most of it
    pieces = (np.hypot(xs - 12, ys - 12) <= 6) | (np.hypot(xs - 48, ys - 48) <= 6)
    assert TQ.generated_object(image_of(pieces), red) == (None, None)
    # the colour over most of the frame: the model drew a background, not an object
    assert TQ.generated_object(image_of(xs < 40), red) == (None, None)
    # a speck
    assert TQ.generated_object(image_of(np.hypot(xs - 30, ys - 30) <= 2), red) == (None, None)


def test_a_generated_object_is_told_from_a_background_of_a_near_colour():
    # a red disc on a striped orange background: the orange's darker stripes lie within 0.25
    # of red, so the colour alone takes the background for the object
    disc = shapes.Obj("circle", "red", "solid", 30.0, 28.0, 10.0, 0.0)
    scene = shapes.Scene(64, "orange", "striped", 0.12, 0.4, 1.0, (disc,))
    out = shapes.render(scene)
    image, exact = out["image"], out["masks"][0]
    red, orange = shapes.COLORS["red"], shapes.COLORS["orange"]
    assert quality.iou(quality.segment(image, red, 0.25), exact) < 0.5
    assert TQ.generated_object(image, red) == (None, None)
    mask, moving = TQ.generated_object(image, red, orange)
    assert quality.iou(mask, exact) > 0.9 and quality.iou(moving, exact) > 0.9


def test_shade_distance_is_the_distance_to_the_nearest_shade():
    color = np.array([0.8, 0.4, 0.2], np.float32)
    pixels = np.array([[0.4, 0.2, 0.1], [0.8, 0.4, 0.2], [0.0, 0.0, 0.0], [0.2, 0.4, 0.8]])
    got = quality.shade_distance(pixels.astype(np.float32), color)
    # by brute force over the shades 0.4-1.1
    shades = np.linspace(*quality.SHADES, 7001)[:, None, None] * color
    want = np.sqrt(np.mean(np.square(pixels[None] - shades), -1)).min(0)
    np.testing.assert_allclose(got, want, atol=1e-4)
    assert got[1] < 1e-6 and got[2] > 0.1  # the colour itself; black is darker than any shade


def test_a_batch_of_a_redrawn_source_is_another_batch(tmp_path):
    preset = TQ.preset_values("toy")
    runner = TQ.UnitRunner("toy", preset, None, None, tmp_path, float("inf"))
    rendered, generated = (TQ.Case(n, 64, quality.HELDOUT_SEEDS) for n in (0, 1))

    def part(attempt):
        return [
            {"case": rendered, "generation_seed": None},
            {"case": generated, "generation_seed": generated.generation_seed(attempt)},
        ]

    before = runner.digest(part(0))
    assert runner.digest(part(0)) == before
    assert runner.digest(part(1)) != before  # the generated source drawn again
    digests = {
        d: TQ.UnitRunner("toy", preset, None, None, tmp_path, float("inf"), dilate=d).digest(
            part(0)
        )
        for d in (1, TQ.DILATE, TQ.TOY_DILATE)
    }
    assert digests[TQ.TOY_DILATE] == before  # the runner's default is the toy preset's
    assert len(set(digests.values())) == len(digests)  # another frozen mask is another batch
    # a batch of Motion's default dilation has the digest of one that records no dilation
    plain = dict(method="toy", preset=preset, edits=[0, 1],
                 generation_seeds=[None, generated.generation_seed(0)])  # fmt: skip
    want = hashlib.sha256(json.dumps(plain, sort_keys=True).encode()).hexdigest()
    assert digests[TQ.DILATE] == want
    # a grown silhouette is another flow, so another batch; grow 0 is the plain batch
    grown = TQ.UnitRunner("toy", preset, None, None, tmp_path, float("inf"), grow=2)
    assert grown.digest(part(0)) != before
    assert (
        TQ.UnitRunner("toy", preset, None, None, tmp_path, float("inf"), grow=0).digest(part(0))
        == before
    )
    # so is a blended-rim growth, and a grown request (mask_grow); each of 0 is the plain batch
    runner_of = lambda **kw: TQ.UnitRunner("toy", preset, None, None, tmp_path, 1e9, **kw)  # noqa: E731
    rim = runner_of(grow=2, grow_rule="blended").digest(part(0))
    wide = runner_of(mask_grow=2).digest(part(0))
    assert len({before, grown.digest(part(0)), rim, wide}) == 4
    assert runner_of(mask_grow=0).digest(part(0)) == before


@pytest.mark.parametrize("kind", ["translate", "rotate", "drag"])
def test_a_grown_request_moves_the_grown_region_by_the_same_motion(kind):
    from mgjax.edit.motion import grow_mask

    ys, xs = np.mgrid[0:64, 0:64]
    mask = (np.abs(xs - 30) <= 6) & (np.abs(ys - 28) <= 4)
    case = TQ.Case(0, 64, quality.TUNING_SEEDS)
    case.kind = kind
    label, matrix, flow_in = TQ.target_of(case, mask)
    p = dict(flow=flow_in(mask), flow_in=flow_in, moving=mask)
    assert TQ.request_flow(p, 0) is p["flow"]
    wide, region = TQ.request_flow(p, 2), grow_mask(mask, 2)
    assert not wide[~region].any() and np.all(np.any(wide[region & ~mask] != 0, -1))
    np.testing.assert_allclose(wide[mask], p["flow"][mask], atol=1e-5)  # the object's motion
    if kind != "drag":  # an affine map: every pixel of the region moves by it
        pts = np.stack([xs[region], ys[region], np.ones(region.sum())], -1) @ matrix.T
        np.testing.assert_allclose(
            wide[region], pts[:, :2] - np.stack([xs[region], ys[region]], -1), atol=1e-4
        )


@pytest.mark.slow
def test_raft_is_measured_on_the_exact_edits_by_motion():
    """motion_epe: one row per motion kind over the rendered sources; the zero flow's EPE is
    the motion's mean length inside the object, and the pack's RAFT sees a translation."""
    from flow.checkpoint import load_raft

    sd, raft = sdm.load(pack.sd_folder()), load_raft(pack.raft_file())
    seeds = TQ.split_seeds("tuning")
    rows = TQ.motion_epe(sd, raft, seeds, 8)
    assert sorted(rows) == sorted(TQ.KINDS) and all(r["edits"] == 1 for r in rows.values())
    case = TQ.Case(0, 64, seeds)  # the first translation, rendered
    mask = shapes.render(case.scene)["masks"][0]
    label, _, flow_in = TQ.target_of(case, mask)
    length = np.linalg.norm(flow_in(mask), axis=-1)[mask].mean()
    assert label.startswith("translate") and np.isclose(rows["translate"]["zero"], length)
    assert rows["translate"]["rendered"] < 0.5 * rows["translate"]["zero"]
