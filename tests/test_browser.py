"""One real-browser test of the main flow: a `streamlit run` server and Debian's chromium driven
by Playwright. Data (demo) -> Train (1 epoch, MobileNetV2 head-only) -> Evaluate.

Playwright is a test requirement (tests/requirements.txt): missing, it fails. Skipped when
/usr/bin/chromium is missing (`./lab.sh test` installs Debian's). Never runs `playwright install`:
the system chromium is used through `executable_path`.
"""
from __future__ import annotations

import contextlib
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from playwright import sync_api

REPO_ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = "/usr/bin/chromium"
ARTIFACTS = REPO_ROOT / "test-artifacts"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]

if not (os.path.exists(CHROMIUM) or shutil.which("chromium")):
    pytest.skip(f"{CHROMIUM} is not installed", allow_module_level=True)
expect = sync_api.expect

pytestmark = [pytest.mark.slow, pytest.mark.browser]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return response.read().decode().strip() == "ok"
    except OSError:
        return False


@pytest.fixture
def server(tmp_path):
    """A fresh `streamlit run streamlit_app.py` per test, on a free port with its own empty
    FINETUNE_LAB_HOME: no runs, and no session has run the entry file yet (Streamlit keeps
    process-wide state about that). Yields (base url, path of the server's log)."""
    log_path = tmp_path / "server.log"
    port = free_port()
    env = dict(os.environ, FINETUNE_LAB_HOME=str(tmp_path / "server_home"), HF_HUB_OFFLINE="1",
               PYTHONUNBUFFERED="1")
    cmd = [sys.executable, "-m", "streamlit", "run", "streamlit_app.py",
           "--server.headless", "true", "--server.port", str(port), "--server.address", "127.0.0.1",
           "--server.fileWatcherType", "none", "--browser.gatherUsageStats", "false"]
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, cwd=REPO_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        end = time.monotonic() + 90
        while not healthy(f"{base}/_stcore/health"):
            if proc.poll() is not None:
                pytest.fail(f"streamlit exited with {proc.returncode}:\n{log_path.read_text()}")
            if time.monotonic() > end:
                pytest.fail(f"streamlit did not answer /_stcore/health:\n{log_path.read_text()}")
            time.sleep(0.3)
        yield base, log_path
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=15)


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        expect.set_options(timeout=60_000)     # a first script run imports torch and timm
        yield chromium
        chromium.close()


@contextlib.contextmanager
def app_page(browser, server):
    """A fresh browser context on the app's Home page, closed afterwards; yields the page. On a
    clean exit, no JavaScript error may have reached the page, nor a traceback the server log."""
    base, log_path = server
    context = browser.new_context(viewport={"width": 1400, "height": 1000})
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda err: errors.append(str(err)))
    try:
        page.goto(base)
        expect(page.get_by_role("heading", name="Finetune Lab")).to_be_visible()
        settle(page)
        yield page
    finally:
        context.close()
    assert not errors, f"JavaScript errors in the page: {errors}"
    log = log_path.read_text()
    assert "Traceback" not in log, log
    assert "missing ScriptRunContext" not in log, log


def settle(page, timeout: float = 60_000) -> None:
    """Wait until the script run triggered last has finished (the 'Running…' widget is gone)."""
    page.wait_for_timeout(300)        # let a just-triggered rerun show its status widget
    expect(page.get_by_test_id("stStatusWidget")).to_have_count(0, timeout=timeout)


def sidebar_link(page, name: str):
    return page.get_by_test_id("stSidebar").get_by_test_id("stPageLink").get_by_role("link", name=re.compile(name))


def metric_value(page, label: str):
    return page.get_by_test_id("stMetric").filter(
        has=page.get_by_test_id("stMetricLabel").filter(has_text=re.compile(rf"^{re.escape(label)}$"))
    ).get_by_test_id("stMetricValue")


NAV = ["Home", "Data", "Doctor", "Model", "Train", "Evaluate", "Predict", "Inspect", "Experiments"]


def nav_names(page) -> list[str]:
    links = page.get_by_test_id("stSidebar").get_by_test_id("stPageLink").get_by_role("link")
    expect(links.first).to_be_visible()
    # a Material icon's element holds its ligature name ("home") before the label
    return [re.sub(r"^[a-z_]+(?=[A-Z])", "", re.sub(r"[^\w ]", "", name).strip()) for name in links.all_inner_texts()]


def screenshot(page, name: str) -> None:
    """The whole page: Streamlit scrolls inside its main container, so a full_page screenshot
    alone stops at the window; make the window as tall as the content first."""
    ARTIFACTS.mkdir(exist_ok=True)
    size = page.viewport_size
    height = page.evaluate("() => document.querySelector('[data-testid=\"stMain\"]').scrollHeight")
    page.set_viewport_size({"width": size["width"], "height": min(max(height, size["height"]), 6000)})
    page.wait_for_timeout(500)
    page.screenshot(path=str(ARTIFACTS / name), full_page=True)
    page.set_viewport_size(size)


def go_to(page, name: str, heading: str | None = None) -> None:
    """Open a page by its sidebar link (same session) and wait for its run to finish. A click
    that lands while the page reruns on its own (a run just ended) can be lost, as a user's
    would be: then click again, as a user would."""
    target = page.get_by_role("heading", name=heading or name, exact=True)
    for attempt in range(3):
        sidebar_link(page, name).click()
        try:
            expect(target).to_be_visible(timeout=20_000)
            break
        except AssertionError:
            if attempt == 2:
                raise
    settle(page)


def start_training(page, epochs: int = 1, smaller_images: bool = False) -> str:
    """On Train: set the epochs (and optionally the image size), press Start training, wait until
    the run finished; returns the test accuracy as shown."""
    box = page.get_by_label("Epochs")
    box.fill(str(epochs))
    box.press("Enter")
    settle(page)
    expect(box).to_have_value(str(epochs))
    if smaller_images:       # 128 -> 96 -> 64 px with the keyboard on the select slider
        thumb = page.get_by_test_id("stSlider").filter(has_text="Image size").get_by_role("slider")
        thumb.focus()
        thumb.press("ArrowLeft")
        thumb.press("ArrowLeft")
        expect(thumb).to_have_attribute("aria-valuetext", "64")
        settle(page)
    page.get_by_role("button", name=re.compile("Start training")).click()
    expect(page.get_by_text("Test accuracy (best epoch)")).to_be_visible(timeout=150_000)
    settle(page)
    expect(page.get_by_text(re.compile(r"finished\s+—\s+Finished"))).to_be_visible()
    accuracy = metric_value(page, "Test accuracy (best epoch)").inner_text()
    assert re.fullmatch(r"\d+\.\d%", accuracy), accuracy
    return accuracy


def drill_down(page, matrix) -> None:
    """Click confusion-matrix cells along the diagonal until one other than the default
    (first class, first class) is selected; its images must then be shown."""
    box = matrix.locator("canvas, svg").first.bounding_box()
    caption = page.get_by_text(re.compile(r"image\(s\) labelled"))
    before = caption.inner_text()
    for frac in (0.45, 0.55, 0.4, 0.6, 0.5, 0.35, 0.65, 0.3):
        matrix.locator("canvas, svg").first.click(position={"x": box["width"] * frac * 0.9,
                                                            "y": box["height"] * frac * 0.75})
        settle(page)
        text = caption.inner_text()
        match = re.match(r"(\d+) image\(s\) labelled (.+), predicted (.+)", text)
        if text != before and match and int(match.group(1)) > 0:
            break
    else:
        raise AssertionError(f"clicking the confusion matrix selected no new cell: {text}")
    tab = page.get_by_role("tabpanel").first
    expect(tab.get_by_test_id("stImage").first).to_be_visible()
    assert tab.get_by_test_id("stImage").count() >= 1


def test_main_flow_in_browser(server, browser):
    """Home -> Data (demo set) -> Train (defaults, 1 epoch) -> Evaluate, as a first-time user."""
    with app_page(browser, server) as page:
        assert nav_names(page) == NAV

        go_to(page, "Data")
        expect(metric_value(page, "Images")).to_have_text("1000")
        expect(metric_value(page, "Classes")).to_have_text("10")
        expect(page.get_by_test_id("stVegaLiteChart").first).to_be_visible()     # images per class

        go_to(page, "Train")
        expect(page.get_by_text("mobilenetv2_100").first).to_be_visible()
        expect(page.get_by_text("No runs yet")).to_be_visible()
        accuracy = start_training(page, epochs=1, smaller_images=True)
        screenshot(page, "train.png")

        go_to(page, "Evaluate")
        expect(metric_value(page, "Accuracy")).to_have_text(accuracy)
        expect(page.get_by_text("150 test images")).to_be_visible()
        matrix = page.get_by_test_id("stVegaLiteChart").first
        expect(matrix).to_be_visible()
        expect(matrix.locator("canvas, svg").first).to_be_visible()
        drill_down(page, matrix)
        screenshot(page, "evaluate.png")


def use_server_folder(page, base: str, root, images: int) -> None:
    """From Home, pick a folder on the server as the data set on the Data page."""
    page.goto(base)
    expect(page.get_by_role("heading", name="Finetune Lab")).to_be_visible()
    settle(page)
    go_to(page, "Data")
    page.get_by_text("Folder on this server").click()
    settle(page)
    path = page.get_by_label("Folder path on the server")
    path.fill(str(root))
    path.press("Enter")
    settle(page)
    expect(metric_value(page, "Images")).to_have_text(str(images))


def test_show_run_label_follows_the_run_state(server, browser, image_folder):
    """The run label turns 'finished' by itself, and after a reload (a new session) the run still
    belongs to this browser. A small folder on the server keeps this run to a few seconds."""
    base, _ = server
    root = image_folder(classes=3, per_class=10, size=40)
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    try:
        use_server_folder(page, base, root, images=30)
        go_to(page, "Train")
        start_training(page, epochs=1)
        expect(page.get_by_role("combobox", name="Show run")).to_have_value(
            re.compile(r"· finished"), timeout=5_000)
        # a reload is a new Streamlit session, but the same browser: the run is still its own
        page.reload()
        settle(page)
        expect(page.get_by_role("combobox", name="Show run")).to_have_value(re.compile(r"^★ .*· finished"))
        expect(page.get_by_role("button", name=re.compile("Delete"))).to_be_visible()
        expect(page.get_by_text("Started in another browser")).to_have_count(0)
    finally:
        page.close()


def test_sweep_in_browser(server, browser, image_folder):
    """Experiments: vary the optimizer (sgd, adam) of the default head-only MobileNetV2 on a small
    folder, queue both runs, and watch the results table fill in."""
    base, log_path = server
    root = image_folder(classes=3, per_class=10, size=40)
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    try:
        use_server_folder(page, base, root, images=30)
        go_to(page, "Experiments")
        for label, option in (("Vary", "Optimizer"), ("…and (optional)", "nothing else")):
            page.get_by_test_id("stSelectbox").filter(has_text=label).click()
            page.get_by_role("option", name=option, exact=True).click()
            settle(page)
        chosen = page.get_by_test_id("stMultiSelect").first
        expect(chosen).to_contain_text("sgd")
        expect(chosen).to_contain_text("adam")
        expect(metric_value(page, "Runs in this sweep")).to_have_text("2")
        page.get_by_role("button", name="Queue 2 runs").click()
        cells = page.get_by_test_id("stDataFrame").locator('[role="gridcell"]')   # the grid's hidden a11y table
        expect(cells.filter(has_text=re.compile(r"^finished$"))).to_have_count(2, timeout=120_000)
        expect(cells.filter(has_text=re.compile(r"^optimizer=(sgd|adam)$"))).to_have_count(2)
        expect(page.get_by_text(re.compile(r"\d of 2 runs done"))).to_have_count(0)
        screenshot(page, "experiments.png")
    finally:
        page.close()
    assert "Traceback" not in log_path.read_text()


def test_a_deep_link_on_a_fresh_server_shows_the_apps_own_navigation(server, browser):
    """Opened first by a bookmark (before any session ran the entry file's st.navigation), a
    page still shows the app's sidebar: Home ... Experiments, not Streamlit's "streamlit app"."""
    base, _ = server
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    try:
        page.goto(base + "/Train")
        expect(page.get_by_role("heading", name=re.compile("Train"))).to_be_visible()
        settle(page)
        assert nav_names(page) == NAV
        expect(page.get_by_text("streamlit app")).to_have_count(0)
        sidebar_link(page, "Home").click()
        expect(page.get_by_role("heading", name="Finetune Lab")).to_be_visible()
    finally:
        page.close()
