"""core.cli (`python -m core ...`) and data-parallel training under torchrun (Gloo on CPU).

Subprocess tests cost an interpreter start (torch + timm imports, several seconds on a busy
2-core machine), so only what needs a real process runs in one: `python -m core train` and
torchrun. Everything else calls core.cli.main in-process, the same code `python -m core` runs.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import pandas as pd
import pytest
import torch.distributed

import core
from conftest import class_image
from core import cli
from core.training import distributed as dist
from core.training import checkpoints
from core.training import run as training
from core.config import ConfigError
from core.serve.store import get_run, list_runs

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
METRICS = ("train_loss", "train_acc", "val_loss", "val_acc", "lr")


def run_cli(args: list[str], lab_home: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    """A real `python -m core ...` (or any `python -m` module) in the test's own lab home."""
    env = dict(os.environ, FINETUNE_LAB_HOME=str(lab_home), HF_HUB_OFFLINE="1", FINETUNE_LAB_CPU_BF16="0")
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)             # a stray torchrun variable would turn a plain run distributed
    return subprocess.run([sys.executable, "-m", *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=timeout)


def write_config(cfg, path: Path) -> Path:
    path.write_text(json.dumps(cfg.to_dict()), encoding="utf-8")
    return path


def only_run():
    (run,) = list_runs()
    return run


# ---------------------------------------------------------------- the demo, end to end

def test_config_then_train_the_demo(lab_home, tmp_path):
    """The documented first steps: the default config (bundled mobilenetv2, head only, 128 px,
    the embedded demo set) trained for one epoch in a real process, listed as the app lists it."""
    cfg_file = tmp_path / "cfg.json"
    assert cli.main(["config", "--out", str(cfg_file)]) == 0
    written = json.loads(cfg_file.read_text())
    assert written["arch"] == "mobilenetv2_100" and written["freeze"] == "head"
    assert written["image_size"] == 128 and written["data_root"].startswith("assets/")  # portable

    # 30 of the demo's 100 images a class: the same steps, a third of the decoding
    done = run_cli(["core", "train", str(cfg_file), "--set", "epochs=1", "--set", "max_per_class=30", "--quiet"],
                   lab_home)
    assert done.returncode == 0, done.stderr[-3000:]
    run = only_run()
    assert run.id in done.stdout and str(run.path) in done.stdout
    status = run.status()
    assert status["state"] == "finished", status
    assert 0 <= status["test_acc"] <= 1 and f"{status['test_acc']:.4f}" in done.stdout
    assert status["owner"] == "cli" and len(run.epochs()) == 1


# ---------------------------------------------------------------- torchrun (DDP over Gloo)

needs_gloo = pytest.mark.skipif(
    not (torch.distributed.is_available() and torch.distributed.is_gloo_available()),
    reason="torch.distributed with the Gloo backend is not available in this torch build")


@pytest.mark.distributed
@needs_gloo
@pytest.mark.parametrize("settings", [
    dict(arch="test_resnet", freeze="head", epochs=3, lr=5e-2),       # frozen backbone: feature cache
    dict(arch="test_vit", freeze="full", epochs=2, lr=1e-3),          # whole net; no BatchNorm
], ids=["head-feature-cache", "vit-full"])
def test_torchrun_matches_one_process(tiny_config, lab_home, tmp_path, settings):
    """Two Gloo processes, each taking half of every batch, must log the numbers one process logs:
    the ranks' half-batches make up the single process's batch, DDP averages the gradients,
    and the losses and counts are summed over ranks. (BatchNorm would differ: it normalises over
    each rank's half batch, hence ViT for the full fine-tune.)"""
    cfg = tiny_config(batch_size=8, **settings)              # even, so it splits over 2 ranks
    reference = core.train(cfg)
    assert reference.status()["state"] == "finished", reference.status()

    cfg_file = write_config(cfg, tmp_path / "cfg.json")
    done = run_cli(["torch.distributed.run", "--standalone", "--nproc_per_node=2",   # free port
                    "-m", "core", "train", str(cfg_file), "--quiet"], lab_home)
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    assert "on 2 process(es)" in done.stdout
    (ddp,) = [r for r in list_runs() if r.id != reference.id]
    assert ddp.id in done.stdout

    one, two = reference.epochs(), ddp.epochs()
    assert [r["epoch"] for r in two] == list(range(1, cfg.epochs + 1))     # rank 0 alone wrote rows
    for a, b in zip(one, two):
        for key in METRICS:
            assert b[key] == pytest.approx(a[key], abs=2e-3), (b["epoch"], key)
    assert ddp.status()["state"] == "finished"
    assert ddp.status()["test_acc"] == pytest.approx(reference.status()["test_acc"], abs=1e-6)
    assert ddp.status()["feature_cache"] is reference.status()["feature_cache"] is (cfg.freeze == "head")


def stopped_after_first_epoch(cfg, monkeypatch):
    """A run of `cfg` that the user stopped right after epoch 1's resume state was saved."""
    stop, original = threading.Event(), checkpoints.save_resume_state

    def save_and_stop(*args):
        original(*args)
        stop.set()
    with monkeypatch.context() as patch:
        patch.setattr(checkpoints, "save_resume_state", save_and_stop)
        run = core.Run.create(cfg)
        assert training.train_run(run, stop=stop)["state"] == "stopped"
    assert len(run.epochs()) == 1 and run.resumable()
    return run


@pytest.mark.distributed
@needs_gloo
def test_torchrun_resume_matches_an_uninterrupted_run(tiny_config, lab_home, monkeypatch):
    """`torchrun ... -m core resume RUN` goes on from a stop in data-parallel mode (rank 0 checks
    and writes, every rank loads the weights, optimiser and schedule state) and ends with the
    numbers of one process that never stopped."""
    cfg = tiny_config(arch="test_vit", freeze="full", epochs=3, lr=1e-3, scheduler="cosine")
    reference = core.train(cfg)
    run = stopped_after_first_epoch(cfg, monkeypatch)

    done = run_cli(["torch.distributed.run", "--standalone", "--nproc_per_node=2",
                    "-m", "core", "resume", run.id, "--quiet"], lab_home)
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    assert run.status()["state"] == "finished", run.status()
    assert [r["epoch"] for r in run.epochs()] == [1, 2, 3]          # each once, whatever the ranks
    for a, b in zip(reference.epochs(), run.epochs()):
        for key in METRICS:
            assert b[key] == pytest.approx(a[key], abs=2e-3), (b["epoch"], key)
    assert run.status()["test_acc"] == pytest.approx(reference.status()["test_acc"], abs=1e-6)


def test_batch_size_that_does_not_split_over_processes_fails(tiny_config, tmp_path, monkeypatch, capsys):
    """Under torchrun with 3 processes a batch of 8 cannot be shared evenly: the run fails with
    local_batch's message. A patched world size stands in for torchrun (cmd_train's init() is a
    no-op outside it)."""
    monkeypatch.setattr(dist, "world", lambda: 3)
    with pytest.raises(ValueError) as err:
        dist.local_batch(8)
    assert "multiple of 3" in str(err.value)

    cfg_file = write_config(tiny_config(batch_size=8, freeze="full", epochs=1), tmp_path / "cfg.json")
    assert cli.main(["train", str(cfg_file), "--quiet"]) == 1
    status = only_run().status()
    assert status["state"] == "failed" and status["message"] == str(err.value)
    assert "failed" in capsys.readouterr().out


# ---------------------------------------------------------------- the other commands

def test_evaluate_predict_export(tiny_config, tmp_path, capsys):
    cfg_file = write_config(tiny_config(epochs=1), tmp_path / "cfg.json")
    assert cli.main(["train", str(cfg_file), "--quiet"]) == 0
    run = only_run()

    assert cli.main(["evaluate", run.id]) == 0
    assert "accuracy" in capsys.readouterr().out
    assert run.file("test_metrics.json").is_file() and run.file("test_predictions.csv").is_file()
    assert cli.main(["evaluate", run.id, "--split", "val"]) == 0
    assert run.read_json("val_metrics.json")["n"] == len(run.read_json("splits.json")["val"])

    # one loose image plus a folder of three (nested, to check the recursive walk)
    single, folder = tmp_path / "one.png", tmp_path / "more"
    class_image(0, 900).save(single)
    (folder / "sub").mkdir(parents=True)
    for i in range(3):
        class_image(i, 901 + i).save(folder / ("sub" if i else "") / f"x{i}.png")
    out = tmp_path / "x.csv"
    assert cli.main(["predict", run.id, str(single), str(folder), "--out", str(out)]) == 0
    frame = pd.read_csv(out)
    assert len(frame) == 4 and frame["file"].nunique() == 4
    assert set(frame["predicted"]) <= set(run.classes) and frame["predicted"].notna().all()
    assert "4 predictions written" in capsys.readouterr().out

    assert cli.main(["export", run.id, "--onnx"]) == 0
    for name in ("model.safetensors", "model.json", "model.onnx"):
        assert (run.file("export") / name).stat().st_size > 0, name


def test_sweep_creates_tagged_runs(tiny_config, tmp_path, capsys):
    cfg_file = write_config(tiny_config(), tmp_path / "cfg.json")
    assert cli.main(["sweep", str(cfg_file), "--grid", "lr=0.001,0.01", "--set", "epochs=1", "--quiet"]) == 0
    runs = sorted(list_runs(), key=lambda r: r.config.lr)
    assert [r.config.tags for r in runs] == [{"lr": 0.001}, {"lr": 0.01}]
    assert len({r.config.sweep for r in runs}) == 1 and runs[0].config.sweep
    assert all(r.status()["state"] == "finished" and len(r.epochs()) == 1 for r in runs)
    assert "lr=0.001" in capsys.readouterr().out                 # the results table


def test_bad_inputs(tiny_config, tmp_path, capsys):
    cfg_file = write_config(tiny_config(), tmp_path / "cfg.json")
    # a config problem: its sentences on stderr and status 2, as argparse does (tests/test_hostile_config.py has more)
    for argv in (["train", str(cfg_file), "--set", "epochz=1"],
                 ["sweep", str(cfg_file), "--grid", "lr=0.1", "--set", "epochz=1"]):
        assert cli.main(argv) == 2
        assert "error: --set: unknown setting 'epochz' (did you mean 'epochs'?)" in capsys.readouterr().err
    assert cli.main(["sweep", str(cfg_file), "--grid", "colour=red,blue"]) == 2
    assert "not one of" in capsys.readouterr().err
    # a CLI config may use any batch size, not any lr
    assert cli.main(["train", str(cfg_file), "--set", "lr=-1", "--set", "batch_size=12"]) == 2
    assert capsys.readouterr().err == "error: lr is -1; it must be between 1e-06 and 10.\n"
    assert cli.main(["sweep", str(cfg_file), "--grid", "lr=0.1,20"]) == 2   # one bad value: no run starts
    assert "lr=20: lr is 20; it must be between" in capsys.readouterr().err
    assert list_runs() == []                                     # nothing was created

    for command in (["evaluate"], ["resume"], ["export"], ["predict", "x.png"]):
        assert cli.main([command[0], "no-such-run", *command[1:]]) == 2, command
        assert "No run called no-such-run" in capsys.readouterr().err

    finished = core.train(tiny_config(epochs=1))
    with pytest.raises(SystemExit, match="cannot be resumed"):
        cli.main(["resume", finished.id])
    assert get_run(finished.id).status()["state"] == "finished"  # untouched by the refusal


def test_a_preset_file_is_a_config(image_folder, tmp_path):
    """A teacher's preset (here the shipped report 003) runs from the command line; it holds no
    data set, so the command names one or says it must."""
    preset = REPO / "assets" / "presets" / "report-003-sgd-steplr-augment.json"
    settings = json.loads(preset.read_text())["settings"]
    with pytest.raises(ConfigError, match="names no data set: add --set data_root=FOLDER"):
        cli.load_config(str(preset))
    cfg = cli.load_config(str(preset), [f"data_root={image_folder()}", "epochs=1"])
    assert (cfg.optimizer, cfg.lr, cfg.momentum, cfg.scheduler, cfg.step_size, cfg.freeze) == (
        settings["optimizer"], settings["lr"], settings["momentum"], "step", 7, "full")
    assert cfg.augment == settings["augment"] and cfg.epochs == 1 and cfg.name == ""
    broken = tmp_path / "broken.json"
    broken.write_text(json.dumps({"settings": {"lr": 100}}))
    with pytest.raises(ConfigError, match="lr is 100"):
        cli.load_config(str(broken), ["data_root=x"])
