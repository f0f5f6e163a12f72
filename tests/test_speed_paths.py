"""The speed paths must not change results: CPU bf16 autocast and the caches shared by a sweep."""
import pytest
import torch

import core
from core import device as devices
from core.training import caches


def test_bf16_switch(monkeypatch):
    monkeypatch.setenv("FINETUNE_LAB_CPU_BF16", "1")
    assert devices.cpu_bf16()
    with devices.autocast(torch.device("cpu")):
        assert torch.is_autocast_enabled("cpu")
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.bfloat16
    monkeypatch.setenv("FINETUNE_LAB_CPU_BF16", "0")
    assert not devices.cpu_bf16()
    assert "fp32" in devices.describe(torch.device("cpu"))


@pytest.mark.slow
def test_training_under_bf16_finishes(monkeypatch, tiny_config, image_folder):
    monkeypatch.setenv("FINETUNE_LAB_CPU_BF16", "1")
    run = core.train(tiny_config(data_root=str(image_folder()), freeze="full", epochs=2))
    assert run.status()["state"] == "finished"
    assert "bf16" in run.status()["device"]
    assert all(torch.isfinite(torch.tensor(e["train_loss"])) for e in run.epochs())


def test_sweep_caches_give_identical_results(tiny_config, image_folder):
    caches._DECODED.clear()
    caches._FEATURES.clear()
    cfg = tiny_config(data_root=str(image_folder()), freeze="head", epochs=3)
    first = core.train(cfg)
    assert caches._DECODED and caches._FEATURES        # filled by the first run
    second = core.train(cfg)
    assert [e["val_acc"] for e in first.epochs()] == [e["val_acc"] for e in second.epochs()]
    assert first.status()["test_acc"] == second.status()["test_acc"]
    caches._DECODED.clear()
    caches._FEATURES.clear()
    third = core.train(cfg)                  # the same without caches
    assert [e["train_loss"] for e in third.epochs()] == [e["train_loss"] for e in first.epochs()]
