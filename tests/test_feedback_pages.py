"""Closing the loop through the pages (AppTest): Predict's verdicts become a new data set version
and the run trains again on it, keeping its splits; Evaluate says what changed in a run's files
before any metric and scores them only as asked; a mislabelled test image moves to its class.

One tiny run is trained once per module (in the foreground, outside any test's lab home) and
copied into each test's FINETUNE_LAB_HOME with a copy of its data set, which a test may edit."""
from __future__ import annotations

import io
import shutil
from pathlib import Path

import pandas as pd
import pytest

from apptest_helpers import assert_ok, opened, texts, wait_state
from conftest import class_folders, class_image, tiny_run_config, train_apart
from core import paths
from core.data import feedback
from core.data import versions as V
from core.serve.store import get_run

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("idle_manager")]   # one test queues a run

EVALUATE, PREDICT = "pages/4_Evaluate.py", "pages/5_Predict.py"


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory) -> Path:
    base = tmp_path_factory.mktemp("feedback_pages")
    return train_apart(tiny_run_config(class_folders(base / "data")), base).path


@pytest.fixture
def run(trained_run, tmp_path):
    """The trained run in this test's lab home, its splits pointing at a copy of its data set."""
    target = paths.runs_dir() / trained_run.name
    shutil.copytree(trained_run, target)
    run = get_run(trained_run.name)
    splits = run.read_json("splits.json")
    data = shutil.copytree(splits["root"], tmp_path / "data")
    run.write_json("splits.json", dict(splits, root=str(data)))
    return run


def png(label: int, index: int) -> bytes:
    buf = io.BytesIO()
    class_image(label, index, 40).save(buf, "PNG")
    return buf.getvalue()


def test_predict_verdicts_make_a_version_and_the_run_trains_again_on_it(run):
    old_splits = feedback.run_splits(run)
    at = opened(PREDICT)
    assert f"trained on data {feedback.data_label(run)}" in texts(at)
    at.file_uploader(key="pred_files").set_value([("one.png", png(0, 201), "image/png"),
                                                   ("two.png", png(1, 202), "image/png"),
                                                   ("three.png", png(2, 203), "image/png")])
    at.run()
    assert_ok(at)
    assert at.button(key="pred_fb_save").disabled                      # everything skipped so far
    at.selectbox(key="fb_img_0_one.png").set_value("class_a")
    at.selectbox(key="fb_img_2_three.png").set_value("class_b")         # right or wrong: both go in
    at.run()
    assert_ok(at)
    save = at.button(key="pred_fb_save")
    assert save.label == "Add 2 images to a new version of data" and not save.disabled
    save.click().run()
    assert_ok(at)
    assert [v.ref for v in V.versions("data")] == ["data/v1", "data/v2"]
    v2 = V.get("data", "v2")
    assert "Saved data/v2: +2 images to train" in texts(at) and "stored as data/v1" in texts(at)
    added = {e["path"]: e["label"] for e in V.diff(V.get("data", "v1"), v2).added}
    assert added.get("train/class_a/one.png") == "class_a" and added.get("train/class_b/three.png") == "class_b"
    assert at.button(key="pred_fb_save").disabled                      # saved once

    at.button(key="pred_fb_again").click().run()
    assert_ok(at)
    queued = at.session_state["lab"].current_run
    assert queued != run.id and f"Queued run {queued}" in texts(at)
    assert wait_state(queued, timeout=240)["state"] == "finished"
    again = get_run(queued)
    assert again.config.data_root == str(v2.folder) and again.config.name == f"{run.config.arch} · data/v2"
    assert {k: v for k, v in again.config.to_dict().items() if k not in ("data_root", "name")} == \
        {k: v for k, v in run.config.to_dict().items() if k not in ("data_root", "name")}
    pin = again.read_json("splits.json")["pin"]
    assert pin["version"] == "data/v2" and feedback.data_label(again) == "data/v2"
    new_splits = feedback.run_splits(again)
    assert {rel: new_splits[f"{split}/{rel}"] for rel, split in old_splits.items()} == old_splits   # kept
    assert new_splits["train/class_a/one.png"] == new_splits["train/class_b/three.png"] == "train"


def test_a_batch_folders_verdicts_go_into_a_version(run, tmp_path):
    folder = tmp_path / "new_photos"
    folder.mkdir()
    for i in range(3):
        class_image(i, 500 + i, 40).save(folder / f"p{i}.png")
    at = opened(PREDICT)
    at.text_input(key="pred_folder").input(str(folder)).run()
    at.button(key="pred_all").click().run()
    assert_ok(at)
    assert {s.key for s in at.selectbox if s.key.startswith("fb_batch_")} == {f"fb_batch_p{i}.png" for i in range(3)}
    at.selectbox(key="fb_batch_p1.png").set_value("class_b").run()
    assert_ok(at)
    at.button(key="pred_fb_save").click().run()
    assert_ok(at)
    old = {e["sha256"] for e in V.get("data", "v1").files}
    added = [(e["path"], e["label"]) for e in V.get("data", "v2").files if e["sha256"] not in old]
    assert added == [("train/class_b/p1.png", "class_b")]


def test_evaluate_says_what_changed_before_scoring(run):
    root = feedback.run_root(run)
    V.snapshot(root, "data", "local")                     # the files as trained on, stored before the edit
    test_before = run.read_json("test_metrics.json")
    used = sorted(feedback.run_splits(run))
    class_image(2, 300).save(root / used[0])               # new content at the same path
    (root / used[1]).unlink()
    at = opened(EVALUATE)
    warning = next(w.value for w in at.warning if "changed since this run trained" in w.value)
    assert f"1 image changed content: `{used[0]}`" in warning and f"1 image removed: `{used[1]}`" in warning
    order = [type(node).__name__ for node in at.main]      # the message comes before the metrics
    assert order.index("Warning") < order.index("Metric")
    assert at.radio(key="eval_data").value == "pinned"
    assert "stored as data set version **data/v1**" in texts(at)
    assert {m.label: m.value for m in at.metric}["Accuracy"] == f"{test_before['accuracy']:.1%}"
    assert "the files it trained on" in texts(at)

    at.radio(key="eval_split").set_value("val").run()     # never scored: on the pinned version's folder
    assert_ok(at)
    assert run.read_json("val_metrics.json")["data"] == dict(files="pinned", version="data/v1",
                                                             root=str(V.get("data", "v1").folder))

    at.radio(key="eval_split").set_value("test")
    at.radio(key="eval_data").set_value("current").run()
    assert_ok(at)
    current = run.read_json("test-current_metrics.json")
    assert current["data"]["files"] == "current" and current["data"]["root"] == str(root)
    assert current["n"] == test_before["n"] - (used[1] in dict(run.read_json("splits.json")["test"]))
    assert run.read_json("test_metrics.json") == test_before          # the training-time scores stay
    assert "the current files" in texts(at)


def test_evaluate_without_a_stored_copy_scores_only_when_asked(run):
    root = feedback.run_root(run)
    class_image(1, 301).save(root / sorted(feedback.run_splits(run))[0])
    at = opened(EVALUATE)
    assert at.radio(key="eval_data").value == "pinned"
    at.radio(key="eval_split").set_value("val").run()
    assert_ok(at)
    assert "choose *Evaluate on the current files*" in texts(at) and not run.file("val_predictions.csv").exists()
    at.radio(key="eval_data").set_value("current").run()
    assert_ok(at)
    assert run.file("val-current_predictions.csv").exists() and not run.file("val_predictions.csv").exists()


def test_a_mislabelled_test_image_moves_to_its_class_in_a_new_version(run):
    frame = pd.read_csv(run.file("test_predictions.csv"), dtype=str, keep_default_na=False)
    image, true = frame.loc[0, "file"], frame.loc[0, "true"]
    other = next(c for c in run.classes if c != true)
    frame.loc[0, "predicted"] = other                     # make sure the gallery has a wrong prediction
    frame.to_csv(run.file("test_predictions.csv"), index=False)
    at = opened(EVALUATE)
    at.selectbox(key="fix_file").set_value(image).run()
    assert_ok(at)
    assert at.selectbox(key=f"fix_to_{image}").value == other
    button = at.button(key="eval_fb_save")
    assert button.label == f"This test image is mislabelled → move it to {other}"
    button.click().run()
    assert_ok(at)
    v2 = V.get("data", "v2")
    (old, new), = V.diff(V.get("data", "v1"), v2).relabelled
    assert old["path"] == image and new["path"].startswith(f"test/{other}/") and new["label"] == other
    assert "Saved data/v2: 1 image moved to another class" in texts(at)
    assert at.button(key="eval_fb_again") is not None


def test_data_page_lists_a_data_sets_versions_and_switches_between_them(run):
    from core.serve import access
    saved = feedback.save_feedback(run, access.User("local", admin=True), access.Policy(),
                                   [feedback.Example("new.png", "class_a", "class_b", data=png(1, 400))])
    v1, v2 = saved.base, saved.version
    at = opened("pages/1_Data.py")
    at.radio(key="data_source").set_value("version").run()
    assert_ok(at)
    assert (at.selectbox(key="ver_name").value, at.selectbox(key="ver_id").value) == ("data", "v2")
    assert at.session_state["lab"].settings["data_root"] == str(v2.folder)
    table = next(d.value for d in at.dataframe if "parent" in d.value)
    assert list(table["id"]) == ["v2", "v1"] and list(table["parent"]) == ["v1", ""]
    assert list(table["files"]) == [len(v2.files), len(v1.files)] and list(table["current"]) == ["←", ""]
    assert set(table["author"]) == {"local"} and table["note"].iloc[0] == v2.note
    assert {m.label: m.value for m in at.metric}["Pre-split"] == "yes"
    at.selectbox(key="ver_switch").set_value("v1")
    at.button(key="ver_use").click().run()
    assert_ok(at)
    assert at.session_state["lab"].settings["data_root"] == str(v1.folder)
    assert at.session_state["lab"].settings["data_label"] == "Data set data/v1"
    assert at.radio(key="data_source").value == "version" and at.selectbox(key="ver_id").value == "v1"
    # v2, the newest and not in use, can be deleted from the list (v1 is the current data set)
    assert at.selectbox(key="ver_delete_pick").options == ["v2"]
    at.button(key="ver_delete").click().run()
    assert_ok(at)
    assert any("Deleted data/v2" in s.value for s in at.success), [s.value for s in at.success]
    assert [v.id for v in V.versions("data")] == ["v1"]
    # the folder the run trained on is stored under its name: its versions show there too
    at.radio(key="data_source").set_value("path").run()
    at.text_input(key="w_typed_path").input(str(feedback.run_root(run))).run()
    assert_ok(at)
    assert any("Versions of data set data (1)" in e.label for e in at.expander)


def test_experiments_shows_each_runs_data_and_warns_when_they_differ(run):
    other = shutil.copytree(run.path, run.path.with_name(run.id + "-b"))
    splits = get_run(other.name).read_json("splits.json")
    get_run(other.name).write_json("splits.json", dict(splits, pin=dict(splits["pin"], version="data/v2",
                                                                          manifest="f" * 64)))
    at = opened("pages/7_Experiments.py")
    frame = next(d.value for d in at.dataframe if "data" in d.value)
    assert sorted(frame["data"]) == sorted([feedback.data_label(run), "data/v2"])
    assert list(frame.columns[:2]) == ["name", "data"]
    assert any("trained on different data" in w.value and "data/v2 (1 run)" in w.value for w in at.warning)
