"""Debian chromium for the page tests (Playwright, never ``playwright install``): a browser
fixture and a login that records every problem a page shows in the console or the network.

``page.problems`` collects console errors, uncaught script errors, Content-Security-Policy
violations (they are console errors), failed requests and responses with status >= 400
(favicon included). A test that expects a 4xx (an error page) reads and clears it.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
if os.environ.get("UPDATE_SCREENSHOTS") in {"1", "true", "yes"}:
    SHOTS = ROOT / "docs" / "screenshots"
else:
    SHOTS = Path(os.environ.get("UI_SCREENSHOT_DIR")
                 or Path(os.environ.get("VAR_DIR") or "/tmp") / "ui-screenshots")
CHROMIUM = "/usr/bin/chromium"
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--no-first-run"]
PASSWORD = "a-long-test-password-1"
DESKTOP = {"width": 1366, "height": 860}
PHONE = {"width": 390, "height": 844}


def launch():
    """Yield a headless Debian chromium (skip, or fail under REQUIRE_SERVICES=1, without it);
    a test module makes it a fixture: ``yield from launch()``."""
    if not Path(CHROMIUM).exists() or shutil.which("chromium") is None:
        if os.environ.get("REQUIRE_SERVICES") in {"1", "true", "yes"}:
            pytest.fail("REQUIRE_SERVICES=1 but Debian chromium is not installed")
        pytest.skip("Debian chromium is not installed (/usr/bin/chromium)")
    # Playwright's sync API runs an event loop in this thread; the ORM calls of the test
    # itself stay synchronous. Only for these tests (check --deploy refuses the variable).
    previous = os.environ.get("DJANGO_ALLOW_ASYNC_UNSAFE")
    os.environ["DJANGO_ALLOW_ASYNC_UNSAFE"] = "true"
    from playwright.sync_api import sync_playwright

    try:
        with sync_playwright() as pw:
            chromium = pw.chromium.launch(executable_path=CHROMIUM, args=ARGS, headless=True)
            yield chromium
            chromium.close()
    finally:
        if previous is None:
            os.environ.pop("DJANGO_ALLOW_ASYNC_UNSAFE", None)
        else:
            os.environ["DJANGO_ALLOW_ASYNC_UNSAFE"] = previous


def watch(page) -> None:
    """Attach the problem collectors to ``page`` (``page.problems``, a list of strings)."""
    page.problems = []
    page.on("console", lambda m: m.type == "error" and page.problems.append(
        f"console on {page.url}: {m.text[:160]}"))
    page.on("pageerror", lambda e: page.problems.append(f"script on {page.url}: {e}"))
    page.on("requestfailed", lambda r: _navigation_aborted_favicon(r) or page.problems.append(
        f"failed: {r.method} {r.url} ({r.failure})"))
    page.on("response", lambda r: r.status >= 400 and page.problems.append(
        f"HTTP {r.status}: {r.request.method} {r.url}"))


def _navigation_aborted_favicon(request) -> bool:
    """Chromium fetches the favicon after the page's load event; when the test navigates on
    first, that fetch is cancelled (net::ERR_ABORTED), which is no failure of the page. The
    favicon itself is checked by ``test_the_favicon_is_served`` (a missing one answers 404,
    which the response check above also catches whenever the fetch completes)."""
    return request.url.endswith("/favicon.svg") and "ERR_ABORTED" in (request.failure or "")


def new_page(browser, viewport=DESKTOP):
    context = browser.new_context(viewport=viewport, accept_downloads=True)
    context.set_default_timeout(15_000)
    page = context.new_page()
    watch(page)
    return page


def log_in(page, live_server, username: str, path: str = "/accounts/login/") -> None:
    page.goto(f"{live_server.url}{path}")
    page.fill("#id_username", username)
    page.fill("#id_password", PASSWORD)
    page.click("button[type=submit]")
    page.wait_for_url(lambda url: "/accounts/login/" not in url)


def login(browser, live_server, username: str, viewport=DESKTOP):
    page = new_page(browser, viewport)
    log_in(page, live_server, username)
    return page


def shot(page, name: str) -> None:
    """A viewport screenshot into a scratch folder, or docs/screenshots/ with
    ``UPDATE_SCREENSHOTS=1`` (``make screenshots``); palette-reduced so the PNGs stay small."""
    import io

    from PIL import Image

    SHOTS.mkdir(parents=True, exist_ok=True)
    picture = Image.open(io.BytesIO(page.screenshot())).convert("RGB")
    picture.quantize(colors=256, method=Image.Quantize.MEDIANCUT).save(
        SHOTS / f"{name}.png", optimize=True)
