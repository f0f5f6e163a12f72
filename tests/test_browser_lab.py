"""The Home page's Quick demo in a real browser: a `streamlit run` server and Debian's chromium
driven by Playwright (the server and browser fixtures come from tests/test_browser.py). One click
trains the embedded demo (1,000 Fashion-MNIST images, bundled MobileNetV2, head only) and, when it
has finished, the app opens the Evaluate page by itself. Leaves test-artifacts/quick_demo.png.

Skipped when playwright or /usr/bin/chromium is missing. Never runs `playwright install`.
"""
from __future__ import annotations

import re
import time

import pytest

# Importing test_browser skips this module too when chromium is missing.
from test_browser import app_page, browser, expect, metric_value, screenshot, server, settle  # noqa: F401 - fixtures by name

pytestmark = [pytest.mark.slow, pytest.mark.browser]

QUICK_DEMO_TIMEOUT_MS = 150_000


def test_quick_demo_opens_evaluate(server, browser):
    with app_page(browser, server) as page:
        expect(page.get_by_text("without writing code")).to_be_visible()
        expect(page.get_by_role("link", name="3. Train")).to_be_visible()

        started = time.monotonic()
        page.get_by_role("button", name=re.compile("Quick demo")).click()
        # while it trains, Home shows its progress; when it is done, the app opens Evaluate
        expect(page.get_by_role("heading", name="Evaluate")).to_be_visible(timeout=QUICK_DEMO_TIMEOUT_MS)
        accuracy = metric_value(page, "Accuracy")
        expect(accuracy).to_have_text(re.compile(r"^\d+\.\d%$"), timeout=60_000)
        elapsed = time.monotonic() - started
        settle(page)
        expect(page.get_by_text("150 test images")).to_be_visible()
        expect(page.get_by_role("combobox", name="Run")).to_have_value(re.compile(r"Quick demo · finished"))
        expect(page.get_by_text("Why are validation and test accuracy different?")).to_be_visible()
        screenshot(page, "quick_demo.png")
        print(f"\nQuick demo: click -> Evaluate with test accuracy {accuracy.inner_text()} in {elapsed:.1f} s")
