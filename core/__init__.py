"""Finetune Lab's library: transfer learning of timm image classifiers, usable from a notebook.

    from core import RunConfig, train, evaluate_run, demo_dataset
    run = train(RunConfig(data_root=str(demo_dataset()), epochs=3))
    print(run.status()["test_acc"])
"""
from core.models.backbones import CATALOG, build_model, create_backbone, parameter_table, weight_sources
from core.data import DataError
from core.data.folders import demo_dataset, scan_folder
from core.data.splits import split_items
from core.models.backbones import load_run_model
from core.results.evaluate import evaluate_run
from core.config import RunConfig
from core.serve.store import Run, get_run, list_runs
from core.serve.worker import MANAGER


def train(config: RunConfig, root=None) -> Run:
    """Train in the foreground and return the finished run (its folder holds everything)."""
    from core.training.run import train_run
    run = Run.create(config, root)
    train_run(run)
    return run


__all__ = ["CATALOG", "MANAGER", "DataError", "Run", "RunConfig", "build_model", "create_backbone",
           "demo_dataset", "evaluate_run", "get_run", "list_runs", "load_run_model",
           "parameter_table", "scan_folder", "split_items", "train", "weight_sources"]
