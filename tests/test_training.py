"""core.training.run, core.serve.store and core.results.evaluate: whole runs on tiny models and generated images."""
from __future__ import annotations

import contextlib
import math
import os
import shutil
import subprocess
import sys
import threading
import time

import pandas as pd
import pytest
import torch

import core
from conftest import class_image
from core.training import caches
from core.training import run as training
from core.data import DataError
from core.results.evaluate import evaluate_run
from core.models.backbones import load_run_model
from core.serve import runqueue
from core.serve.store import HOST, Run, get_run, list_runs
from core.serve.worker import MANAGER

pytestmark = pytest.mark.slow

EPOCH_KEYS = {"epoch", "lr", "train_loss", "val_loss", "val_acc", "seconds"}


def metric_rows(run: Run) -> list[dict]:
    """Epoch rows without the wall-clock time."""
    return [{k: v for k, v in row.items() if k != "seconds"} for row in run.epochs()]


def check_finished_run(run: Run, cfg) -> dict:
    status = run.status()
    assert status["state"] == "finished", status
    rows = run.epochs()
    assert len(rows) == cfg.epochs
    assert [r["epoch"] for r in rows] == list(range(1, cfg.epochs + 1))
    for row in rows:
        assert EPOCH_KEYS <= set(row)
        assert all(math.isfinite(row[k]) for k in ("lr", "train_loss", "val_loss", "val_acc"))
        assert 0 <= row["val_acc"] <= 1 and row["seconds"] >= 0
    assert run.checkpoint.is_file()
    assert run.classes == ["class_a", "class_b", "class_c"]
    metrics = run.read_json("test_metrics.json")
    assert 0 <= metrics["accuracy"] <= 1
    n_test = len(run.read_json("splits.json")["test"])
    assert metrics["n"] == n_test > 0
    assert len(metrics["confusion"]) == 3 and all(len(r) == 3 for r in metrics["confusion"])
    assert sum(map(sum, metrics["confusion"])) == n_test
    assert status["test_acc"] == pytest.approx(metrics["accuracy"])
    frame = pd.read_csv(run.file("test_predictions.csv"))
    assert len(frame) == n_test
    assert {"file", "true", "predicted", "confidence", "p_class_a", "p_class_b", "p_class_c"} <= set(frame.columns)
    assert (frame["predicted"] == frame["true"]).mean() == pytest.approx(metrics["accuracy"])
    return metrics


# ---------------------------------------------------------------- foreground training

def test_train_with_feature_cache_writes_everything(tiny_config, lab_home):
    cfg = tiny_config(freeze="head")
    assert caches.uses_feature_cache(cfg)
    run = core.train(cfg)
    metrics = check_finished_run(run, cfg)
    assert run.status()["feature_cache"] is True
    assert run.path.resolve().is_relative_to(lab_home.resolve())
    assert run.read_json("skipped.json") == []
    assert get_run(run.id).path == run.path
    assert run.id in [r.id for r in list_runs()]

    again = evaluate_run(run)
    assert again["accuracy"] == metrics["accuracy"]
    assert again["confusion"] == metrics["confusion"]

    model = load_run_model(run)
    assert not model.training
    with torch.no_grad():
        assert model(torch.randn(2, 3, 32, 32)).shape == (2, 3)


@pytest.mark.parametrize("settings", [
    dict(freeze="full", augment={"hflip": True}),
    dict(freeze="top_k", top_k=1, head="mlp", hidden=16, scheduler="cosine", optimizer="sgd"),
    dict(arch="test_efficientnet", freeze="head", cache_features=False, scheduler="step", step_size=1),
], ids=["full-augment", "top_k-mlp-cosine", "effnet-head-nocache"])
def test_train_without_feature_cache(tiny_config, settings):
    cfg = tiny_config(**settings)
    assert not caches.uses_feature_cache(cfg)
    run = core.train(cfg)
    check_finished_run(run, cfg)
    assert run.status()["feature_cache"] is False
    if cfg.scheduler == "step":
        lrs = [r["lr"] for r in run.epochs()]
        assert lrs[1] == pytest.approx(lrs[0] * cfg.gamma)
    assert evaluate_run(run)["accuracy"] == run.read_json("test_metrics.json")["accuracy"]


def test_learns_the_generated_classes(tiny_config):
    """The generated classes are easy: a few epochs of full training beat chance clearly."""
    cfg = tiny_config(freeze="full", epochs=4, lr=3e-3)
    run = core.train(cfg)
    assert run.status()["state"] == "finished"
    assert max(r["val_acc"] for r in run.epochs()) > 0.5


@pytest.mark.parametrize("settings", [dict(freeze="full", augment={"hflip": True, "rotation": 10}),
                                      dict(freeze="head")], ids=["full-augment", "feature-cache"])
def test_same_seed_gives_identical_epochs(tiny_config, image_folder, settings):
    root = str(image_folder())
    first = core.train(tiny_config(data_root=root, seed=3, **settings))
    second = core.train(tiny_config(data_root=root, seed=3, **settings))
    assert first.status()["state"] == second.status()["state"] == "finished"
    assert metric_rows(first) == metric_rows(second)
    assert first.read_json("test_metrics.json")["confusion"] == second.read_json("test_metrics.json")["confusion"]


def test_stop_event_set_before_start(tiny_config):
    run = Run.create(tiny_config())
    stop = threading.Event()
    stop.set()
    status = training.train_run(run, stop=stop)
    assert status["state"] == "stopped" and "Stopped" in status["message"]
    assert run.status()["state"] == "stopped"
    assert run.epochs() == []


@pytest.mark.parametrize("freeze", ["head", "full"])
def test_huge_learning_rate_does_not_raise(tiny_config, freeze):
    run = Run.create(tiny_config(optimizer="sgd", lr=1e6, momentum=0.9, freeze=freeze, epochs=2))
    status = training.train_run(run)
    assert status["state"] in ("failed", "finished"), status
    if status["state"] == "failed":
        assert "NaN" in status["message"]


@pytest.mark.parametrize("freeze", ["head", "full"])
def test_a_nan_loss_stops_the_run_with_a_sentence(tiny_config, freeze, monkeypatch):
    """The guard itself: a loss that turns NaN (as a far too high learning rate makes it) ends
    the run as failed with the sentence, never as finished (it fails if the guard is removed)."""
    class NaNLoss(training.nn.CrossEntropyLoss):
        def forward(self, logits, target):
            return super().forward(logits, target) * float("nan")
    monkeypatch.setattr(training.nn, "CrossEntropyLoss", NaNLoss)
    run = Run.create(tiny_config(freeze=freeze, epochs=2))
    status = training.train_run(run)
    assert status["state"] == "failed", status
    assert "NaN" in status["message"] and "learning rate" in status["message"]


def test_folder_without_class_folders_fails_clearly(tiny_config, tmp_path):
    flat = tmp_path / "flat"
    flat.mkdir()
    for i in range(4):
        class_image(0, i).save(flat / f"{i}.png")
    run = core.train(tiny_config(data_root=str(flat)))
    status = run.status()
    assert status["state"] == "failed"
    assert "No class folders found" in status["message"]


@pytest.mark.parametrize("case", ["missing", "no_train_split"])
def test_unusable_data_fails_clearly(tiny_config, image_folder, tmp_path, case):
    if case == "missing":
        root, expected = tmp_path / "does_not_exist", "Folder not found"
    else:
        root, expected = image_folder(splits={"val": 3, "test": 3}), "training split is empty"
    run = core.train(tiny_config(data_root=str(root)))
    assert run.status()["state"] == "failed"
    assert expected in run.status()["message"]


def test_unreadable_images_are_skipped_not_fatal(tiny_config, image_folder):
    root = image_folder()
    (root / "class_a" / "broken.jpg").write_text("not really a jpeg")
    (root / "class_b" / "empty.png").write_bytes(b"")
    run = core.train(tiny_config(data_root=str(root), epochs=1))
    assert run.status()["state"] == "finished", run.status()
    skipped = [path for path, _ in run.read_json("skipped.json")]
    assert sorted(skipped) == ["class_a/broken.jpg", "class_b/empty.png"]


def test_evaluate_run_skips_images_that_disappeared(tiny_config, image_folder):
    root = image_folder()
    run = core.train(tiny_config(data_root=str(root), epochs=1))
    test_files = [path for path, _ in run.read_json("splits.json")["test"]]
    (root / test_files[0]).unlink()
    metrics = evaluate_run(run)
    assert metrics["n"] == len(test_files) - 1
    assert [path for path, _ in metrics["skipped"]] == [test_files[0]]
    assert len(pd.read_csv(run.file("test_predictions.csv"))) == len(test_files) - 1
    assert evaluate_run(run, split="val")["n"] == len(run.read_json("splits.json")["val"])


def test_evaluate_run_when_data_set_was_deleted(tiny_config, image_folder):
    root = image_folder()
    run = core.train(tiny_config(data_root=str(root), epochs=1))
    n_test = len(run.read_json("splits.json")["test"])
    shutil.rmtree(root)
    try:
        metrics = evaluate_run(run)
    except (DataError, FileNotFoundError) as err:          # a clear, user-fixable error is fine
        assert str(root) in str(err) or "image" in str(err).lower()
    else:                                                 # so is an empty result listing every file
        assert metrics["n"] == 0 and len(metrics["skipped"]) == n_test


# ---------------------------------------------------------------- background manager and status

def test_manager_trains_in_background(tiny_config):
    run = MANAGER.submit(tiny_config())
    seen = set()
    deadline = time.monotonic() + 120
    while MANAGER.knows(run.id) and time.monotonic() < deadline:
        seen.add(run.status().get("state"))
        time.sleep(0.02)
    assert MANAGER.wait(run.id, timeout=120)
    assert "interrupted" not in seen, seen          # a live background run never looks dead
    status = run.status()
    assert status["state"] == "finished", status
    assert run.id in [r.id for r in list_runs()]
    assert list_runs()[0].status()["state"] == "finished"


def test_manager_stop_right_after_submit(tiny_config):
    run = MANAGER.submit(tiny_config(epochs=50))
    MANAGER.stop(run.id)
    assert MANAGER.wait(run.id, timeout=120)
    assert run.status()["state"] == "stopped"
    assert not MANAGER.knows(run.id)


def test_manager_failed_run_does_not_kill_queue(tiny_config, tmp_path):
    bad = MANAGER.submit(tiny_config(data_root=str(tmp_path / "missing")))
    good = MANAGER.submit(tiny_config(epochs=1))
    assert MANAGER.wait(good.id, timeout=120) and MANAGER.wait(bad.id, timeout=1)
    assert bad.status()["state"] == "failed"
    assert good.status()["state"] == "finished"


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_running_run_with_dead_pid_shows_interrupted(tiny_config):
    run = Run.create(tiny_config())
    run.write_json("status.json", dict(state="running", pid=dead_pid(), updated=time.time(), epoch=1))
    status = run.status()
    assert status["state"] == "interrupted"
    assert "stopped" in status["message"] and status["epoch"] == 1
    assert run.read_json("status.json")["state"] == "running"       # the file itself is untouched
    assert "interrupted" in run.label()


def test_run_status_liveness_rules(tiny_config):
    run = Run.create(tiny_config())
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        run.write_json("status.json", dict(state="running", pid=sleeper.pid, updated=time.time()))
        assert run.status()["state"] == "running"                     # another live process
        run.write_json("status.json", dict(state="running", pid=sleeper.pid, updated=time.time() - 3600))
        assert run.status()["state"] == "interrupted"                 # alive but silent for an hour
        # ...unless the queue started it: a worker starved of CPU between two beats is not dead
        runqueue.update_running(runqueue.Job(run.id, "", False, None, pid=sleeper.pid, host=HOST))
        assert run.status()["state"] == "running"
        runqueue.done(run.id)
    finally:
        sleeper.kill()
        sleeper.wait()
    run.write_json("status.json", dict(state="preparing", pid=os.getpid(), updated=time.time()))
    assert run.status()["state"] == "interrupted"                     # this process, not training it
    run.write_json("status.json", dict(state="finished", pid=dead_pid(), updated=0))
    assert run.status()["state"] == "finished"                        # final states stay as written


def test_a_silent_process_holding_the_lock_is_alive(tiny_config):
    """A page task's worker holds its folder's lock, so a step that sends no progress for minutes
    (a starved CPU) never reads as a dead process."""
    run = Run.create(tiny_config())
    code = ("import fcntl, sys, time; f = open(sys.argv[1], 'a+'); fcntl.flock(f, fcntl.LOCK_EX); "
            "print('locked', flush=True); time.sleep(30)")
    holder = subprocess.Popen([sys.executable, "-c", code, str(run.file(".lock"))], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        run.write_json("status.json", dict(state="running", pid=holder.pid, updated=time.time() - 3600))
        assert run.status()["state"] == "running"
    finally:
        holder.kill()
        holder.wait()
    assert run.status()["state"] == "interrupted"


def test_a_task_worker_holds_its_folders_lock(monkeypatch):
    from core.serve import tasks
    seen = []
    monkeypatch.setitem(tasks.KINDS, "probe", lambda task, *_: seen.append(Run(task.path).busy()))
    monkeypatch.setattr("signal.signal", lambda *_: None)      # pytest keeps its own SIGTERM handler
    task = tasks.submit("probe", {})
    runqueue.remove_waiting(task.id)
    tasks.run_task(task.id)
    assert seen == [True] and task.status()["state"] == "finished" and not task.busy()


def test_list_runs_and_get_run(tiny_config):
    assert list_runs() == []
    runs = [Run.create(tiny_config()) for _ in range(2)]
    assert {r.id for r in list_runs()} == {r.id for r in runs}
    with pytest.raises(FileNotFoundError):
        get_run("no-such-run")
    assert get_run("../../" + runs[0].id).path == runs[0].path      # only the name is used
    assert runs[0].config == runs[0].config.from_dict(runs[0].config.to_dict())


# ---------------------------------------------------------------- core bugs

def test_fixed_size_backbone_trains_at_its_native_size(tiny_config):
    """ViTs only take their native size: the run switches to it and records that in config.json."""
    cfg = tiny_config(arch="test_vit", image_size=32, epochs=1, freeze="head")
    run = core.train(cfg)
    assert run.status()["state"] == "finished", run.status()
    assert run.config.image_size == 160
    assert evaluate_run(run)["accuracy"] == run.read_json("test_metrics.json")["accuracy"]


def test_unknown_arch_is_refused_before_a_run_exists(tiny_config):
    """Issue 14: the model name is checked before any folder is written, in the queue and in
    the foreground alike."""
    from core.config import ConfigError
    for create in (MANAGER.submit, Run.create):
        with pytest.raises(ConfigError, match="not_a_timm_model"):
            create(tiny_config(arch="not_a_timm_model"))
    assert list_runs() == []


def test_a_model_timm_cant_build_fails_clearly_in_foreground(tiny_config, monkeypatch):
    """A name that passed the check but can't be built (e.g. a hub id offline) still ends as a
    failed run with the reason."""
    run = Run.create(tiny_config())
    cfg = run.read_json("config.json")
    run.write_json("config.json", dict(cfg, arch="not_a_timm_model"))
    status = training.train_run(run)
    assert status["state"] == "failed"
    assert "no model called 'not_a_timm_model'" in status["message"]


def test_unexpected_error_in_foreground_run_is_recorded(tiny_config, monkeypatch):
    def broken_build(*args, **kwargs):
        raise RuntimeError("boom: model construction failed")
    monkeypatch.setattr(training, "build_model", broken_build)
    with contextlib.suppress(Exception):
        core.train(tiny_config())
    (run,) = list_runs()
    status = run.status()
    assert status["state"] == "failed", status
    assert "boom" in status["message"]
