"""A new user's whole session in a real browser (a `streamlit run` server and Debian's chromium
driven by Playwright; the server and browser fixtures come from tests/test_browser.py):

Home -> Quick demo (Home shows its progress, then opens Evaluate by itself) -> Data (upload a zip
of generated class folders) -> Model (full fine-tune, so epochs take long enough to stop one) ->
Train (6 epochs, 64 px, batch 8): the live view updates by itself; Stop -> "stopped" shows without
a reload; Resume -> queued/preparing/running, then finished, again without a reload -> Evaluate,
Inspect and Predict each open on THIS run, not on the Quick demo's.

Leaves test-artifacts/flow_*.png. Skipped when playwright or /usr/bin/chromium is missing. Never
runs `playwright install`.
"""
from __future__ import annotations

import json
import re
import time
import zipfile

import pytest

pytest.importorskip("playwright.sync_api", reason="playwright is not installed")
# Importing test_browser skips this module too when chromium is missing.
from test_browser import (ARTIFACTS, app_page, browser, expect, go_to, metric_value, screenshot,  # noqa: E402,F401
                          server, settle)

QUICK_DEMO_TIMEOUT_MS = 240_000
RUN_TIMEOUT_MS = 240_000
EPOCHS = 6
# "<id> · <name or arch> · <state> ..." (the teacher's labels start with "👤 ")
RUN_ID = re.compile(r"(\d{8}-\d{9}-\S+)\s+·")
# the live view's first line: "<icon> **<state>** — <message>"
STATE_LINE = re.compile(r"(queued|preparing|running|stopped|finished|failed|interrupted)\s+—")


def watch(page, done, fail_on=(), timeout_ms: float = RUN_TIMEOUT_MS) -> list[str]:
    """Poll the Train page's live view, without touching the page, until done(state line) is
    true; returns the distinct state lines seen, in order. Fails if a line contains a word of
    fail_on first, or on the timeout."""
    seen: list[str] = []
    end = time.monotonic() + timeout_ms / 1000
    while time.monotonic() < end:
        try:
            text = state_line(page).inner_text(timeout=2_000)
        except Exception:        # none at the moment (redrawn in between)
            text = ""
        if text and (not seen or seen[-1] != text):
            seen.append(text)
        if text and done(text):
            return seen
        if any(word in text for word in fail_on):
            pytest.fail(f"the live view showed {text!r} too early: {seen}")
        page.wait_for_timeout(250)
    pytest.fail(f"the live view did not get there in {timeout_ms / 1000:.0f} s: {seen}")


def run_id_of(label: str) -> str:
    match = RUN_ID.search(label)
    assert match, f"no run id in the label {label!r}"
    return match.group(1)


def make_zip(folder, path):
    """Zip a folder of class folders (class_a/img_000.png, ...)."""
    with zipfile.ZipFile(path, "w") as zf:
        for file in sorted(folder.rglob("*.png")):
            zf.write(file, file.relative_to(folder).as_posix())
    return path


def select_slider_to(page, label: str, value: str, key: str = "ArrowLeft") -> None:
    """Move a select slider with the keyboard, one step per script run: key presses 200 ms apart
    on the Train page after the Quick demo lose the later steps (the slider shows 64 px, the run
    gets 96 px), so each press waits for its rerun."""
    thumb = page.get_by_test_id("stSlider").filter(has_text=label).get_by_role("slider")
    for _ in range(8):
        if thumb.get_attribute("aria-valuetext") == value:
            break
        thumb.focus()
        thumb.press(key)
        page.wait_for_timeout(700)
        settle(page)
    expect(thumb).to_have_attribute("aria-valuetext", value)
    settle(page)


def main(page):
    """The page itself, without the sidebar (whose queue line reads "... 0 more queued — ...")."""
    return page.get_by_test_id("stMain")


def state_line(page):
    return main(page).get_by_text(STATE_LINE).first


def test_new_user_flow(server, browser, image_folder, tmp_path):
    started = time.monotonic()
    with app_page(browser, server) as page:
        try:
            walk_through(page, image_folder, tmp_path, started)
        except BaseException:
            page.screenshot(path=str(ARTIFACTS / "flow_failure.png"), full_page=True)
            raise


def walk_through(page, image_folder, tmp_path, started):
    # a marker in the window: it survives Streamlit's page switches and reruns, not a reload
    page.evaluate("() => { window.__flowMarker = 'no reload'; }")

    def no_reload():
        assert page.evaluate("() => window.__flowMarker") == "no reload", "the page was reloaded"

    # ---------------------------------------------------------------- Home: Quick demo
    expect(page.get_by_role("button", name=re.compile("Quick demo"))).to_be_visible()
    page.get_by_role("button", name=re.compile("Quick demo")).click()
    expect(page.get_by_test_id("stProgress").first).to_be_visible(timeout=60_000)
    screenshot(page, "flow_home_progress.png")
    expect(page.get_by_role("heading", name="Evaluate")).to_be_visible(timeout=QUICK_DEMO_TIMEOUT_MS)
    expect(metric_value(page, "Accuracy")).to_have_text(re.compile(r"^\d+\.\d%$"), timeout=60_000)
    settle(page)
    picker = page.get_by_role("combobox", name="Run")
    expect(picker).to_have_value(re.compile(r"Quick demo · finished"))
    demo_id = run_id_of(picker.input_value())
    no_reload()
    demo_done = time.monotonic()

    # ---------------------------------------------------------------- Data: a zip of class folders
    upload = make_zip(image_folder(classes=3, per_class=12, size=40), tmp_path / "shapes.zip")
    go_to(page, "Data")
    page.get_by_text("Upload a .zip of class folders").click()
    settle(page)
    uploader = page.get_by_test_id("stFileUploader").filter(has_text="Zip with one folder per class")
    uploader.locator('input[type="file"]').set_input_files(str(upload))
    expect(metric_value(page, "Images")).to_have_text("36", timeout=60_000)
    expect(metric_value(page, "Classes")).to_have_text("3")
    settle(page)
    screenshot(page, "flow_data_zip.png")

    # ---------------------------------------------------------------- Model: full fine-tune
    go_to(page, "Model")
    page.get_by_test_id("stRadio").filter(has_text="Freeze").get_by_text("Full fine-tune").click()
    settle(page)
    expect(page.get_by_text("Every layer adapts")).to_be_visible()

    # ---------------------------------------------------------------- Train: start, watch, stop
    go_to(page, "Train", heading="🏋️ Train")  # not "What to train" on Model
    epochs = page.get_by_label("Epochs", exact=True)    # not "Two-phase: head-only epochs first"
    if not epochs.is_visible():       # collapsed once a run exists (the Quick demo's)
        page.get_by_test_id("stExpander").filter(has_text="Training settings").locator("summary").click()
    expect(epochs).to_be_visible()
    epochs.fill(str(EPOCHS))
    epochs.press("Enter")
    settle(page)
    expect(epochs).to_have_value(str(EPOCHS))
    select_slider_to(page, "Image size", "64")
    select_slider_to(page, "Batch size", "8")
    page.get_by_role("button", name=re.compile("Start training")).click()

    show_run = page.get_by_role("combobox", name="Show run")
    expect(show_run).not_to_have_value(re.compile(re.escape(demo_id)), timeout=60_000)
    run_id = run_id_of(show_run.input_value())
    assert run_id != demo_id
    # what the page shows is what the run got (the server's FINETUNE_LAB_HOME is below tmp_path)
    config = json.loads((tmp_path / "server_home" / "runs" / run_id / "config.json").read_text())
    got = {k: config[k] for k in ("freeze", "epochs", "image_size", "batch_size")}
    assert got == dict(freeze="full", epochs=EPOCHS, image_size=64, batch_size=8), got
    assert "shapes" in config["data_root"], config["data_root"]

    # the live view follows the run by itself: its state line changes, a finished epoch shows
    table = main(page).get_by_test_id("stDataFrame")
    stop = page.get_by_role("button", name=re.compile("Stop"))
    seen = watch(page, lambda text: bool(table.count() and stop.count() and re.search(r"Epoch \d+/", text)),
                 fail_on=("finished", "failed"))
    assert len(seen) >= 2, f"the live view did not update by itself: {seen}"
    screenshot(page, "flow_train_running.png")
    no_reload()
    clicked = time.monotonic()
    stop.click()
    expect(main(page).get_by_text(re.compile(r"stopped\s+—"))).to_be_visible(timeout=20_000)
    stop_s = time.monotonic() - clicked
    resume = page.get_by_role("button", name=re.compile("Resume"))
    expect(resume).to_be_visible(timeout=15_000)
    expect(show_run).to_have_value(re.compile(re.escape(run_id) + r".*· stopped"), timeout=15_000)
    no_reload()
    settle(page)
    screenshot(page, "flow_train_stopped.png")

    # ---------------------------------------------------------------- Resume: runs again, finishes
    resume.click()
    resumed = watch(page, lambda text: bool(re.search(r"finished\s+—\s+Finished", text)), fail_on=("failed",))
    assert any(re.search(r"(queued|preparing|running)\s+—", t) for t in resumed), \
        f"after Resume the live view never showed the run queued, preparing or running: {resumed}"
    expect(metric_value(page, "Test accuracy (best epoch)")).to_have_text(re.compile(r"^\d+\.\d%$"))
    expect(show_run).to_have_value(re.compile(re.escape(run_id) + r".*· finished"), timeout=15_000)
    settle(page)
    no_reload()
    rows = table.first.locator('[role="row"]')
    assert rows.count() >= EPOCHS, f"{rows.count()} rows in the per-epoch table"
    screenshot(page, "flow_train_finished.png")

    # ---------------------------------------------------------------- every results page: this run
    go_to(page, "Evaluate")
    picker = page.get_by_role("combobox", name="Run")
    expect(picker).to_have_value(re.compile(re.escape(run_id) + r".*· finished"))
    expect(metric_value(page, "Accuracy")).to_have_text(re.compile(r"^\d+\.\d%$"), timeout=60_000)
    screenshot(page, "flow_evaluate.png")

    go_to(page, "Inspect")
    expect(page.get_by_role("radio", name="A trained run").first).to_be_checked()
    picker = page.get_by_role("combobox", name="Run").first
    expect(picker).to_have_value(re.compile(re.escape(run_id)))
    settle(page, timeout=120_000)
    screenshot(page, "flow_inspect.png")

    go_to(page, "Predict")
    expect(page.get_by_role("radio", name="A trained run").first).to_be_checked()
    picker = page.get_by_role("combobox", name="Run")
    expect(picker).to_have_value(re.compile(re.escape(run_id)))
    assert demo_id not in picker.input_value()
    screenshot(page, "flow_predict.png")
    no_reload()
    print(f"\nQuick demo {demo_done - started:.0f} s; whole flow {time.monotonic() - started:.0f} s; "
          f"Stop -> 'stopped' in {stop_s:.1f} s;\nlive view before Stop: {seen}\nafter Resume: {resumed}")
