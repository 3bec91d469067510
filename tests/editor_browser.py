"""Driving the editor in headless Chromium (Debian's chromium + chromium-driver, through
Selenium): start `launch.py --serve` on the toy pack, author an edit the way a person does
(pick the demo scene, paint the object, drag a motion), run it and read the result. Used by
tests/test_editor_browser.py, and as a script that keeps the README's screenshot true:

  python -m tests.editor_browser docs/editor.png [--shots DIR]
"""

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request

import numpy as np
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LOCAL_SCHEMES = ("data", "blob", "about", "chrome", "devtools")


def chromium() -> tuple[str, str] | None:
    """(browser, driver) paths of Debian's chromium and chromium-driver, or None."""
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    return (browser, driver) if browser and driver else None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`python launch.py --serve` on the toy pack in a subprocess, until stop()."""

    def __init__(self, out_dir: str, *flags: str, timeout: float = 300):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/"
        self.log = tempfile.NamedTemporaryFile("w+", suffix=".log", delete=False)
        cmd = [
            sys.executable,
            "launch.py",
            "--serve",
            f"--port={self.port}",
            f"--out_dir={out_dir}",
        ]
        self.proc = subprocess.Popen(
            [*cmd, *flags], cwd=ROOT, stdout=self.log, stderr=subprocess.STDOUT
        )
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the server ended: {self.output()}")
            try:
                urllib.request.urlopen(self.url + "api/info", timeout=2).read()
                return
            except OSError:
                time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"the server did not answer in {timeout} s: {self.output()}")

    def output(self) -> str:
        self.log.flush()
        with open(self.log.name) as f:
            return f.read()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        os.unlink(self.log.name)


def browser(size=(1400, 1000)):
    """Headless Chromium with the performance log (every request the page makes)."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    paths = chromium()
    if paths is None:
        raise RuntimeError("Debian's chromium and chromium-driver are not installed")
    options = webdriver.ChromeOptions()
    options.binary_location = paths[0]
    for arg in (
        "--headless=new",
        "--no-sandbox",
        "--disable-dev-shm-usage",
        "--disable-gpu",
        f"--window-size={size[0]},{size[1]}",
    ):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"performance": "ALL"})
    return webdriver.Chrome(service=Service(paths[1]), options=options)


def _by(selector: str):
    from selenium.webdriver.common.by import By

    return (By.CSS_SELECTOR, selector)


def element(driver, selector: str, timeout: float = 30):
    from selenium.webdriver.support import expected_conditions as EC
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, timeout).until(EC.element_to_be_clickable(_by(selector)))


def text(driver, selector: str) -> str:
    return driver.find_element(*_by(selector)).text


def wait_for(driver, condition, timeout: float, what: str):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        value = condition()
        if value:
            return value
        if text(driver, "#error"):
            raise AssertionError(f"the page says {text(driver, '#error')!r} while {what}")
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout} s while {what}")


def drag_on_image(driver, points, scale: float) -> None:
    """Press at points[0], move through the rest, release (image pixel coordinates)."""
    from selenium.webdriver.common.action_chains import ActionChains

    view = driver.find_element(*_by("#view"))
    w, h = view.size["width"], view.size["height"]
    offset = lambda p: (round((p[0] + 0.5) * scale - w / 2), round((p[1] + 0.5) * scale - h / 2))  # noqa: E731
    chain = ActionChains(driver).move_to_element_with_offset(view, *offset(points[0]))
    chain.click_and_hold()
    for p in points[1:]:
        chain.move_to_element_with_offset(view, *offset(p))
    chain.release().perform()


def demo_object_mask() -> np.ndarray:
    """bool[64,64]: the toy pack's demo object."""
    from mgjax.toy import pack

    return np.asarray(Image.open(pack.demo_files()["object_mask"])) > 127


def demo_object_box() -> tuple[int, int, int, int]:
    """x0, y0, x1, y1 (inclusive) of the toy pack's demo object."""
    ys, xs = np.nonzero(demo_object_mask())
    return int(xs.min()), int(ys.min()), int(xs.max()), int(ys.max())


def author_demo(driver, url: str, motion_tool: str, motion_drag, steps: int) -> None:
    """Open the page, pick the demo scene, paint over its object, drag a motion, set steps."""
    driver.get(url)
    element(driver, "#use-scene").click()
    wait_for(driver, lambda: "64x64" in text(driver, "#source-info"), 30, "loading the scene")
    element(driver, "[data-tool=brush]").click()
    driver.execute_script(
        "const s = document.getElementById('brush-size'); s.value = 5;"
        "s.dispatchEvent(new Event('input'));"
    )
    x0, y0, x1, y1 = demo_object_box()
    for y in range(y0, y1 + 1, 3):  # strokes across the object's box
        drag_on_image(driver, [(x0, y), ((x0 + x1) / 2, y), (x1, y)], 8)
    wait_for(driver, lambda: "painted" in text(driver, "#mask-info"), 10, "painting")
    element(driver, f"[data-tool={motion_tool}]").click()
    drag_on_image(driver, motion_drag, 8)
    wait_for(driver, lambda: "moves" in text(driver, "#flow-info"), 30, "previewing the flow")
    steps_box = driver.find_element(*_by("#steps"))
    steps_box.clear()
    steps_box.send_keys(str(steps))


def run_and_wait(driver, timeout: float) -> str:
    """Click Run, wait for the result; returns the run folder the page names."""
    element(driver, "#run").click()
    wait_for(driver, lambda: text(driver, "#status") == "done", timeout, "running the edit")
    wait_for(
        driver,
        lambda: driver.execute_script(
            "const i = document.getElementById('result-image');"
            "return i.complete && i.naturalWidth > 0;"
        ),
        30,
        "loading the result",
    )
    return text(driver, "#folder")


def requests_made(driver) -> list[str]:
    """Every URL the page requested (Chrome's performance log, Network.requestWillBeSent)."""
    urls = []
    for entry in driver.get_log("performance"):
        message = json.loads(entry["message"])["message"]
        if message.get("method") == "Network.requestWillBeSent":
            urls.append(message["params"]["request"]["url"])
    return urls


def outside(urls: list[str]) -> list[str]:
    """The URLs that left the machine (anything but 127.0.0.1 and in-page data)."""
    bad = []
    for url in urls:
        parts = urllib.parse.urlsplit(url)
        if parts.scheme in LOCAL_SCHEMES:
            continue
        if parts.scheme not in ("http", "https") or parts.hostname != "127.0.0.1":
            bad.append(url)
    return bad


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("screenshot", help="where the finished page's screenshot goes (PNG)")
    parser.add_argument("--shots", help="also save the authoring (rotation) screenshot here")
    parser.add_argument("--steps", type=int, default=100, help="DDIM steps (the toy preset's 100)")
    args = parser.parse_args()
    out = tempfile.mkdtemp(prefix="mgjax-editor-shot-")
    server = Server(out)
    driver = browser((1400, 1500))
    try:
        if args.shots:
            os.makedirs(args.shots, exist_ok=True)
            author_demo(driver, server.url, "rotate", [(44, 30), (40, 18), (34, 14)], args.steps)
            driver.save_screenshot(os.path.join(args.shots, "editor_rotation.png"))
        author_demo(driver, server.url, "translate", [(28, 30), (33, 30), (38, 30)], args.steps)
        run_and_wait(driver, 1800)
        driver.execute_script("document.getElementById('result').scrollIntoView()")
        driver.execute_script("window.scrollTo(0, 0)")
        driver.save_screenshot(args.screenshot)
        if args.shots:
            shutil.copy(args.screenshot, os.path.join(args.shots, "editor_result.png"))
        print(f"wrote {args.screenshot}")
    finally:
        driver.quit()
        server.stop()
        shutil.rmtree(out, ignore_errors=True)


if __name__ == "__main__":
    main()
