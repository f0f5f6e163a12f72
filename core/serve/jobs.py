"""One queued run, trained in its own process: `python -m core job RUN_ID` (what the executor
starts, locally or as a Ray job). The same training as `python -m core train/resume`; Stop arrives
as the run folder's stop file (or SIGTERM, which Ray's stop_job sends) and becomes the loop's stop
event, checked every batch."""
from __future__ import annotations

import contextlib
import os
import signal
import threading

from core.serve import store

POLL_S = 0.1


@contextlib.contextmanager
def child_of_the_queue(folder: store.Run, limit_s: float | None = None):
    """What every process the executor starts needs, for the block: a lower priority, the folder
    held as ours, and one stop event set by the folder's stop file, by SIGTERM (Ray's stop_job)
    or by the time cap. Yields (stop, timed_out)."""
    lower_priority()
    store.hold(folder.id)          # our own pid in status.json means "alive" in this process
    stop, timed_out, ended = threading.Event(), threading.Event(), threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    threading.Thread(target=_watch_stop_file, args=(folder, stop, ended), daemon=True).start()
    timer = threading.Timer(limit_s, lambda: (timed_out.set(), stop.set())) if limit_s else None
    if timer:
        timer.daemon = True
        timer.start()
    try:
        yield stop, timed_out
    finally:
        ended.set()
        if timer:
            timer.cancel()


def run_job(run_id: str, resume: bool = False, limit_s: float | None = None) -> int:
    """Train the run; 0 when it ended in any recorded state (finished, stopped, failed), 3 when
    another process holds it."""
    run = store.get_run(run_id)
    with child_of_the_queue(run, limit_s) as (stop, timed_out):
        from core.training.run import train_run
        try:
            train_run(run, stop=stop, resume=resume)
        except store.RunBusy:
            return 3
    if timed_out.is_set() and run.status().get("state") == "stopped":
        run.set_status("stopped", message="Stopped at the teacher's time limit. The best checkpoint is "
                       "kept; Resume goes on from the last finished epoch while time is left.")
    return 0


def _watch_stop_file(run: store.Run, stop: threading.Event, ended: threading.Event) -> None:
    while not ended.wait(POLL_S):
        if run.stop_requested():
            stop.set()
            return


def lower_priority() -> None:
    """Pages stay responsive: training yields the CPU to the web server."""
    try:
        os.nice(int(os.environ.get("FINETUNE_LAB_NICE", "0")))
    except (OSError, ValueError, AttributeError):
        pass
