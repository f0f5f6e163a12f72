"""A run's status.json as a typed record: its state (one of `State`) and the fields the pages,
the CLI and the queue read. Written and read only through `Run.set_status` / `Run.status`.

The file stays the same JSON object it always was (old run folders read unchanged). A field this
record doesn't name yet (a task's own result, say) is kept in `extra`, so nothing written is
lost. `RunStatus` also answers `status["state"]` and `status.get("test_acc")`, the dict reads
that scripts and notebooks already use.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from enum import Enum


class State(str, Enum):
    """str-valued, so `status.state == "finished"` and the JSON both read as plain text."""
    QUEUED = "queued"
    PREPARING = "preparing"
    RUNNING = "running"
    FINISHED = "finished"
    STOPPED = "stopped"
    FAILED = "failed"
    INTERRUPTED = "interrupted"    # the process training it died; shown, never written by a trainer

    def __str__(self) -> str:
        return self.value

    @property
    def active(self) -> bool:
        return self in ACTIVE


ACTIVE = (State.QUEUED, State.PREPARING, State.RUNNING)


@dataclass
class RunStatus:
    state: State | None = None
    message: str = ""
    updated: float = 0.0
    pid: int | None = None
    host: str | None = None
    # progress of the current step (decoding, an epoch, a test)
    phase: str | None = None
    step: int | None = None
    steps: int | None = None
    fraction: float | None = None
    epoch: int | None = None
    epochs: int | None = None
    # results
    best_val_acc: float | None = None
    best_epoch: int | None = None
    last_epoch: int | None = None
    early_stopped: bool | None = None
    test_acc: float | None = None
    # how it trains
    device: str | None = None
    precision: dict | None = None     # phase -> precision it ran in
    cache: dict | None = None
    plan: dict | list | None = None
    used_s: float | None = None
    owner: str | None = None
    # where the lab's queue placed it
    where: str | None = None
    slot: int | None = None
    launcher: str | None = None
    slot_started: float | None = None
    extra: dict = field(default_factory=dict)

    @classmethod
    def from_dict(cls, data: dict | None) -> "RunStatus":
        data = dict(data or {})
        known = {f.name for f in fields(cls)} - {"extra"}
        status = cls(**{k: data.pop(k) for k in list(data) if k in known})
        status.extra = data
        if status.state is not None:
            status.state = _state(status.state)
        return status

    def to_dict(self) -> dict:
        out = {k: v for k, v in asdict(self).items() if k != "extra" and v is not None}
        out.update(self.extra)
        if self.state is not None:
            out["state"] = self.state.value
        return out

    def updated_with(self, **info) -> "RunStatus":
        return RunStatus.from_dict({**self.to_dict(), **info})

    @property
    def active(self) -> bool:
        return self.state in ACTIVE

    # dict-style reads, for callers that treat status.json as the dict it is on disk
    def get(self, key: str, default=None):
        value = self.to_dict().get(key, default)
        return default if value is None else value

    def __getitem__(self, key: str):
        data = self.to_dict()
        if key not in data:
            raise KeyError(key)
        return data[key]

    def __contains__(self, key: str) -> bool:
        return key in self.to_dict()

    def keys(self):
        return self.to_dict().keys()

    def items(self):
        return self.to_dict().items()

    def __iter__(self):
        return iter(self.to_dict())

    def __len__(self) -> int:
        return len(self.to_dict())

    def __eq__(self, other) -> bool:
        if isinstance(other, dict):
            return self.to_dict() == other
        return isinstance(other, RunStatus) and self.to_dict() == other.to_dict()


def _state(value) -> State:
    try:
        return State(value)
    except ValueError:
        raise ValueError(f"{value!r} is not a run state; it must be one of "
                         f"{', '.join(s.value for s in State)}.") from None


def overall_fraction(status: RunStatus) -> float | None:
    """How far along the run is, 0..1, for a progress bar; None when nothing counts yet. While
    epochs train it is the share of all epochs (the current one by its step); in any other phase
    (decoding, building the model, testing) the share of that phase's steps."""
    if not status.steps:
        return None
    within = (status.step or 0) / status.steps
    if status.epochs and status.phase in ("train", "val"):
        within = (max((status.epoch or 0) - 1, 0) + within) / status.epochs
    return min(1.0, within)
