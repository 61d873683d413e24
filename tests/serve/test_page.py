"""The demo page in real headless Chromium (Debian's package, driven by Playwright): typing makes an image appear,
uploads, drawings and the webcam drive image-to-image, downloads carry parameters. Skipped without Chromium."""

from __future__ import annotations

import contextlib
import re
import shutil

import pytest
from PIL import Image

from fake_pipeline import FakePipeline
from serve_helpers import encoded, running_server

sync_api = pytest.importorskip("playwright.sync_api")
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = [pytest.mark.slow, pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed")]

ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
    "--use-fake-ui-for-media-stream",  # grant the camera without a prompt
    "--use-fake-device-for-media-stream",  # and make it a synthetic one
]
TIMEOUT_MS = 15_000


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        yield browser
        browser.close()


@pytest.fixture(scope="module")
def page_server():
    with running_server(FakePipeline(delay_s=0.05), default_side_px=64, max_side_px=512) as s:
        yield s


@pytest.fixture
def page(browser, page_server):
    context = browser.new_context(accept_downloads=True)
    page = context.new_page()
    page.set_default_timeout(TIMEOUT_MS)
    errors = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.on("console", lambda m: m.type == "error" and errors.append(m.text))
    page.goto(page_server.url + "/")
    sync_api.expect(page.locator("#status")).to_have_text("connected")
    sync_api.expect(page.locator("#auth")).to_be_hidden()
    yield page
    context.close()
    assert not errors, errors


def wait_for_image_of(page, prompt: str):
    sync_api.expect(page.locator("#params")).to_contain_text(prompt)
    sync_api.expect(page.locator("#result")).to_have_attribute("src", re.compile("^blob:"))


def test_typing_a_prompt_makes_an_image_appear(page, page_server):
    page.locator("#prompt").press_sequentially("a lighthouse at dusk", delay=20)
    wait_for_image_of(page, "a lighthouse at dusk")
    sync_api.expect(page.locator("#latency")).to_contain_text("ms round trip")
    assert page.evaluate("document.getElementById('result').naturalWidth") == 64
    # Stale requests were dropped, not queued: far fewer generations than keystrokes.
    assert len(page_server.pipeline.calls) < len("a lighthouse at dusk")


@pytest.mark.parametrize("source", ["none", "upload", "draw"])
def test_a_phone_wide_screen_needs_no_sideways_scrolling(page, source):
    page.set_viewport_size({"width": 375, "height": 667})
    page.locator(f"input[name=source][value={source}]").check()
    assert page.evaluate("document.documentElement.scrollWidth") <= 375


def test_seed_lock_randomize_steps_and_size(page):
    page.locator("#prompt").fill("seeds")
    wait_for_image_of(page, "Seed: 42")
    page.locator("#seed-random").click()
    seed = page.locator("#seed").input_value()
    assert seed != "42"
    wait_for_image_of(page, f"Seed: {seed}")
    page.locator("#steps").select_option("3")
    wait_for_image_of(page, "Steps: 3")
    page.locator("#size").select_option("256x256")
    wait_for_image_of(page, "Size: 256x256")
    page.locator("#seed-lock").uncheck()
    page.locator("#prompt").fill("unlocked")
    wait_for_image_of(page, "unlocked")
    assert page.locator("#seed").input_value() != seed


def test_an_uploaded_image_drives_img2img(page, page_server, tmp_path):
    path = tmp_path / "source.png"
    path.write_bytes(encoded(Image.new("RGB", (96, 64), (200, 40, 40))))
    page.locator("input[name=source][value=upload]").check()
    page.locator("#upload").set_input_files(str(path))
    page.locator("#strength").fill("0.75")
    page.locator("#prompt").fill("a red barn")
    wait_for_image_of(page, "Denoising strength: 0.75")
    sync_api.expect(page.locator("#params")).to_contain_text("a red barn")


def test_drawing_drives_img2img(page):
    page.locator("input[name=source][value=draw]").check()
    page.locator("#prompt").fill("a drawing")
    box = page.locator("#canvas").bounding_box()
    page.mouse.move(box["x"] + 10, box["y"] + 10)
    page.mouse.down()
    page.mouse.move(box["x"] + box["width"] - 10, box["y"] + box["height"] - 10, steps=8)
    page.mouse.up()
    wait_for_image_of(page, "Denoising strength: 0.5")


def test_webcam_frames_drive_img2img_continuously(page, page_server):
    page.locator("#prompt").fill("webcam")
    wait_for_image_of(page, "webcam")
    before = len(page_server.pipeline.calls)
    page.locator("input[name=source][value=webcam]").check()
    wait_for_image_of(page, "Denoising strength")
    page.wait_for_timeout(500)
    assert len(page_server.pipeline.calls) - before >= 3  # a new frame as soon as the last result is back
    page.locator("input[name=source][value=none]").check()


def test_download_is_a_png_with_its_parameters(page, tmp_path):
    page.locator("#prompt").fill("download me")
    wait_for_image_of(page, "download me")
    with page.expect_download() as info:
        page.locator("#download").click()
    path = tmp_path / "out.png"
    info.value.save_as(path)
    with Image.open(path) as image:
        assert image.format == "PNG" and image.text["parameters"].startswith("download me")
    assert info.value.suggested_filename.startswith("sdturbo-42")


def test_the_page_asks_for_the_api_key(browser):
    with running_server(FakePipeline(), api_key="page-secret-key", default_side_px=64) as s:
        context = browser.new_context()
        page = context.new_page()
        page.set_default_timeout(TIMEOUT_MS)
        page.goto(s.url + "/")
        sync_api.expect(page.locator("#auth")).to_be_visible()
        page.locator("#api-key").fill("page-secret-key")
        page.locator("#api-key-send").click()
        sync_api.expect(page.locator("#status")).to_have_text("connected")
        page.locator("#prompt").fill("with a key")
        wait_for_image_of(page, "with a key")
        context.close()


@contextlib.contextmanager
def page_recording_sent_frames(browser, url: str):
    """A fresh page on `url` and the list of the WebSocket frames it sends, recorded from its first one."""
    context = browser.new_context()
    page = context.new_page()
    page.set_default_timeout(TIMEOUT_MS)
    sent: list[str] = []
    page.on("websocket", lambda ws: ws.on("framesent", lambda payload: sent.append(payload)))
    page.goto(url + "/")
    try:
        yield page, sent
    finally:
        context.close()


def test_a_slow_model_shows_step_previews_before_the_image(browser):
    with (
        running_server(FakePipeline(delay_s=0.35, after_previews_s=1.5), default_side_px=64) as server,
        page_recording_sent_frames(browser, server.url) as (page, sent),
    ):
        page.locator("#prompt").fill("first")
        wait_for_image_of(page, "first")  # took > 300 ms: the page goes on asking for previews
        assert '"preview":true' in sent[-1]  # the first request asks: the model's speed is not known yet
        page.locator("#prompt").fill("second")
        result = page.locator("#result")
        sync_api.expect(result).to_have_class(re.compile("preview"))  # the 8x8 thumbnail, shown at the image's size
        assert page.evaluate("document.getElementById('result').naturalWidth") == 8
        assert page.evaluate("document.getElementById('result').getBoundingClientRect().width") == 256  # 64 px x 4
        sync_api.expect(page.locator("#status")).to_contain_text("preview after step 1")
        wait_for_image_of(page, "second")
        sync_api.expect(result).not_to_have_class(re.compile("preview"))
        assert page.evaluate("document.getElementById('result').naturalWidth") == 64
        assert '"preview":true' in sent[-1]


def test_a_fast_model_gets_no_previews_after_its_first_result(browser, page_server):
    with page_recording_sent_frames(browser, page_server.url) as (page, sent):
        page.locator("#prompt").fill("quick one")
        wait_for_image_of(page, "quick one")
        assert '"preview":true' in sent[-1]  # the model's speed was not known yet
        page.locator("#prompt").fill("quick two")
        wait_for_image_of(page, "quick two")
        assert '"preview"' not in sent[-1]  # 50 ms per image: previews would only add frames
