"""The background queue: one worker thread trains queued runs one after another (one device,
one queue). Runs of different users interleave: the next run is always taken from the user served
least recently, so one student's sweep can't hold back everyone else. Stop requests are events the
training loop checks every batch. Kept apart from core.store (the run folders), so storage never
imports training."""
from __future__ import annotations

import itertools
import logging
import statistics
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

from core import store
from core import training
from core.config import RunConfig
from core.store import Run, RunBusy

FALLBACK_EPOCH_S = 30.0      # a guess for a kind of run this server has never trained
PREPARE_S = 20.0             # building the model and decoding images, before the first epoch


class QueueFull(ValueError):
    """A user already has as many runs waiting as the admin allows."""


@dataclass
class _Job:
    run: Run
    resume: bool
    owner: str
    seq: int
    limit_s: float | None = None
    stop: threading.Event = field(default_factory=threading.Event)


class RunManager:
    def __init__(self):
        self._waiting: dict[str, deque[_Job]] = {}
        self._served: dict[str, int] = {}      # owner -> seq of the last job started
        self._stops: dict[str, threading.Event] = {}
        self._current: tuple[_Job, float] | None = None
        self._seq = itertools.count(1)
        self._lock = threading.Lock()
        self._ready = threading.Condition(self._lock)
        self._worker: threading.Thread | None = None

    # ------------------------------------------------------------ submitting
    def submit(self, config: RunConfig, root: Path | None = None, owner: str = "",
               max_queued: int | None = None, limit_s: float | None = None) -> Run:
        """Create the run and queue it. `max_queued` (a student's cap) refuses it while the owner
        has that many waiting; `limit_s` stops it after that long in training."""
        self.check_room(owner, max_queued)
        run = Run.create(config, root, owner)
        self._enqueue(_Job(run, False, owner, 0, limit_s))
        return run

    def check_room(self, owner: str, max_queued: int | None, adding: int = 1) -> None:
        if max_queued is None:
            return
        waiting = self.waiting_count(owner)
        if waiting + adding > max_queued:
            raise QueueFull(f"You already have {waiting} run(s) waiting; the teacher allows "
                            f"{max_queued} at a time. Wait for one to start, or stop one.")

    def resume(self, run: Run, owner: str | None = None, limit_s: float | None = None) -> None:
        """Queue a stopped or interrupted run to go on from its last finished epoch."""
        self.wait(run.id, timeout=10)     # Stop was just pressed: its job is still tidying up
        if not run.resumable():
            raise ValueError("This run has no saved epoch to resume from, or it already finished.")
        if self.knows(run.id) or run.busy():
            raise ValueError("Another process is still training this run (perhaps paused): stop "
                             "that process first, then resume.")
        run.set_status("queued", message="Waiting for the device (resume)")
        self._enqueue(_Job(run, True, run.owner if owner is None else owner, 0, limit_s))

    def _enqueue(self, job: _Job) -> None:
        with self._lock:
            job.seq = next(self._seq)
            self._stops[job.run.id] = job.stop
            store.hold(job.run.id)
            self._waiting.setdefault(job.owner, deque()).append(job)
            self._ready.notify()
            if self._worker is None or not self._worker.is_alive():
                self._worker = threading.Thread(target=self._work, name="finetune-lab-trainer",
                                                daemon=True)
                self._worker.start()

    # ------------------------------------------------------------ asking
    def stop(self, run_id: str) -> None:
        with self._lock:
            event = self._stops.get(run_id)
        if event:
            event.set()

    def stopping(self, run_id: str) -> bool:
        """Stop was pressed and the run hasn't ended yet."""
        with self._lock:
            event = self._stops.get(run_id)
        return bool(event and event.is_set())

    def knows(self, run_id: str) -> bool:
        with self._lock:
            return run_id in self._stops

    def busy(self) -> bool:
        with self._lock:
            return bool(self._stops)

    def waiting_count(self, owner: str) -> int:
        with self._lock:
            return len(self._waiting.get(owner, ()))

    def wait(self, run_id: str, timeout: float | None = None) -> bool:
        """Block until `run_id` leaves the queue (tests, notebooks)."""
        end = time.monotonic() + (timeout or 1e9)
        while self.knows(run_id) and time.monotonic() < end:
            time.sleep(0.05)
        return not self.knows(run_id)

    def place(self, run_id: str) -> tuple[int, float] | None:
        """(runs ahead of it, estimated seconds until it starts) for a waiting run, else None.
        The estimate adds up what the runs ahead are expected to take (see `expected_s`)."""
        with self._lock:
            order = _order(self._waiting, self._served)
            current = self._current
        ids = [job.run.id for job in order]
        if run_id not in ids:
            return None
        ahead = order[:ids.index(run_id)]
        eta = sum(expected_s(job.run.config) for job in ahead)
        if current:
            job, started = current
            eta += max(0.0, expected_s(job.run.config) - (time.monotonic() - started))
        return len(ahead) + (1 if current else 0), eta

    # ------------------------------------------------------------ working
    def _next(self) -> _Job | None:
        with self._lock:
            if not any(self._waiting.values()):
                self._ready.wait(timeout=5)
            order = _order(self._waiting, self._served)
            if not order:
                self._worker = None
                return None
            job = order[0]
            self._waiting[job.owner].popleft()
            self._served[job.owner] = job.seq
            self._current = (job, time.monotonic())
            return job

    def _work(self):
        while (job := self._next()) is not None:
            try:
                self._train(job)
            except RunBusy:
                pass        # another process trains it and keeps its status up to date
            except Exception as err:  # noqa: BLE001 - a crashed run must never kill the queue
                _mark_failed(job.run, err)
            finally:
                with self._lock:
                    self._current = None
                    if self._stops.get(job.run.id) is job.stop:      # not a newer job's (a Resume)
                        self._stops.pop(job.run.id)
                        store.release(job.run.id)

    def _train(self, job: _Job) -> None:
        event = job.stop
        if event.is_set():
            job.run.set_status("stopped", message="Stopped before it started")
            return
        fired = threading.Event()
        timer = threading.Timer(job.limit_s, lambda: (fired.set(), event.set())) if job.limit_s else None
        if timer:
            timer.daemon = True
            timer.start()
        try:
            training.train_run(job.run, stop=event, resume=job.resume)
        finally:
            if timer:
                timer.cancel()
        if fired.is_set() and job.run.status().get("state") == "stopped":
            job.run.set_status("stopped", message=f"Stopped at the teacher's limit of "
                               f"{job.limit_s / 60:g} minutes. The best checkpoint is kept; "
                               "Resume goes on from the last finished epoch.")


def _order(waiting: dict[str, deque], served: dict[str, int]) -> list[_Job]:
    """The waiting jobs in the order they will start: repeatedly, the first job of the owner
    served least recently (never served first; ties: who queued first)."""
    queues = {owner: list(jobs) for owner, jobs in waiting.items() if jobs}
    last = dict(served)
    out = []
    while queues:
        owner = min(queues, key=lambda o: (last.get(o, 0), queues[o][0].seq))
        job = queues[owner].pop(0)
        out.append(job)
        last[owner] = job.seq
        if not queues[owner]:
            del queues[owner]
    return out


def expected_s(cfg: RunConfig) -> float:
    """A rough duration: the time budget if it has one, else its epochs times the median epoch
    time of this server's past runs of the same backbone, freezing and image size."""
    if cfg.time_budget_s:
        return float(cfg.time_budget_s)
    return PREPARE_S + cfg.epochs * _epoch_seconds(cfg.arch, cfg.freeze, cfg.image_size)


_EPOCH_S: dict[tuple, tuple[float, float]] = {}


def _epoch_seconds(arch: str, freeze: str, size: int) -> float:
    key = (arch, freeze, size)
    cached = _EPOCH_S.get(key)
    if cached and time.monotonic() - cached[1] < 300:
        return cached[0]
    seen = []
    for run in store.list_runs()[:100]:
        cfg = run.config
        if (cfg.arch, cfg.freeze, cfg.image_size) == key:
            seen += [row["seconds"] for row in run.epochs() if isinstance(row.get("seconds"), (int, float))]
    value = statistics.median(seen) if seen else FALLBACK_EPOCH_S
    _EPOCH_S[key] = (value, time.monotonic())
    return value


def _mark_failed(run: Run, err: Exception) -> None:
    """Record a run's failure if its folder can still be written (it may have been deleted, or
    the disk be full); either way the worker goes on to the next run."""
    try:
        run.set_status("failed", message=f"{type(err).__name__}: {err}")
    except OSError:
        logging.getLogger(__name__).exception("run %s failed and its status can't be written", run.id)


MANAGER = RunManager()
