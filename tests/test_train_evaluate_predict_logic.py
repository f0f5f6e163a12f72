"""The rules behind the Train, Evaluate and Predict pages, tested in core without Streamlit:
the options and rules the Train page shows (core.config), the one class-imbalance rule
(core.data.folders), a data set's stats and augmentation preview (core.data.transforms), when a
stored evaluation is stale (core.results.evaluate), a run's overall progress (core.serve.status),
and the Predict page's folder and ImageNet helpers (core.models.predict)."""
from __future__ import annotations

import os

import numpy as np
import pandas as pd
import pytest

from conftest import class_folders
from core import config
from core.data import DataError
from core.data import folders
from core.data import images as imaging
from core.data import transforms
from core.data.folders import Item
from core.models import predict
from core.models.backbones import WeightSource
from core.results import evaluate as evaluation
from core.serve.status import RunStatus, overall_fraction
from core.serve.store import Run

# ---------------------------------------------------------------- core.config: what Train offers


@pytest.mark.parametrize("name, labels", [("optimizer", config.OPTIMIZER_LABELS),
                                          ("scheduler", config.SCHEDULER_LABELS),
                                          ("normalize", config.NORMALIZE_LABELS)])
def test_every_choice_the_train_page_offers_has_a_label(name, labels):
    assert list(labels) == config.options(name)


def test_train_widgets_offer_the_configs_steps():
    assert config.options("batch_size") == list(config.WIDGET_CHOICES["batch_size"])
    assert config.options("image_size") == list(config.WIDGET_CHOICES["image_size"])
    assert config.RunConfig().batch_size in config.options("batch_size")
    assert config.default_image_size("cpu") in config.options("image_size")
    assert config.default_image_size("cuda") in config.options("image_size")


def test_momentum_only_for_the_optimizers_that_take_one():
    assert [o for o in config.options("optimizer") if config.uses_momentum(o)] == ["sgd", "rmsprop"]


def test_two_phase_only_where_a_pretrained_backbone_trains():
    assert {f: config.two_phase_applies(f) for f in config.options("freeze")} == {
        "head": False, "top_k": True, "full": True, "scratch": False}


def test_time_budget_minutes_become_whole_seconds_within_the_configs_range():
    assert config.budget_seconds(2.0) == 120 and config.budget_seconds(0.0) == 0
    assert config.budget_seconds(1.0 / 120) == 0 and config.budget_seconds(0.5) == 30
    low, high = config.RANGES["time_budget_s"]
    assert low <= config.budget_seconds(config.BUDGET_MINUTES[0]) < config.budget_seconds(
        config.BUDGET_MINUTES[1]) <= high


def test_auto_augment_kinds_are_accepted_by_the_config():
    for kind in transforms.AUTO_AUGMENTS:
        assert config.augment_problems({"auto": kind}) == []
    assert config.augment_problems({"auto": "mixup"})


# ---------------------------------------------------------------- core.data.folders: one imbalance rule

def scan_of(sizes: list[int]) -> folders.DataScan:
    items = [Item(f"{label}/{i}", label) for label, n in enumerate(sizes) for i in range(n)]
    return folders.DataScan("/nowhere", [f"c{i}" for i in range(len(sizes))], items)


@pytest.mark.parametrize("sizes, hinted", [([10, 10], False), ([12, 4], False), ([20, 4], True),
                                           ([60, 6], True), ([40, 2], False)])   # 2 images: its own warning
def test_the_train_hint_and_the_data_warning_follow_one_threshold(sizes, hinted):
    scan = scan_of(sizes)
    assert folders.is_imbalanced(scan.imbalance()) is hinted
    assert any("imbalanced" in note for note in scan.warnings()) is hinted


def test_imbalance_threshold_is_the_data_pages():
    assert folders.is_imbalanced(folders.IMBALANCE_WARN)
    assert not folders.is_imbalanced(folders.IMBALANCE_WARN - 0.01)


def test_image_files_are_sorted_and_skip_hidden_folders(tmp_path):
    for name in ("b.png", "sub/a.JPG", ".hidden/c.png", "__MACOSX/d.png", "notes.txt", "sub/.e.png"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"")
    assert [p.relative_to(tmp_path).as_posix() for p in folders.image_files(tmp_path)] == ["b.png", "sub/a.JPG"]


# ---------------------------------------------------------------- core.data.transforms: a folder's stats and preview

def test_folder_stats_are_the_dataset_stats_of_its_images(tmp_path):
    root = class_folders(tmp_path / "data", classes=2, per_class=3)
    scan = folders.scan_folder(root, check=False)
    images, _ = imaging.decode_images(scan.root, scan.items, 32)
    mean, std = transforms.folder_stats(root, 32)
    expected_mean, expected_std = transforms.dataset_stats(images)
    assert mean == pytest.approx(expected_mean) and std == pytest.approx(expected_std)
    assert len(mean) == len(std) == 3


def test_folder_preview_draws_by_its_seed(tmp_path):
    root = class_folders(tmp_path / "data", classes=2, per_class=4)
    augment = {"hflip": True, "rotation": 30.0}
    first = transforms.folder_preview(root, 32, augment, seed=0)
    assert len(first) == 16 and first[0].shape == (32, 32, 3) and first[0].dtype == np.uint8
    again = transforms.folder_preview(root, 32, augment, seed=0)
    assert all((a == b).all() for a, b in zip(first, again))
    other = transforms.folder_preview(root, 32, augment, seed=1)
    assert any((a != b).any() for a, b in zip(first, other))


def test_folder_stats_and_preview_of_no_data_set_say_so(tmp_path):
    with pytest.raises(DataError):
        transforms.folder_stats(tmp_path / "gone", 32)
    with pytest.raises(DataError):
        transforms.folder_preview(tmp_path / "gone", 32, {"hflip": True}, seed=0)


# ---------------------------------------------------------------- core.results.evaluate: stored evaluations

PROBS = np.array([[0.9, 0.1], [0.3, 0.7], [0.6, 0.4]])


@pytest.fixture
def evaluated(tmp_path) -> Run:
    """A run folder with a checkpoint and a stored test evaluation of it."""
    run = Run(tmp_path / "run")
    run.path.mkdir()
    run.write_json("classes.json", ["a", "b"])
    run.write_json("splits.json", {"root": str(tmp_path / "data")})
    run.checkpoint.write_bytes(b"weights")
    evaluation.save_evaluation(run, "test", ["x.png", "y.png", "z.png"], [0, 1, 1], PROBS)
    return run


def test_a_fresh_evaluation_is_used(evaluated):
    frame, metrics = evaluation.stored_evaluation(evaluated, "test")
    assert list(frame["file"]) == ["x.png", "y.png", "z.png"]
    assert metrics["accuracy"] == pytest.approx(2 / 3)
    assert not evaluation.is_stale(metrics, evaluated.checkpoint)


def test_an_evaluation_of_an_older_checkpoint_is_stale(evaluated):
    stamp = evaluated.checkpoint.stat().st_mtime
    os.utime(evaluated.checkpoint, (stamp + 10, stamp + 10))       # the run resumed and found a better epoch
    assert evaluation.stored_evaluation(evaluated, "test") is None


def test_missing_or_old_style_metrics_are_stale(evaluated, tmp_path):
    assert evaluation.stored_evaluation(evaluated, "val") is None          # never computed
    metrics = evaluated.read_json("test_metrics.json")
    assert evaluation.is_stale(None, evaluated.checkpoint)
    assert evaluation.is_stale({k: v for k, v in metrics.items() if k != "mAP"}, evaluated.checkpoint)
    assert evaluation.is_stale(metrics, tmp_path / "no_checkpoint")
    evaluated.file("test_predictions.csv").unlink()                       # metrics without the table
    assert evaluation.stored_evaluation(evaluated, "test") is None


def test_images_root_is_where_the_split_files_are(evaluated, tmp_path):
    assert evaluation.images_root(evaluated) == tmp_path / "data"
    evaluated.file("splits.json").unlink()
    assert str(evaluation.images_root(evaluated)) == "."


def test_confusion_frame_counts_and_shares_per_true_class():
    metrics = {"classes": ["a", "b", "c"], "confusion": [[2, 1, 0], [0, 4, 0], [0, 0, 0]]}
    long = evaluation.confusion_frame(metrics).set_index(["true", "predicted"])
    assert len(long) == 9 and list(long.columns) == ["count", "share"]
    assert long.loc[("a", "a"), "count"] == 2 and long.loc[("a", "b"), "share"] == pytest.approx(1 / 3)
    assert long.loc[("b", "b"), "share"] == 1.0
    assert long.loc[("c", "c"), "share"] == 0.0          # a class without images: no division by zero


# ---------------------------------------------------------------- core.serve.status: overall progress

def test_overall_fraction_is_none_before_anything_counts():
    assert overall_fraction(RunStatus(phase="scan")) is None


@pytest.mark.parametrize("fields, fraction", [
    (dict(phase="decode", step=30, steps=120), 0.25),                     # a phase's own steps
    (dict(phase="train", epoch=1, epochs=4, step=5, steps=10), 0.125),     # half of the first of 4 epochs
    (dict(phase="val", epoch=3, epochs=4, step=10, steps=10), 0.75),
    (dict(phase="train", epoch=0, epochs=2, step=0, steps=10), 0.0),
    (dict(phase="test", epoch=4, epochs=4, step=3, steps=4), 0.75),       # testing counts its own images
    (dict(phase="model", step=5, steps=3), 1.0),                          # never past the end
])
def test_overall_fraction(fields, fraction):
    assert overall_fraction(RunStatus(**fields)) == pytest.approx(fraction)


# ---------------------------------------------------------------- core.models.predict: the Predict page's helpers

class TwoClasses:
    classes, image_size = ["cat", "dog"], 16

    def probs(self, images):
        return np.tile([0.25, 0.75], (len(images), 1))


def test_predict_folder_names_files_relative_to_the_folder(tmp_path):
    class_folders(tmp_path / "photos", classes=1, per_class=2)
    (tmp_path / "photos" / "bad.jpg").write_bytes(b"garbage")
    files = folders.image_files(tmp_path / "photos")
    seen = []
    frame = predict.predict_folder(TwoClasses(), tmp_path / "photos", files, progress=lambda d, t, _m: seen.append((d, t)))
    rows = frame.set_index("file")
    assert set(rows.index) == {"bad.jpg", "class_a/img_000.png", "class_a/img_001.png"}
    assert isinstance(rows.loc["bad.jpg", "error"], str)
    assert rows.loc["class_a/img_000.png", "predicted"] == "dog"
    assert seen[-1] == (3, 3)


def test_predict_folder_of_nothing_is_an_empty_table(tmp_path):
    assert predict.predict_folder(TwoClasses(), tmp_path, []).equals(pd.DataFrame())


@pytest.mark.parametrize("sources, available", [
    ([WeightSource("bundled", "", True), WeightSource("random", "", True)], True),
    ([WeightSource("hub-cache", "", False), WeightSource("hub", "", True)], True),
    ([WeightSource("hub-cache", "", False), WeightSource("hub", "", False),
      WeightSource("file", "", True), WeightSource("random", "", True)], False),   # no ImageNet head
])
def test_imagenet_available_only_with_pretrained_weights(monkeypatch, sources, available):
    monkeypatch.setattr(predict, "weight_sources", lambda arch: sources)
    assert predict.imagenet_available("any") is available
