"""Sweeps: one base configuration, one or two settings varied, every combination queued as a
normal run; and the results table over any set of runs (report 004's ablation tables)."""
from __future__ import annotations

import itertools
import secrets
from dataclasses import replace
from datetime import datetime

import pandas as pd

from core.config import RunConfig
from core.data.transforms import PRESETS
from core.serve.store import Run, list_runs
from core.serve.worker import MANAGER

# What a sweep can vary: axis -> (label, how a value changes the config)
AXES = {
    "lr": "Learning rate",
    "optimizer": "Optimizer",
    "freeze": "Freeze mode",
    "augment": "Augmentation preset",
    "batch_size": "Batch size",
    "max_per_class": "Few-shot: images per class",
    "init": "Pretrained vs random init",
    "model": "Model or baseline",
}
BASELINES = {"logreg": "Logistic regression (raw pixels)",
             "small_cnn": "Small CNN from scratch (resnet10t)"}


def apply(cfg: RunConfig, axis: str, value) -> RunConfig:
    """`cfg` with one axis set to `value`."""
    if axis == "augment":
        return replace(cfg, augment=dict(PRESETS[value]))
    if axis == "init":
        return replace(cfg, weights="auto", freeze=cfg.freeze if cfg.freeze != "scratch" else "full") \
            if value == "pretrained" else replace(cfg, freeze="scratch", weights="random")
    if axis == "model":
        if value == "logreg":
            return replace(cfg, baseline="logreg")
        if value == "small_cnn":
            return replace(cfg, arch="resnet10t", weights="random", freeze="scratch", baseline="")
        return replace(cfg, arch=value, baseline="")
    if axis == "max_per_class":
        return replace(cfg, max_per_class=int(value) if value else None)
    if axis == "freeze" and value != "scratch" and cfg.weights == "random":
        # from a scratch base (report 002), "head only" on a random backbone would be meaningless:
        # freezing depth is about pretrained weights (the init axis compares random vs pretrained)
        return replace(cfg, freeze=value, weights="auto").with_rules()
    return replace(cfg, **{axis: value}).with_rules()


def expand(base: RunConfig, axes: dict[str, list]) -> list[RunConfig]:
    """Every combination of the axes' values, each tagged with what it varied."""
    sweep = datetime.now().strftime("%m%d-%H%M%S-") + secrets.token_hex(2)
    names = list(axes)
    configs = []
    for values in itertools.product(*(axes[n] for n in names)):
        cfg = replace(base, augment=dict(base.augment), tags={}, sweep=sweep)
        for axis, value in zip(names, values):
            cfg = apply(cfg, axis, value)
        cfg.tags = {axis: value for axis, value in zip(names, values)}
        cfg.name = " · ".join(f"{axis}={value}" for axis, value in cfg.tags.items())
        configs.append(cfg)
    return configs


def queue(configs: list[RunConfig], owner: str = "", max_queued: int | None = None,
          limit_s: float | None = None) -> list[Run]:
    """Submit in order; the manager trains them one after another. With `max_queued` (a
    student's cap) the whole sweep must fit, or none of it is queued."""
    MANAGER.check_room(owner, max_queued, adding=len(configs))
    return [MANAGER.submit(cfg, owner=owner, limit_s=limit_s) for cfg in configs]


def results(runs: list[Run] | None = None) -> pd.DataFrame:
    """One row per run: varied settings, best epoch, best val accuracy, test accuracy of the best
    epoch's checkpoint, mean seconds per epoch, state."""
    rows = []
    for run in runs if runs is not None else list_runs():
        cfg, status, epochs = run.config, run.status(), run.epochs()
        row = dict(run=run.id, sweep=cfg.sweep, name=cfg.name or cfg.arch,
                   model=BASELINES["logreg"] if cfg.baseline == "logreg" else cfg.arch,
                   freeze=cfg.freeze, optimizer=cfg.optimizer, lr=cfg.lr, epochs=len(epochs))
        row.update({f"vary:{k}": str(v) for k, v in cfg.tags.items()})
        row.update(best_epoch=status.get("best_epoch"), best_val_acc=status.get("best_val_acc"),
                   test_acc=status.get("test_acc"),
                   s_per_epoch=sum(e["seconds"] for e in epochs) / len(epochs) if epochs else None,
                   state=status.get("state"))
        rows.append(row)
    frame = pd.DataFrame(rows)
    first = ["name", "best_val_acc", "test_acc", "best_epoch", "s_per_epoch", "state"]
    return frame[[c for c in first if c in frame] + [c for c in frame if c not in first]]


def sweeps(runs: list[Run] | None = None) -> dict[str, list[Run]]:
    """Runs (default: all) grouped by sweep id, newest sweep first."""
    groups: dict[str, list[Run]] = {}
    for run in list_runs() if runs is None else runs:
        sweep = run.config.sweep
        if sweep:
            groups.setdefault(sweep, []).insert(0, run)     # oldest first within a sweep
    return groups
