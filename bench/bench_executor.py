"""Runs leave the web server (issue 22): throughput with 1 vs 2 slots, page reruns while a run
trains, Stop across processes, and what the server process holds. A tool, not a test; run it on a
quiet machine:

    python bench/bench_executor.py            # about 6 minutes on 2 cores
    python bench/bench_executor.py --quick    # throughput and Stop only
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("FINETUNE_LAB_LOCAL", "1")      # the pages as the one local user sees them

from conftest import class_folders, tiny_run_config

RESULTS: list[dict] = []


def record(name: str, value: float, unit: str, target: str = "", ok: bool | None = None) -> None:
    RESULTS.append(dict(name=name, value=round(value, 3), unit=unit, target=target,
                        status="" if ok is None else "PASS" if ok else "FAIL"))
    print(f"{name:<64} {value:>9.2f} {unit:<7} {target:<14} {RESULTS[-1]['status']}", flush=True)


def fresh_home() -> Path:
    home = Path(tempfile.mkdtemp(prefix="bench-exec-"))
    os.environ["FINETUNE_LAB_HOME"] = str(home)
    return home


def manager(n_slots: int):
    from core.serve import slots
    from core.serve.executor import Executor, LocalLauncher
    from core.serve.worker import RunManager
    return RunManager(Executor(LocalLauncher(plan=lambda: slots.plan(setting=n_slots))))


def bench_throughput(n_slots: int, data: Path) -> float:
    """6 tiny runs (test_resnet, 64 px, 4 epochs) from 3 users: runs per hour."""
    fresh_home()
    m = manager(n_slots)
    started = time.perf_counter()
    runs = [m.submit(tiny_run_config(data, epochs=4, image_size=64, seed=i), owner=owner)
            for i, owner in enumerate(["teacher", "teacher", "a", "a", "b", "b"])]
    for run in runs:
        m.wait(run.id, 900)
    seconds = time.perf_counter() - started
    m.executor.close()
    assert all(r.status()["state"] == "finished" for r in runs), [r.status() for r in runs]
    per_hour = 6 / seconds * 3600
    record(f"6 tiny runs, 3 users, {n_slots} CPU slot(s): runs/hour", per_hour, "runs/h")
    return per_hour


def bench_stop(data: Path, rounds: int = 3) -> None:
    """Stop pressed mid-epoch of a full fine-tune in its own process, to 'stopped' on disk."""
    fresh_home()
    m = manager(1)
    worst = 0.0
    for i in range(rounds):
        run = m.submit(tiny_run_config(data, freeze="full", epochs=500, image_size=64, seed=i))
        while (run.status().get("step") or 0) < 2:
            time.sleep(0.05)
        time.sleep(0.3 * i)
        pressed = time.perf_counter()
        m.stop(run.id)
        while run.status().get("state") != "stopped":
            time.sleep(0.01)
        worst = max(worst, time.perf_counter() - pressed)
        m.wait(run.id, 60)
    m.executor.close()
    record("Stop -> 'stopped' across processes, worst of 3 (s)", worst, "s", "<= 1", worst <= 1)


def rss_mb(pid: int | None = None) -> float:
    with open(f"/proc/{pid or 'self'}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def page_times(page: str, n: int) -> list[float]:
    from streamlit.testing.v1 import AppTest
    at = AppTest.from_file(str(ROOT / page), default_timeout=120)
    at.run()
    times = []
    for _ in range(n):
        start = time.perf_counter()
        at.run()
        times.append(time.perf_counter() - start)
    return times


def p95(values: list[float]) -> float:
    return sorted(values)[max(0, int(round(0.95 * len(values))) - 1)]


def bench_pages_while_training(n: int = 20) -> None:
    """Home and Train reruns (AppTest, in this process, as in the server) idle vs while a full
    fine-tune of MobileNetV2 at 160 px trains in its own process; and this process's memory."""
    from core.config import RunConfig
    from core.data.folders import demo_dataset
    fresh_home()
    idle = {page: page_times(page, n) for page in ("pages/0_Home.py", "pages/3_Train.py")}
    m = manager(1)
    run = m.submit(RunConfig(data_root=str(demo_dataset()), freeze="full", epochs=50, image_size=160,
                             batch_size=32, device="cpu", name="busy"))
    while run.status().get("phase") != "train":
        time.sleep(0.2)
    busy = {page: page_times(page, n) for page in idle}
    child = m.where(run.id)
    server_mb, child_mb = rss_mb(), rss_mb(child.pid) if child and child.pid else float("nan")
    m.stop(run.id)
    m.wait(run.id, 120)
    m.executor.close()
    for page in idle:
        name = Path(page).stem.split("_", 1)[1]
        i50, i95 = statistics.median(idle[page]), p95(idle[page])
        b50, b95 = statistics.median(busy[page]), p95(busy[page])
        record(f"{name} rerun p50, idle / training (s)", i50, "s")
        record(f"{name} rerun p50 while a full fine-tune trains (s)", b50, "s")
        record(f"{name} rerun p95, idle (s)", i95, "s")
        record(f"{name} rerun p95 while training (s)", b95, "s", "<= 1.5 x idle", b95 <= 1.5 * i95)
    record("server process memory while a run trains (MB RSS)", server_mb, "MB")
    record("the training process's memory (MB RSS)", child_mb, "MB")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--pages-only", action="store_true")
    parser.add_argument("--json", default=str(ROOT / "bench" / "executor.json"))
    args = parser.parse_args()
    data = class_folders(Path(tempfile.mkdtemp(prefix="bench-data-")), 3, 24, 64)
    if args.pages_only:
        bench_pages_while_training()
        return
    one = bench_throughput(1, data)
    two = bench_throughput(2, data)
    record("2 slots vs 1: speed-up", two / one, "x")
    bench_stop(data)
    if not args.quick:
        bench_pages_while_training()
    Path(args.json).write_text(json.dumps(RESULTS, indent=1))
    print(f"written: {args.json}")


if __name__ == "__main__":
    main()
