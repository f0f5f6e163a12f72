"""The lab's run manager: what pages, sweeps and notebooks call to queue, stop, resume and find
runs. Runs wait in the queue on disk (core.serve.runqueue: fair turns between users, survives a restart)
and train in their own processes (core.serve.executor: one per free slot, or Ray jobs). This process
never trains: a crash in a run's native code ends that run, not the web server.
"""
from __future__ import annotations

import os
import statistics
import time
from pathlib import Path

from core import paths
from core.serve import runqueue, store
from core.config import RunConfig
from core.serve.executor import Executor, LocalLauncher
from core.serve.runqueue import Job
from core.serve.store import ACTIVE_STATES, Run

FALLBACK_EPOCH_S = 30.0      # a guess for a kind of run this server has never trained
PREPARE_S = 20.0             # starting a process, building the model and decoding images


class QueueFull(ValueError):
    """A user already has as many runs waiting as the admin allows."""


class RunManager:
    def __init__(self, executor: Executor | None = None):
        self._executor = executor

    @property
    def executor(self) -> Executor:
        if self._executor is None:
            self._executor = make_executor()
        return self._executor

    def close(self) -> None:
        """Stop this process's dispatcher (tests, notebooks); `start` makes a new one."""
        if self._executor is not None:
            self._executor.close()
            self._executor = None

    def reconfigure(self) -> None:
        """The teacher changed the slots or the Ray address: the next dispatcher uses them. Runs
        already training go on; this process keeps reaping the children it started."""
        old, self._executor = self._executor, None
        if old is None:
            return
        old.close()
        new = self.executor
        if isinstance(old.launcher, LocalLauncher) and isinstance(new.launcher, LocalLauncher):
            new.launcher.procs.update(old.launcher.procs)
        self.start()

    def start(self) -> None:
        """Start this process's dispatcher (idempotent): after a restart, queued runs train."""
        self.executor.ensure_started()

    # ------------------------------------------------------------ submitting
    def submit(self, config: RunConfig, root: Path | None = None, owner: str = "",
               max_queued: int | None = None, limit_s: float | None = None) -> Run:
        """Create the run and queue it. `max_queued` (a student's cap) refuses it while the owner
        has that many waiting; `limit_s` stops it after that long in training."""
        self.check_room(owner, max_queued)
        if root is not None and Path(root).resolve() != paths.runs_dir().resolve():
            raise ValueError("Queued runs live in the lab's runs folder; train elsewhere with core.train().")
        run = Run.create(config, root, owner)
        self._enqueue(run, Job(run.id, owner, False, limit_s))
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
        self.wait(run.id, timeout=10)     # Stop was just pressed: its process is still tidying up
        if not run.resumable():
            raise ValueError("This run has no saved epoch to resume from, or it already finished.")
        if self.knows(run.id) or run.busy():
            raise ValueError("Another process is still training this run (perhaps paused): stop "
                             "that process first, then resume.")
        if limit_s:        # the minute cap counts every start of the run, not just this one
            used = float(run.status().get("used_s") or 0)
            if used >= limit_s - 1:
                raise ValueError(f"This run has used the teacher's limit of {limit_s / 60:g} minutes; "
                                 "start a new run instead.")
            limit_s -= used
        run.set_status("queued", message="Waiting for a free slot (resume)")
        self._enqueue(run, Job(run.id, run.owner if owner is None else owner, True, limit_s))

    def _enqueue(self, run: Run, job: Job) -> None:
        run.clear_stop()
        runqueue.push(job)
        self.start()
        self.executor.wake()

    # ------------------------------------------------------------ asking
    def stop(self, run_id: str) -> None:
        """A waiting run leaves the queue at once; a training one stops after its current batch."""
        try:
            run = store.get_run(run_id)
        except FileNotFoundError:
            return
        if runqueue.remove_waiting(run_id):
            run.set_status("stopped", message="Stopped before it started")
            return
        if run.status().get("state") in ACTIVE_STATES:
            run.request_stop()

    def stopping(self, run_id: str) -> bool:
        """Stop was pressed and the run hasn't ended yet."""
        try:
            run = store.get_run(run_id)
        except FileNotFoundError:
            return False
        return run.stop_requested() and run.status().get("state") in ACTIVE_STATES

    def knows(self, run_id: str) -> bool:
        """Whether the run is in the lab's queue, waiting or training."""
        return runqueue.has(run_id)

    def busy(self) -> bool:
        return bool(runqueue.waiting() or runqueue.running())

    def waiting_count(self, owner: str, kind: str = "run") -> int:
        return sum(job.owner == owner for job in runqueue.waiting(kind))

    def wait(self, run_id: str, timeout: float | None = None) -> bool:
        """Block until `run_id` leaves the queue (tests, notebooks)."""
        if self.knows(run_id):
            self.start()
        end = time.monotonic() + (timeout if timeout is not None else 1e9)
        while self.knows(run_id) and time.monotonic() < end:
            time.sleep(0.05)
        return not self.knows(run_id)

    def submit_task(self, kind: str, args: dict, owner: str = "", admin: bool = False):
        """Queue a page's heavy job (core.serve.tasks) on the task slots, within the teacher's task
        time cap (for students) and one waiting task per student."""
        from core.serve import tasks
        rules = _policy()
        task = tasks.submit(kind, args, owner, limit_s=None if admin else rules.task_minutes * 60.0,
                            max_waiting=None if admin else 1)
        self.start()
        self.executor.wake()
        return task

    def where(self, run_id: str) -> Job | None:
        """The queue's record of a run: its slot, device and host once it trains."""
        return runqueue.get(run_id)

    def overview(self) -> dict:
        """What the lab's executor is doing: slots, the runs training and the runs waiting."""
        return dict(slots=self.executor.launcher.slots(), running=runqueue.running("run"),
                    waiting=runqueue.order(), launcher=self.executor.launcher.name,
                    tasks=runqueue.running("task") + runqueue.waiting("task"))

    def place(self, run_id: str) -> tuple[int, float] | None:
        """(runs ahead of it, estimated seconds until it starts) for a waiting run, else None.
        Runs ahead share the slots, so the wait is their expected time divided by the slots."""
        order = runqueue.order()
        ids = [job.run_id for job in order]
        if run_id not in ids:
            return None
        ahead = order[:ids.index(run_id)]
        training = runqueue.running("run")
        work = sum(_expected(job.run_id) for job in ahead)
        now = time.time()
        work += sum(max(0.0, _expected(job.run_id) - (now - (job.started or now))) for job in training)
        n_slots = max(1, len(self.executor.launcher.slots()))
        return len(ahead) + len(training), work / n_slots


def make_executor() -> Executor:
    """Ray jobs when FINETUNE_LAB_RAY_ADDRESS (or the teacher's setting) names a cluster, else
    child processes on this machine's slots."""
    address = os.environ.get("FINETUNE_LAB_RAY_ADDRESS") or _policy().ray_address
    if address:
        from core.serve.ray_launcher import RayLauncher
        return Executor(RayLauncher(address))
    return Executor(LocalLauncher(plan=_local_plan))


def _policy():
    from core.serve.access import load_policy
    return load_policy()


def _local_plan():
    from core.serve import slots
    rules = _policy()
    return slots.plan(setting=rules.slots, per_gpu=rules.runs_per_gpu)


def _expected(run_id: str) -> float:
    try:
        return expected_s(store.get_run(run_id).config)
    except FileNotFoundError:
        return 0.0


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
            seen += store.whole_epoch_seconds(run.epochs())
    value = statistics.median(seen) if seen else FALLBACK_EPOCH_S
    _EPOCH_S[key] = (value, time.monotonic())
    return value


MANAGER = RunManager()
