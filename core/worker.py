"""The background queue: one worker thread trains queued runs one after another (one device,
one queue). Stop requests are events the training loop checks every batch. Kept apart from
core.runs (the run folders), so storage never imports training."""
from __future__ import annotations

import logging
import queue
import threading
import time
from pathlib import Path

from core import runs
from core import training
from core.runs import Run, RunConfig

class RunManager:
    """One worker thread trains queued runs one after another (one device, one queue).
    Stop requests are events the training loop checks every batch."""

    def __init__(self):
        self._queue: queue.Queue[tuple[Run, bool]] = queue.Queue()
        self._stops: dict[str, threading.Event] = {}
        self._lock = threading.Lock()
        self._worker: threading.Thread | None = None

    def submit(self, config: RunConfig, root: Path | None = None, owner: str = "") -> Run:
        run = Run.create(config, root, owner)
        self._enqueue(run, resume=False)
        return run

    def resume(self, run: Run) -> None:
        """Queue a stopped or interrupted run to go on from its last finished epoch."""
        if not run.resumable():
            raise ValueError("This run has no saved epoch to resume from, or it already finished.")
        run.set_status("queued", message="Waiting for the device (resume)")
        self._enqueue(run, resume=True)

    def _enqueue(self, run: Run, resume: bool) -> None:
        with self._lock:
            self._stops[run.id] = threading.Event()
            runs.hold(run.id)
            self._queue.put((run, resume))
            if self._worker is None or not self._worker.is_alive():
                self._worker = threading.Thread(target=self._work, name="finetune-lab-trainer",
                                                daemon=True)
                self._worker.start()

    def stop(self, run_id: str) -> None:
        with self._lock:
            event = self._stops.get(run_id)
        if event:
            event.set()

    def knows(self, run_id: str) -> bool:
        with self._lock:
            return run_id in self._stops

    def busy(self) -> bool:
        with self._lock:
            return bool(self._stops)

    def wait(self, run_id: str, timeout: float | None = None) -> bool:
        """Block until `run_id` leaves the queue (tests, notebooks)."""
        end = time.monotonic() + (timeout or 1e9)
        while self.knows(run_id) and time.monotonic() < end:
            time.sleep(0.05)
        return not self.knows(run_id)

    def _work(self):
        while True:
            try:
                run, resume = self._queue.get(timeout=5)
            except queue.Empty:
                with self._lock:
                    if self._queue.empty():
                        self._worker = None
                        return
                continue
            event = self._stops[run.id]
            try:
                if event.is_set():
                    run.set_status("stopped", message="Stopped before it started")
                else:
                    training.train_run(run, stop=event, resume=resume)
            except Exception as err:  # noqa: BLE001 - a crashed run must never kill the queue
                _mark_failed(run, err)
            finally:
                with self._lock:
                    self._stops.pop(run.id, None)
                    runs.release(run.id)


def _mark_failed(run: Run, err: Exception) -> None:
    """Record a run's failure if its folder can still be written (it may have been deleted, or
    the disk be full); either way the worker goes on to the next run."""
    try:
        run.set_status("failed", message=f"{type(err).__name__}: {err}")
    except OSError:
        logging.getLogger(__name__).exception("run %s failed and its status can't be written", run.id)


MANAGER = RunManager()
