"""The demo page in real headless Chromium (Debian's package, driven by Playwright): typing makes an image appear,
uploads, drawings and the webcam drive image-to-image, downloads carry parameters. Skipped without Chromium."""

from __future__ import annotations

import contextlib
import json
import re
import shutil

import pytest
from PIL import Image

from fake_pipeline import FakePipeline
from sdturbo.serve.routes import ws as ws_route
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
def page_recording_sent_frames(browser, url: str, init_script: str | None = None):
    """A fresh page on `url` and the list of the WebSocket frames it sends, recorded from its first one.
    init_script runs before the page's own (a stubbed camera)."""
    context = browser.new_context()
    if init_script:
        context.add_init_script(init_script)
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


def generates(sent: list[str]) -> list[dict]:
    return [m for m in map(json.loads, sent) if m.get("type") == "generate"]


def test_webcam_waits_after_an_error_instead_of_resending_at_once(browser, page_server):
    with page_recording_sent_frames(browser, page_server.url) as (page, sent):
        page.locator("#prompt").fill("refused frames")
        wait_for_image_of(page, "refused frames")
        page.locator("summary").click()
        page.locator("#guidance").fill("31")  # over the limit: the server refuses every request (422)
        page.locator("input[name=source][value=webcam]").check()
        sync_api.expect(page.locator("#error")).to_contain_text("guidance_scale")
        before = len(generates(sent))
        page.wait_for_timeout(1500)
        assert len(generates(sent)) - before <= 2  # 1 s, then 2 s between tries; without the wait, hundreds
        page.locator("#guidance").fill("0")  # a change is tried at once, and a result ends the waiting
        wait_for_image_of(page, "Denoising strength")
        before = len(generates(sent))
        page.wait_for_timeout(500)
        assert len(generates(sent)) - before >= 3


REFUSED_CAMERA = """navigator.mediaDevices.getUserMedia = async () => {
  throw new DOMException("Permission denied", "NotAllowedError");
};"""
UNANSWERED_CAMERA = "navigator.mediaDevices.getUserMedia = () => new Promise(() => {});"


@pytest.mark.parametrize(
    ("camera", "message"),
    [(REFUSED_CAMERA, "webcam unavailable: Permission denied"), (UNANSWERED_CAMERA, "waiting for the camera")],
)
def test_without_a_camera_frame_webcam_mode_says_why_and_sends_nothing(browser, page_server, camera, message):
    with page_recording_sent_frames(browser, page_server.url, init_script=camera) as (page, sent):
        page.locator("#prompt").fill("no camera")
        wait_for_image_of(page, "no camera")
        before = len(generates(sent))
        page.locator("input[name=source][value=webcam]").check()
        sync_api.expect(page.locator("#error")).to_contain_text(message)
        page.locator("#prompt").fill("no camera still")
        page.wait_for_timeout(500)
        assert len(generates(sent)) == before  # not the blank canvas
        sync_api.expect(page.locator("#error")).to_contain_text(message)
        page.locator("input[name=source][value=none]").check()
        sync_api.expect(page.locator("#error")).to_have_text("")
        wait_for_image_of(page, "no camera still")


SLOW_CAMERA = """(() => {
  window.cameraTracks = [];
  const open = navigator.mediaDevices.getUserMedia.bind(navigator.mediaDevices);
  navigator.mediaDevices.getUserMedia = async (constraints) => {
    const stream = await open(constraints);
    window.cameraTracks.push(...stream.getTracks());
    await new Promise((resolve) => setTimeout(resolve, 400));  // a real camera takes a moment to open
    return stream;
  };
})();"""


def test_a_camera_that_opens_after_the_user_left_webcam_mode_is_stopped(browser, page_server):
    with page_recording_sent_frames(browser, page_server.url, init_script=SLOW_CAMERA) as (page, _):
        page.locator("input[name=source][value=webcam]").check()
        page.locator("input[name=source][value=draw]").check()
        page.wait_for_function("() => window.cameraTracks.length > 0")
        page.wait_for_function("() => window.cameraTracks.every((t) => t.readyState === 'ended')", timeout=3000)


CANVAS_ROWS = """([top, rows]) => {
  const c = document.getElementById("canvas");
  return Array.from(c.getContext("2d").getImageData(0, top, c.width, rows ?? c.height).data);
}"""


def test_size_changes_refit_an_upload_from_its_original(page, tmp_path):
    path = tmp_path / "stripes.png"  # 1 px black and white columns: any resampling turns them grey
    path.write_bytes(encoded(Image.frombytes("L", (512, 512), bytes([0, 255]) * (512 * 256)).convert("RGB")))
    page.locator("#prompt").fill("stripes")
    page.locator("input[name=source][value=upload]").check()
    page.locator("#upload").set_input_files(str(path))
    wait_for_image_of(page, "Denoising strength")  # fitted to the 64 px canvas, and sent
    for size in ["256x256", "512x512"]:
        page.locator("#size").select_option(size)
    row = page.evaluate(CANVAS_ROWS, [256, 1])
    assert row[0::4] == [0, 255] * 256  # the original's columns, not a 64 px copy enlarged


def test_size_changes_keep_a_drawing_and_the_brush_scales_with_the_canvas(page):
    page.locator("input[name=source][value=draw]").check()
    box = page.locator("#canvas").bounding_box()
    page.mouse.move(box["x"] + 10, box["y"] + box["height"] / 2)
    page.mouse.down()
    page.mouse.move(box["x"] + box["width"] - 10, box["y"] + box["height"] / 2, steps=8)
    page.mouse.up()
    drawn = page.evaluate(CANVAS_ROWS, [0, None])
    column = [drawn[(y * 64 + 32) * 4] for y in range(64)]  # red channel down the middle; the brush is blue
    assert 1 <= sum(r < 200 for r in column) <= 4  # 16 px of a 512 px canvas: 2 px of this 64 px one
    for size in ["512x512", "256x256", "64x64"]:
        page.locator("#size").select_option(size)
    assert page.evaluate(CANVAS_ROWS, [0, None]) == drawn  # re-fitted from the drawing as drawn, not from the last crop


def test_download_needs_a_result_of_the_current_connection(page, tmp_path):
    page.locator("#prompt").fill("first connection")
    wait_for_image_of(page, "first connection")
    download = page.locator("#download")
    sync_api.expect(download).to_be_enabled()
    page.locator("#prompt").fill("")  # nothing to generate again after the reconnect
    page.evaluate("state.ws.close()")  # the connection drops
    sync_api.expect(download).to_be_disabled()
    sync_api.expect(page.locator("#status")).to_have_text("connected")
    sync_api.expect(download).to_be_disabled()  # the server keeps results per connection: that one is gone
    # Sending while the socket is still connecting neither throws (the fixture fails on page errors) nor is lost.
    page.evaluate(
        """() => {
        state.ws.onclose = null;
        state.ws.close();
        connect();
        document.getElementById("api-key").value = "any key";
        document.getElementById("auth").requestSubmit();
    }"""
    )
    sync_api.expect(page.locator("#status")).to_have_text("connected")
    page.locator("#prompt").fill("second connection")
    wait_for_image_of(page, "second connection")
    with page.expect_download() as info:
        download.click()
    assert info.value.suggested_filename.startswith("sdturbo-42")


def test_the_key_prompt_outlasts_the_servers_wait_and_enter_sends_the_key(browser, monkeypatch):
    monkeypatch.setattr(ws_route, "AUTH_TIMEOUT_S", 0.3)  # the server's 30 s wait for the key, shortened
    with running_server(FakePipeline(), api_key="page-secret-key", default_side_px=64) as s:
        context = browser.new_context()
        page = context.new_page()
        page.set_default_timeout(TIMEOUT_MS)
        page.goto(s.url + "/")
        message = page.locator("#auth-message")
        sync_api.expect(message).to_have_text("enter the API key to connect")
        page.wait_for_timeout(1000)  # the server closed the connection for want of a key; the page reconnected
        sync_api.expect(message).to_have_text("enter the API key to connect")
        sync_api.expect(page.locator("#error")).to_have_text("")  # not 'send {"type": "auth", ...} first'
        page.locator("#api-key").fill("not-the-key")
        page.locator("#api-key").press("Enter")
        sync_api.expect(message).to_have_text("wrong API key")
        page.locator("#api-key").fill("page-secret-key")
        page.locator("#api-key").press("Enter")
        sync_api.expect(page.locator("#status")).to_have_text("connected")
        sync_api.expect(page.locator("#auth")).to_be_hidden()
        context.close()


def test_a_much_larger_request_asks_for_previews_again(browser, page_server):
    with page_recording_sent_frames(browser, page_server.url) as (page, sent):
        page.locator("#prompt").fill("small")
        wait_for_image_of(page, "small")
        page.locator("#prompt").fill("small again")
        wait_for_image_of(page, "small again")
        assert '"preview"' not in sent[-1]  # 64 px, 1 step: 50 ms
        page.locator("#steps").select_option("4")
        page.locator("#size").select_option("512x512")  # 256 times the work: some 13 s at the last result's pace
        wait_for_image_of(page, "Size: 512x512")
        assert '"preview":true' in sent[-1]


def test_an_empty_seed_is_random_and_only_whole_numbers_are_seeds(browser, page_server):
    with page_recording_sent_frames(browser, page_server.url) as (page, sent):
        page.locator("#prompt").fill("seedless")
        wait_for_image_of(page, "Seed: 42")
        page.locator("#seed").fill("")
        sync_api.expect(page.locator("#params")).not_to_contain_text("Seed: 42")
        seeds = {m["seed"] for m in generates(sent)[1:]}
        assert 0 not in seeds and 42 not in seeds  # random, not 0
        before = len(sent)
        page.locator("#seed").fill("1e3")
        sync_api.expect(page.locator("#error")).to_contain_text("seed must be a whole number")
        assert len(sent) == before


def test_a_change_that_changes_no_field_sends_nothing(browser, page_server):
    with page_recording_sent_frames(browser, page_server.url) as (page, sent):
        prompt = page.locator("#prompt")
        prompt.fill("steady")
        wait_for_image_of(page, "steady")
        before = len(generates(sent))
        prompt.press("End")
        prompt.press_sequentially("  ")  # the prompt is trimmed: the same request
        page.locator("summary").click()
        page.locator("#negative").fill("blurry")  # unused at guidance 0
        page.wait_for_timeout(400)
        assert len(generates(sent)) == before
        page.locator("#seed-lock").uncheck()  # unlocked: a new seed for each new request, not for each keystroke
        page.wait_for_timeout(300)
        assert len(generates(sent)) == before + 1
        prompt.press_sequentially(" ")
        page.wait_for_timeout(300)
        assert len(generates(sent)) == before + 1
        page.locator("#seed-random").click()  # asked for: sent
        page.wait_for_timeout(300)
        assert len(generates(sent)) == before + 2


def test_sizes_in_order_a_labelled_file_input_and_no_blank_upload(page, page_server):
    sizes = page.locator("#size option").evaluate_all("options => options.map((o) => o.value)")
    assert sizes == ["64x64", "256x256", "512x512"]
    sync_api.expect(page.get_by_label("Image", exact=True)).to_have_attribute("type", "file")
    page.locator("#prompt").fill("no file yet")
    wait_for_image_of(page, "no file yet")
    before = len(page_server.pipeline.calls)
    page.locator("input[name=source][value=upload]").check()  # until a file is chosen there is nothing to send
    page.wait_for_timeout(400)
    assert len(page_server.pipeline.calls) == before


def test_connection_changes_are_announced_and_webcam_results_are_not(page):
    status, latency = page.locator("#status"), page.locator("#latency")
    sync_api.expect(status).to_have_attribute("aria-live", "polite")  # "connected"
    page.locator("#prompt").fill("announced")
    wait_for_image_of(page, "announced")
    sync_api.expect(status).to_have_attribute("aria-live", "off")  # not the generating/connected of every request
    sync_api.expect(latency).to_have_attribute("aria-live", "polite")
    page.locator("input[name=source][value=webcam]").check()
    sync_api.expect(latency).to_have_attribute("aria-live", "off")  # ~15 results a second
    page.locator("input[name=source][value=none]").check()
    page.evaluate("state.ws.close()")
    page.wait_for_function(
        "() => { const s = document.getElementById('status'); "
        "return s.dataset.state === 'closed' && s.getAttribute('aria-live') === 'polite'; }"
    )


def test_a_preview_is_not_left_on_screen_when_the_connection_drops(browser):
    with (
        running_server(FakePipeline(delay_s=0.35, after_previews_s=1.5), default_side_px=64) as server,
        page_recording_sent_frames(browser, server.url) as (page, _),
    ):
        page.locator("#prompt").fill("kept")
        wait_for_image_of(page, "kept")
        page.locator("#prompt").fill("lost")
        result = page.locator("#result")
        sync_api.expect(result).to_have_class(re.compile("preview"))
        # The server goes away mid-generation; looked at as soon as the page knows, before a reconnect re-sends.
        class_after_close = page.evaluate(
            """async () => {
            const ws = state.ws;
            const closed = new Promise((resolve) => ws.addEventListener("close", resolve));  // after the page's onclose
            ws.close();
            await closed;
            return document.getElementById("result").className;
        }"""
        )
        assert class_after_close == ""
        # "kept" back (64 px), not the 8 px preview, well before "lost" could be generated again
        page.wait_for_function("() => document.getElementById('result').naturalWidth === 64", timeout=1000)
