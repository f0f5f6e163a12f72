"""Runs leave the web server: a dispatcher thread in each server process takes runs from the
queue on disk (core.serve.runqueue) in fair order and starts each as its own OS process
(`python -m core job RUN_ID`) on a free slot of this machine (core.serve.slots), or as a Ray job when
a Ray address is configured. A process that dies (kill -9, the OOM killer, SIGBUS, a segfault)
ends its own run with one sentence; the slot is freed and the next run starts.

The run folder stays the contract: the child writes status.json and epochs.jsonl as the CLI does;
this module only writes the queue records and, when a child died without saying so, its status.
"""
from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import threading
import time

from core import paths
from core.serve import forked, runqueue, slots
from core.serve.runqueue import Job
from core.serve.store import ACTIVE_STATES, HOST, Run, get_run

log = logging.getLogger(__name__)
TICK_S = 0.25
KILL_AFTER_S = 30.0      # a Stop the child has not honoured by then ends it by force
NICE = 10
SLOTS_TTL_S = 3.0

SIGNAL_SENTENCES = {
    signal.SIGKILL: ("The training process was killed (signal 9), most often by the system when "
                     "the machine ran out of memory: try a smaller batch size or image size, or "
                     "freeze more of the model. Finished epochs are kept; Resume goes on."),
    signal.SIGBUS: ("The training process crashed reading a memory-mapped file (SIGBUS), which "
                    "usually means the disk filled up: free some space, then Resume."),
    signal.SIGSEGV: ("The training process crashed in native code (segmentation fault). Finished "
                     "epochs are kept; Resume goes on, or try another backbone."),
    signal.SIGTERM: "The training process was ended from outside (SIGTERM). Resume goes on.",
}


def death_sentence(code: int | None, log_tail: str = "") -> str:
    """One sentence for a training process that ended without recording how."""
    if code is None:
        return ("The process training this run ended while no server watched it (server "
                "restart?). Finished epochs and the best checkpoint are kept; Resume goes on.")
    if code < 0:
        try:
            sig = signal.Signals(-code)
        except ValueError:
            return f"The training process ended on signal {-code}. Resume goes on."
        return SIGNAL_SENTENCES.get(sig, f"The training process ended on {sig.name}. Resume goes on.")
    last = log_tail.strip().splitlines()[-1:] or [""]
    return f"The training process exited with status {code}: {last[0][:300]}".rstrip(": ")


def pid_alive(pid: int | None) -> bool:
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except (OSError, ValueError):
        return False
    try:        # a zombie (exited, not yet reaped by its parent) is not alive
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


# ---------------------------------------------------------------- launchers

class LocalLauncher:
    """Child processes on this machine, one per free slot: `python -m core job RUN_ID` (or
    `task TASK_ID` for the pages' heavy tasks)."""

    def __init__(self, plan=None, name: str = "local", verb: str = "job"):
        self.name, self.verb = name, verb
        self.slots = slots.Cached(plan or slots.plan, SLOTS_TTL_S)    # the teacher may change them on Home
        self.procs: dict[str, subprocess.Popen | forked.Child] = {}

    def start(self, job: Job, slot: slots.Slot, run: Run) -> Job:
        env = dict(os.environ, **slot.env, **slots.thread_env(slot.threads),
                   FINETUNE_LAB_NICE=str(NICE), PYTHONUNBUFFERED="1")
        argv = [self.verb, job.run_id] + job_args(job)
        proc = self._forked(argv, env, slot, run)
        if proc is None:
            with open(run.file("train.log"), "ab") as out:
                # a session of its own: Ctrl+C on the server (or its crash) leaves the run training
                proc = subprocess.Popen([sys.executable, "-m", "core", *argv], cwd=paths.REPO_ROOT, env=env,
                                        stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                        start_new_session=True)
        self.procs[job.run_id] = proc
        job.pid = proc.pid
        return job

    @staticmethod
    def _forked(argv: list[str], env: dict, slot: slots.Slot, run: Run):
        """The child from the warm fork server (core.serve.forked) on a CPU slot, else None."""
        if slot.device != "cpu" or not forked.available():
            return None
        try:
            return forked.start(argv, env, run.file("train.log"), paths.REPO_ROOT)
        except Exception:  # noqa: BLE001 - a fresh interpreter still starts it
            log.exception("the fork server could not start %s; starting a new process", argv)
            return None

    def poll(self, job: Job) -> tuple[bool, int | None]:
        """(ended, exit code); a child of another (dead) server reads as ended with code None."""
        proc = self.procs.get(job.run_id)
        if proc is not None:
            code = proc.poll()
            if code == forked.LOST and pid_alive(job.pid):
                return False, None          # the fork server died, not the child: watch its pid
            if code is not None:
                self.procs.pop(job.run_id, None)
            return code is not None, code
        return not pid_alive(job.pid), None

    def mine(self, job: Job) -> bool:
        return job.run_id in self.procs

    def collect(self) -> None:
        """Reap children whose queue record is gone (a test changed FINETUNE_LAB_HOME, someone
        deleted the queue folder): no zombie is left, and their runs read as interrupted."""
        known = {job.run_id for job in runqueue.running()}
        for run_id, proc in list(self.procs.items()):
            if run_id not in known and proc.poll() is not None:
                self.procs.pop(run_id, None)

    def started(self, job: Job) -> bool:
        return job.pid is not None

    def kill(self, job: Job) -> None:
        try:
            os.killpg(job.pid, signal.SIGKILL)
        except (OSError, TypeError):
            pass


def job_args(job: Job) -> list[str]:
    """The entry point's flags for a queue record (local processes and Ray jobs alike)."""
    args = ["--resume"] if job.resume else []
    return args + (["--limit-s", f"{job.limit_s:g}"] if job.limit_s else [])


# ---------------------------------------------------------------- the dispatcher

class Executor:
    """Fills free slots from the queue; reaps, and explains, processes that ended. Two pools:
    training runs on `launcher`'s slots (this machine's, or a Ray cluster's), and the pages'
    heavy tasks (core.serve.tasks: audits, maps, checks) on a few local task slots of their own, so a
    Doctor audit never waits behind thirty training runs."""

    def __init__(self, launcher=None, task_launcher=None):
        self.launcher = launcher or LocalLauncher()
        self.task_launcher = task_launcher or LocalLauncher(plan=_task_plan, name="task", verb="task")
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stopping: dict[str, float] = {}
        self._closed = threading.Event()

    @property
    def pools(self) -> dict[str, object]:
        return {"run": self.launcher, "task": self.task_launcher}

    def ensure_started(self) -> None:
        with self._lock:
            if self._closed.is_set():
                return
            if self._thread is None:
                forked.warm()
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._loop, name="finetune-lab-dispatcher",
                                                daemon=True)
                self._thread.start()

    def wake(self) -> None:
        self._wake.set()

    def close(self, timeout: float = 5.0) -> None:
        """End the dispatcher thread (runs it started go on training; another server reaps them)."""
        self._closed.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def _loop(self) -> None:
        while not self._closed.is_set():
            try:
                self.tick()
            except Exception:  # noqa: BLE001 - the dispatcher must outlive any one bad record
                log.exception("dispatcher tick failed")
            self._wake.wait(TICK_S)
            self._wake.clear()

    def tick(self) -> None:
        self.reap()
        self.fill()

    # ------------------------------------------------------------ starting
    def fill(self) -> None:
        with runqueue.locked():
            for kind, launcher in self.pools.items():
                while (slot := self._free_slot(launcher)) is not None:
                    job = runqueue.take_next(kind=kind)
                    if job is None:
                        break
                    self._launch(job, slot, launcher)

    def _free_slot(self, launcher) -> slots.Slot | None:
        taken = {j.slot for j in runqueue.running() if j.launcher == launcher.name and j.host == HOST}
        return next((s for s in launcher.slots() if s.index not in taken), None)

    def _launch(self, job: Job, slot: slots.Slot, launcher) -> None:
        job.slot, job.device, job.host = slot.index, slot.device, HOST
        job.spawner, job.launcher, job.started = os.getpid(), launcher.name, time.time()
        runqueue.update_running(job)        # the slot is taken before the process exists
        try:
            run = folder_of(job)
        except FileNotFoundError:           # deleted while it waited
            runqueue.done(job.run_id)
            return
        if run.stop_requested():
            run.set_status("stopped", message="Stopped before it started")
            runqueue.done(job.run_id)
            return
        try:
            job = launcher.start(job, slot, run)
        except Exception as err:  # noqa: BLE001 - can't start (no Ray room, bad env): say so
            runqueue.done(job.run_id)
            _safe_status(run, "failed", message=f"It could not be started: {err}")
            return
        runqueue.update_running(job)
        where = f"Ray ({slot.device})" if launcher.name == "ray" else f"{slot.label()} on {HOST}"
        _safe_status(run, "preparing", message=f"Starting on {where}", pid=job.pid or 0,
                     slot=slot.index, where=where, launcher=launcher.name, slot_started=job.started)

    # ------------------------------------------------------------ ending
    def reap(self) -> None:
        for launcher in self.pools.values():
            launcher.collect()
        names = {launcher.name: launcher for launcher in self.pools.values()}
        for job in runqueue.running():
            launcher = names.get(job.launcher)
            if launcher is None or (launcher.name != "ray" and job.host != HOST):
                continue
            if not launcher.started(job):
                if time.time() - (job.started or 0) > 60 and not pid_alive(job.spawner):
                    runqueue.done(job.run_id)        # its server died before starting it
                continue
            if not launcher.mine(job) and pid_alive(job.spawner) and job.spawner != os.getpid():
                continue        # another live server started it and will reap it
            ended, code = launcher.poll(job)
            if ended:
                self._finish(job, code)
            else:
                self._enforce_stop(job, launcher)

    def _finish(self, job: Job, code: int | None) -> None:
        """Record how it ended, then free its slot: whoever waits for the queue record to go
        finds the run folder already final (status, used time, no stop file)."""
        forced = self._stopping.pop(job.run_id, None) is not None
        try:
            self._record_end(job, code, forced)
        finally:
            runqueue.done(job.run_id)
            self._wake.set()                  # a slot is free: fill it now, not at the next tick

    def _record_end(self, job: Job, code: int | None, forced: bool) -> None:
        try:
            run = folder_of(job)
        except FileNotFoundError:
            return
        if job.kind == "run":
            _add_used_time(run, job)
        raw = run.read_json("status.json", {}) or {}
        if raw.get("state") in ACTIVE_STATES:     # the child died without recording its end
            if forced:
                _safe_status(run, "stopped", message="Stopped: the process did not answer Stop in time "
                             "and was ended." + (" Resume goes on from the last finished epoch."
                                                 if job.kind == "run" else ""))
            else:
                _safe_status(run, "interrupted", message=death_sentence(code, _tail(run)))
        run.clear_stop()

    def _enforce_stop(self, job: Job, launcher) -> None:
        """A child that ignores its stop file (stuck in native code) is ended after a grace time."""
        try:
            run = folder_of(job)
        except FileNotFoundError:
            return
        if not run.stop_requested():
            return
        first = self._stopping.setdefault(job.run_id, time.monotonic())
        if time.monotonic() - first > KILL_AFTER_S:
            launcher.kill(job)


def folder_of(job: Job) -> Run:
    """The run folder, or the task folder, a queue record stands for."""
    if job.kind == "task":
        from core.serve.tasks import get_task
        return get_task(job.run_id)
    return get_run(job.run_id)


def _task_plan() -> list[slots.Slot]:
    """Task slots: the teacher's number of page tasks at once (default 2), sharing the cores."""
    from core.serve.access import load_policy
    count = max(1, load_policy().max_tasks)
    return [slots.Slot(i + 1, "cpu", max(1, slots.cores() // count), {"CUDA_VISIBLE_DEVICES": ""})
            for i in range(count)]


def _add_used_time(run: Run, job: Job) -> None:
    """Seconds this run has had a slot, over all its starts: a Resume counts against the same
    minute cap (kept even when the process died without a word)."""
    if not job.started:
        return
    raw = run.read_json("status.json", {}) or {}
    raw["used_s"] = round(float(raw.get("used_s") or 0) + max(0.0, time.time() - job.started), 1)
    try:
        run.write_json("status.json", raw)
    except OSError:
        pass


def _tail(run: Run, lines: int = 5) -> str:
    try:
        data = run.file("train.log").read_bytes()[-4000:]
    except OSError:
        return ""
    return "\n".join(data.decode("utf-8", "replace").splitlines()[-lines:])


def _safe_status(run: Run, state: str, **info) -> None:
    try:
        run.set_status(state, **info)
    except OSError:
        log.exception("run %s: status can't be written", run.id)
