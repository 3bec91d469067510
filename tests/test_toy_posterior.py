"""The posterior bench (bench.toy_posterior): Bayes' rule over candidate latents under the
schedule's Gaussian noise, checked against torch's normal density; the family of candidate
scenes; and the bench end to end on the pack, cut short."""

import json
import math
import subprocess
import sys

import numpy as np
import pytest

from bench import toy_posterior as TP
from mgjax.toy import quality, shapes


def test_the_posterior_over_candidates_is_bayes_rule_under_the_schedules_noise():
    import torch

    rng = np.random.default_rng(3)
    latents = rng.normal(size=(6, 4, 5, 5)).astype(np.float32)
    for abar in (0.95, 0.6, 0.2):
        z_t = math.sqrt(abar) * latents[2] + math.sqrt(1 - abar) * rng.normal(size=(4, 5, 5))
        normal = torch.distributions.Normal(
            torch.from_numpy(math.sqrt(abar) * latents.astype(np.float64)), math.sqrt(1 - abar)
        )
        log_p = normal.log_prob(torch.from_numpy(z_t)[None]).sum((1, 2, 3))
        expected = torch.softmax(log_p, 0).numpy()  # uniform prior
        np.testing.assert_allclose(TP.posterior(z_t, latents, abar), expected, rtol=1e-9)
    exact = TP.posterior(math.sqrt(0.999) * latents[4], latents, 0.999)
    assert exact[4] > 1 - 1e-9  # no noise to speak of: the candidate itself


def test_the_family_varies_one_object_and_holds_the_true_scene():
    scene = next(
        s
        for s in (
            shapes.sample_scene(np.random.default_rng(int(x)), 64) for x in quality.TUNING_SEEDS
        )
        if len(s.objects) > 1
    )
    family, names, true = TP.candidates(scene, 1)
    assert len(family) == 4 * 3 * 3 * 3 * 3 == len(names)
    assert family[true] == scene and sum(c == scene for c in family) == 1
    assert all(c.objects[0] == scene.objects[0] for c in family)  # the others as they are
    assert sorted(set(names)) == sorted(shapes.SHAPES)
    assert all(names.count(n) == 81 for n in shapes.SHAPES)
    moved = {(c.objects[1].cx - scene.objects[1].cx, c.objects[1].cy - scene.objects[1].cy)
             for c in family}  # fmt: skip
    assert moved == {(dx, dy) for dx in TP.SHIFTS for dy in TP.SHIFTS}


@pytest.mark.slow
def test_the_bench_measures_each_object_on_the_pack(tmp_path):
    out = tmp_path / "posterior.json"
    cmd = [sys.executable, "-m", "bench.toy_posterior", "--scenes", "1", "--draws", "1"]
    run = subprocess.run(cmd + ["--strengths", "0.3", "--json", str(out)], capture_output=True,
                         text=True, timeout=600)  # fmt: skip
    assert run.returncode == 0, run.stderr[-2000:]
    assert "strength 0.3: " in run.stdout
    rows = json.loads(out.read_text())["rows"]["0.3"]
    n = len(shapes.sample_scene(np.random.default_rng(int(quality.TUNING_SEEDS[0])), 64).objects)
    for key in ("posterior_mean", "most_probable", "unet", "p_true", "p_shape"):
        assert len(rows[key]) == n and all(0.0 <= v <= 1.0 for v in rows[key])
    assert all(s >= t for s, t in zip(rows["p_shape"], rows["p_true"], strict=True))


@pytest.mark.slow
def test_the_bench_refuses_a_json_path_in_no_folder_before_any_model_work(tmp_path):
    cmd = [sys.executable, "-m", "bench.toy_posterior", "--json", str(tmp_path / "no" / "x.json")]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    lines = run.stderr.strip().splitlines()
    assert run.returncode == 2 and len(lines) == 1 and "no such folder" in lines[0], run.stderr
    assert not (tmp_path / "no").exists()
