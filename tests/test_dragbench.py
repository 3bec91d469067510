"""DragBench folders to a jobs file: real pickles of numpy data read without unpickling code,
hostile pickles refused, points paired, masks written, the jobs file accepted by --jobs."""

import json
import os
import pickle

import numpy as np
import pytest
from PIL import Image

from flow.errors import InputError
from mgjax.batch.jobs import read_jobs
from mgjax.evaluation.dragbench import read_meta, to_jobs


def _sample(folder, points, mask, prompt="a mug on a desk", protocol=4):
    os.makedirs(folder, exist_ok=True)
    Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(folder / "original_image.png")
    with open(folder / "meta_data.pkl", "wb") as f:
        pickle.dump({"prompt": prompt, "points": points, "mask": mask}, f, protocol=protocol)


class _Boom:
    def __reduce__(self):
        return (os.system, ("touch pwned",))


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_numpy_pickles_are_read_exactly(tmp_path, protocol):
    mask = np.zeros((64, 64), np.uint8)
    mask[10:30, 5:25] = 1
    points = [np.array([12, 20]), np.array([30, 20]), [1.5, 2], [3, 4.25]]
    _sample(tmp_path, points, mask, protocol=protocol)
    meta = read_meta(str(tmp_path / "meta_data.pkl"))
    np.testing.assert_array_equal(meta["mask"], mask)
    assert meta["mask"].dtype == np.uint8 and meta["prompt"] == "a mug on a desk"
    np.testing.assert_array_equal(
        np.asarray(meta["points"], float).ravel(), [12, 20, 30, 20, 1.5, 2, 3, 4.25]
    )
    big = np.arange(6, dtype=">f8").reshape(2, 3, order="F")  # byte order and Fortran order
    with open(tmp_path / "m2.pkl", "wb") as f:
        pickle.dump({"prompt": "", "points": [], "mask": big}, f, protocol=protocol)
    np.testing.assert_array_equal(read_meta(str(tmp_path / "m2.pkl"))["mask"], big)


def test_hostile_pickles_are_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for name, payload in (
        ("code.pkl", {"prompt": _Boom(), "points": [], "mask": 0}),
        ("objects.pkl", {"prompt": "", "points": [], "mask": np.array([object()])}),
    ):
        with open(tmp_path / name, "wb") as f:
            pickle.dump(payload, f)
        with pytest.raises(InputError, match="not a DragBench meta_data.pkl"):
            read_meta(str(tmp_path / name))
    assert not (tmp_path / "pwned").exists()
    with open(tmp_path / "partial.pkl", "wb") as f:
        pickle.dump({"prompt": "x"}, f)
    with pytest.raises(InputError, match="no points, mask"):
        read_meta(str(tmp_path / "partial.pkl"))


def test_folders_become_jobs(tmp_path):
    root = tmp_path / "drag_bench_data"
    mask = np.zeros((64, 64), np.uint8)
    mask[20:40, 20:40] = 1
    _sample(root / "animals" / "cat_1", [[25, 30], [35, 30]], mask, "a cat")
    _sample(root / "objects" / "mug_2", [[21, 21], [23, 25], [38, 38], [36, 30]], mask * 255)
    jobs_path = tmp_path / "db.jsonl"
    assert to_jobs(str(root), str(jobs_path)) == 2
    lines = [json.loads(ln) for ln in jobs_path.read_text().splitlines()]
    assert [j["name"] for j in lines] == ["animals__cat_1", "objects__mug_2"]
    assert lines[0]["points"] == [[[25.0, 30.0], [35.0, 30.0]]] and lines[0]["prompt"] == "a cat"
    assert len(lines[1]["points"]) == 2
    written = np.asarray(Image.open(lines[1]["object_mask"])) > 0
    np.testing.assert_array_equal(written, mask > 0)
    jobs = read_jobs(str(jobs_path), dict(out_dir=str(tmp_path / "out")))
    assert [j.status for j in jobs] == ["pending", "pending"]
    assert jobs[1].config.motion.drag == "21,21>23,25; 38,38>36,30"
    _sample(root / "bad" / "odd", [[1, 2], [3, 4], [5, 6]], mask)
    with pytest.raises(InputError, match="handle/target pairs, got 3 points"):
        to_jobs(str(root), str(tmp_path / "again.jsonl"))
    assert not (tmp_path / "again.jsonl").exists()
    with pytest.raises(InputError, match="no such folder"):
        to_jobs(str(tmp_path / "none"), str(jobs_path))
