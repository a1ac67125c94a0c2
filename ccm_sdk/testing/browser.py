"""Headless Chromium for the page's tests and benchmark: the system's Chromium (Debian's package), driven
by Playwright for Python through ``executable_path``; no browser is downloaded.

``scripts/setup-browser.sh`` installs Chromium where it is missing; Playwright comes with the ``dev`` extra.
Chromium's fake camera (``--use-fake-device-for-media-stream``) is a moving test pattern, here at 30 frames
a second like a webcam (20 by default, which would cap the measured frame rate), and
``--use-fake-ui-for-media-stream`` grants the camera and screen without asking.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Iterator
from typing import Any

CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome")
CHROMIUM_ARGS = (
    "--use-fake-device-for-media-stream=fps=30",  # a webcam's 30 frames a second (Chromium's default for it is 20)
    "--use-fake-ui-for-media-stream",
    "--auto-select-desktop-capture-source=Entire screen",
    "--no-sandbox",  # CI containers run as root, where Chromium's sandbox cannot start
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--autoplay-policy=no-user-gesture-required",
)


def find_chromium() -> str | None:
    """The Chromium to drive: ``$CCM_CHROMIUM``, else the first of :data:`CHROMIUM_NAMES` on the PATH."""
    chosen = os.environ.get("CCM_CHROMIUM")
    if chosen:
        return chosen if os.path.exists(chosen) else None
    return next((path for name in CHROMIUM_NAMES if (path := shutil.which(name))), None)


def missing() -> str | None:
    """Why the browser cannot run here (None when it can)."""
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "Playwright for Python is not installed (pip install -e '.[dev]')"
    if find_chromium() is None:
        return "Chromium is not installed (bash scripts/setup-browser.sh installs the Debian package)"
    return None


@contextlib.contextmanager
def chromium_page(*, width: int = 1100, height: int = 900) -> Iterator[Any]:
    """A Playwright page in headless system Chromium with the fake camera; closed on exit."""
    from playwright.sync_api import sync_playwright

    reason = missing()
    if reason is not None:
        raise RuntimeError(reason)
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=find_chromium(), headless=True, args=list(CHROMIUM_ARGS))
        try:
            page = browser.new_page(viewport={"width": width, "height": height})
            yield page
        finally:
            browser.close()
