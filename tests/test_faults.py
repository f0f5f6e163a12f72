"""Faults: a killed trainer, Stop at every stage, out of memory, imbalanced classes, and who may
delete a run. What must survive each: parseable epoch rows, a loadable best checkpoint, and a run
that resumes to exactly the epochs it was asked for."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import safetensors.torch
import torch

import core
from core import cli
from core.training import sweeps
from core.training import checkpoints
from core.training import loop as training_loop
from core.training import run as training
from core.training import steps
from core.results.evaluate import evaluate_run
from core.models.backbones import load_run_model
from core.config import RunConfig
from core.serve.store import Run, delete_run, get_run, list_runs
from core.serve.worker import MANAGER

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
TIMEOUT = 180


@pytest.fixture
def slow_batches(monkeypatch):
    """slow_batches(seconds): every batch takes at least that long, so a Stop lands inside an
    epoch however fast (or busy) the machine is."""
    def make(seconds: float = 0.05):
        original = steps.run_epoch

        def paced(model, batches, *args, **kwargs):
            def each():
                for batch in batches:
                    time.sleep(seconds)
                    yield batch
            return original(model, each(), *args, **kwargs)
        monkeypatch.setattr(training_loop, "run_epoch", paced)
    return make


def wait_for(condition, timeout: float = TIMEOUT, what: str = "condition"):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if condition():
            return
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


def check_checkpoint(run: Run) -> None:
    """best.safetensors is a whole file: safetensors reads it and the run's model loads it."""
    assert safetensors.torch.load_file(str(run.checkpoint))
    model = load_run_model(run)
    size = run.config.image_size
    with torch.no_grad():
        assert model(torch.randn(1, 3, size, size)).shape == (1, len(run.classes))


def check_epochs_once(run: Run, epochs: int) -> None:
    assert [r["epoch"] for r in run.epochs()] == list(range(1, epochs + 1))


# ---------------------------------------------------------------- killed mid-epoch

def test_sigkill_mid_epoch_then_resume(tiny_config, image_folder, lab_home, tmp_path):
    """A real `python -m core train` killed with SIGKILL (no cleanup runs) during epoch 2."""
    cfg = tiny_config(data_root=str(image_folder(per_class=50, size=48)), image_size=48,
                      freeze="full", epochs=4, lr=3e-3)
    cfg_file = tmp_path / "cfg.json"
    cfg_file.write_text(json.dumps(cfg.to_dict()))
    env = dict(os.environ, FINETUNE_LAB_HOME=str(lab_home), HF_HUB_OFFLINE="1", FINETUNE_LAB_CPU_BF16="0")
    env.pop("WORLD_SIZE", None)
    proc = subprocess.Popen([sys.executable, "-m", "core", "train", str(cfg_file), "--quiet"], cwd=REPO,
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)

    def epoch_one_saved():
        assert proc.poll() is None, proc.stderr.read()[-2000:]     # it must not end on its own
        runs = list_runs()
        return runs and (runs[0].read_json("status.json") or {}).get("last_epoch", 0) >= 1
    try:
        # epoch 1's resume state is on disk (last_epoch is written after last_state.pt), so
        # epoch 2 is under way: kill it at once
        wait_for(epoch_one_saved, what="epoch 1's resume state")
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()                 # reap it: a zombie still answers kill(pid, 0) as alive
    assert proc.returncode == -signal.SIGKILL, proc.stderr.read()[-2000:]
    run = list_runs()[0]

    status = run.status()
    assert status["state"] == "interrupted", status
    assert "stopped" in status["message"] and "checkpoint" in status["message"]
    rows = [json.loads(line) for line in run.file("epochs.jsonl").read_text().splitlines()]
    assert 1 <= len(rows) < cfg.epochs and rows == run.epochs()
    check_checkpoint(run)
    assert run.resumable()

    # a kill during an atomic write leaves a dot-tmp file; it must not be mistaken for anything
    run.file(".best.safetensors.tmp").write_bytes(b"half a file")
    run.file(".status.json.999999.tmp").write_text('{"state": "runn')
    assert run.status()["state"] == "interrupted" and [r.id for r in list_runs()] == [run.id]
    check_checkpoint(run)

    assert cli.main(["resume", run.id, "--quiet"]) == 0
    status = get_run(run.id).status()
    assert status["state"] == "finished" and 0 <= status["test_acc"] <= 1
    check_epochs_once(run, cfg.epochs)
    check_checkpoint(run)
    assert not run.resumable()


# ---------------------------------------------------------------- Stop

def test_crash_between_resume_state_and_epoch_row(tiny_config, monkeypatch):
    """The end of an epoch writes two files: its resume state, then its row in epochs.jsonl. A
    crash between them (here an error in the second write) loses no epoch: the resume state holds
    the row, and resuming writes it back before training on."""
    original = Run.append_epoch

    def crash_at_epoch_2(self, row):
        if row["epoch"] == 2:
            raise OSError("disk went away")
        original(self, row)
    monkeypatch.setattr(Run, "append_epoch", crash_at_epoch_2)
    run = Run.create(tiny_config(freeze="full", epochs=3))
    status = training.train_run(run)
    assert status["state"] == "failed" and "disk went away" in status["message"], status
    check_epochs_once(run, 1)
    assert run.resumable()

    monkeypatch.undo()
    status = training.train_run(run, resume=True)
    assert status["state"] == "finished", status
    check_epochs_once(run, 3)
    rows = run.epochs()
    best = max(rows, key=lambda r: r["val_acc"])
    assert [r["epoch"] for r in rows if r["best"]][-1] == status["best_epoch"]
    assert status["best_val_acc"] == best["val_acc"]


def test_stop_during_an_epoch_then_resume(tiny_config):
    """Through the lab's queue: the run trains in its own process, Stop reaches it there."""
    run = MANAGER.submit(tiny_config(freeze="full", epochs=300, image_size=48))
    wait_for(lambda: run.epochs(), what="the first epoch")
    MANAGER.stop(run.id)
    assert MANAGER.wait(run.id, timeout=TIMEOUT)
    status = run.status()
    assert status["state"] == "stopped" and "Resume" in status["message"]
    done = len(run.epochs())
    assert 1 <= done < 300
    check_checkpoint(run)
    assert run.resumable()

    run.write_json("config.json", dict(run.read_json("config.json"), epochs=done + 2))
    MANAGER.resume(run)
    assert MANAGER.wait(run.id, timeout=TIMEOUT)
    assert run.status()["state"] == "finished", run.status()
    check_epochs_once(run, done + 2)


@pytest.mark.parametrize("when", ["testing", "after-last-epoch"])
def test_stop_after_training_then_resume_tests(tiny_config, monkeypatch, when):
    """Stop once every epoch is done -- while the best checkpoint is being tested (the test pass
    checks Stop per batch), or in the gap between the last epoch's resume state and testing. The
    run ends *stopped*: every epoch and an intact checkpoint, no test metrics yet. Resume then
    trains nothing and only runs the test pass."""
    stop = threading.Event()
    if when == "testing":
        original_status = Run.set_status

        def set_status(self, state, **info):       # the moment the status shows phase 'test'
            original_status(self, state, **info)
            if info.get("phase") == "test":
                stop.set()
        monkeypatch.setattr(Run, "set_status", set_status)
    else:
        original_save = checkpoints.save_resume_state

        def save_and_stop(run, model, optimizer, scheduler, scaler, progress):
            original_save(run, model, optimizer, scheduler, scaler, progress)
            if progress["epoch"] == run.config.epochs:
                stop.set()
        monkeypatch.setattr(checkpoints, "save_resume_state", save_and_stop)
    run = Run.create(tiny_config(freeze="full", epochs=2))     # no feature cache: predict_probs
    status = training.train_run(run, stop=stop)
    assert status["state"] == "stopped" and "test_acc" not in status, status
    check_epochs_once(run, 2)
    check_checkpoint(run)
    best = run.checkpoint.read_bytes()

    assert run.resumable()
    monkeypatch.undo()
    status = training.train_run(run, resume=True)
    assert status["state"] == "finished" and 0 <= status["test_acc"] <= 1, status
    check_epochs_once(run, 2)                       # no epoch trained again
    assert run.checkpoint.read_bytes() == best
    assert evaluate_run(run)["accuracy"] == status["test_acc"]


def test_resume_keeps_its_split_and_refuses_changed_files(tiny_config, monkeypatch):
    """Resume goes on with the split the run started with: an image added since stays out of it
    (a re-split would move old images between train and test); a pinned file that was deleted
    fails the resume with a sentence naming it."""
    stop = threading.Event()
    original_save = checkpoints.save_resume_state

    def save_and_stop(run, model, optimizer, scheduler, scaler, progress):
        original_save(run, model, optimizer, scheduler, scaler, progress)
        stop.set()
    monkeypatch.setattr(checkpoints, "save_resume_state", save_and_stop)
    run = Run.create(tiny_config(freeze="full", epochs=2))
    assert training.train_run(run, stop=stop)["state"] == "stopped"
    monkeypatch.undo()
    before = run.read_json("splits.json")
    root = Path(before["root"])
    victim = before["train"][0][0]
    kept = (root / victim).read_bytes()
    (root / victim).unlink()
    status = training.train_run(run, resume=True)
    assert status["state"] == "failed" and victim in status["message"] and "1 image removed" in status["message"], status
    (root / victim).write_bytes(kept)
    shutil.copyfile(root / victim, root / Path(victim).parent / "added_later.png")
    assert training.train_run(run, resume=True)["state"] == "finished", run.status()
    assert run.read_json("splits.json") == before
    check_epochs_once(run, 2)


def test_stop_one_run_of_a_sweep(tiny_config):
    configs = sweeps.expand(tiny_config(epochs=1), {"lr": [1e-3, 1e-2, 3e-2]})
    configs[1].epochs = 1000                  # surely still training when it is stopped
    runs = sweeps.queue(configs)
    wait_for(lambda: runs[1].epochs(), what="the second run's first epoch")
    MANAGER.stop(runs[1].id)
    assert all(MANAGER.wait(r.id, timeout=TIMEOUT) for r in runs)
    assert [r.status()["state"] for r in runs] == ["finished", "stopped", "finished"]
    assert runs[1].resumable()
    assert list(sweeps.results(runs)["state"]) == ["finished", "stopped", "finished"]


# ---------------------------------------------------------------- out of memory

@pytest.mark.parametrize("error", [
    RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 68719476736 bytes."),
    torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 64.00 GiB"),
], ids=["cpu-allocator", "cuda"])
def test_out_of_memory_fails_clearly(tiny_config, monkeypatch, error):
    """The error comes on the 3rd pass (epoch 2's training), so epoch 1's checkpoint exists.
    (That the queue goes on after a run dies, even of the OOM killer, is in test_executor.)"""
    original, calls = steps.run_epoch, []

    def oom_once(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise error
        return original(*args, **kwargs)
    monkeypatch.setattr(training_loop, "run_epoch", oom_once)
    bad = Run.create(tiny_config(freeze="full", epochs=3, batch_size=8))
    status = training.train_run(bad)
    assert status["state"] == "failed"
    assert "Out of memory" in status["message"] and "smaller batch size" in status["message"]
    assert "batch size 8" in status["message"]
    check_checkpoint(bad)
    assert bad.resumable()                    # a smaller batch can't resume, but the state is kept


# ---------------------------------------------------------------- class-weighted loss

def test_class_weights_are_inverse_frequency():
    on, off = RunConfig(class_weights=True), RunConfig()
    weights = training.class_weights(on, [0] * 6 + [1] * 3 + [2], 3, "cpu")
    # total / (classes x count): 10/18, 10/9, 10/3 -- each class contributes equally overall
    assert weights.tolist() == pytest.approx([10 / 18, 10 / 9, 10 / 3])
    assert training.class_weights(off, [0, 1], 2, "cpu") is None
    assert torch.isfinite(training.class_weights(on, [0, 0], 2, "cpu")).all()    # absent class: no 1/0


def test_class_weighted_run_on_imbalanced_data(tiny_config, image_folder, monkeypatch):
    original, seen = training.class_weights, []

    def spy(*args):
        seen.append(original(*args))
        return seen[-1]
    monkeypatch.setattr(training, "class_weights", spy)
    root = image_folder(per_class={"class_a": 30, "class_b": 10, "class_c": 5})
    run = core.train(tiny_config(data_root=str(root), class_weights=True, freeze="full"))
    assert run.status()["state"] == "finished", run.status()

    labels = [label for _, label in run.read_json("splits.json")["train"]]
    counts = torch.bincount(torch.tensor(labels), minlength=3).float()
    assert seen[0].tolist() == pytest.approx((len(labels) / (3 * counts)).tolist())
    assert seen[0][2] > seen[0][1] > seen[0][0]            # the rarest class weighs the most


# ---------------------------------------------------------------- owners and deleting

def test_run_owner():
    cfg = RunConfig(epochs=1)
    assert Run.create(cfg, owner="a").owner == "a"
    assert Run.create(cfg).owner == ""


def test_delete_run_rules(tiny_config, tmp_path):
    active = MANAGER.submit(tiny_config(epochs=1000), owner="b")
    assert active.owner == "b"
    with pytest.raises(ValueError, match="Stop the run"):
        delete_run(active)
    MANAGER.stop(active.id)
    assert MANAGER.wait(active.id, timeout=TIMEOUT)
    delete_run(active)                                      # stopped: may go
    assert not active.path.exists()

    finished = core.train(tiny_config(epochs=1))
    elsewhere = tmp_path / "elsewhere" / finished.id        # same files, outside the runs folder
    elsewhere.parent.mkdir()
    shutil.copytree(finished.path, elsewhere)
    with pytest.raises(ValueError, match="Not a run of this lab"):
        delete_run(Run(elsewhere))
    assert elsewhere.exists()
    nested = finished.path / "nested"
    shutil.copytree(elsewhere, nested)                      # inside the runs folder, but not a run folder
    with pytest.raises(ValueError, match="Not a run of this lab"):
        delete_run(Run(nested))

    delete_run(finished)
    assert not finished.path.exists() and list_runs() == []


def test_a_run_whose_folder_vanishes_does_not_stop_the_queue(tiny_config):
    """Issue 14: one run that can't even write its status (folder deleted while queued) must not
    stop the queue: the runs queued after it still train."""
    blocker = MANAGER.submit(tiny_config(seed=0, epochs=300, freeze="full"))
    doomed = MANAGER.submit(tiny_config(seed=1, epochs=1))
    after = MANAGER.submit(tiny_config(seed=2, epochs=1))
    shutil.rmtree(doomed.path)
    MANAGER.stop(blocker.id)
    assert MANAGER.wait(doomed.id, timeout=TIMEOUT) and MANAGER.wait(after.id, timeout=TIMEOUT)
    assert after.status()["state"] == "finished", after.status()
