"""The web UI in a real headless browser: Debian's chromium driven by Playwright, against the real server
(kolors.serve) running the tiny model under uvicorn on a free local port.

Playwright only drives the browser: it is pointed at /usr/bin/chromium and never downloads one of its own.
"""

from __future__ import annotations

import re
import socket
import threading
import time
from pathlib import Path

import pytest
import torch
from PIL import Image

CHROMIUM = Path("/usr/bin/chromium")
if not CHROMIUM.is_file():
    pytest.skip(
        f"{CHROMIUM} is absent: apt-get install chromium (.ci/run does) to run the browser test",
        allow_module_level=True,
    )
sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is absent: pip install -e '.[test]'")
uvicorn = pytest.importorskip("uvicorn", reason="the server extra is absent: pip install -e '.[server]'")

from kolors.pipeline import KolorsPipeline  # noqa: E402
from kolors.serve import ServerConfig, create_app  # noqa: E402

# Without the background-networking flags chromium keeps calling home, which a closed network answers slowly.
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
TIMEOUT_MS = 120_000  # generous: CI machines are small and shared
PROMPT = "一只戴着宇航员头盔的柴犬, cinematic light"
MAX_SIZE = 256  # the server's size limit in these tests, so a bad size is one the server refuses
API_KEY = "test-key-123"
MANY_STEPS = 500  # a run long enough to interrupt on any machine


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """uvicorn serving `app` from a background thread, stopped by `close`."""

    def __init__(self, app):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/"
        config = uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning", lifespan="on")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 60
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the test server did not start")
            time.sleep(0.05)

    def close(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)


@pytest.fixture(scope="module")
def pipe(tiny_model_dir):
    return KolorsPipeline.from_pretrained(tiny_model_dir, dtype=torch.float32, device="cpu")


@pytest.fixture(scope="module")
def server(pipe):
    s = Server(create_app(pipe, ServerConfig(max_width=MAX_SIZE, max_height=MAX_SIZE, max_steps=MANY_STEPS)))
    yield s
    s.close()


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    with sync_api.sync_playwright() as p:
        context = p.chromium.launch_persistent_context(
            tmp_path_factory.mktemp("chromium-profile"),  # a fresh --user-data-dir
            executable_path=str(CHROMIUM),
            headless=True,
            args=CHROMIUM_ARGS,
            accept_downloads=True,
        )
        context.set_default_timeout(TIMEOUT_MS)
        yield context
        context.close()


def open_page(browser, url: str):
    """A fresh tab on the UI; JavaScript errors on it are recorded in `page.errors`."""
    page = browser.new_page()
    page.errors = []
    page.on("pageerror", lambda e: page.errors.append(str(e)))
    page.goto(url)
    return page


def wait_for_samplers(page) -> None:
    """The page is ready once it has filled its sampler list from the server."""
    try:
        page.wait_for_function("document.querySelector('#sampler').options[0].value !== ''", timeout=30_000)
    except sync_api.TimeoutError:
        pytest.fail(
            f"the page did not load the server's samplers; it shows {page.inner_text('#error')!r}, "
            f"JavaScript errors: {page.errors}"
        )


@pytest.fixture
def page(browser, server):
    page = open_page(browser, server.url)
    wait_for_samplers(page)
    yield page
    errors = page.errors
    page.close()
    assert not errors, f"JavaScript errors on the page: {errors}"


def set_number(page, selector: str, value) -> None:
    """Type into a number field and leave it, as a person does (the page reacts on `change`)."""
    page.fill(selector, str(value))
    page.dispatch_event(selector, "change")


def generate(page) -> None:
    """Click Generate and wait until the page is idle again."""
    page.click("#generate")
    page.wait_for_function("document.querySelector('#generate-form').getAttribute('aria-busy') === 'false'")


def download_newest(page, tmp_path: Path) -> Path:
    with page.expect_download() as download:
        page.click("#gallery li:first-child a.download")
    name = download.value.suggested_filename
    assert name.endswith(".png"), name
    path = tmp_path / name
    download.value.save_as(path)
    return path


def newest_image_size(page) -> tuple[int, int]:
    return page.eval_on_selector(
        "#gallery li:first-child img", "img => img.complete && [img.naturalWidth, img.naturalHeight]"
    )


def test_text_to_image_shows_the_image_its_seed_and_downloads_the_png_with_its_parameters(page, tmp_path):
    assert page.locator("#sampler option").count() >= 1  # filled from /sdapi/v1/samplers
    page.fill("#prompt", PROMPT)
    page.select_option("#size-preset", "512x512")
    assert (page.input_value("#width"), page.input_value("#height")) == ("512", "512")
    set_number(page, "#width", 61)  # the page keeps sizes on multiples of 8
    set_number(page, "#height", 64)
    assert page.input_value("#width") == "64"
    assert page.input_value("#size-preset") == "custom"
    set_number(page, "#steps", 2)
    assert page.input_value("#seed") == "-1"  # random by default

    generate(page)

    assert page.is_hidden("#error"), page.inner_text("#error")
    # no IP-Adapter or FaceID on this server: their slots are not offered
    assert page.is_hidden("#ip-fieldset") and page.is_hidden("#face-fieldset")
    assert page.locator("#gallery li").count() == 1
    page.wait_for_function("document.querySelector('#gallery li img').complete")
    assert newest_image_size(page) == [64, 64]
    seed = int(re.fullmatch(r"Seed (\d+)", page.inner_text("#gallery li .seed")).group(1))

    # The download is the PNG as the server made it, metadata included, not a re-encoded canvas.
    with Image.open(download_newest(page, tmp_path)) as im:
        assert im.size == (64, 64)
        parameters = im.text["parameters"]
    assert parameters.startswith(PROMPT)
    assert f"Seed: {seed}" in parameters and "Steps: 2" in parameters and "Size: 64x64" in parameters

    # The large view shows the same image and offers its seed back to the form.
    page.click("#gallery li:first-child .thumb")
    assert page.is_visible("#viewer")
    assert f"Seed: {seed}" in page.inner_text("#viewer-info")
    page.click("#viewer-reuse")
    assert page.input_value("#seed") == str(seed)
    assert page.is_hidden("#viewer")


def test_a_size_the_server_refuses_is_shown_inline_and_adds_nothing(page):
    page.fill("#prompt", PROMPT)
    set_number(page, "#width", MAX_SIZE + 64)
    set_number(page, "#height", 64)
    set_number(page, "#steps", 2)

    generate(page)

    assert page.is_visible("#error")
    assert "width" in page.inner_text("#error").lower()
    assert page.locator("#gallery li").count() == 0
    assert page.is_enabled("#generate")  # and the page can try again

    set_number(page, "#width", 64)
    generate(page)
    assert page.is_hidden("#error")
    assert page.locator("#gallery li").count() == 1


def test_image_to_image_from_an_uploaded_file(page, tmp_path):
    init = tmp_path / "start.png"
    Image.new("RGB", (75, 64), (200, 80, 40)).save(init)
    page.fill("#prompt", "红色的抽象画")
    assert page.is_disabled("#strength")  # strength means nothing without a start image

    page.set_input_files("#init-image", init)
    page.wait_for_selector("#init-box:not([hidden])")
    # The size fields take the image's size, down to a multiple of 8.
    assert (page.input_value("#width"), page.input_value("#height")) == ("72", "64")
    page.eval_on_selector("#strength", "el => { el.value = '0.6'; el.dispatchEvent(new Event('input')); }")
    assert page.inner_text("#strength-value") == "0.60"
    set_number(page, "#steps", 4)

    generate(page)

    assert page.is_hidden("#error"), page.inner_text("#error")
    assert page.locator("#gallery li").count() == 1
    page.wait_for_function("document.querySelector('#gallery li img').complete")
    assert newest_image_size(page) == [72, 64]
    with Image.open(download_newest(page, tmp_path)) as im:
        assert "Denoising strength: 0.6" in im.text["parameters"]

    page.click("#clear-image")
    assert page.is_hidden("#init-box") and page.is_disabled("#strength")


def test_inpainting_with_a_painted_mask_keeps_the_rest(page, tmp_path):
    import numpy as np

    init = tmp_path / "start.png"
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(init)
    page.fill("#prompt", "a red hat")
    page.set_input_files("#init-image", init)
    page.wait_for_selector("#mask-box:not([hidden])")
    assert page.inner_text("#generate") == "Generate from image"
    page.wait_for_function("document.querySelector('#mask-image').complete")
    page.locator("#mask-canvas").scroll_into_view_if_needed()
    box = page.locator("#mask-canvas").bounding_box()
    y = box["y"] + box["height"] * 0.7
    page.mouse.move(box["x"] + box["width"] * 0.2, y)
    page.mouse.down()
    page.mouse.move(box["x"] + box["width"] * 0.8, y, steps=5)
    page.mouse.up()
    assert page.inner_text("#generate") == "Inpaint"
    page.eval_on_selector("#strength", "el => { el.value = '1'; el.dispatchEvent(new Event('input')); }")
    set_number(page, "#steps", 2)

    generate(page)

    assert page.is_hidden("#error"), page.inner_text("#error")
    page.wait_for_function("document.querySelector('#gallery li img').complete")
    path = download_newest(page, tmp_path)
    with Image.open(path) as im:
        assert "Mask blur: 4" in im.text["parameters"]
        result = np.asarray(im.convert("RGB"), dtype=int)
    original = np.asarray(Image.open(init).convert("RGB"), dtype=int)
    assert np.array_equal(result[:24], original[:24])  # far above the stroke: kept exactly
    assert np.abs(result[42:48, 20:44] - original[42:48, 20:44]).mean() > 10  # under the stroke: redrawn

    # Invert repaints the rest; clearing the mask is plain image to image again.
    page.click("#invert-mask")
    assert page.inner_text("#generate") == "Inpaint"
    page.click("#clear-mask")
    assert page.inner_text("#generate") == "Generate from image"


def test_progress_is_shown_while_generating_and_interrupt_stops_the_run(page):
    page.fill("#prompt", PROMPT)
    set_number(page, "#width", 64)
    set_number(page, "#height", 64)
    set_number(page, "#steps", MANY_STEPS)
    page.click("#generate")
    # The page polls /internal/progress for its own task: "Step i of N" once the worker has taken the job.
    page.wait_for_function(
        f"/Step [1-9]\\d* of {MANY_STEPS}/.test(document.querySelector('#progress-text').textContent)"
    )
    assert page.is_enabled("#interrupt")

    page.click("#interrupt")

    page.wait_for_function("document.querySelector('#generate-form').getAttribute('aria-busy') === 'false'")
    assert page.is_hidden("#progress-box") and page.is_disabled("#interrupt")
    # Stopped after a few of its steps: as AUTOMATIC1111, the server answers the image as far as it got.
    page.wait_for_function("document.querySelectorAll('#gallery li').length === 1")


def test_the_api_key_is_sent_as_a_bearer_token_and_remembered(browser, pipe):
    server = Server(create_app(pipe, ServerConfig(api_key=API_KEY)))
    try:
        page = open_page(browser, server.url)
        # Without the key the server refuses the page's API calls, and the page says what to do.
        page.wait_for_selector("#error:not([hidden])")
        assert "API key" in page.inner_text("#error")
        assert page.is_visible("#api-key")

        page.fill("#api-key", API_KEY)
        page.dispatch_event("#api-key", "change")
        wait_for_samplers(page)
        page.fill("#prompt", PROMPT)
        set_number(page, "#width", 64)
        set_number(page, "#height", 64)
        set_number(page, "#steps", 1)
        generate(page)
        assert page.locator("#gallery li").count() == 1, page.inner_text("#error")

        page.reload()  # the key stays in this browser's localStorage
        assert page.input_value("#api-key") == API_KEY
        page.evaluate("localStorage.clear()")
        assert not page.errors, page.errors
        page.close()
    finally:
        server.close()


def in_viewport(page, selector: str) -> bool:
    """The element's whole box is inside the window, without scrolling."""
    return page.evaluate(
        """(sel) => { const r = document.querySelector(sel).getBoundingClientRect();
                     return r.width > 0 && r.top >= 0 && r.left >= 0 &&
                            r.bottom <= window.innerHeight && r.right <= window.innerWidth; }""",
        selector,
    )


@pytest.mark.parametrize(("width", "height"), [(1366, 768), (1920, 960)])
def test_generate_progress_and_errors_are_in_view_on_a_desktop(browser, server, width, height, tmp_path):
    page = open_page(browser, server.url)
    try:
        page.set_viewport_size({"width": width, "height": height})
        wait_for_samplers(page)
        assert in_viewport(page, "#prompt") and in_viewport(page, "#generate")
        page.fill("#prompt", PROMPT)
        set_number(page, "#width", MAX_SIZE + 8)  # refused by the server: the error shows where Generate is
        page.press("#prompt", "Control+Enter")
        page.wait_for_selector("#error:not([hidden])")
        assert in_viewport(page, "#error"), page.inner_text("#error")
        set_number(page, "#width", 64)
        set_number(page, "#height", 64)
        set_number(page, "#steps", MANY_STEPS)
        page.click("#generate")
        page.wait_for_selector("#progress-box:not([hidden])")
        assert in_viewport(page, "#progress-box") and in_viewport(page, "#interrupt")
        page.screenshot(path=str(tmp_path / f"desktop-{width}.png"))
        page.click("#interrupt")
        page.wait_for_function(
            "document.querySelector('#generate-form').getAttribute('aria-busy') === 'false'"
        )
    finally:
        page.close()


@pytest.mark.parametrize("width", [320, 390])
def test_no_horizontal_scroll_on_a_phone(browser, server, width, tmp_path):
    page = open_page(browser, server.url)
    try:
        page.set_viewport_size({"width": width, "height": 800})
        wait_for_samplers(page)
        page.set_input_files("#init-image", [])  # the file field as it is before a file is chosen
        widths = page.evaluate("[document.documentElement.scrollWidth, window.innerWidth]")
        assert widths[0] <= widths[1], f"document {widths[0]} px wide in a {widths[1]} px window"
        page.screenshot(path=str(tmp_path / f"phone-{width}.png"), full_page=True)
    finally:
        page.close()


def test_the_page_follows_its_own_job_behind_another_one(browser, pipe):
    """Another client's job holds the only worker: the page shows its own place in the queue (A1111's
    /internal/progress with the request's force_task_id), and its Interrupt takes its job out of the queue
    without touching the other one."""
    import httpx

    from tests.server_helpers import GatedPipe, wait_until

    gated = GatedPipe(pipe, hold_at=0)
    app = create_app(gated, ServerConfig(max_width=MAX_SIZE, max_height=MAX_SIZE))
    server = Server(app)
    body = {"prompt": "x", "steps": 1, "width": 64, "height": 64, "force_task_id": "other"}
    other = threading.Thread(
        target=httpx.post, args=(f"{server.url}sdapi/v1/txt2img",), kwargs={"json": body, "timeout": 120}
    )
    try:
        other.start()
        assert gated.holding.wait(60)
        page = open_page(browser, server.url)
        wait_for_samplers(page)
        page.fill("#prompt", PROMPT)
        set_number(page, "#width", 64)
        set_number(page, "#height", 64)
        page.click("#generate")
        page.wait_for_function(
            "document.querySelector('#progress-text').textContent === 'In queue: 1/1'", timeout=30_000
        )
        page.click("#interrupt")
        page.wait_for_function(
            "document.querySelector('#generate-form').getAttribute('aria-busy') === 'false'"
        )
        assert page.inner_text("#error") == "Interrupted before an image was finished."
        assert [job.task_id for job in app.state.queue.running()] == ["other"]
        assert not app.state.queue.running()[0].interrupted and app.state.queue.waiting() == 0
    finally:
        gated.release.set()
        other.join(120)
        server.close()
    wait_until(lambda: app.state.queue.finished == 1, "the other job to finish")
