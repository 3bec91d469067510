"""The editor end to end in a real browser (headless Chromium through Selenium): on the toy
pack, paint the demo object, drag a translation, run a few steps, wait for the result, check
the image shown, the files written and that no request left 127.0.0.1."""

import json
import os

import numpy as np
import pytest
from PIL import Image

from tests import editor_browser as B

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        B.chromium() is None,
        reason="needs Debian's chromium and chromium-driver (apt-get install chromium "
        "chromium-driver; .ci/run installs them)",
    ),
]


def test_paint_drag_run_in_chromium(tmp_path):
    server = B.Server(str(tmp_path / "runs"), f"--compilation_cache={tmp_path / 'xla'}")
    driver = B.browser()
    try:
        B.author_demo(driver, server.url, "translate", [(28, 30), (33, 30), (38, 30)], steps=3)
        motion = driver.find_element("id", "motion").get_attribute("value")
        assert motion == "translate:10,0"
        folder = B.run_and_wait(driver, 900)
        shown = driver.execute_script(
            "const i = document.getElementById('result-image');"
            "return [i.naturalWidth, i.naturalHeight, i.src];"
        )
        assert shown[:2] == [64, 64] and shown[2].endswith("sample_00/edited.png")
        urls = B.requests_made(driver)
    finally:
        driver.quit()
        server.stop()
    assert os.path.dirname(folder) == str(tmp_path / "runs")
    sample = os.path.join(folder, "sample_00")
    edited = np.asarray(Image.open(os.path.join(sample, "edited.png")), np.float64)
    source = np.asarray(Image.open(os.path.join(sample, "source.png")), np.float64)
    assert edited.shape == (64, 64, 3) and np.abs(edited - source).mean() > 0
    config = json.load(open(os.path.join(sample, "config.json")))
    assert (config["motion"], config["steps"]) == ("translate:10,0", 3)
    painted = np.asarray(Image.open(os.path.join(folder, "inputs", "object_mask.png"))) > 127
    x0, y0, x1, y1 = B.demo_object_box()
    near = np.zeros_like(painted)  # the object's box and the brush's radius around it
    near[max(y0 - 3, 0) : y1 + 4, max(x0 - 3, 0) : x1 + 4] = True
    rows = "\n".join("".join("#" if v else "." for v in r) for r in painted)
    assert painted[B.demo_object_mask()].mean() > 0.95 and not painted[~near].any(), rows
    assert os.path.isfile(os.path.join(folder, "job.jsonl"))
    assert any(u.endswith("/api/run") for u in urls) and any("/events" in u for u in urls)
    assert B.outside(urls) == []
