"""Sweeps: one base configuration, one or two settings varied, every combination queued as a
normal run; and the results table over any set of runs (report 004's ablation tables)."""
from __future__ import annotations

import itertools
import math
import secrets
import statistics
from dataclasses import replace
from datetime import datetime

import pandas as pd

from core import config
from core.config import FREEZE_MODES, RunConfig
from core.data.transforms import PRESETS
from core.serve.store import Run, list_runs, whole_epoch_seconds
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
                   s_per_epoch=statistics.mean(whole) if (whole := whole_epoch_seconds(epochs)) else None,
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


# ---------------------------------------------------------------- what the Experiments page offers per axis

NUMBER_AXES = {"lr": float, "max_per_class": int}        # typed as text; each value cast with this
INITS = ("pretrained", "random")
# what each axis starts with: a small contrast worth running ("model" adds the current backbone)
AXIS_DEFAULTS = {"lr": (0.01, 0.001, 0.0001), "max_per_class": (5, 20, 0), "batch_size": (16, 32),
                 "optimizer": ("sgd", "adam"), "freeze": ("head", "full"), "augment": ("none", "photos"),
                 "init": INITS, "model": ("logreg",)}


def axis_options(axis: str) -> list:
    """The values a sweep may pick for an axis chosen from a list (not NUMBER_AXES): the
    setting's own options where it is a setting, so a sweep offers what the pages offer."""
    from core.models.backbones import CATALOG
    if axis in ("optimizer", "freeze", "batch_size"):
        return config.options(axis)
    return {"augment": list(PRESETS), "init": list(INITS), "model": list(CATALOG) + list(BASELINES)}[axis]


def axis_defaults(axis: str, arch: str) -> list:
    """The values an axis starts with; for "model", the current backbone `arch` first. Values
    the axis doesn't offer are left out."""
    defaults = ((arch,) if axis == "model" else ()) + AXIS_DEFAULTS[axis]
    if axis in NUMBER_AXES:
        return list(defaults)
    options = axis_options(axis)
    return [value for value in defaults if value in options]


def parse_numbers(text: str, cast=float) -> list:
    """"0.01, 0.001; 1e-4" -> [0.01, 0.001, 0.0001] (commas or semicolons, blanks ignored);
    ValueError when a part is not a number."""
    return [cast(value) for value in text.replace(";", ",").split(",") if value.strip()]


def value_label(value) -> str:
    """How a sweep value reads in a list: freeze modes and baselines by their names."""
    return {**FREEZE_MODES, **BASELINES}.get(value, str(value))


def run_count(axes: dict[str, list]) -> int:
    """How many runs the sweep queues: one per combination of the axes' values."""
    return math.prod(len(values) for values in axes.values())


def problems(base: RunConfig, axes: dict[str, list]) -> list[str]:
    """Every setting problem (config.setting_problems) any run of the sweep would have, once each."""
    configs = expand(base, axes) if run_count(axes) else []
    return sorted({problem for cfg in configs for problem in config.setting_problems(cfg.to_dict())})


def curves(runs: list[Run], ids: list[str]) -> pd.DataFrame:
    """The per-epoch metrics of the runs in `ids`, one row per epoch, each with its run's name
    (the config's name, else the run id) in a "run" column; empty when there are none."""
    return pd.DataFrame([dict(epoch, run=run.config.name or run.id)
                         for run in runs if run.id in ids for epoch in run.epochs()])
