"""The pages' heavy jobs (a Doctor audit, the learning-rate finder), as queued work: each a
folder `<home>/tasks/<id>/` (task.json, status.json, its result files) that the lab's queue hands
to a worker process (`python -m core task ID`) on a task slot: the same fair turns, per-user cap,
Stop and time cap as training runs, and never in the web server's process.

    task = tasks.submit("doctor", {"folder": "/data/photos"}, owner="lab-3-ana")
    tasks.get_task(task.id).status()      # queued / running (fraction, message) / finished
"""
from __future__ import annotations

import re
import secrets
import threading
import time
from pathlib import Path

from core import paths
from core.progress import Cancelled, Progress
from core.serve import runqueue, store
from core.serve.runqueue import Job

PROGRESS_EVERY_S = 0.3


def tasks_dir() -> Path:
    path = paths.home() / "tasks"
    path.mkdir(parents=True, exist_ok=True)
    return path


def get_task(task_id: str) -> store.Run:
    path = tasks_dir() / Path(task_id).name
    if not (path / "task.json").exists():
        raise FileNotFoundError(f"No task called {task_id}")
    return store.Run(path)


def submit(kind: str, args: dict, owner: str = "", limit_s: float | None = None,
           max_waiting: int | None = None) -> store.Run:
    """Queue a task; ValueError with a sentence when this user already has `max_waiting` waiting."""
    if kind not in KINDS:
        raise ValueError(f"Unknown task {kind!r}.")
    waiting = sum(j.owner == owner for j in runqueue.waiting("task"))
    if max_waiting is not None and waiting >= max_waiting:
        raise ValueError(f"You already have {waiting} task(s) waiting; wait for one to finish.")
    label = re.sub(r"[^a-z_]", "", kind)
    path = tasks_dir() / f"{time.strftime('%Y%m%d-%H%M%S')}-{label}-{secrets.token_hex(3)}"
    path.mkdir(parents=True)
    task = store.Run(path)
    task.write_json("task.json", dict(kind=kind, args=args, owner=owner, created=time.time()))
    task.set_status("queued", message="Waiting for a free task slot", owner=owner, fraction=0.0)
    runqueue.push(Job(task.id, owner, False, limit_s, kind="task"))
    return task


def stop(task_id: str) -> None:
    try:
        task = get_task(task_id)
    except FileNotFoundError:
        return
    if runqueue.remove_waiting(task_id):
        task.set_status("stopped", message="Stopped before it started")
    elif task.status().get("state") in store.ACTIVE_STATES:
        task.request_stop()


# ---------------------------------------------------------------- the worker process's side

def run_task(task_id: str, limit_s: float | None = None) -> int:
    """`python -m core task ID`: run it, record finished / stopped / failed with one sentence."""
    from core.serve.jobs import child_of_the_queue
    task = get_task(task_id)
    spec = task.read_json("task.json", {}) or {}
    # the lock says "alive" to every reader however long a step goes without a progress beat
    with child_of_the_queue(task, limit_s) as (stop_event, timed_out), task.training_lock():
        try:
            task.set_status("running", message="Starting", fraction=0.0)
            KINDS[spec.get("kind")](task, dict(spec.get("args") or {}), _progress(task, stop_event), stop_event)
            task.set_status("finished", message="Done", fraction=1.0)
        except Exception as err:  # noqa: BLE001 - every ending gets a sentence in the task folder
            task.set_status(*_ending(err, stop_event, timed_out, limit_s))
    return 0


def _ending(err: Exception, stop_event, timed_out, limit_s) -> tuple[str, str]:
    if isinstance(err, Cancelled) or stop_event.is_set():
        if timed_out.is_set():
            return "stopped", f"Stopped at the teacher's limit of {limit_s / 60:g} minutes per task."
        return "stopped", "Stopped."
    if isinstance(err, (ValueError, OSError, KeyError)):
        return "failed", str(err) or type(err).__name__
    return "failed", f"Unexpected error: {type(err).__name__}: {err}"


def _progress(task: store.Run, stop_event: threading.Event) -> Progress:
    """A core.progress callback whose message and fraction go to status.json at most every
    PROGRESS_EVERY_S (the pages poll it); raises Cancelled once Stop was pressed."""
    last = [0.0]

    def report(done: int, total: int, message: str) -> None:
        if stop_event.is_set():
            raise Cancelled()
        fraction = min(max(done / max(total, 1), 0.0), 1.0)
        if time.monotonic() - last[0] >= PROGRESS_EVERY_S or fraction >= 1:
            last[0] = time.monotonic()
            task.set_status("running", message=str(message)[:200], fraction=float(fraction))
    return report


# ---------------------------------------------------------------- the kinds of task

def doctor_task(task: store.Run, args: dict, progress, stop_event) -> None:
    """A Doctor audit of `folder`; the result is kept where the page reads it (doctor.saved)."""
    from core.trust import doctor
    result = doctor.audit(args["folder"], progress=progress, stop=stop_event)
    doctor.save(result)
    task.write_json("result.json", {"root": result.root, "findings": len(result.findings)})


def lr_task(task: store.Run, args: dict, progress, stop_event) -> None:
    """The learning-rate range test of a configuration; its curve and suggestion in result.json."""
    from core.config import validate_config
    from core.training.lr_find import suggest_lr
    cfg = validate_config(args["config"])
    task.write_json("result.json", suggest_lr(cfg, progress=progress))


KINDS = {"doctor": doctor_task, "lr": lr_task}
