"""Runs as Ray Jobs (issue 22): a local Ray head on 127.0.0.1, two tiny runs submitted through the
app's own executor and queue, one stopped through the stop file, both run folders checked.

Needs the optional cluster install (`pip install -r requirements-cluster.txt`); skipped with that
reason otherwise. CI installs it, so there it runs (about a minute)."""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

ray = pytest.importorskip("ray", reason="ray is an optional install: pip install -r requirements-cluster.txt")

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ray_head(tmp_path_factory):
    ray_bin = Path(sys.executable).with_name("ray")
    if not ray_bin.exists():
        ray_bin = shutil.which("ray")
    temp = tmp_path_factory.mktemp("ray")
    dashboard = free_port()
    env = dict(os.environ, RAY_USAGE_STATS_ENABLED="0")
    cmd = [str(ray_bin), "start", "--head", "--num-cpus", "2", "--node-ip-address", "127.0.0.1",
           "--port", str(free_port()), "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dashboard),
           "--disable-usage-stats", "--include-dashboard", "true", "--temp-dir", str(temp)]
    started = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180)
    if started.returncode != 0:
        pytest.fail("ray start failed:\n" + started.stdout[-2000:] + started.stderr[-2000:])
    address = f"http://127.0.0.1:{dashboard}"
    try:
        from ray.job_submission import JobSubmissionClient
        end = time.monotonic() + 60
        while True:
            try:
                JobSubmissionClient(address).list_jobs()
                break
            except Exception:  # the dashboard takes a few seconds to answer (re-raised at the deadline)
                if time.monotonic() > end:
                    raise
                time.sleep(1)
        yield address
    finally:
        subprocess.run([str(ray_bin), "stop", "--force"], env=env, capture_output=True, timeout=120)


def test_runs_train_and_stop_as_ray_jobs(ray_head, tiny_config):
    from core.serve.executor import Executor
    from core.serve.ray_launcher import RayLauncher
    from core.serve.worker import MANAGER, RunManager
    MANAGER.close()          # its local dispatcher would take these runs as a second server would
    launcher = RayLauncher(ray_head)
    assert len(launcher.slots()) == 2            # 2 CPUs, 1 per run
    m = RunManager(Executor(launcher))
    try:
        short = m.submit(tiny_config(epochs=2), owner="a")
        long = m.submit(tiny_config(freeze="full", epochs=400), owner="b")
        end = time.monotonic() + 300
        while not long.epochs():
            assert time.monotonic() < end, long.status()
            time.sleep(0.2)
        assert long.status()["where"].startswith("Ray")
        m.stop(long.id)
        assert m.wait(long.id, 120) and m.wait(short.id, 300)
    finally:
        m.close()           # its dispatcher would follow FINETUNE_LAB_HOME into later tests
    assert short.status()["state"] == "finished", short.status()
    assert (short.path / "best.safetensors").exists() and (short.path / "test_metrics.json").exists()
    status = long.status()
    assert status["state"] == "stopped" and long.resumable(), status
    assert "Running entrypoint" in (long.path / "train.log").read_text()     # Ray's log, kept
    jobs = {j.submission_id: j.status for j in launcher.client.list_jobs()}
    assert len(jobs) == 2 and all(str(s.value) == "SUCCEEDED" for s in jobs.values()), jobs
