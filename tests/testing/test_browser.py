"""ccm_sdk.testing.browser: which Chromium is driven, and why the browser cannot run when it cannot."""

from __future__ import annotations

import pytest

from ccm_sdk.testing import browser


def test_ccm_chromium_picks_the_browser(monkeypatch, tmp_path):
    fake = tmp_path / "my-chromium"
    fake.write_text("")
    monkeypatch.setenv("CCM_CHROMIUM", str(fake))
    assert browser.find_chromium() == str(fake)
    monkeypatch.setenv("CCM_CHROMIUM", str(tmp_path / "absent"))
    assert browser.find_chromium() is None


def test_a_missing_chromium_is_named_with_the_setup_script(monkeypatch, tmp_path):
    pytest.importorskip("playwright.sync_api", reason="Playwright is not installed: the other reason is reported first")
    monkeypatch.setenv("CCM_CHROMIUM", str(tmp_path / "absent"))
    assert "scripts/setup-browser.sh" in browser.missing()
    with pytest.raises(RuntimeError, match="Chromium is not installed"):
        with browser.chromium_page():
            pass


def test_the_fake_camera_and_its_permission_are_on():
    assert "--use-fake-device-for-media-stream=fps=30" in browser.CHROMIUM_ARGS  # a webcam's rate, not the fake's 20
    assert "--use-fake-ui-for-media-stream" in browser.CHROMIUM_ARGS
