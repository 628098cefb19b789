"""The browser test's helper: without Chromium it skips, saying why, but
under CI (``PQ_TEST_REQUIRE_BROWSER``) it fails, so a CI run cannot pass
without having driven the dashboard in a browser."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.browser import chromium


def test_a_missing_browser_skips_and_under_ci_fails(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("PQ_TEST_CHROMIUM", str(tmp_path / "no-chromium"))
    monkeypatch.delenv("PQ_TEST_REQUIRE_BROWSER", raising=False)
    with pytest.raises(pytest.skip.Exception, match="no-chromium"), chromium(tmp_path):
        pass
    monkeypatch.setenv("PQ_TEST_REQUIRE_BROWSER", "1")
    with pytest.raises(pytest.fail.Exception, match="no-chromium"), chromium(tmp_path):
        pass
