"""The Experiments page, and the Train page's new options, with Streamlit's AppTest (no browser).

AppTest does not tick fragments on its own: after queueing, the test waits for the background
queue (core.serve.worker.MANAGER) to drain and runs the page again.
"""
from __future__ import annotations

import time
from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest

from apptest_helpers import assert_ok, opened

from core.data import folders
from core.data import images as imaging
from core.data import transforms

from core.serve.worker import MANAGER

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("idle_manager")]   # the queue is process-wide

REPO_ROOT = Path(__file__).resolve().parents[1]
ENTRY = str(REPO_ROOT / "streamlit_app.py")
EXPERIMENTS, TRAIN = "pages/7_Experiments.py", "pages/3_Train.py"
TIMEOUT = 120


def drained(timeout: float) -> bool:
    end = time.monotonic() + timeout
    while MANAGER.busy() and time.monotonic() < end:
        time.sleep(0.1)
    return not MANAGER.busy()


def use_tiny_settings(at: AppTest, root: Path, **overrides) -> None:
    settings = dict(at.session_state["lab"].settings)
    settings.update(data_root=str(root), data_label="Test images", arch="test_resnet", weights="random",
                    image_size=32, epochs=1, batch_size=8, device="cpu", augment={})
    settings.update(overrides)
    at.session_state["lab"].settings = settings


def metrics(at: AppTest) -> dict[str, str]:
    return {m.label: m.value for m in at.metric}


# ---------------------------------------------------------------- Experiments

def test_experiments_page_without_runs():
    at = AppTest.from_file(str(REPO_ROOT / EXPERIMENTS), default_timeout=TIMEOUT).run()   # deep link
    assert_ok(at)
    assert any("No runs yet" in i.value for i in at.info)
    at = opened(EXPERIMENTS)
    assert any("No runs yet" in i.value for i in at.info)
    # the defaults: learning rates x optimizers
    assert at.selectbox(key="axis1").value == "lr" and at.selectbox(key="axis2").value == "optimizer"
    assert metrics(at)["Runs in this sweep"] == "6"


def test_sweep_with_an_impossible_value_cannot_be_queued():
    at = opened(EXPERIMENTS)
    at.text_input(key="values1_lr").set_value("0.01, 50").run()
    assert_ok(at)
    assert [e.value for e in at.error] == [
        "Can't queue this sweep: lr is 50; it must be between 1e-06 and 10."]
    assert at.button(key="queue_sweep").disabled
    at.text_input(key="values1_lr").set_value("0.01, 0.5").run()
    assert not at.error and not at.button(key="queue_sweep").disabled


def queue_optimizer_sweep(at: AppTest, root: Path) -> None:
    """Vary the optimizer (sgd, adam) of a tiny head-only config, queue, wait, run the page again."""
    use_tiny_settings(at, root)
    at.run()
    assert_ok(at)
    at.selectbox(key="axis1").set_value("optimizer").run()
    assert_ok(at)
    at.selectbox(key="axis2").set_value(None).run()
    at.multiselect(key="values1_optimizer").set_value(["sgd", "adam"]).run()
    assert_ok(at)
    assert metrics(at)["Runs in this sweep"] == "2"
    assert "Queue 2 runs" in at.button(key="queue_sweep").label
    at.button(key="queue_sweep").click().run()
    assert_ok(at)
    assert drained(120), "the sweep did not finish"
    at.run()
    assert_ok(at)


def test_sweep_over_optimizers(image_folder):
    at = opened(EXPERIMENTS)
    queue_optimizer_sweep(at, image_folder(classes=3, per_class=8))
    frame = at.dataframe[0].value
    assert len(frame) == 2
    # (row order: see test_sweep_order_when_runs_are_created_in_the_same_millisecond)
    assert sorted(frame["name"]) == ["optimizer=adam", "optimizer=sgd"]
    assert frame["test_acc"].notna().all() and (frame["state"] == "finished").all()
    assert sorted(frame["vary:optimizer"]) == ["adam", "sgd"]
    sweep = frame["sweep"].iloc[0]
    assert at.session_state["sweep_pick"] == sweep
    assert at.selectbox(key="sweep_pick").value == sweep
    assert not at.get("progress")                 # nothing left to wait for
    assert [b.label for b in at.get("download_button")] == ["Download config.json", "Results (CSV)"]


def test_curves_of_a_new_sweep_are_overlaid(image_folder):
    at = opened(EXPERIMENTS)
    queue_optimizer_sweep(at, image_folder(classes=3, per_class=8))
    (picker,) = [m for m in at.multiselect if m.label == "Runs"]
    assert len(picker.value) == 2


# ---------------------------------------------------------------- Train: augmentation and normalisation

def test_train_augmentation_preset_and_preview(image_folder):
    at = opened(TRAIN)
    use_tiny_settings(at, image_folder(classes=2, per_class=4))
    at.run()
    assert_ok(at)
    at.selectbox(key="aug_preset").set_value("report 003").run()
    assert_ok(at)
    assert at.session_state["lab"].settings["augment"] == transforms.PRESETS["report 003"]
    assert at.checkbox(key="aug_on_rotation").value and at.checkbox(key="aug_on_vflip").value
    assert not at.checkbox(key="aug_on_blur").value
    at.run()          # the choice sticks on the next run
    assert at.session_state["lab"].settings["augment"] == transforms.PRESETS["report 003"]
    at.toggle(key="aug_preview").set_value(True).run()
    assert_ok(at)
    assert len(at.get("image")) == 1
    # one more augmentation on top of the preset
    at.checkbox(key="aug_on_blur").check().run()
    assert_ok(at)
    assert at.session_state["lab"].settings["augment"] == {**transforms.PRESETS["report 003"], "blur": 5.0}


def test_train_dataset_normalisation_shows_stats(image_folder):
    root = image_folder(classes=2, per_class=4)
    at = opened(TRAIN)
    use_tiny_settings(at, root)
    at.run()
    assert not [d for d in at.dataframe if list(d.value.index) == ["R", "G", "B"]]
    at.selectbox(key="w_normalize").set_value("dataset").run()
    assert_ok(at)
    assert at.session_state["lab"].settings["normalize"] == "dataset"
    stats = [d.value for d in at.dataframe if list(d.value.index) == ["R", "G", "B"]]
    assert len(stats) == 1
    scan = folders.scan_folder(root, check=False)
    images, _ = imaging.decode_images(scan.root, scan.items, at.session_state["lab"].settings["image_size"])
    mean, std = transforms.dataset_stats(images)
    assert list(stats[0]["this data set mean"]) == pytest.approx(mean)
    assert list(stats[0]["std"]) == pytest.approx(std)
