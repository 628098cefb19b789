"""Headless Chromium (Debian's chromium and chromium-driver) through
selenium, for the dashboard's browser test.

Where the browser, its driver or selenium is missing the test skips, saying
so; CI installs them and sets ``PQ_TEST_REQUIRE_BROWSER``, and then a
missing one is a failure. Nothing here downloads a browser: the driver is
the system's chromedriver, the binary the system's chromium.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from selenium.webdriver.chrome.webdriver import WebDriver

#: Where the browser and its driver are (``PQ_TEST_CHROMIUM``,
#: ``PQ_TEST_CHROMEDRIVER`` override them).
CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
#: Window size of the screenshots docs/web.md shows.
WINDOW = (1280, 1000)

FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
    f"--window-size={WINDOW[0]},{WINDOW[1]}",
)


def _paths() -> tuple[str, str]:
    return (
        os.environ.get("PQ_TEST_CHROMIUM", CHROMIUM),
        os.environ.get("PQ_TEST_CHROMEDRIVER", CHROMEDRIVER),
    )


def _missing() -> str:
    browser, driver = _paths()
    for path, package in ((browser, "chromium"), (driver, "chromium-driver")):
        if not (os.path.exists(path) or shutil.which(path)):
            return f"{path} not installed (Debian package {package}; .ci/run installs it)"
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium not installed (pip install -e '.[dev]')"
    return ""


@contextmanager
def chromium(profile: Path) -> Iterator[WebDriver]:
    """A headless Chromium with a fresh profile under ``profile``, quit on the
    way out; skip (fail under ``PQ_TEST_REQUIRE_BROWSER``) when there is none."""
    why = _missing()
    if why:
        if os.environ.get("PQ_TEST_REQUIRE_BROWSER"):
            pytest.fail(why)
        pytest.skip(why)
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    browser, driver_path = _paths()
    options = webdriver.ChromeOptions()
    options.binary_location = browser
    for flag in (*FLAGS, f"--user-data-dir={profile}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(options=options, service=Service(driver_path))
    try:
        driver.set_page_load_timeout(30)
        yield driver
    finally:
        driver.quit()
