"""The page in a real headless Chromium (the system's, driven by Playwright): draw a stroke, stream the
fake camera and the screen, load a picture for img2img, and check that images come back, with figures and history.

Skipped when Chromium or Playwright is missing, unless ``CCM_REQUIRE_BROWSER=1`` (CI sets it), where
that is a failure. ``CCM_SCREENSHOT=path`` also saves the page's screenshot there.
"""

from __future__ import annotations

import io
import os

import pytest
from PIL import Image

from ccm_sdk.app.server import GenerationService, server_url
from ccm_sdk.testing import browser

pytestmark = [pytest.mark.browser, pytest.mark.slow]


@pytest.fixture(scope="module", autouse=True)
def _browser_available():
    reason = browser.missing()
    if reason is not None:
        if os.environ.get("CCM_REQUIRE_BROWSER") == "1":
            pytest.fail(f"CCM_REQUIRE_BROWSER=1 but {reason}")
        pytest.skip(reason)


def _png_bytes(size: int = 64) -> bytes:
    image = Image.new("RGB", (size, size), (30, 120, 40))
    image.paste((230, 200, 40), (16, 16, 48, 48))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def test_draw_stream_the_camera_and_img2img_in_chromium(serve, pipe, tmp_path):
    service = GenerationService(pipe, model="tiny", initial_prompt="a red square")
    with serve(service) as server, browser.chromium_page() as page:
        errors = []
        page.on("pageerror", lambda exc: errors.append(str(exc)))
        page.goto(server_url(server))
        page.wait_for_function("document.getElementById('model').textContent.includes('tiny')")
        # the favicon and the values beside the sliders
        assert page.evaluate("fetch('/favicon.ico').then(r => r.status)") == 200
        assert page.text_content("#guidance-value") == "8" and page.text_content("#scale-value") == "1"

        # 1. draw a stroke: an image comes back, and the history keeps it under a name with prompt and seed
        page.fill("#seed", "3")
        box = page.locator("#canvas").bounding_box()
        page.mouse.move(box["x"] + 60, box["y"] + 60)
        page.mouse.down()
        page.mouse.move(box["x"] + 300, box["y"] + 250, steps=8)
        page.mouse.up()
        page.wait_for_selector("#history a[download='a-red-square-seed3.png']", state="attached", timeout=30_000)
        assert page.get_attribute("#save", "download") == "a-red-square-seed3.png"
        assert page.evaluate("document.getElementById('result').naturalWidth") == 64

        # 2. the fake camera through the stream: new images arrive, the figures are on screen
        page.check("#mode-camera")
        page.wait_for_function("globalThis.ccmStream.generated >= 5 && globalThis.ccmStream.shown.length >= 3", timeout=60_000)
        assert page.get_attribute("#result", "src").startswith("blob:")
        page.wait_for_function("document.getElementById('figures').textContent.includes('fps')")
        figures = page.text_content("#figures")
        assert "latency" in figures and "generated" in figures
        count = "document.querySelectorAll('#history a').length"
        before = page.evaluate(count)
        page.click("#remember")
        assert page.evaluate(count) == before + 1
        page.screenshot(path=str(tmp_path / "page.png"))
        if os.environ.get("CCM_SCREENSHOT"):
            page.screenshot(path=os.environ["CCM_SCREENSHOT"])

        # 3. the screen (getDisplayMedia), the control map made on the server with canny
        page.select_option("#condition", "canny")
        page.check("#mode-screen")
        page.wait_for_function("globalThis.ccmStream.generated >= 3 && globalThis.ccmStream.displayed >= 3", timeout=60_000)
        assert "canny on the server" in page.text_content("#status")

        # 4. img2img: a picture and a strength, the control map made on the server
        page.check("#mode-img2img")
        page.wait_for_function("globalThis.ccmStream.answers === 0")
        page.set_input_files("#upload", files=[{"name": "picture.png", "mimeType": "image/png", "buffer": _png_bytes()}])
        page.wait_for_function("globalThis.ccmStream.generated >= 1", timeout=30_000)
        assert page.get_attribute("#result", "src").startswith("blob:")
        page.click("#stop")
        assert page.is_checked("#mode-draw")
        assert errors == []
    assert Image.open(tmp_path / "page.png").size == (1100, 900)
