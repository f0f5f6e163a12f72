"""Finetune Lab's library: transfer learning of timm image classifiers, usable from a notebook.

    from core import RunConfig, train, evaluate_run, demo_dataset
    run = train(RunConfig(data_root=str(demo_dataset()), epochs=3))
    print(run.status().test_acc)

This module is the public face; the code lives in groups, each imported from its own module:

    core.data      folders (scan), zips (safe uploads), images (decode), transforms, splits, downloads
    core.models    backbones (timm, weights, freezing), squeezenet, torchvision_weights, prefix
                   (frozen-prefix cache), export, predict
    core.training  run (one run end to end), loop, steps, phase_caches, batches, precision, plan,
                   checkpoints, budget (time-budget planner), choose (backbone probe), lr_find,
                   baselines, distributed, sweeps, estimate (memory and disk before allocating)
    core.serve     store and status (the run folder), runqueue, executor, slots, jobs,
                   ray_launcher, worker (processes that train), access, accounts, gate, tasks, presets
    core.trust     embeddings, doctor, embedding_map, export_check, sanity
    core.results   evaluate, inspection, report
    core.config, core.paths, core.rng, core.device, core.hooks, core.progress, core.tables
"""
from core.config import ConfigError, RunConfig, validate_config
from core.data import DataError
from core.data.folders import demo_dataset, scan_folder
from core.data.splits import split_items
from core.models.backbones import CATALOG, build_model, create_backbone, load_run_model, parameter_table, weight_sources
from core.progress import Cancelled, Progress
from core.results.evaluate import evaluate_run
from core.serve.status import RunStatus, State
from core.serve.store import Run, get_run, list_runs
from core.serve.worker import MANAGER


def train(config: RunConfig, root=None) -> Run:
    """Train in the foreground and return the finished run (its folder holds everything)."""
    from core.training.run import train_run
    run = Run.create(config, root)
    train_run(run)
    return run


__all__ = ["CATALOG", "MANAGER", "Cancelled", "ConfigError", "DataError", "Progress", "Run", "RunConfig",
           "RunStatus", "State", "build_model", "create_backbone", "demo_dataset", "evaluate_run", "get_run",
           "list_runs", "load_run_model", "parameter_table", "scan_folder", "split_items", "train",
           "validate_config", "weight_sources"]
