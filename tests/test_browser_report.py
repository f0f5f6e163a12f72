"""A run's HTML report in a real browser, with no server: Debian's chromium (via Playwright) opens
the file from disk with every network request refused, shows every section, loads every image,
and prints the page to PDF. Leaves test-artifacts/report.png (and report.pdf) to look at.

Skipped when playwright or /usr/bin/chromium is missing. Never runs `playwright install`.
"""
from __future__ import annotations

from pathlib import Path

import pytest

from conftest import class_folders, tiny_run_config, train_apart
from core.results.report import RUN_SECTIONS, save_run_report
# Importing test_browser skips this module too when chromium is missing.
from test_browser import ARTIFACTS, CHROMIUM, CHROMIUM_ARGS, expect, sync_api

pytestmark = [pytest.mark.slow, pytest.mark.browser]


@pytest.fixture(scope="module")
def report_file(tmp_path_factory) -> Path:
    """report.html of a finished tiny run (test_resnet, 3 classes, one with HTML in its name)."""
    base = tmp_path_factory.mktemp("browser_report")
    data = class_folders(base / "data", ["<b>cat&dog", "plain", "stripes"])
    run = train_apart(tiny_run_config(data), base)
    return save_run_report(run)


@pytest.fixture
def offline_page():
    """A chromium page whose every request other than file: and data: is aborted and recorded;
    yields (page, refused urls, console errors)."""
    refused, errors = [], []

    def gate(route):
        url = route.request.url
        if url.startswith(("file:", "data:")):
            route.continue_()
        else:
            refused.append(url)
            route.abort()

    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            context = browser.new_context(viewport={"width": 1200, "height": 900})
            context.route("**/*", gate)
            page = context.new_page()
            page.on("console", lambda msg: errors.append(msg.text) if msg.type == "error" else None)
            yield page, refused, errors
        finally:
            browser.close()


def test_report_opens_offline_with_every_section_and_image(report_file, offline_page):
    page, refused, errors = offline_page
    page.goto(report_file.as_uri(), wait_until="load")
    expect(page).to_have_title(f"Run {report_file.parent.name}")
    for sid, title in RUN_SECTIONS.items():
        heading = page.locator(f"section#{sid} > h2")
        heading.scroll_into_view_if_needed()
        expect(heading).to_be_visible()
        expect(heading).to_have_text(title)
    images = page.evaluate("() => Array.from(document.images, i => [i.complete, i.naturalWidth, i.alt])")
    assert len(images) > 30
    assert [alt for complete, width, alt in images if not complete or width == 0] == []
    expect(page.get_by_text("<b>cat&dog").first).to_be_attached()     # shown as text, not markup
    assert refused == [] and errors == []

    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "report.png"), full_page=True)
    page.emulate_media(media="print")
    pdf = page.pdf(format="A4", print_background=True)
    assert pdf.startswith(b"%PDF") and len(pdf) > 20_000
    (ARTIFACTS / "report.pdf").write_bytes(pdf)
