"""AppTest helpers shared by the page tests."""
from __future__ import annotations

from pathlib import Path

from streamlit.testing.v1 import AppTest

ENTRY = str(Path(__file__).resolve().parents[1] / "streamlit_app.py")


def assert_ok(at: AppTest) -> None:
    assert not at.exception, [e.value for e in at.exception]


def opened(page: str | None = None, timeout: float = 120) -> AppTest:
    """The app run once from its entry file (Home), then switched to `page`."""
    at = AppTest.from_file(ENTRY, default_timeout=timeout).run()
    assert_ok(at)
    if page:
        at.switch_page(page).run()
        assert_ok(at)
    return at
