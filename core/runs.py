"""Runs on disk (the queue that trains them is core.worker).

A run is a folder: config.json, classes.json, splits.json, status.json, epochs.jsonl,
best.safetensors, test_metrics.json, predictions.csv. The disk is the truth; the queue only
decides what trains next. Status is written by whoever trains (the app's worker thread, or a
command-line process), so any page, tab or restarted server reads the same state.
"""
from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import threading
import time
from dataclasses import asdict, dataclass, field, fields
from datetime import datetime, timedelta
from pathlib import Path

from core import paths

ACTIVE_STATES = ("queued", "preparing", "running")
STALE_AFTER_S = 120


@dataclass
class RunConfig:
    """Everything that defines a run; stored as config.json."""
    data_root: str = ""
    split: tuple = (0.7, 0.15, 0.15)
    split_seed: int = 0
    max_per_class: int | None = None
    arch: str = "mobilenetv2_100"
    weights: str = "auto"            # auto, bundled, hub-cache, hub, file, random
    weights_file: str | None = None
    freeze: str = "head"             # head, top_k, full, scratch
    top_k: int = 1
    head: str = "linear"             # linear, mlp
    hidden: int = 128
    dropout: float = 0.0
    optimizer: str = "adamw"         # sgd, adam, adamw, rmsprop
    lr: float = 1e-3
    weight_decay: float = 1e-4
    momentum: float = 0.9
    scheduler: str = "none"          # none, step, cosine (with warm-up), onecycle
    step_size: int = 7
    gamma: float = 0.1
    warmup_epochs: int = 0
    label_smoothing: float = 0.0
    patience: int = 0                # early stopping: epochs without val improvement (0 = off)
    phase1_epochs: int = 0           # two-phase: this many head-only epochs first, then unfreeze
    backbone_lr_mult: float = 1.0    # backbone LR = lr x this, while the backbone trains
    normalize: str = "backbone"      # backbone (its pretrained mean/std) or dataset (computed)
    epochs: int = 10
    batch_size: int = 32
    image_size: int = 128
    seed: int = 0
    augment: dict = field(default_factory=dict)
    cache_features: bool = True      # run frozen layers once per image and train on their output
    aug_views: int = 0               # augmented views per training image cached through frozen layers
                                     # (0: augmentations run live, so caching is off when augmenting)
    time_budget_s: int = 0           # >0: plan the phases to fit this many seconds (core.budget)
    device: str = "auto"
    name: str = ""
    class_weights: bool = False      # weight the loss by 1/class frequency (imbalanced data)
    baseline: str = ""               # "logreg": logistic regression on raw pixels, no network
    sweep: str = ""                  # id of the sweep this run belongs to
    tags: dict = field(default_factory=dict)   # the settings a sweep varied, for the results table

    @classmethod
    def from_dict(cls, data: dict) -> "RunConfig":
        known = {f.name for f in fields(cls)}
        cfg = cls(**{k: v for k, v in data.items() if k in known})
        cfg.split = tuple(cfg.split)
        return cfg

    def to_dict(self) -> dict:
        return asdict(self)


FREEZE_MODES = {
    "head": "Head only (backbone frozen)",
    "top_k": "Top k blocks + head",
    "full": "Full fine-tune",
    "scratch": "From scratch (random init, all trainable)",
}

# What the app's widgets offer. A preset must fit them, since a page can only show what its widget
# allows; a command-line config must fit the ranges but may use any batch or image size.
RANGES = {"lr": (1e-6, 10.0), "weight_decay": (0.0, 1.0), "momentum": (0.0, 0.999),
          "epochs": (1, 500), "seed": (0, 10**6), "split_seed": (0, 10**6), "step_size": (1, 100),
          "gamma": (0.01, 1.0), "warmup_epochs": (0, 50), "label_smoothing": (0.0, 0.5),
          "patience": (0, 100), "phase1_epochs": (0, 500), "backbone_lr_mult": (0.001, 10.0),
          "hidden": (8, 4096), "dropout": (0.0, 0.9), "top_k": (1, 1000), "max_per_class": (1, 100_000),
          "batch_size": (1, 65536), "image_size": (16, 2048), "aug_views": (0, 16),
          "time_budget_s": (0, 7 * 86400)}
CHOICES = {"optimizer": ("sgd", "adam", "adamw", "rmsprop"),
           "scheduler": ("none", "step", "cosine", "onecycle"),
           "freeze": tuple(FREEZE_MODES), "head": ("linear", "mlp"),
           "normalize": ("backbone", "dataset"), "baseline": ("", "logreg"),
           "weights": ("auto", "bundled", "hub-cache", "hub", "file", "random")}
WIDGET_CHOICES = {"batch_size": (4, 8, 16, 32, 64, 128, 256),
                  "image_size": (64, 96, 128, 160, 192, 224, 256, 288, 320, 384)}


def setting_problems(settings: dict, for_widgets: bool = False) -> list[str]:
    """One sentence per setting outside what a run (or, `for_widgets`, the app's pages) accepts."""
    problems = []
    for key, (low, high) in RANGES.items():
        value = settings.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and not low <= value <= high:
            problems.append(f"{key} is {value:g}; it must be between {low:g} and {high:g}.")
    choices = CHOICES | (WIDGET_CHOICES if for_widgets else {})
    for key, allowed in choices.items():
        if key in settings and settings[key] not in allowed:
            shown = ", ".join(repr(a) if isinstance(a, str) else str(a) for a in allowed)
            problems.append(f"{key} is {settings[key]!r}; it must be one of {shown}.")
    return problems + split_problems(settings.get("split")) + augment_problems(settings.get("augment") or {})


def split_problems(split) -> list[str]:
    if split is None:
        return []
    if len(split) != 3 or min(split) < 0 or split[0] <= 0 or abs(sum(split) - 1) > 0.011:
        return [f"split is {list(split)}; it must be three fractions (train, val, test) adding up to 1, "
                "with some training images."]
    return []


def augment_problems(augment: dict) -> list[str]:
    from core.data import AUGMENT_RANGES, AUGMENTATIONS, AUTO_AUGMENTS
    problems = []
    for name, value in augment.items():
        low, high, _ = AUGMENT_RANGES.get(name, (None, None, None))
        if name not in AUGMENTATIONS:
            problems.append(f"augment has {name!r}; known augmentations are {', '.join(AUGMENTATIONS)}.")
        elif name == "auto" and value not in (*AUTO_AUGMENTS, True, False, 0, 1):
            problems.append(f"augment auto is {value!r}; it must be one of {', '.join(AUTO_AUGMENTS)}.")
        elif low is not None and value and not low <= value <= high:
            problems.append(f"augment {name} is {value:g}; it must be between {low:g} and {high:g}.")
    return problems


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
        label = re.sub(r"[^A-Za-z0-9_]+", "_", config.arch)[:40].strip("_") or "model"
        path = (root or paths.runs_dir()) / f"{_next_stamp()}-{label}-{secrets.token_hex(2)}"
        path.mkdir(parents=True)
        run = cls(path)
        run.write_json("config.json", config.to_dict())
        run.set_status("queued", message="Waiting for the device", owner=owner)
        return run

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

    # status
    def set_status(self, state: str, **info) -> None:
        status = self.read_json("status.json", {}) or {}
        status.update(info, state=state, pid=os.getpid(), updated=time.time())
        self.write_json("status.json", status)

    def status(self) -> dict:
        """The stored status, with runs whose trainer died shown as 'interrupted'."""
        status = self.read_json("status.json", {}) or {}
        if status.get("state") in ACTIVE_STATES and not self._alive(status):
            status = dict(status, state="interrupted",
                          message="The process training this run stopped (server restart?). "
                                  "Finished epochs and the best checkpoint are kept.")
        return status

    def _alive(self, status: dict) -> bool:
        if status.get("pid") == os.getpid():
            return held(self.id)
        try:
            os.kill(int(status.get("pid", -1)), 0)
        except (OSError, ValueError):
            return False
        return time.time() - status.get("updated", 0) < STALE_AFTER_S

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
        acc = status.get("test_acc")
        tail = f" · test acc {acc:.1%}" if isinstance(acc, float) else ""
        return f"{self.id} · {cfg.name or cfg.arch} · {status.get('state', '?')}{tail}"


class _ReadOnlyRun(Run):
    def write_json(self, name: str, data) -> None:
        pass

    def set_status(self, state: str, **info) -> None:
        pass

    def append_epoch(self, row: dict) -> None:
        pass

    def keep_epochs(self, last: int) -> None:
        pass


def delete_run(run: Run, root: Path | None = None) -> None:
    """Remove a run's folder; refused while it trains."""
    if run.status().get("state") in ACTIVE_STATES:
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
    """Mark a run as queued or training in this process (core.worker does), so its status is
    trusted while the pid is ours."""
    with _HELD_LOCK:
        _HELD.add(run_id)


def release(run_id: str) -> None:
    with _HELD_LOCK:
        _HELD.discard(run_id)


def held(run_id: str) -> bool:
    with _HELD_LOCK:
        return run_id in _HELD
