"""The fast fine-tuning paths: the frozen-prefix split and cache (core.models.prefix), the per-step
precision choice (core.device.choose_precision) and the time-budget planner (core.training.budget), both
on their own and end to end through core.training. Tiny timm models with random weights, offline."""
from __future__ import annotations

import copy
import json
import math
import threading
import time

import numpy as np
import pytest
import timm
import torch
from torch import nn

import core
from conftest import class_folders, class_image, tiny_run_config
from core.training import budget
from core.training import run as training
from core import config
from core import device as devices
from core.models import prefix
from core.models.backbones import (FineTuneModel, apply_freeze, block_groups, build_model, freeze_norm_stats,
                            make_head, native_input_size)
from core.data.transforms import build_transform
from core.config import RunConfig

pytestmark = pytest.mark.slow

ARCHS = ["test_resnet", "test_efficientnet", "test_convnext", "test_vit"]


def size_for(arch: str) -> int:
    # ViT's position embeddings fix its input size; the conv nets take any size
    return native_input_size(arch) or 64


def model_for(arch: str, seed: int = 0) -> FineTuneModel:
    torch.manual_seed(seed)
    return build_model(arch, 3, weights="random")


def images_uint8(n: int, size: int = 40) -> list[torch.Tensor]:
    """Decoded images as the loop holds them: uint8 CHW tensors."""
    return [torch.from_numpy(np.array(class_image(i % 3, i, size))).permute(2, 0, 1).contiguous()
            for i in range(n)]


# ---------------------------------------------------------------- 1. the split is exact

@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("top_k", [1, 2])
def test_prefix_then_suffix_equals_whole_backbone(arch, top_k):
    # Training on the cached prefix is only right if prefix + suffix is the very same function
    # as the backbone's own forward pass.
    model = model_for(arch)
    size = size_for(arch)
    apply_freeze(model, "top_k", top_k)
    split = prefix.find_split(model.backbone, size)
    assert split.ok, split.reason
    assert 0 < split.cut <= len(split.blocks)
    assert split.cut_name
    backbone = model.backbone.eval()
    x = torch.randn(3, 3, size, size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = backbone(x)
        got = prefix.run_suffix(backbone, split, prefix.prefix_output(backbone, split, x))
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_deeper_top_k_cuts_lower():
    # More trainable blocks means the frozen prefix ends earlier in the chain.
    model = model_for("test_efficientnet")
    cuts = []
    for k in (1, 2, 3):
        apply_freeze(model, "top_k", k)
        split = prefix.find_split(model.backbone, 64)
        assert split.ok, split.reason
        cuts.append(split.cut)
    assert cuts[0] > cuts[1] > cuts[2]
    assert 0 < split.frozen_fraction < 1


# ---------------------------------------------------------------- 2. cached training == normal training

@pytest.mark.parametrize("arch", ["test_resnet", "test_efficientnet"])
def test_one_sgd_step_on_cached_prefix_equals_normal_step(arch):
    # The suffix model shares the model's modules, so a step through it must move the weights
    # exactly as a step of the whole model does (frozen BN in eval mode in both).
    size = 32
    a = model_for(arch)
    apply_freeze(a, "top_k", 1)
    b = copy.deepcopy(a)
    x = torch.randn(6, 3, size, size, generator=torch.Generator().manual_seed(2))
    y = torch.tensor([0, 1, 2, 0, 1, 2])
    loss_fn = nn.CrossEntropyLoss()

    # A: the normal way
    a.train()
    freeze_norm_stats(a)
    opt_a = torch.optim.SGD([p for p in a.parameters() if p.requires_grad], lr=0.1)
    logits_a = a(x)
    loss_fn(logits_a, y).backward()
    opt_a.step()

    # B: prefix once (no grad, eval mode), then the suffix trains
    split = prefix.find_split(b.backbone, size)
    assert split.ok, split.reason
    b.eval()
    with torch.no_grad():
        cached = prefix.prefix_output(b.backbone, split, x).clone()
    suffix = prefix.SuffixModel(b, split)
    suffix.train()
    freeze_norm_stats(b)
    opt_b = torch.optim.SGD([p for p in b.parameters() if p.requires_grad], lr=0.1)
    logits_b = suffix(cached)
    loss_fn(logits_b, y).backward()
    opt_b.step()

    torch.testing.assert_close(logits_b, logits_a, atol=1e-4, rtol=1e-4)
    params_b = dict(b.named_parameters())
    moved = 0
    for name, pa in a.named_parameters():
        torch.testing.assert_close(params_b[name], pa, atol=1e-4, rtol=1e-4, msg=name)
        moved += pa.requires_grad
    assert moved > 2          # the top block and the head trained, not just the head
    # the trainable block's BN statistics moved the same way too
    buffers_b = dict(b.named_buffers())
    for name, buf in a.named_buffers():
        if buf.is_floating_point():
            torch.testing.assert_close(buffers_b[name], buf, atol=1e-4, rtol=1e-4, msg=name)


def test_suffix_model_shares_modules():
    # Nothing is copied: the suffix's parameters are the model's own tensors.
    model = model_for("test_resnet")
    apply_freeze(model, "top_k", 1)
    split = prefix.find_split(model.backbone, 32)
    suffix = prefix.SuffixModel(model, split)
    own = {id(p) for p in model.parameters()}
    assert all(id(p) in own for p in suffix.parameters())
    assert suffix.head is model.head


# ---------------------------------------------------------------- 3. when there is no split

def test_no_split_when_whole_backbone_frozen_or_lowest_block_trains():
    model = model_for("test_resnet")
    apply_freeze(model, "head")
    split = prefix.find_split(model.backbone, 32)
    assert not split.ok and "frozen" in split.reason
    assert split.cut_name == ""
    apply_freeze(model, "full")
    split = prefix.find_split(model.backbone, 32)
    assert not split.ok and "lowest block trains" in split.reason


def _top_group_trains(backbone: nn.Module) -> None:
    top = set(block_groups(backbone)[-1][1])
    for name, p in backbone.named_parameters():
        p.requires_grad = name in top


def test_no_split_with_drop_path_below_the_cut():
    # timm's resnet gives layer2..layer4 a DropPath when drop_path_rate > 0 (layer1 gets rate 0):
    # a random prefix can't be cached.
    backbone = timm.create_model("test_resnet", num_classes=0, drop_path_rate=0.1)
    below = [n for n, m in backbone.named_modules()
             if type(m).__name__ == "DropPath" and float(m.drop_prob) > 0 and not n.startswith("layer4")]
    assert below, "precondition: test_resnet has DropPath below its top block"
    model = FineTuneModel(backbone, make_head(backbone.num_features, 3))
    apply_freeze(model, "top_k", 1)
    split = prefix.find_split(backbone, 32)
    assert not split.ok
    assert "stochastic" in split.reason


def test_no_split_with_dropout_below_the_cut():
    # A ViT's position dropout runs before every block.
    backbone = timm.create_model("test_vit", num_classes=0, pos_drop_rate=0.1)
    assert isinstance(backbone.pos_drop, nn.Dropout) and backbone.pos_drop.p > 0
    _top_group_trains(backbone)
    split = prefix.find_split(backbone, size_for("test_vit"))
    assert not split.ok
    assert "dropout" in split.reason


def test_zero_rate_dropout_does_not_block_the_split():
    # ConvNeXt and ViT hold nn.Dropout(p=0) layers: harmless, so the split still applies.
    for arch in ("test_convnext", "test_vit"):
        model = model_for(arch)
        assert any(isinstance(m, nn.Dropout) for m in model.backbone.modules())
        apply_freeze(model, "top_k", 1)
        assert prefix.find_split(model.backbone, size_for(arch)).ok


# ---------------------------------------------------------------- 4. no leftovers

def _hooks(module: nn.Module) -> list[str]:
    return [name for name, m in module.named_modules() if m._forward_pre_hooks or m._forward_hooks]


@pytest.mark.parametrize("arch", ["test_resnet", "test_vit"])
def test_hooks_removed_and_train_flags_restored(arch):
    model = model_for(arch)
    size = size_for(arch)
    apply_freeze(model, "top_k", 1)
    backbone = model.backbone
    # a mix of train and eval, as freeze_norm_stats leaves a model
    for i, m in enumerate(backbone.modules()):
        m.training = i % 2 == 0
    modes = {name: m.training for name, m in backbone.named_modules()}
    assert not _hooks(backbone)

    split = prefix.find_split(backbone, size)
    assert split.ok, split.reason
    prefix.block_chain(backbone, size)
    prefix.bytes_per_image(backbone, split, size)
    with torch.no_grad():
        prefix.prefix_output(backbone, split, torch.randn(1, 3, size, size))
    tf = build_transform(size, [0.5] * 3, [0.25] * 3)
    prefix.compute(backbone, split, images_uint8(3), tf, torch.device("cpu"), views=1).close()

    assert not _hooks(backbone)
    assert {name: m.training for name, m in backbone.named_modules()} == modes


def test_hooks_removed_when_the_forward_raises():
    # prefix_output on a cut block that is never reached raises, and still leaves no hook.
    model = model_for("test_resnet")
    apply_freeze(model, "top_k", 1)
    split = prefix.find_split(model.backbone, 32)
    bogus = prefix.Split(split.blocks + [("nowhere", nn.Identity())], len(split.blocks))
    with pytest.raises(RuntimeError, match="never reached"), torch.no_grad():
        prefix.prefix_output(model.backbone.eval(), bogus, torch.randn(2, 3, 32, 32))
    assert not _hooks(model.backbone)


# ---------------------------------------------------------------- 5. Store and compute

def test_compute_views_and_disk_store(tmp_path):
    model = model_for("test_resnet").eval()
    apply_freeze(model, "top_k", 1)
    backbone = model.backbone
    split = prefix.find_split(backbone, 32)
    images = images_uint8(5)
    tf = build_transform(32, [0.5] * 3, [0.25] * 3, {"hflip": True, "random_resized_crop": 0.5})
    cpu = torch.device("cpu")

    torch.manual_seed(7)
    mem = prefix.compute(backbone, split, images, tf, cpu, views=3, batch_size=2)
    assert mem.n == 3 * len(images)
    n = len(images)
    with torch.no_grad():
        one = prefix.prefix_output(backbone.eval(), split, torch.randn(1, 3, 32, 32))
    assert mem.shape == tuple(one.shape[1:])
    # row v * n + i is view v of image i: the augmented views of one image differ
    views = mem.get(np.array([1, n + 1, 2 * n + 1]))
    for a, b in ((0, 1), (0, 2), (1, 2)):
        assert not torch.equal(views[a], views[b])

    disk = tmp_path / "cache" / "x.npy"
    torch.manual_seed(7)
    mapped = prefix.compute(backbone, split, images, tf, cpu, views=3, batch_size=2, disk=disk)
    assert isinstance(mapped.data, np.memmap)
    assert disk.exists()
    assert mapped.n == mem.n and mapped.shape == mem.shape
    assert mem.data.dtype == torch.float16 and mapped.data.dtype == np.float16   # both 2-byte
    rows = np.arange(mem.n)
    assert torch.equal(mapped.get(rows), mem.get(rows))
    assert torch.equal(mapped.get([4, 0]), mem.get([4, 0]))
    assert mapped.nbytes == mem.nbytes
    mapped.close()
    assert not disk.exists()
    mem.close()            # in memory: nothing to remove, must not fail


def test_compute_without_split_gives_pooled_features():
    model = model_for("test_resnet")
    tf = build_transform(32, [0.5] * 3, [0.25] * 3)
    store = prefix.compute(model.backbone, None, images_uint8(4), tf, torch.device("cpu"), views=1)
    assert store.n == 4 and store.shape == (model.backbone.num_features,)
    with torch.no_grad():
        want = model.backbone.eval()(torch.stack([tf(img) for img in images_uint8(4)]))
    torch.testing.assert_close(store.get(np.arange(4)), want, atol=2e-2, rtol=2e-3)   # fp16 storage


def test_compute_progress_can_stop():
    model = model_for("test_resnet")
    tf = build_transform(32, [0.5] * 3, [0.25] * 3)
    seen = []

    def progress(done, total):
        seen.append((done, total))
        if done >= 4:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        prefix.compute(model.backbone, None, images_uint8(6), tf, torch.device("cpu"), views=2,
                  batch_size=2, progress=progress)
    assert seen == [(2, 12), (4, 12)]


# ---------------------------------------------------------------- 6. end to end with the prefix cache

@pytest.fixture
def folder(tmp_path):
    return class_folders(tmp_path / "data", 3, 12)


def test_top_k_run_uses_prefix_cache_and_is_deterministic(folder):
    cfg = tiny_run_config(folder, freeze="top_k", top_k=1, epochs=2)
    first = core.train(cfg)
    status = first.status()
    assert status["state"] == "finished", status
    assert isinstance(status["prefix_cache"], str) and status["prefix_cache"]
    assert status["cache_off"] == ""
    assert status["feature_cache"] is False
    assert status["precision"]
    second = core.train(cfg)
    assert second.status()["state"] == "finished"
    rows1, rows2 = first.epochs(), second.epochs()
    assert len(rows1) == 2
    assert [r["train_loss"] for r in rows1] == [r["train_loss"] for r in rows2]
    assert [r["val_acc"] for r in rows1] == [r["val_acc"] for r in rows2]
    assert status["test_acc"] == second.status()["test_acc"]


def test_prefix_cache_trains_like_the_uncached_run(folder):
    # Same seed, same batches (train_order == the loader's sampler): the cached run differs from
    # the normal one only by the cache's fp16 rounding of the frozen prefix's output.
    cached = core.train(tiny_run_config(folder, freeze="top_k", top_k=1, epochs=2))
    plain = core.train(tiny_run_config(folder, freeze="top_k", top_k=1, epochs=2, cache_features=False))
    assert cached.status()["prefix_cache"] and plain.status()["prefix_cache"] == ""
    assert "off" in plain.status()["cache_off"]
    got = [r["train_loss"] for r in cached.epochs()]
    want = [r["train_loss"] for r in plain.epochs()]
    assert got == pytest.approx(want, rel=2e-2)


def test_augmented_views_are_cached(folder):
    run = core.train(tiny_run_config(folder, freeze="top_k", top_k=1, epochs=2,
                                     augment={"hflip": True}, aug_views=2))
    status = run.status()
    assert status["state"] == "finished", status
    assert status["prefix_cache"]
    assert status["cache"]["views"] == 2
    assert status["cache"]["where"] == "memory"
    assert len(run.epochs()) == 2


def test_live_augmentation_turns_the_prefix_cache_off(folder):
    run = core.train(tiny_run_config(folder, freeze="top_k", top_k=1, epochs=1,
                                     augment={"hflip": True}, aug_views=0))
    status = run.status()
    assert status["state"] == "finished", status
    assert status["prefix_cache"] == ""
    assert "augment" in status["cache_off"]


def test_head_only_with_augmented_views_uses_feature_cache(folder):
    run = core.train(tiny_run_config(folder, freeze="head", epochs=2, augment={"hflip": True},
                                     aug_views=2))
    status = run.status()
    assert status["state"] == "finished", status
    assert status["feature_cache"] is True
    assert status["cache"]["views"] == 2


def test_prefix_cache_goes_to_disk_when_memory_is_short(folder, monkeypatch, lab_home):
    # A tiny RAM budget sends the cache to a memory-mapped file, which is removed after the run.
    monkeypatch.setenv("FINETUNE_LAB_CACHE_RAM_MB", "0.0001")
    run = core.train(tiny_run_config(folder, freeze="top_k", top_k=1, epochs=1,
                                     augment={"hflip": True}, aug_views=2))
    status = run.status()
    assert status["state"] == "finished", status
    assert status["cache"]["where"].startswith("disk")
    assert not list((lab_home / "cache").glob("*.npy"))


# ---------------------------------------------------------------- 7. precision choice

def _sleeper(slow: str, seconds: float = 0.03):
    calls = []

    def step(precision):
        calls.append(precision)
        torch.randn(10)                 # a real step draws random numbers (dropout, ...)
        if precision == slow:
            time.sleep(seconds)
    return step, calls


def test_choose_precision_measures_and_remembers(monkeypatch, tmp_path):
    monkeypatch.delenv("FINETUNE_LAB_CPU_BF16", raising=False)
    monkeypatch.setattr(devices, "_CHOSEN", {})
    monkeypatch.setattr(devices, "_has_bf16_flags", lambda: True)     # as on a CPU with AVX512-BF16/AMX
    cpu, store = torch.device("cpu"), tmp_path / "p.json"

    step, calls = _sleeper("bf16")
    torch.manual_seed(3)
    rng = torch.get_rng_state()
    got = devices.choose_precision(cpu, "k1", step, store=store)
    assert torch.equal(torch.get_rng_state(), rng)      # the trial leaves a seeded run's RNG alone
    assert got["precision"] == "fp32" and got["why"] == "measured now"
    assert got["bf16_s"] > got["fp32_s"]
    assert "fp32" in calls and "bf16" in calls

    step2, calls2 = _sleeper("fp32")
    assert devices.choose_precision(cpu, "k2", step2, store=store)["precision"] == "bf16"

    # asked again with another step: the stored answer, no trial
    step3, calls3 = _sleeper("fp32")
    again = devices.choose_precision(cpu, "k1", step3, store=store)
    assert again["precision"] == "fp32" and again["why"] == "measured earlier on this machine"
    assert calls3 == []
    saved = json.loads(store.read_text())
    assert saved["k1"]["precision"] == "fp32" and saved["k2"]["precision"] == "bf16"

    # a fresh process (empty memory) reads the file
    monkeypatch.setattr(devices, "_CHOSEN", {})
    later = devices.choose_precision(cpu, "k2", step3, store=store)
    assert later["precision"] == "bf16" and later["why"] == "measured earlier on this machine"
    assert calls3 == []


def test_choose_precision_without_bf16_instructions_keeps_fp32(monkeypatch, tmp_path):
    # Emulated bf16 is several times slower: no trial on a CPU without the instructions.
    monkeypatch.delenv("FINETUNE_LAB_CPU_BF16", raising=False)
    monkeypatch.setattr(devices, "_CHOSEN", {})
    monkeypatch.setattr(devices, "_has_bf16_flags", lambda: False)
    step, calls = _sleeper("fp32")
    got = devices.choose_precision(torch.device("cpu"), "k", step, store=tmp_path / "p.json")
    assert got["precision"] == "fp32" and "bf16" in got["why"]
    assert calls == []


def test_choose_precision_forced_by_environment(monkeypatch, tmp_path):
    monkeypatch.setattr(devices, "_CHOSEN", {})
    step, calls = _sleeper("fp32")
    monkeypatch.setenv("FINETUNE_LAB_CPU_BF16", "0")
    got = devices.choose_precision(torch.device("cpu"), "k", step, store=tmp_path / "p.json")
    assert got["precision"] == "fp32" and "FINETUNE_LAB_CPU_BF16" in got["why"]
    monkeypatch.setenv("FINETUNE_LAB_CPU_BF16", "1")
    assert devices.choose_precision(torch.device("cpu"), "k", step)["precision"] == "bf16"
    assert calls == []
    assert not (tmp_path / "p.json").exists()


def test_precision_key_separates_kinds():
    cpu = torch.device("cpu")
    a = devices.precision_key(cpu, "test_resnet", 32, "train")
    assert a != devices.precision_key(cpu, "test_resnet", 32, "train@layer4.0")
    assert a != devices.precision_key(cpu, "test_resnet", 64, "train")
    assert a != devices.precision_key(cpu, "test_vit", 32, "train")


# ---------------------------------------------------------------- 8. the planner

def _fake_speeds(model, size=32, block=1e-4):
    names = [n for n, _ in prefix.block_chain(model.backbone, size)]
    return budget.Speeds(block_s=[block] * len(names), head_s=1e-5, train_factor=3.0, augment_s=1e-5,
                    names=names)


def _plan_cfg(**kw):
    return RunConfig(**{**dict(arch="test_efficientnet", weights="random", image_size=32,
                                freeze="top_k", augment={"hflip": True}, aug_views=2), **kw})


def _is_sentence(note) -> bool:
    return isinstance(note, str) and note[:1].isupper() and note.rstrip().endswith(".")


def test_plan_with_a_huge_budget_fine_tunes_everything():
    model = model_for("test_efficientnet")
    phases, notes = budget.plan(_plan_cfg(), model, _fake_speeds(model), budget.Counts(100, 20, 20), 1e6, views=2)
    assert [p.freeze for p in phases] == ["head", "full"]
    head, full = phases
    assert head.epochs == budget.HEAD_EPOCHS and head.lr == config.HEAD_LR
    assert full.epochs == budget.PLAN_EPOCHS
    assert full.lr == pytest.approx(config.FULL_LR)
    assert notes and all(_is_sentence(n) for n in notes)


def test_plan_with_a_small_budget_trains_top_blocks():
    model = model_for("test_efficientnet")
    speeds, counts = _fake_speeds(model), budget.Counts(100, 20, 20)
    groups = len(block_groups(model.backbone))
    seconds = 0.8        # the cached top-1 phase fits with a few epochs; the full network doesn't
    phases, notes = budget.plan(_plan_cfg(), model, speeds, counts, seconds, views=2)
    assert phases[0].freeze == "head"
    assert len(phases) == 2
    ft = phases[1]
    assert ft.freeze == "top_k" and 1 <= ft.top_k < groups
    assert ft.epochs >= budget.MIN_EPOCHS
    assert ft.lr == pytest.approx(config.depth_lr(ft.top_k / groups))
    assert phases[0].seconds + ft.seconds <= seconds * budget.SAFETY + 1e-9
    assert all(_is_sentence(n) for n in notes)
    assert any("cache" in n for n in notes)
    # more time never means a shallower fine-tune
    deeper, _ = budget.plan(_plan_cfg(), model, speeds, counts, 1.5, views=2)
    assert (deeper[1].top_k if deeper[1].freeze == "top_k" else groups) >= ft.top_k


def test_plan_with_no_time_trains_the_head_longer():
    model = model_for("test_efficientnet")
    phases, notes = budget.plan(_plan_cfg(), model, _fake_speeds(model), budget.Counts(100, 20, 20), 0.2, views=2)
    assert [p.freeze for p in phases] == ["head"]
    assert phases[0].epochs == 2 * budget.HEAD_EPOCHS >= budget.MIN_EPOCHS
    assert len(notes) == 2 and all(_is_sentence(n) for n in notes)


def test_the_test_pass_reserve_follows_the_measured_speed():
    from core.training.plan import measured_image_s, reserve_for_testing
    guess = reserve_for_testing(300, 300, "auto")
    plan = dict(speeds=dict(forward_ms=3.5, augment_ms=0.8))      # MobileNetV2 at 160 px on 2 cores
    measured = reserve_for_testing(300, 300, "auto", measured_image_s(plan))
    assert guess == pytest.approx(2 + 0.02 * 1200)
    assert 2 < measured < guess / 2          # a 90 s budget keeps ~12 s back, not 26 s
    assert reserve_for_testing(300, 300, "auto", 1.0) == guess     # a slow model never gets less than the guess
    for broken in (None, {}, dict(speeds=dict(forward_ms="x")), dict(speeds=dict(forward_ms=0))):
        assert measured_image_s(broken) is None


def test_the_last_phase_fills_the_budget_within_ten_times_its_plan():
    from core.training.plan import LONGEST, BudgetClock
    phases = [budget.Phase("head", "head", 8), budget.Phase("fine-tune", "full", 8)]
    clock = BudgetClock(time.monotonic() + 101)
    assert clock.refit(phases, 1, 9, 8, 16, epoch_s=5) == 29          # 20 more epochs fit
    clock.deadline = time.monotonic() + 61
    assert clock.refit(phases, 1, 20, 8, 29, epoch_s=5) == 32         # later epochs lengthen it too
    clock.deadline = time.monotonic() + 11
    assert clock.refit(phases, 1, 21, 8, 32, epoch_s=5) == 23         # running late: cut
    clock.deadline = time.monotonic() + 1e6
    assert clock.refit(phases, 1, 22, 8, 23, epoch_s=5) == 8 + LONGEST * 8     # never past the cap
    resumed = BudgetClock(time.monotonic() + 100)                     # no first epoch seen: only cuts
    assert resumed.refit(phases, 1, 12, 8, 16, epoch_s=5) == 16
    assert BudgetClock(time.monotonic() + 100).refit(phases, 0, 1, 0, 8, epoch_s=1) == 8   # not the last phase


def test_a_last_epoch_that_partly_fits_starts_and_stops_at_the_deadline():
    from core.training.loop import Until
    from core.training.plan import SHORT_EPOCH, BudgetClock
    phases = [budget.Phase("head", "head", 8), budget.Phase("fine-tune", "full", 8)]
    share = SHORT_EPOCH + 0.1                                          # of one more 10 s epoch
    assert BudgetClock(time.monotonic() + 20 + 10 * share).refit(phases, 1, 9, 8, 16, epoch_s=10) == 12
    whole_only = BudgetClock(time.monotonic() + 20 + 10 * share, short_epochs=False)   # several processes
    assert whole_only.refit(phases, 1, 9, 8, 16, epoch_s=10) == 11
    assert BudgetClock(time.monotonic() + 20 + 10 * share).refit(phases, 0, 1, 0, 16, epoch_s=10) == 3
    assert BudgetClock(time.monotonic() + 100).stop_training_at(4.0) == pytest.approx(time.monotonic() + 96, abs=1)
    assert whole_only.stop_training_at(4.0) is None and BudgetClock(None).stop_training_at(4.0) is None
    past, future = Until(range(5), time.monotonic() - 1), Until(range(5), time.monotonic() + 100)
    assert (list(past), past.taken, past.cut) == ([0], 1, True)        # at least one batch
    assert (list(future), future.taken, future.cut) == ([0, 1, 2, 3, 4], 5, False)
    assert list(Until(range(3), None)) == [0, 1, 2]


def test_a_run_whose_epochs_are_cut_at_the_deadline_still_validates_and_tests(folder, monkeypatch):
    from core.training.plan import BudgetClock
    monkeypatch.setattr(BudgetClock, "stop_training_at", lambda self, validate_s: 0.0)   # always past
    run = core.train(tiny_run_config(folder, time_budget_s=60))
    status, rows = run.status(), run.epochs()
    assert status["state"] == "finished" and status.get("test_acc") is not None, status
    assert [r["train_batches"] for r in rows] == [1]                   # one batch; a cut epoch ends training
    assert all(math.isfinite(r["train_loss"]) and r["val_acc"] is not None for r in rows)


def test_depth_lr_falls_with_depth():
    assert config.depth_lr(0) == pytest.approx(config.HEAD_LR)
    assert config.depth_lr(1) == pytest.approx(config.FULL_LR)
    values = [config.depth_lr(f / 10) for f in range(11)]
    assert all(a > b for a, b in zip(values, values[1:]))
    assert config.depth_lr(-1) == config.depth_lr(0) and config.depth_lr(2) == config.depth_lr(1)


def test_config_phases_match_the_two_phase_behaviour():
    from core.training.run import plan_phases
    cfg = RunConfig(freeze="top_k", top_k=2, epochs=5, phase1_epochs=2)
    phases = budget.config_phases(cfg)
    assert [(p.name, p.freeze, p.epochs, p.top_k) for p in phases] == [
        ("head", "head", 2, 2), ("fine-tune", "top_k", 3, 2)]
    assert all(p.lr is None and p.backbone_lr_mult is None for p in phases)   # the config's own
    assert plan_phases(cfg) == [("head", "head", 2), ("fine-tune", "top_k", 3)]
    for one in (RunConfig(freeze="top_k", epochs=5),                      # no head phase asked for
                RunConfig(freeze="head", epochs=5, phase1_epochs=2),      # head only anyway
                RunConfig(freeze="scratch", epochs=5, phase1_epochs=2),   # no pretrained features
                RunConfig(freeze="full", epochs=2, phase1_epochs=2)):     # nothing left after it
        assert [(p.name, p.freeze, p.epochs) for p in budget.config_phases(one)] == [
            ("train", one.freeze, one.epochs)]
    assert budget.total_epochs(phases) == 5
    assert budget.phases_from([p.to_dict() for p in phases]) == phases


def test_measure_leaves_the_model_alone():
    model = model_for("test_efficientnet")
    apply_freeze(model, "top_k", 1)
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    tf = build_transform(32, [0.5] * 3, [0.25] * 3)
    torch.manual_seed(5)
    rng = torch.get_rng_state()
    speeds = budget.measure(model, 32, torch.device("cpu"), tf, images_uint8(4), batch=4)
    assert torch.equal(torch.get_rng_state(), rng)
    assert speeds.names == [n for n, _ in prefix.block_chain(model.backbone, 32)]
    assert len(speeds.block_s) == len(speeds.names)
    assert all(s >= 0 for s in speeds.block_s) and speeds.forward_s > 0
    assert speeds.train_factor >= 1.5
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert all(p.grad is None for p in model.parameters())
    assert model.training


def test_measure_leaves_the_rng_alone_with_an_augmenting_transform():
    # measure() promises to leave the RNG as it was; the planner runs it between seeding and
    # training, so a time-budget run's augmentations would otherwise depend on the measurement.
    model = model_for("test_efficientnet")
    tf = build_transform(32, [0.5] * 3, [0.25] * 3, {"hflip": True, "random_resized_crop": 0.5})
    torch.manual_seed(5)
    rng = torch.get_rng_state()
    budget.measure(model, 32, torch.device("cpu"), tf, images_uint8(4), batch=4)
    assert torch.equal(torch.get_rng_state(), rng)


# ---------------------------------------------------------------- 9. a time-budget run

def test_time_budget_run(folder):
    start = time.monotonic()
    run = core.train(tiny_run_config(folder, time_budget_s=60))
    elapsed = time.monotonic() - start
    status = run.status()
    assert status["state"] == "finished", status
    plan = run.read_json("plan.json")
    assert plan and plan["phases"] and plan["budget_s"] == 60
    assert elapsed < 60 * 1.5, f"a 60 s budget took {elapsed:.0f} s"       # the budget is kept (with test overhead)
    assert sum(p.seconds for p in budget.phases_from(plan["phases"])) <= 60
    phases = budget.phases_from(plan["phases"])
    assert phases[0].freeze == "head"
    planned = budget.total_epochs(phases)
    assert run.config.epochs == planned
    ran = len(run.epochs())
    assert 1 <= ran <= planned
    if elapsed < 40 and "early_stopped" not in status:      # far from the deadline: the whole plan ran
        assert ran == planned
    assert [r["phase"] for r in run.epochs()][0] == "head"
    # conftest forces fp32; the head phase on cached features gets its own precision entry
    assert status["precision"] and set(status["precision"].values()) == {"fp32"}
    assert "train@head" in status["precision"]
    assert status["plan"] == plan["notes"]
    assert (run.path / "precision.json").exists()


# ---------------------------------------------------------------- stop and resume keep the guarantees

def _stop_after(monkeypatch, epoch: int) -> threading.Event:
    """A stop event set right after `epoch`'s resume state is written (as if Stop was pressed)."""
    from core.training import checkpoints
    stop = threading.Event()
    original = checkpoints.save_resume_state

    def save_and_stop(run, model, optimizer, scheduler, scaler, progress):
        original(run, model, optimizer, scheduler, scaler, progress)
        if progress["epoch"] == epoch:
            stop.set()
    monkeypatch.setattr(checkpoints, "save_resume_state", save_and_stop)
    return stop


def _metrics(run):
    return [(r["epoch"], r["phase"], round(r["train_loss"], 6), r["val_acc"]) for r in run.epochs()]


def test_prefix_run_with_augmented_views_resumes_to_the_same_metrics(folder, monkeypatch):
    # The bank is rebuilt on resume from the same seed, and each epoch's view is drawn from
    # (seed, epoch): a stopped-and-resumed run trains exactly as an uninterrupted one.
    from core.serve.store import Run
    settings = dict(freeze="top_k", top_k=1, epochs=4, augment={"hflip": True}, aug_views=2)
    whole = Run.create(tiny_run_config(folder, **settings))
    assert training.train_run(whole)["state"] == "finished"

    run = Run.create(tiny_run_config(folder, **settings))
    status = training.train_run(run, stop=_stop_after(monkeypatch, 2))
    assert status["state"] == "stopped" and run.resumable(), status
    monkeypatch.undo()
    status = training.train_run(run, resume=True)
    assert status["state"] == "finished", status
    assert status["prefix_cache"] and status["cache"]["views"] == 2
    assert _metrics(run) == _metrics(whole)
    assert status["test_acc"] == whole.status()["test_acc"]


def test_budget_run_resumes_with_its_saved_plan(folder, monkeypatch):
    from core.serve.store import Run
    run = Run.create(tiny_run_config(folder, freeze="top_k", time_budget_s=120))
    status = training.train_run(run, stop=_stop_after(monkeypatch, 2))
    assert status["state"] == "stopped", status
    plan = run.read_json("plan.json")
    monkeypatch.undo()
    status = training.train_run(run, resume=True)
    assert status["state"] == "finished", status
    after = run.read_json("plan.json")
    assert [p["freeze"] for p in after["phases"]] == [p["freeze"] for p in plan["phases"]]
    assert [r["epoch"] for r in run.epochs()] == list(range(1, run.config.epochs + 1))
