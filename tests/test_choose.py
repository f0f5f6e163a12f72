"""core.training.choose: the budget's probe of backbones and image sizes on the user's data."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from core.data.folders import Item, scan_folder
from core.data.splits import split_items
from core.training import choose
from core.training.choose import Probe


def probe_of(arch, acc, epoch_s, images=200, fits=True, size=160):
    return Probe(arch, size, "bundled", acc, images, 10.0, epoch_s, fits)


def test_the_most_accurate_fitting_candidate_wins():
    pick, notes = choose.choose([probe_of("a", 0.70, 10), probe_of("b", 0.90, 30), probe_of("c", 0.95, 99, fits=False)])
    assert pick.arch == "b" and "b at 160 px" in notes[0]
    assert any("Too slow" in n and "c at 160 px" in n for n in notes)


def test_a_tie_within_one_standard_error_goes_to_the_cheaper():
    se = choose.standard_error(0.90, 200)          # about 2.1 points
    pick, notes = choose.choose([probe_of("slow", 0.90, 60), probe_of("fast", 0.90 - se / 2, 20)])
    assert pick.arch == "fast" and "within one standard error" in notes[1]
    pick, _ = choose.choose([probe_of("slow", 0.90, 60), probe_of("fast", 0.90 - 2 * se, 20)])
    assert pick.arch == "slow"


def test_nothing_fits_means_no_choice():
    pick, notes = choose.choose([probe_of("a", 0.9, 10, fits=False)])
    assert pick is None and "chosen backbone trains" in notes[0]


def test_the_sample_is_balanced_seeded_and_from_the_given_items():
    items = [Item(f"c{label}/{i}.png", label) for label in range(3) for i in range(10 + 40 * label)]
    picked = choose.sample(items, per_class=8)
    assert [sum(it.label == c for it in picked) for c in range(3)] == [8, 8, 8]
    paths = {it.path for it in items}
    assert picked == choose.sample(items, per_class=8) and {it.path for it in picked} <= paths
    assert choose.sample(items, per_class=8, seed=1) != picked


def test_fits_counts_the_head_pass_and_the_fine_tune_epochs():
    p = Probe("a", 160, "bundled", 0.9, 100, forward_ms=10.0, epoch_s=20.0)
    counts = {"train": 700, "val": 150, "test": 150}           # one pass: 10 s
    from core.training.budget import MIN_EPOCHS, SAFETY
    need = 10 + MIN_EPOCHS * 20
    assert choose.fits(p, counts, need / SAFETY + 1) and not choose.fits(p, counts, need / SAFETY - 1)


@pytest.mark.slow
def test_probe_measures_each_candidate_on_generated_classes(image_folder, monkeypatch):
    """Colour-coded classes are separable from pooled features of a random network already."""
    monkeypatch.setattr(choose, "candidates", lambda device_type="cpu": [("test_resnet", "random", 32),
                                                                          ("test_efficientnet", "random", 32)])
    scan = scan_folder(str(image_folder(classes=3, per_class=12)))
    splits = split_items(scan, seed=0)
    counts = {k: len(v) for k, v in splits.items()}
    seen = []
    probes = choose.probe(scan.root, splits["train"], counts, 300, torch.device("cpu"),
                          progress=lambda d, n, m: seen.append((d, n)))
    assert [(p.arch, p.size) for p in probes] == [("test_resnet", 32), ("test_efficientnet", 32)]
    assert all(p.images == len(splits["train"]) and 0 <= p.accuracy <= 1 and p.forward_ms > 0 for p in probes)
    assert seen[-1] == (2, 2) and not np.isnan(probes[0].accuracy)


def test_sizes_follow_the_device_default():
    assert choose.sizes_for("cpu") == (160, 224)
    assert choose.sizes_for("cuda") == (224, 256)


@pytest.mark.parametrize("acc,n", [(0.5, 100), (0.99, 400)])
def test_standard_error_is_the_binomial_one(acc, n):
    assert choose.standard_error(acc, n) == pytest.approx(np.sqrt(acc * (1 - acc) / n), rel=1e-3)


@pytest.mark.slow
def test_a_budget_run_trains_the_backbone_its_probe_chose(tiny_config, monkeypatch):
    """pick_backbone: the run probes the candidates, writes probe.json, and its config.json
    holds the chosen backbone and size (so Resume, Evaluate and exports see what trained)."""
    import core
    monkeypatch.setattr(choose, "candidates", lambda device_type="cpu": [("test_resnet", "random", 32),
                                                                          ("test_efficientnet", "random", 40)])
    run = core.train(tiny_config(arch="mobilenetv2_100", pick_backbone=True, time_budget_s=60,
                                 freeze="top_k", tta="auto"))
    status, cfg, probed = run.status(), run.config, run.read_json("probe.json")
    assert status.state == "finished", status.message
    assert (cfg.arch, cfg.image_size) == (probed["chosen"]["arch"], probed["chosen"]["size"])
    assert cfg.arch in ("test_resnet", "test_efficientnet") and not cfg.pick_backbone
    assert len(probed["probes"]) == 2 and probed["notes"] and cfg.tta in ("", "hflip")


@pytest.mark.slow
def test_a_pinned_backbone_is_not_probed(tiny_config):
    import core
    run = core.train(tiny_config(pick_backbone=False, time_budget_s=30, freeze="top_k"))
    assert run.read_json("probe.json") is None and run.config.arch == "test_resnet"


def test_choosing_a_backbone_pins_it():
    from core.config import with_backbone
    assert with_backbone({"arch": "a", "pick_backbone": True}, "b")["pick_backbone"] is False
