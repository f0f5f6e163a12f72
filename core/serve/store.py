"""Runs on disk: create, list, read, delete, and whether a run is alive (the queue that trains
them is core.serve.worker; what a run's settings may be is core.config).

A run is a folder: config.json, classes.json, splits.json, status.json, epochs.jsonl,
best.safetensors, test_metrics.json, predictions.csv. The disk is the truth; the queue only
decides what trains next. Status is written by whoever trains (the app's worker thread, or a
command-line process), so any page, tab or restarted server reads the same state.
"""
from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import secrets
import shutil
import socket
import threading
import time
from datetime import datetime, timedelta
from pathlib import Path

from core.serve.status import ACTIVE, RunStatus, State
from core import paths
from core.serve import runqueue
from core.config import ConfigError, RunConfig, arch_problems

try:
    import fcntl
except ImportError:          # Windows: no OS lock, one trainer per run is then up to the user
    fcntl = None

ACTIVE_STATES = tuple(s.value for s in ACTIVE)
STOP_FILE = "stop.request"        # Stop, across processes: the trainer polls for this file
HOST = socket.gethostname()


class RunBusy(RuntimeError):
    """The run is being trained by another process."""


def disk_problem(err: OSError) -> str | None:
    """One sentence for the write failures a full or read-only disk causes, else None."""
    if err.errno in (errno.ENOSPC, errno.EDQUOT):
        return ("The disk is full: the run stopped and keeps its finished epochs. Free some space "
                f"in {paths.home()}, then Resume.")
    if err.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
        return f"The data directory {paths.home()} can't be written (read-only or no permission)."
    return None
STALE_AFTER_S = 120


# ---------------------------------------------------------------- one run's folder

_STAMP = {"last": ""}
_STAMP_LOCK = threading.Lock()


def _next_stamp() -> str:
    """Millisecond time stamps, strictly increasing within a process, so runs (and the runs of a
    sweep) sort in the order they were created."""
    with _STAMP_LOCK:
        stamp = datetime.now().strftime("%Y%m%d-%H%M%S%f")[:-3]
        if stamp <= _STAMP["last"]:     # same millisecond as the last run: take the next one
            last = datetime.strptime(_STAMP["last"] + "000", "%Y%m%d-%H%M%S%f")
            stamp = (last + timedelta(milliseconds=1)).strftime("%Y%m%d-%H%M%S%f")[:-3]
        _STAMP["last"] = stamp
        return stamp


class Run:
    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.id = self.path.name

    @classmethod
    def create(cls, config: RunConfig, root: Path | None = None, owner: str = "") -> "Run":
        """`owner` is the browser session (or "cli") that started it: only its owner may stop or
        delete it without saying so explicitly."""
        # the folder name is built from a safe id, never from a config value as written
        # (an arch of "../../x" once created the run outside the data directory)
        if problems := arch_problems(config.arch):
            raise ConfigError(problems)
        label = re.sub(r"[^A-Za-z0-9_]+", "_", config.arch)[:40].strip("_") or "model"
        path = (root or paths.runs_dir()) / f"{_next_stamp()}-{label}-{secrets.token_hex(2)}"
        path.mkdir(parents=True)
        run = cls(path)
        run.write_json("config.json", config.with_rules().to_dict())
        run.set_status("queued", message="Waiting for the device", owner=owner)
        return run

    @contextlib.contextmanager
    def training_lock(self):
        """Held while a process trains this run, so two trainers never write it at once (a
        paused CLI process still holds it). An OS lock: freed when its process dies."""
        if fcntl is None:
            yield
            return
        handle = open(self.file(".lock"), "a+")
        try:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise RunBusy("Another process is still training this run (perhaps paused): stop "
                              "that process first, then resume.") from None
            yield
        finally:
            handle.close()

    def busy(self) -> bool:
        """Whether some process holds this run's training lock."""
        try:
            with self.training_lock():
                return False
        except RunBusy:
            return True
        except OSError:
            return False

    def follower(self) -> "Run":
        """The same run seen by a non-zero rank of a distributed job: it reads, never writes."""
        return _ReadOnlyRun(self.path)

    # files
    def file(self, name: str) -> Path:
        return self.path / name

    def read_json(self, name: str, default=None):
        try:
            return json.loads(self.file(name).read_text(encoding="utf-8"))
        except (FileNotFoundError, json.JSONDecodeError):
            return default

    def write_json(self, name: str, data) -> None:
        paths.atomic_write_text(self.file(name), json.dumps(data, indent=1))

    @property
    def config(self) -> RunConfig:
        return RunConfig.from_dict(self.read_json("config.json", {}))

    @property
    def classes(self) -> list[str]:
        return self.read_json("classes.json", [])

    @property
    def checkpoint(self) -> Path:
        return self.file("best.safetensors")

    @property
    def owner(self) -> str:
        return (self.read_json("status.json", {}) or {}).get("owner", "")

    def resumable(self) -> bool:
        """Ended early (stopped, interrupted, failed) with an end-of-epoch state to go on from:
        epochs left to train, or every epoch done but the test pass cut short."""
        state = self.status().get("state")
        done = (self.read_json("status.json", {}) or {}).get("last_epoch", 0)
        return (state in ("stopped", "interrupted", "failed") and self.file("last_state.pt").exists()
                and (done < self.config.epochs or not self.file("test_metrics.json").exists()))

    # stop requests
    def request_stop(self) -> None:
        self.file(STOP_FILE).touch()

    def stop_requested(self) -> bool:
        return self.file(STOP_FILE).exists()

    def clear_stop(self) -> None:
        self.file(STOP_FILE).unlink(missing_ok=True)

    # status
    def set_status(self, state: str, **info) -> None:
        """`pid` and `host` default to this process's: whoever trains the run writes them."""
        info = {"pid": os.getpid(), "host": HOST, **info, "state": state, "updated": time.time()}
        status = RunStatus.from_dict(self.read_json("status.json", {})).updated_with(**info)
        self.write_json("status.json", status.to_dict())

    def status(self) -> RunStatus:
        """The stored status, with runs whose trainer died shown as 'interrupted'."""
        status = RunStatus.from_dict(self.read_json("status.json", {}))
        if status.active and not self._alive(status):
            status = status.updated_with(
                state=State.INTERRUPTED, message="The process training this run stopped (server "
                "restart?). Finished epochs and the best checkpoint are kept.")
        return status

    def _alive(self, status: RunStatus) -> bool:
        if status.state == State.QUEUED and runqueue.has(self.id):
            return True          # waiting in the lab's queue on disk, whichever server wrote it
        beat = time.time() - status.updated < STALE_AFTER_S
        if (status.host or HOST) != HOST or not status.pid:   # Ray: trust the heartbeat
            return beat
        if status.pid == os.getpid():
            return held(self.id)
        try:
            os.kill(int(status.pid), 0)
        except (OSError, ValueError):
            return False
        # a trainer paused (Ctrl+Z) or starved of CPU sends no heartbeat yet still holds the run;
        # so does a process the queue started and records, before it takes the lock
        return beat or self.busy() or _queue_pid(self.id) == int(status.pid)

    # epochs
    def append_epoch(self, row: dict) -> None:
        with open(self.file("epochs.jsonl"), "a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")

    def keep_epochs(self, last: int) -> None:
        """Drop epoch rows after `last` (an epoch a crash cut short of its resume state)."""
        rows = [r for r in self.epochs() if r["epoch"] <= last]
        paths.atomic_write_text(self.file("epochs.jsonl"), "".join(json.dumps(r) + "\n" for r in rows))

    def epochs(self) -> list[dict]:
        try:
            lines = self.file("epochs.jsonl").read_text(encoding="utf-8").splitlines()
        except FileNotFoundError:
            return []
        return [json.loads(line) for line in lines if line.strip()]

    def label(self) -> str:
        cfg, status = self.config, self.status()
        acc = status.test_acc
        tail = f" · test acc {acc:.1%}" if isinstance(acc, float) else ""
        return f"{self.id} · {cfg.name or cfg.arch} · {status.state or '?'}{tail}"


class _ReadOnlyRun(Run):
    def write_json(self, name: str, data) -> None:
        pass

    def set_status(self, state: str, **info) -> None:
        pass

    def append_epoch(self, row: dict) -> None:
        pass

    def keep_epochs(self, last: int) -> None:
        pass


def whole_epoch_seconds(rows: list[dict]) -> list[float]:
    """Seconds of each whole epoch in a run's rows: a last epoch cut short at the time budget
    (`train_batches` in its row) says nothing of how long an epoch takes."""
    return [r["seconds"] for r in rows if isinstance(r.get("seconds"), (int, float)) and "train_batches" not in r]


def delete_run(run: Run, root: Path | None = None) -> None:
    """Remove a run's folder; refused while it trains."""
    if run.status().active:
        raise ValueError("Stop the run before deleting it.")
    base = Path(root or paths.runs_dir()).resolve()
    if run.path.resolve().parent != base:      # only ever a folder directly inside the runs dir
        raise ValueError("Not a run of this lab.")
    shutil.rmtree(run.path)


def list_runs(root: Path | None = None) -> list[Run]:
    """All runs, newest first."""
    base = root or paths.runs_dir()
    return [Run(p) for p in sorted(base.iterdir(), reverse=True)
            if p.is_dir() and (p / "config.json").exists()]


def get_run(run_id: str, root: Path | None = None) -> Run:
    path = (root or paths.runs_dir()) / Path(run_id).name   # a name, never a path from outside
    if not (path / "config.json").exists():
        raise FileNotFoundError(f"No run called {run_id}")
    return Run(path)


# ---------------------------------------------------------------- runs this process holds

_HELD: set[str] = set()
_HELD_LOCK = threading.Lock()


def hold(run_id: str) -> None:
    """Mark a run as queued or training in this process (core.serve.worker does), so its status is
    trusted while the pid is ours."""
    with _HELD_LOCK:
        _HELD.add(run_id)


def release(run_id: str) -> None:
    with _HELD_LOCK:
        _HELD.discard(run_id)


def _queue_pid(run_id: str) -> int | None:
    job = runqueue.get(run_id)
    return job.pid if job is not None and job.host == HOST else None


def held(run_id: str) -> bool:
    with _HELD_LOCK:
        return run_id in _HELD
