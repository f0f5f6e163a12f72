"""First paint of the app in a real browser: a fresh `streamlit run` server (so the first visit
also imports PyTorch and timm), Debian's chromium through Playwright. Used by benchmark.py; run
alone with `python bench/bench_ui.py`. Skipped (no row) when playwright or chromium is missing.
"""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = "/usr/bin/chromium"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return response.read().decode().strip() == "ok"
    except OSError:
        return False


def _start_server(home: str) -> tuple[subprocess.Popen, str]:
    port = _free_port()
    env = dict(os.environ, FINETUNE_LAB_HOME=home, HF_HUB_OFFLINE="1")
    cmd = [sys.executable, "-m", "streamlit", "run", "streamlit_app.py", "--server.headless", "true",
           "--server.port", str(port), "--server.address", "127.0.0.1",
           "--server.fileWatcherType", "none", "--browser.gatherUsageStats", "false"]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    end = time.monotonic() + 90
    while not _healthy(f"{base}/_stcore/health"):
        if proc.poll() is not None or time.monotonic() > end:
            proc.kill()
            raise RuntimeError("streamlit did not start")
        time.sleep(0.2)
    return proc, base


def first_paint(page: str = "") -> tuple[float, float]:
    """Seconds from opening the URL (first visit after a server start) until the app shows any
    text of its own (the loading line or the page), and until the page's heading is there."""
    from playwright.sync_api import sync_playwright
    with tempfile.TemporaryDirectory() as home, sync_playwright() as p:
        proc, base = _start_server(home)
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu"])
        try:
            tab = browser.new_page(viewport={"width": 1400, "height": 1000})
            start = time.perf_counter()
            tab.goto(f"{base}/{page}")
            tab.get_by_test_id("stMain").get_by_text(
                __import__("re").compile(r"\w")).first.wait_for(timeout=60_000)
            painted = time.perf_counter() - start
            tab.get_by_role("heading").first.wait_for(timeout=120_000)
            tab.get_by_test_id("stSidebar").get_by_text("Home").first.wait_for(timeout=60_000)
            ready = time.perf_counter() - start
        finally:
            browser.close()
            proc.terminate()
            proc.wait(timeout=15)
    return painted, ready


def available() -> bool:
    try:
        import playwright.sync_api  # noqa: F401 - only whether it imports
    except ImportError:
        return False
    return os.path.exists(CHROMIUM) or bool(shutil.which("chromium"))


def bench_first_paint(record) -> None:
    if not available():
        print("first paint: skipped (playwright or chromium missing)")
        return
    for label, page in (("Home", ""), ("Inspect by deep link", "Inspect")):
        painted, ready = first_paint(page)
        record(f"first paint after a server start, {label} (s)", painted, "s", "<= 2", painted <= 2)
        record(f"  page ready with its own navigation, {label} (s)", ready, "s")


if __name__ == "__main__":
    def show(name, value, unit, target="", ok=None):
        print(f"{name:<62} {value:>8.2f} {unit} {target} {'' if ok is None else 'PASS' if ok else 'FAIL'}")
    bench_first_paint(show)
