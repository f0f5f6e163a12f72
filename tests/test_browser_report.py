"""A run's HTML report in a real browser, with no server: Debian's chromium (via Playwright) opens
the file from disk with every network request refused, shows every section, loads every image,
and prints the page to PDF. Leaves test-artifacts/report.png (and report.pdf) to look at.

Skipped when playwright or /usr/bin/chromium is missing. Never runs `playwright install`.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

import core
from conftest import class_image
from core.report import RUN_SECTIONS, save_run_report
from core.runs import RunConfig

REPO_ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = "/usr/bin/chromium"
ARTIFACTS = REPO_ROOT / "test-artifacts"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]

sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed")
if not (os.path.exists(CHROMIUM) or shutil.which("chromium")):
    pytest.skip(f"{CHROMIUM} is not installed", allow_module_level=True)
expect = sync_api.expect


@pytest.fixture(scope="module")
def report_file(tmp_path_factory) -> Path:
    """report.html of a finished tiny run (test_resnet, 3 classes, one with HTML in its name)."""
    base = tmp_path_factory.mktemp("browser_report")
    data = base / "data"
    for label, name in enumerate(["<b>cat&dog", "plain", "stripes"]):
        (data / name).mkdir(parents=True)
        for i in range(12):
            class_image(label, i, 40).save(data / name / f"img_{i:03d}.png")
    cfg = RunConfig(data_root=str(data), arch="test_resnet", weights="random", image_size=32,
                    epochs=2, batch_size=8, lr=1e-2, device="cpu", seed=0)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FINETUNE_LAB_HOME", str(base / "home"))
        run = core.train(cfg, root=base / "runs")
    assert run.status()["state"] == "finished", run.status()
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
