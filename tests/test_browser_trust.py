"""Issue 17's flow in a real browser: upload a zip with two mislabelled images -> Doctor: audit,
"Move all to the suggested class", "Save the fixes as a new version" -> train on that version ->
Evaluate: the before/after embedding map and a checked export ("agrees on 100%") -> Inspect:
the heat-map sanity check. Screenshots in test-artifacts/trust_*.png."""
from __future__ import annotations

import re
import shutil

import pytest

from conftest import class_folders
# Importing test_browser skips this module too when chromium is missing.
from test_browser import (app_page, browser, expect, go_to, metric_value, screenshot,  # noqa: F401 - fixtures by name
                          server, settle)
from test_browser_flow import main, make_zip, set_epochs, watch

pytestmark = [pytest.mark.slow, pytest.mark.browser]

CLASSES = ["red", "green", "blue"]


def mislabelled_set(root):
    """24 images a class, two of them in the wrong class folder."""
    class_folders(root, CLASSES, per_class=24, size=48)
    shutil.move(root / "red/img_003.png", root / "green/moved_red_003.png")
    shutil.move(root / "green/img_005.png", root / "blue/moved_green_005.png")
    return root


def test_audit_fix_retrain_and_check(server, browser, tmp_path):
    upload = make_zip(mislabelled_set(tmp_path / "colours"), tmp_path / "colours.zip")
    with app_page(browser, server) as page:
        go_to(page, "Data")
        page.get_by_text("Upload a .zip of class folders").click()
        settle(page)
        page.get_by_test_id("stFileUploader").filter(has_text="Zip with one folder per class") \
            .locator('input[type="file"]').set_input_files(str(upload))
        expect(metric_value(page, "Images")).to_have_text("72", timeout=60_000)
        settle(page)

        go_to(page, "Doctor", heading="Dataset doctor")
        page.get_by_role("button", name=re.compile("Audit this data set")).click()
        expect(page.get_by_test_id("stProgress").first).to_be_visible(timeout=30_000)
        expect(main(page).get_by_text(re.compile("look mislabelled"))).to_be_visible(timeout=180_000)
        settle(page)
        screenshot(page, "trust_doctor.png")
        page.get_by_role("button", name=re.compile(r"Move all \d+ to the suggested class")).click()
        settle(page)
        page.get_by_role("button", name=re.compile("Save the fixes as a new version")).click()
        expect(main(page).get_by_text(re.compile("Now using the fixed version"))).to_be_visible(timeout=60_000)
        settle(page)

        go_to(page, "Train")
        screenshot(page, "trust_train.png")
        set_epochs(page, 2)
        page.get_by_role("button", name=re.compile("Start training")).click()
        watch(page, lambda text: bool(re.search(r"finished\s+—\s+Finished", text)), fail_on=("failed",))
        settle(page)
        expect(page.get_by_test_id("stSidebar").get_by_text(re.compile("fixed"))).to_be_visible()

        # Evaluate: the before/after map, then a checked export
        go_to(page, "Evaluate")
        page.get_by_role("tab", name=re.compile("Embedding map")).click()
        page.get_by_test_id("stRadio").filter(has_text="Projection").get_by_text("PCA").click()
        settle(page)
        page.get_by_role("button", name=re.compile("Compute the maps")).click()
        expect(main(page).get_by_test_id("stVegaLiteChart").filter(visible=True)).to_have_count(2, timeout=180_000)
        settle(page)
        screenshot(page, "trust_map.png")
        page.get_by_role("tab", name=re.compile("Download & export")).click()
        page.get_by_role("button", name="Prepare export").click()
        expect(main(page).get_by_text(re.compile(r"agrees on 100% of \d+ test images"))).to_be_visible(timeout=180_000)
        settle(page)
        screenshot(page, "trust_export.png")

        # Inspect: attributions, then the sanity check says whether they depend on the model
        go_to(page, "Inspect")
        page.get_by_role("tab", name="Attributions").click()
        page.get_by_role("button", name="Compute attributions").click()
        expect(main(page).get_by_test_id("stImage").filter(has_text="Occlusion")).to_be_visible(timeout=120_000)
        settle(page)
        page.get_by_role("button", name=re.compile("Check these maps")).click()
        expect(main(page).get_by_text(re.compile(r"Grad-CAM .*(changes|barely changes)"))).to_be_visible(timeout=180_000)
        settle(page)
        screenshot(page, "trust_sanity.png")
