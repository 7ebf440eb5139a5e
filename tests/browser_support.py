"""Driving the FiftyOne App in Debian's Chromium with Playwright.

Nothing here downloads a browser: Playwright drives ``/usr/bin/chromium``
(``make browser`` installs it). Screenshots go to the git-ignored
``artifacts/browser/`` folder.
"""

import os
import socket
import warnings
from contextlib import contextmanager
from pathlib import Path

import pytest

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--disable-quic",
]
ARTIFACTS = Path(__file__).resolve().parents[1] / "artifacts" / "browser"


def require_browser():
    """Skips the calling test, loudly, when Chromium or Playwright is missing."""
    reason = None
    if not os.access(CHROMIUM, os.X_OK):
        reason = (
            "%s is missing: the real-browser test of the App did NOT run. "
            "Install it with `make browser` (apt-get install chromium, as "
            "root)" % CHROMIUM
        )
    else:
        try:
            import playwright.sync_api  # noqa: F401
        except ImportError:
            reason = (
                "playwright is not installed: the real-browser test of the "
                "App did NOT run (pip install -e '.[dev]')"
            )
    if reason is not None:
        warnings.warn(reason)
        pytest.skip(reason)


def free_port():
    """A TCP port nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextmanager
def app_server():
    """Serves the FiftyOne App on localhost; yields its URL.

    This is the server ``fo.launch_app()`` and ``fiftyone app launch``
    start, without a Python session attached (whose client would retry
    connecting while the server boots): a child process that inherits this
    process's private database and plugins directory, stopped on exit.
    """
    import fiftyone.core.service as fos

    port = free_port()
    server = fos.ServerService(port)
    try:
        yield "http://localhost:%d" % port
    finally:
        server.stop()


#: Errors the FiftyOne App itself raises now and then, not the plugin's:
#: "entry is loading" comes from the App's grid while it reloads the view
#: (after a modal closes, or an operator sets a new view).
KNOWN_APP_ERRORS = {"entry is loading"}


def plugin_errors(page):
    """The page errors collected so far, less the App's known transient ones."""
    return [e for e in page.errors if e not in KNOWN_APP_ERRORS]


@contextmanager
def browser_page(width=1400, height=900):
    """A fresh headless Chromium page; collects page errors in ``.errors``."""
    from playwright.sync_api import sync_playwright

    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS
        )
        try:
            page = browser.new_page(viewport={"width": width, "height": height})
            page.errors = []
            page.on("pageerror", lambda error: page.errors.append(str(error)))
            yield page
        finally:
            browser.close()


def screenshot(page, name, element=None):
    """Saves a screenshot of the page (or one element) under artifacts/."""
    path = ARTIFACTS / ("%s.png" % name)
    (element or page).screenshot(path=str(path))
    return path


@contextmanager
def on_failure(page, name):
    """Saves a screenshot (and the page's HTML) when the block fails."""
    try:
        yield
    except BaseException:
        screenshot(page, name)
        (ARTIFACTS / ("%s.html" % name)).write_text(page.content())
        raise


def open_dataset(page, base_url, dataset_name, timeout_ms=90_000):
    """Opens the dataset's grid and waits until its samples render."""
    from urllib.parse import quote

    page.goto(
        "%s/datasets/%s" % (base_url, quote(dataset_name)), wait_until="load"
    )
    page.wait_for_selector('[data-cy="looker"]', timeout=timeout_ms)
    # the "Explore Enterprise" pop-up and the analytics banner
    for text in ("Dismiss", "Disable"):
        try:
            page.get_by_text(text, exact=True).first.click(timeout=3_000)
        except Exception:
            pass


def run_operator(page, label, timeout_ms=30_000):
    """Opens the operator browser (backtick), picks ``label``, opens its form."""
    page.locator("body").click(position={"x": 5, "y": 5})
    page.keyboard.press("`")
    page.keyboard.type(label.split(": ", 1)[-1])
    page.get_by_text(label, exact=True).click(timeout=timeout_ms)


def colored_pixels(png_path, min_saturation=80):
    """How many clearly coloured (non-grey) pixels a screenshot holds."""
    import numpy as np
    from PIL import Image

    pixels = np.asarray(Image.open(png_path).convert("RGB")).astype(int)
    spread = pixels.max(axis=2) - pixels.min(axis=2)
    return int((spread >= min_saturation).sum())


def appears(locator, timeout_ms=30_000):
    """Whether ``locator`` becomes visible within the timeout."""
    from playwright.sync_api import TimeoutError as PlaywrightTimeout

    try:
        locator.wait_for(timeout=timeout_ms)
    except PlaywrightTimeout:
        return False
    return True
