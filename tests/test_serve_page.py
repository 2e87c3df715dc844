"""wan-serve's web page in headless Chromium (Debian's chromium + chromium-driver, driven by Selenium): it
submits a job from the form, shows its progress, and plays the finished video inline.

``WAN_SERVE_SCREENSHOT=docs/serve-page.png python -m pytest tests/test_serve_page.py`` keeps the screenshot.
"""
from __future__ import annotations

import os
import pathlib
import time

import pytest


CHROMIUM, DRIVER = pathlib.Path("/usr/bin/chromium"), pathlib.Path("/usr/bin/chromedriver")
webdriver = pytest.importorskip("selenium.webdriver")
pytest.importorskip("httpx")

from tests.serve_util import ServerProcess  # noqa: E402  (after the skips)
pytestmark = pytest.mark.skipif(not (CHROMIUM.exists() and DRIVER.exists()),
                                reason="needs Debian's chromium and chromium-driver (.ci/run installs them)")


def _browser(tmp_path):
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = str(CHROMIUM)
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--autoplay-policy=no-user-gesture-required", "--window-size=1200,800",
                 f"--user-data-dir={tmp_path / 'chromium-profile'}"):
        opts.add_argument(flag)
    return webdriver.Chrome(options=opts, service=Service(str(DRIVER)))


def _until(fn, timeout=300.0, what=""):
    t0 = time.time()
    while time.time() - t0 < timeout:
        value = fn()
        if value:
            return value
        time.sleep(0.05)
    raise TimeoutError(what)


def test_page_submits_shows_progress_and_plays(serve_ckpt, serve_compile_cache, tmp_path):
    from selenium.webdriver.common.by import By

    server = ServerProcess(serve_ckpt, tmp_path / "data", compile_cache=serve_compile_cache)
    browser = None
    try:
        server.wait_ready()
        browser = _browser(tmp_path)
        browser.get(server.url + "/")
        _until(lambda: browser.find_element(By.ID, "status").text == "ready", 60, "the page shows the server ready")
        prompt = browser.find_element(By.ID, "prompt")
        prompt.clear()
        prompt.send_keys("a paper boat drifts down a rainy street")
        browser.find_element(By.ID, "num_inference_steps").send_keys("40")
        browser.find_element(By.ID, "seed").send_keys("3")
        browser.find_element(By.ID, "submit").click()
        card = _until(lambda: browser.find_elements(By.CSS_SELECTOR, ".job"), 30, "a job card")[0]
        seen = set()

        def progressed():
            state = card.find_element(By.CSS_SELECTOR, ".state").text
            seen.add(state)
            return state == "completed"

        _until(progressed, 300, "the job completes")
        shown = {s for s in seen if s.endswith("%") and 0 < int(s[:-1]) < 100}
        assert shown, f"no progress between 0 and 100% was shown (saw {sorted(seen)})"
        playing = _until(lambda: browser.execute_script(
            "const v = document.querySelector('.job video');"
            "return v && v.readyState >= 2 && v.currentTime > 0 && v.videoWidth === 96 ? [v.videoWidth, v.videoHeight]"
            " : null;"), 60, "the video plays inline")
        assert playing == [96, 64]
        assert not browser.find_element(By.ID, "error").text
        shot = pathlib.Path(os.environ.get("WAN_SERVE_SCREENSHOT") or tmp_path / "page.png")
        shot.parent.mkdir(parents=True, exist_ok=True)
        browser.save_screenshot(str(shot))
        assert shot.stat().st_size > 10_000
    finally:
        if browser is not None:
            browser.quit()
        server.kill()
