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


def test_uploaded_masks_read_by_the_same_rule_as_launch(tmp_path):
    """A 0/1 label PNG, a red-on-black PNG and an anti-aliased 0..255 PNG of the demo object,
    uploaded on the page, give the painted mask that mgjax.edit.readers reads from the same
    file: a pixel is object where its largest channel is above half the mask's largest value."""
    from mgjax.edit.readers import read_mask_image

    obj = B.demo_object_mask()
    label = obj.astype(np.uint8)
    red = np.zeros((*obj.shape, 3), np.uint8)
    red[obj, 0] = 200
    soft = (obj * 180).astype(np.uint8)
    soft[np.roll(obj, 1, axis=1) & ~obj] = 60  # an edge below half: not object
    files = {"label": label, "red": red, "soft": soft}
    server = B.Server(str(tmp_path / "runs"), f"--compilation_cache={tmp_path / 'xla'}")
    driver = B.browser()
    shown = {}
    try:
        driver.get(server.url)
        B.element(driver, "#use-scene").click()
        B.wait_for(driver, lambda: "64x64" in B.text(driver, "#source-info"), 30, "the scene")
        for name, pixels in files.items():
            path = tmp_path / f"{name}.png"
            Image.fromarray(pixels).save(path)
            driver.execute_script("clearMask(); changed();")
            driver.find_element("id", "mask-upload").send_keys(str(path))
            B.wait_for(driver, lambda: "painted" in B.text(driver, "#mask-info"), 10, name)
            alpha = driver.execute_script(
                "const c = S.mask, d = c.getContext('2d').getImageData(0, 0, c.width, c.height);"
                "return Array.from(d.data.filter((_, i) => i % 4 === 3));"
            )
            shown[name] = np.asarray(alpha).reshape(obj.shape) > 127
    finally:
        driver.quit()
        server.stop()
    for name in files:
        expected = read_mask_image(str(tmp_path / f"{name}.png"), *obj.shape)
        assert expected.sum() == obj.sum(), name
        assert np.array_equal(shown[name], expected), name
