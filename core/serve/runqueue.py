"""The lab's queue of runs, kept on disk so it survives a server restart and is shared by every
process that serves the lab (two Streamlit servers on one data directory never take the same run).

    <home>/queue/waiting/<run id>.json   a run waiting for a slot: owner, place, resume, time cap
    <home>/queue/running/<run id>.json   the same, plus where it trains: slot, device, host, pid
    <home>/queue/state.json              the last place handed out, and when each owner was served
    <home>/queue/.lock                   held (flock) while any of the above changes

Imports nothing heavy: the run store asks it whether a 'queued' run is still in the queue.
"""
from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from core import paths


@dataclass
class Job:
    run_id: str                     # a run's id, or a page task's (kind "task")
    owner: str = ""
    resume: bool = False
    limit_s: float | None = None
    seq: int = 0
    submitted: float = field(default_factory=time.time)
    # filled in when it starts
    slot: int | None = None
    device: str = ""
    host: str = ""
    pid: int | None = None
    spawner: int | None = None      # pid of the server process that started it (it reaps it)
    launcher: str = "local"
    handle: str = ""                # the Ray job's submission id
    kind: str = "run"               # "run" (training) or "task" (a page's heavy job: core.serve.tasks)
    started: float | None = None

    @classmethod
    def from_dict(cls, data: dict) -> "Job":
        known = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        return cls(**known)


def root() -> Path:
    path = paths.home() / "queue"
    for sub in ("waiting", "running"):
        (path / sub).mkdir(parents=True, exist_ok=True)
    return path


def locked():
    """Every change to the queue happens under this OS lock (freed if its holder dies)."""
    return paths.locked(root() / ".lock")


def _file(kind: str, run_id: str) -> Path:
    return root() / kind / f"{Path(run_id).name}.json"


def _read(path: Path) -> Job | None:
    try:
        return Job.from_dict(json.loads(path.read_text(encoding="utf-8")))
    except (OSError, ValueError, TypeError):
        return None


def _write(kind: str, job: Job) -> None:
    paths.atomic_write_text(_file(kind, job.run_id), json.dumps(asdict(job), indent=1))


def _jobs(kind: str) -> list[Job]:
    jobs = [_read(p) for p in (root() / kind).glob("*.json")]
    return sorted((j for j in jobs if j), key=lambda j: j.seq)


def _state() -> dict:
    try:
        data = json.loads((root() / "state.json").read_text(encoding="utf-8"))
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def _save_state(state: dict) -> None:
    paths.atomic_write_text(root() / "state.json", json.dumps(state))


# ---------------------------------------------------------------- reading (no lock needed)

def waiting(kind: str | None = None) -> list[Job]:
    return [j for j in _jobs("waiting") if kind is None or j.kind == kind]


def running(kind: str | None = None) -> list[Job]:
    return [j for j in _jobs("running") if kind is None or j.kind == kind]


def get(run_id: str) -> Job | None:
    """The queue's record of a run, waiting or running, else None."""
    return _read(_file("running", run_id)) or _read(_file("waiting", run_id))


def has(run_id: str) -> bool:
    return _file("waiting", run_id).exists() or _file("running", run_id).exists()


def order(jobs: list[Job] | None = None, served: dict | None = None) -> list[Job]:
    """The waiting jobs in the order they will start: repeatedly, the first job of the owner
    served least recently (never served first; ties: who queued first)."""
    jobs = waiting("run") if jobs is None else jobs
    served = {k: v for k, v in _state().get("served", {}).items() if ":" not in k} if served is None else served
    queues: dict[str, list[Job]] = {}
    for job in sorted(jobs, key=lambda j: j.seq):
        queues.setdefault(job.owner, []).append(job)
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


# ---------------------------------------------------------------- changing (under the lock)

def push(job: Job) -> Job:
    with locked():
        state = _state()
        job.seq = int(state.get("seq", 0)) + 1
        state["seq"] = job.seq
        _save_state(state)
        _write("waiting", job)
    return job


def remove_waiting(run_id: str) -> bool:
    """Take a run out of the queue before it started; False when it was not waiting."""
    with locked():
        try:
            _file("waiting", run_id).unlink()
            return True
        except FileNotFoundError:
            return False


def take_next(skip: set[str] = frozenset(), kind: str = "run") -> Job | None:
    """Under the lock (the caller holds it): move the next job of `kind` in fair order to
    running/. Jobs in `skip` stay waiting (a launcher has no room for them yet)."""
    state = _state()
    served = state.setdefault("served", {})
    prefix = "" if kind == "run" else f"{kind}:"       # tasks take turns among themselves
    mine = {k[len(prefix):]: v for k, v in served.items() if (k.startswith(prefix) if prefix else ":" not in k)}
    for job in order([j for j in waiting() if j.kind == kind], mine):
        if job.run_id in skip:
            continue
        src = _file("waiting", job.run_id)
        if not src.exists():
            continue
        served[prefix + job.owner] = job.seq
        _save_state(state)
        _write("running", job)
        src.unlink()
        return job
    return None


def update_running(job: Job) -> None:
    _write("running", job)


def done(run_id: str) -> None:
    _file("running", run_id).unlink(missing_ok=True)
