"""A new user's whole session in a real browser (a `streamlit run` server and Debian's chromium
driven by Playwright; the server and browser fixtures come from tests/test_browser.py):

Home -> Quick demo (Home shows its progress, then opens Evaluate by itself) -> Data (upload a zip
of generated class folders) -> Train a head-only run on it -> Model (full fine-tune, so epochs take
long enough to stop one) -> Train (10 epochs, 64 px, batch 8): the live view updates by itself;
Stop -> "stopped" shows without a reload; Resume -> queued/preparing/running, then finished, again
without a reload -> Evaluate, Inspect (with attributions) and Predict each open on THIS run, not on
the Quick demo's -> a prediction for a dropped image -> the HTML report.

Each step is timed: seconds from the click to the first visible change on the page (new text, an
image, a spinner, a progress bar or a toast; the header's "Running…" doesn't count) and to the
step's end. The table is printed and written to test-artifacts/walk.json, with a screenshot per
step (test-artifacts/flow_*.png). Skipped when playwright or /usr/bin/chromium is missing. Never
runs `playwright install`.
"""
from __future__ import annotations

import contextlib
import json
import re
import time
import zipfile

import pytest

# Importing test_browser skips this module too when chromium is missing.
from test_browser import (ARTIFACTS, app_page, browser, expect, go_to, metric_value, screenshot,  # noqa: F401 - fixtures by name
                          server, settle, sidebar_link)

pytestmark = [pytest.mark.slow, pytest.mark.browser]

QUICK_DEMO_TIMEOUT_MS = 240_000
RUN_TIMEOUT_MS = 240_000
EPOCHS = 10      # enough that a slow page update still sees the run before it ends
# On a busy 2-core CI machine; the aim (a second on an idle one) is what walk.json reports.
FEEDBACK_LIMIT_S = 5.0
# The first visible feedback after an action, seen by a MutationObserver: a spinner, progress bar,
# toast or status box appears or changes its text, or the page's own text (not the sidebar's, not the header's
# "Running…") differs from what it was when the action started.
OBSERVE = """() => {
  const mainText = () => (document.querySelector('[data-testid="stMain"]') || document.body).innerText;
  const busy = '[data-testid="stSpinner"],[data-testid="stProgress"],[data-testid="stToast"],' +
               '[data-testid="stExpanderDetails"] [data-testid="stSpinner"],[data-testid="stStatusContainer"]';
  const busyText = () => Array.from(document.querySelectorAll(busy)).map(e => e.innerText).join('|');
  const w = window.__walk = {start: performance.now(), first: null, what: null, text: mainText(), busy: busyText()};
  if (window.__walkObserver) window.__walkObserver.disconnect();
  window.__walkObserver = new MutationObserver(() => {
    if (w.first !== null) return;
    const shown = busyText(), text = mainText();
    if (shown !== w.busy || text !== w.text) {
      w.first = performance.now();
      w.what = (shown !== w.busy ? shown : text.split('\\n').filter(l => !w.text.includes(l)).join(' ')).slice(0, 60);
    }
  });
  window.__walkObserver.observe(document.body, {subtree: true, childList: true, characterData: true});
}"""


class Walk:
    """The per-step timeline of the walk."""

    def __init__(self, page):
        self.page, self.rows = page, []

    @contextlib.contextmanager
    def step(self, name: str, shot: str | None = None):
        """Time the block, which starts with the step's action (a click, an upload) and ends when
        the step is complete; screenshot the page afterwards."""
        self.page.evaluate(OBSERVE)
        start = time.monotonic()
        yield
        done = time.monotonic() - start
        seen = self.page.evaluate("() => [window.__walk.first === null ? null : "
                                  "(window.__walk.first - window.__walk.start) / 1000, window.__walk.what]")
        self.rows.append(dict(step=name, first_feedback_s=None if seen[0] is None else round(seen[0], 2),
                              done_s=round(done, 1), first_change=seen[1]))
        if shot:
            screenshot(self.page, shot)

    def report(self) -> str:
        ARTIFACTS.mkdir(exist_ok=True)
        (ARTIFACTS / "walk.json").write_text(json.dumps(self.rows, indent=1))
        lines = [f"{'step':<44} {'feedback':>9} {'done':>7}  first change"]
        lines += [f"{r['step']:<44} {r['first_feedback_s'] if r['first_feedback_s'] is not None else '-':>8}s "
                  f"{r['done_s']:>6}s  {r['first_change'] or ''}" for r in self.rows]
        return "\n".join(lines)

    def slow(self) -> list[dict]:
        return [r for r in self.rows if r["first_feedback_s"] is None and r["done_s"] > FEEDBACK_LIMIT_S
                or (r["first_feedback_s"] or 0) > FEEDBACK_LIMIT_S]
# "<id> · <name or arch> · <state> ..." (the teacher's labels start with "★ ")
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
        except Exception:  # noqa: BLE001 - Playwright's timeout: no state line at the moment (redrawn)
            text = ""
        if text and (not seen or seen[-1] != text):
            seen.append(text)
        if text and done(text):
            return seen
        if any(word in text for word in fail_on) and stale_gone(page, text):
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


def stale_gone(page, text: str) -> bool:
    """Still showing `text` after a moment: a rerun in progress keeps the previous run's line on
    screen until the new one is drawn, and that is not the new run's state."""
    page.wait_for_timeout(2_000)
    try:
        return state_line(page).inner_text(timeout=2_000) == text
    except Exception:  # noqa: BLE001 - Playwright's timeout: the line is being redrawn
        return False


def state_line(page):
    return main(page).get_by_text(STATE_LINE).first


def test_new_user_flow(server, browser, image_folder, tmp_path):
    started = time.monotonic()
    with app_page(browser, server) as page:
        walk = Walk(page)
        try:
            walk_through(page, walk, image_folder, tmp_path, started)
        except BaseException:
            page.screenshot(path=str(ARTIFACTS / "flow_failure.png"), full_page=True)
            raise
        finally:
            print("\n" + walk.report())
    assert not walk.slow(), f"steps with no visible feedback for over {FEEDBACK_LIMIT_S} s: {walk.slow()}"


def set_epochs(page, epochs: int) -> None:
    # the page first measures the model on a few images (a spinner) before it shows the settings
    expect(page.get_by_role("button", name=re.compile("Start training"))).to_be_visible(timeout=120_000)
    box = page.get_by_label("Epochs", exact=True)    # not "Two-phase: head-only epochs first"
    if not box.is_visible():       # collapsed once a run exists (the Quick demo's)
        page.get_by_test_id("stExpander").filter(has_text="Training settings").locator("summary").click()
    expect(box).to_be_visible()
    box.fill(str(epochs))
    box.press("Enter")
    settle(page)
    expect(box).to_have_value(str(epochs))


def start_run(page, walk: Walk, name: str, after: str | None) -> str:
    """Press Start training; returns the new run's id once the live view shows it."""
    show_run = page.get_by_role("combobox", name="Show run")
    with walk.step(name):
        page.get_by_role("button", name=re.compile("Start training")).click()
        if after:
            expect(show_run).not_to_have_value(re.compile(re.escape(after)), timeout=60_000)
        else:
            expect(show_run).to_be_visible(timeout=60_000)
    return run_id_of(show_run.input_value())


def walk_through(page, walk: Walk, image_folder, tmp_path, started):
    # a marker in the window: it survives Streamlit's page switches and reruns, not a reload
    page.evaluate("() => { window.__flowMarker = 'no reload'; }")

    def no_reload():
        assert page.evaluate("() => window.__flowMarker") == "no reload", "the page was reloaded"

    # ---------------------------------------------------------------- Home: Quick demo
    expect(page.get_by_role("button", name=re.compile("Quick demo"))).to_be_visible()
    with walk.step("Quick demo (until Evaluate shows accuracy)", "flow_evaluate_demo.png"):
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
    folder = image_folder(classes=3, per_class=12, size=40)
    upload = make_zip(folder, tmp_path / "shapes.zip")
    go_to(page, "Data")
    page.get_by_text("Upload a .zip of class folders").click()
    settle(page)
    uploader = page.get_by_test_id("stFileUploader").filter(has_text="Zip with one folder per class")
    with walk.step("Data: upload a zip", "flow_data_zip.png"):
        uploader.locator('input[type="file"]').set_input_files(str(upload))
        expect(metric_value(page, "Images")).to_have_text("36", timeout=60_000)
        expect(metric_value(page, "Classes")).to_have_text("3")
        settle(page)

    # ---------------------------------------------------------------- Train: head-only first
    go_to(page, "Train")
    set_epochs(page, 2)
    select_slider_to(page, "Image size", "64")
    select_slider_to(page, "Batch size", "8")
    head_id = start_run(page, walk, "Train: Start (head only)", after=demo_id)
    with walk.step("Train: head-only run until finished", "flow_train_head.png"):
        watch(page, lambda text: bool(re.search(r"finished\s+—\s+Finished", text)), fail_on=("failed",))
        settle(page)

    # ---------------------------------------------------------------- Model: full fine-tune
    go_to(page, "Model")
    with walk.step("Model: choose a full fine-tune", "flow_model.png"):
        page.get_by_test_id("stRadio").filter(has_text="Freeze").get_by_text("Full fine-tune").click()
        expect(page.get_by_text("Every layer adapts")).to_be_visible()
        settle(page)

    # ---------------------------------------------------------------- Train: start, watch, stop
    go_to(page, "Train")
    set_epochs(page, EPOCHS)
    run_id = start_run(page, walk, "Train: Start (full fine-tune)", after=head_id)
    assert run_id not in (demo_id, head_id)
    # what the page shows is what the run got (the server's FINETUNE_LAB_HOME is below tmp_path)
    config = json.loads((tmp_path / "server_home" / "runs" / run_id / "config.json").read_text())
    got = {k: config[k] for k in ("freeze", "epochs", "image_size", "batch_size")}
    assert got == dict(freeze="full", epochs=EPOCHS, image_size=64, batch_size=8), got
    assert "shapes" in config["data_root"], config["data_root"]

    # the live view follows the run by itself: its state line changes, a finished epoch shows
    table = main(page).get_by_test_id("stDataFrame")
    stop = page.get_by_role("button", name=re.compile("Stop"))
    with walk.step("Train: until the first epoch shows", "flow_train_running.png"):
        seen = watch(page, lambda text: bool(table.count() and stop.count() and re.search(r"Epoch \d+/", text)),
                     fail_on=("finished", "failed"))
    assert len(seen) >= 2, f"the live view did not update by itself: {seen}"
    no_reload()
    show_run = page.get_by_role("combobox", name="Show run")
    with walk.step("Train: Stop (until 'stopped')", "flow_train_stopped.png"):
        stop.click()
        expect(main(page).get_by_text(re.compile(r"stopped\s+—"))).to_be_visible(timeout=20_000)
    stop_s = walk.rows[-1]["done_s"]
    resume = page.get_by_role("button", name=re.compile("Resume"))
    expect(resume).to_be_visible(timeout=15_000)
    expect(show_run).to_have_value(re.compile(re.escape(run_id) + r".*· stopped"), timeout=15_000)
    no_reload()
    settle(page)

    # ---------------------------------------------------------------- Resume: runs again, finishes
    with walk.step("Train: Resume until finished", "flow_train_finished.png"):
        resume.click()
        resumed = watch(page, lambda text: bool(re.search(r"finished\s+—\s+Finished", text)), fail_on=("failed",))
        expect(metric_value(page, "Test accuracy (best epoch)")).to_have_text(re.compile(r"^\d+\.\d%$"))
        settle(page)
    assert any(re.search(r"(queued|preparing|running)\s+—", t) for t in resumed), \
        f"after Resume the live view never showed the run queued, preparing or running: {resumed}"
    expect(show_run).to_have_value(re.compile(re.escape(run_id) + r".*· finished"), timeout=15_000)
    no_reload()
    rows = table.first.locator('[role="row"]')
    assert rows.count() >= EPOCHS, f"{rows.count()} rows in the per-epoch table"

    # ---------------------------------------------------------------- every results page: this run
    with walk.step("Evaluate: open (predicts the test split)", "flow_evaluate.png"):
        sidebar_link(page, "Evaluate").click()
        expect(metric_value(page, "Accuracy")).to_have_text(re.compile(r"^\d+\.\d%$"), timeout=60_000)
        settle(page)
    picker = page.get_by_role("combobox", name="Run")
    expect(picker).to_have_value(re.compile(re.escape(run_id) + r".*· finished"))

    with walk.step("Evaluate: build the HTML report", "flow_report.png"):
        page.get_by_role("tab", name=re.compile("Download & export")).click()
        page.get_by_role("button", name="Build HTML report").click()
        expect(page.get_by_role("button", name="report.html")).to_be_visible(timeout=120_000)
        settle(page)
    assert (tmp_path / "server_home" / "runs" / run_id / "report.html").exists()

    with walk.step("Inspect: open", "flow_inspect.png"):
        sidebar_link(page, "Inspect").click()
        expect(page.get_by_role("heading", name="Inspect")).to_be_visible()
        settle(page, timeout=120_000)
    expect(page.get_by_role("radio", name="A trained run").first).to_be_checked()
    picker = page.get_by_role("combobox", name="Run").first
    expect(picker).to_have_value(re.compile(re.escape(run_id)))
    with walk.step("Inspect: compute attributions", "flow_inspect_attributions.png"):
        page.get_by_role("tab", name="Attributions").click()
        page.get_by_role("button", name="Compute attributions").click()
        for method in ("Grad-CAM", "Integrated Gradients", "Occlusion"):
            expect(main(page).get_by_test_id("stImage").filter(has_text=method)).to_be_visible(timeout=120_000)
        settle(page)

    go_to(page, "Predict")
    expect(page.get_by_role("radio", name="A trained run").first).to_be_checked()
    picker = page.get_by_role("combobox", name="Run")
    expect(picker).to_have_value(re.compile(re.escape(run_id)))
    assert demo_id not in picker.input_value()
    picture = next(folder.rglob("*.png"))
    with walk.step("Predict: drop an image", "flow_predict.png"):
        page.get_by_test_id("stFileUploader").filter(has_text="Drop one or more images") \
            .locator('input[type="file"]').set_input_files(str(picture))
        expect(main(page).get_by_text(re.compile(r"\d+(\.\d)?%")).first).to_be_visible(timeout=60_000)
        settle(page)
    no_reload()
    print(f"\nQuick demo {demo_done - started:.0f} s; whole flow {time.monotonic() - started:.0f} s; "
          f"Stop -> 'stopped' in {stop_s:.1f} s;\nlive view before Stop: {seen}\nafter Resume: {resumed}")
