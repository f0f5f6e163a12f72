"""At most N heavy page jobs at once across the whole server (every session, every server process
on the data directory), each with a time cap: for the jobs that still run beside the page that
asked for them (the embedding maps, export checks, the heat-map sanity check and class-average
Grad-CAM, which need the page's loaded model or draw as they go). Doctor audits and the LR range
test go further: they are queued tasks in worker processes (core.serve.tasks).

    with gate.slot("embedding map", limit_s=600) as check:
        frames = embedding_map.run_map_frames(run, method, progress=lambda d, t, m: (check(), bar(d, t, m)))
"""
from __future__ import annotations

import contextlib
import time

from core import paths

try:
    import fcntl
except ImportError:
    fcntl = None


class Busy(RuntimeError):
    """Every slot is taken; the message says so."""


class TimeUp(RuntimeError):
    """The job ran past the teacher's time cap."""


@contextlib.contextmanager
def slot(what: str, slots: int = 2, limit_s: float | None = None, wait_s: float = 20.0):
    """Hold one of `slots` server-wide slots for the block; yields `check()`, which raises TimeUp
    past `limit_s` (call it from the job's progress callback). Busy when none frees up in
    `wait_s`."""
    handle = _take(max(1, slots), wait_s, what)
    started = time.monotonic()

    def check() -> None:
        if limit_s and time.monotonic() - started > limit_s:
            raise TimeUp(f"The {what} stopped at the teacher's limit of {limit_s / 60:g} minutes per task.")
    try:
        yield check
    finally:
        if handle is not None:
            handle.close()


def _take(slots: int, wait_s: float, what: str):
    if fcntl is None:
        return None
    folder = paths.home() / "tasks"
    folder.mkdir(parents=True, exist_ok=True)
    end = time.monotonic() + wait_s
    while True:
        for i in range(slots):
            handle = open(folder / f".page-slot-{i}.lock", "a+")
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return handle
            except BlockingIOError:
                handle.close()
        if time.monotonic() > end:
            raise Busy(f"The server is busy with {slots} heavy task(s) already; try the {what} again in a minute.")
        time.sleep(0.25)
