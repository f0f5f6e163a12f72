"""UI tests of every page with Streamlit's AppTest (no browser).

Notes on AppTest:
* Fragments do not tick on their own here, so the live training view is refreshed by sleeping
  and calling `at.run()` again.
* Training runs on `core.serve.worker.MANAGER`, the process-wide background queue; the autouse fixture
  `idle_manager` makes sure no run outlives its test.
"""
from __future__ import annotations

import io
import time
import zipfile
from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest

from conftest import class_image
from core import paths
from apptest_helpers import assert_ok, texts, use_small_settings
from apptest_helpers import opened as opened_with
from core.serve.store import list_runs

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("idle_manager")]   # the queue is process-wide

REPO_ROOT = Path(__file__).resolve().parents[1]
ENTRY = str(REPO_ROOT / "streamlit_app.py")
PAGES = ["pages/1_Data.py", "pages/2_Model.py", "pages/3_Train.py", "pages/4_Evaluate.py"]
DATA, MODEL, TRAIN, EVALUATE = PAGES
ALL_PAGES = ["pages/0_Home.py"] + PAGES + ["pages/5_Predict.py", "pages/6_Inspect.py", "pages/7_Experiments.py",
                                            "pages/8_Doctor.py"]
TIMEOUT = 60


# ---------------------------------------------------------------- helpers

def app() -> AppTest:
    return AppTest.from_file(ENTRY, default_timeout=TIMEOUT)


def opened(page: str | None = None) -> AppTest:
    return opened_with(page, TIMEOUT)

def metrics(at: AppTest) -> dict[str, str]:
    return {m.label: m.value for m in at.metric}


def charts(at: AppTest) -> list:
    return list(at.get("vega_lite_chart"))


def button(at: AppTest, text: str):
    matches = [b for b in at.button if text in b.label]
    assert matches, f"no button with {text!r} in {[b.label for b in at.button]}"
    return matches[0]


def wait_for_state(at: AppTest, states: tuple[str, ...], timeout: float) -> dict:
    """Poll like the live fragment would: sleep, rerun the page, until the newest run is in `states`."""
    end = time.monotonic() + timeout
    while True:
        status = list_runs()[0].status()
        if status.get("state") in states:
            return status
        assert time.monotonic() < end, f"run still {status.get('state')}: {status.get('message')}"
        time.sleep(0.5)
        at.run()
        assert_ok(at)


def zip_bytes(files: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as archive:
        for name, data in files.items():
            archive.writestr(name, data)
    return buf.getvalue()


def png(label: int, index: int) -> bytes:
    buf = io.BytesIO()
    class_image(label, index, 24).save(buf, "PNG")
    return buf.getvalue()


# ---------------------------------------------------------------- every page renders

@pytest.mark.parametrize("page", ALL_PAGES)
def test_page_renders_via_navigation(page):
    at = opened(page)
    assert at.title, "page drew nothing"


@pytest.mark.parametrize("page", ALL_PAGES)
def test_page_renders_as_deep_link(page):
    """Opened first, before the entry file ever ran st.navigation (a bookmarked URL)."""
    at = AppTest.from_file(str(REPO_ROOT / page), default_timeout=TIMEOUT).run()
    assert_ok(at)
    assert at.title, "page drew nothing"
    assert at.session_state["lab"].settings


def test_home_shows_checklist():
    at = opened()
    links = [link.label for link in at.main.get("page_link")]
    assert links == ["1. Data", "2. Model", "3. Train", "4. Evaluate", "5. Inspect"]
    nav = [link.label for link in at.sidebar.get("page_link")]     # the app's own navigation
    assert nav == ["Home", "Data", "Doctor", "Model", "Train", "Evaluate", "Predict", "Inspect", "Experiments"]
    body = texts(at)
    assert "Fashion-MNIST" in body and "mobilenetv2_100" in body
    assert "0 run(s) started in this session" in body and "0 finished" in body


# ---------------------------------------------------------------- Data

def test_data_demo_default():
    at = opened(DATA)
    assert at.radio(key="data_source").value == "demo"
    m = metrics(at)
    assert m["Classes"] == "10" and m["Images"] == "1000" and m["Skipped files"] == "0"
    assert len(charts(at)) == 1          # images per class
    split = at.dataframe[0].value
    assert list(split.columns) == ["train", "val", "test"]
    assert len(split) == 10 and split.to_numpy().sum() == 1000
    assert split["train"].sum() == 700 and m["Test %"] == "15"


def test_data_missing_server_path_shows_error(tmp_path):
    at = opened(DATA)
    at.radio(key="data_source").set_value("path").run()
    assert_ok(at)
    box = next(t for t in at.text_input if t.label == "Folder path on the server")
    missing = tmp_path / "no" / "such" / "folder"
    box.input(str(missing)).run()
    assert_ok(at)
    assert any(f"No folder at {missing}" in e.value for e in at.error)


def test_data_server_path_with_classes(image_folder):
    root = image_folder(classes=["ants", "bees"], per_class=5)
    at = opened(DATA)
    at.radio(key="data_source").set_value("path").run()
    next(t for t in at.text_input if t.label == "Folder path on the server").input(str(root)).run()
    assert_ok(at)
    assert not at.error
    assert metrics(at)["Classes"] == "2" and metrics(at)["Images"] == "10"
    assert at.session_state["lab"].settings["data_root"] == str(root.resolve())


def test_data_zip_without_class_folders_shows_error():
    at = opened(DATA)
    at.radio(key="data_source").set_value("zip").run()
    assert_ok(at)
    flat = zip_bytes({"a.png": png(0, 0), "b.png": png(1, 0), "notes.txt": b"hello"})
    at.file_uploader(key="zip_upload").upload("flat.zip", flat, "application/zip").run()
    assert_ok(at)
    assert any("No class folders found" in e.value for e in at.error)
    assert not at.metric


def test_data_zip_not_a_zip_shows_error():
    at = opened(DATA)
    at.radio(key="data_source").set_value("zip").run()
    at.file_uploader(key="zip_upload").upload("broken.zip", b"this is not a zip", "application/zip").run()
    assert_ok(at)
    assert any("not a valid zip" in e.value for e in at.error)


def test_data_zip_with_class_folders_shows_classes():
    at = opened(DATA)
    at.radio(key="data_source").set_value("zip").run()
    files = {f"pets/{cls}/{i}.png": png(label, i)
             for label, cls in enumerate(["cats", "dogs", "fish"]) for i in range(4)}
    at.file_uploader(key="zip_upload").upload("pets.zip", zip_bytes(files), "application/zip").run()
    assert_ok(at)
    assert not at.error
    m = metrics(at)
    assert m["Classes"] == "3" and m["Images"] == "12"
    assert list(at.dataframe[-1].value.index) == ["cats", "dogs", "fish"]
    settings = at.session_state["lab"].settings
    assert settings["data_label"] == "Upload: pets.zip"
    assert Path(settings["data_root"]).is_relative_to(paths.datasets_dir())


# ---------------------------------------------------------------- Model

def test_model_backbone_switch_updates_parameters():
    at = opened(MODEL)
    before = metrics(at)["Parameters"]
    rows_before = len(at.dataframe[-1].value)
    at.selectbox(key="arch_pick").set_value("resnet18").run()
    assert_ok(at)
    assert at.session_state["lab"].settings["arch"] == "resnet18"
    after = metrics(at)["Parameters"]
    assert after != before and after.startswith("11.")        # ResNet-18 ~11.2 M with a 10-class head
    table = at.dataframe[-1].value
    assert len(table) != rows_before and table["params"].sum() > 10e6


def test_model_top_k_shows_slider():
    at = opened(MODEL)
    assert all(s.key != "w_top_k" for s in at.slider)
    trainable_head = metrics(at)["Trainable"]
    at.radio(key="w_freeze").set_value("top_k").run()
    assert_ok(at)
    slider = at.slider(key="w_top_k")
    assert slider.value == 1 and slider.max == int(metrics(at)["Blocks"])
    assert metrics(at)["Trainable"] != trainable_head
    slider.set_value(3).run()
    assert_ok(at)
    assert at.session_state["lab"].settings["top_k"] == 3


# ---------------------------------------------------------------- Train and Evaluate

def test_train_tiny_model_then_evaluate(image_folder):
    data_root = image_folder(classes=3, per_class=12, size=40)
    at = app().run()
    use_small_settings(at, data_root)
    at.switch_page(TRAIN).run()
    assert_ok(at)
    assert "No runs yet" in texts(at)
    assert at.number_input(key="w_epochs").value == 2
    assert at.select_slider(key="w_image_size").value == 64

    button(at, "Start training").click().run()
    assert_ok(at)
    runs = list_runs()
    assert len(runs) == 1
    cfg = runs[0].config
    assert (cfg.arch, cfg.image_size, cfg.epochs, cfg.data_root) == ("test_resnet", 64, 2, str(data_root))

    status = wait_for_state(at, ("finished", "failed", "stopped", "interrupted"), timeout=120)
    assert status["state"] == "finished", status.get("message")
    at.run()
    assert_ok(at)
    assert "Test accuracy (best epoch)" in metrics(at)
    assert "finished" in texts(at)
    assert len(charts(at)) == 2           # loss and accuracy curves
    assert not [b for b in at.button if b.key == "stop"]

    at.switch_page(EVALUATE).run()
    assert_ok(at)
    assert metrics(at)["Accuracy"] == f"{status['test_acc']:.1%}"
    assert "6 test images" in texts(at)      # 3 classes x 12 images, 15 % test each
    assert len(charts(at)) >= 1           # the confusion matrix (+ training curves)
    at.toggle(key="cm_norm").set_value(True).run()
    assert_ok(at)
    at.radio(key="eval_split").set_value("val").run()      # computed on demand and stored
    assert_ok(at)
    assert "Accuracy" in metrics(at) and "val images" in texts(at)
    assert runs[0].file("val_metrics.json").exists()


def test_data_page_choice_trains_with_default_model(image_folder):
    """The user flow with the default model (MobileNetV2, bundled offline weights, head only):
    the data set is chosen on the Data page, Train trains on it. (The browser test runs the
    same flow on the 1000-image demo set; here a small folder keeps it quick.)"""
    root = image_folder(classes=["ants", "bees", "wasps"], per_class=10, size=48)
    at = opened(DATA)
    at.radio(key="data_source").set_value("path").run()
    next(t for t in at.text_input if t.label == "Folder path on the server").input(str(root)).run()
    assert_ok(at)
    assert metrics(at)["Images"] == "30"
    at.switch_page(TRAIN).run()
    assert_ok(at)
    assert "mobilenetv2_100" in texts(at)
    button(at, "Start training").click().run()
    assert_ok(at)
    cfg = list_runs()[0].config
    assert (cfg.arch, cfg.freeze, cfg.data_root) == ("mobilenetv2_100", "head", str(root.resolve()))
    status = wait_for_state(at, ("finished", "failed", "stopped", "interrupted"), timeout=150)
    assert status["state"] == "finished", status.get("message")
    assert status.get("feature_cache") is True
    at.run()
    assert_ok(at)
    assert "Test accuracy (best epoch)" in metrics(at)
    assert status["test_acc"] >= 0.5      # pretrained features tell these colours/stripes apart
    at.switch_page(EVALUATE).run()
    assert_ok(at)
    assert "Accuracy" in metrics(at) and charts(at)


def test_stop_running_run(image_folder):
    data_root = image_folder(classes=3, per_class=30, size=64)
    at = app().run()
    use_small_settings(
        at, data_root, epochs=500, image_size=128, batch_size=4,
        augment={"hflip": True, "rotation": 30.0, "random_resized_crop": 0.5})
    at.switch_page(TRAIN).run()
    assert_ok(at)
    button(at, "Start training").click().run()
    status = wait_for_state(at, ("running",) + ("finished", "failed", "stopped"), timeout=60)
    assert status["state"] == "running", status.get("message")
    at.run()
    assert "running" in texts(at)
    at.button(key="stop").click().run()
    assert_ok(at)
    status = wait_for_state(at, ("stopped", "finished", "failed", "interrupted"), timeout=30)
    assert status["state"] == "stopped", status.get("message")
    at.run()
    assert_ok(at)
    assert "stopped" in texts(at)
    assert not [b for b in at.button if b.key == "stop"]
    assert "Test accuracy (best epoch)" not in metrics(at)


def test_evaluate_without_runs_shows_info():
    at = opened(EVALUATE)
    assert any("No trained run yet" in i.value for i in at.info)
    assert not at.metric and not charts(at)


def test_data_camera_snapshots_fill_classes():
    """Teachable-Machine style: each snapshot lands in the class named above the camera."""
    import io

    from conftest import class_image
    at = opened(DATA)
    at.radio(key="data_source").set_value("camera").run()
    assert_ok(at)
    for label, cls in enumerate(["mug", "pen"]):
        for i in range(3):
            at.text_input(key="cam_class").input(cls).run()
            buf = io.BytesIO()
            class_image(label, i, 48).save(buf, "JPEG")
            at.camera_input(key="cam_shot").upload(f"shot{i}.jpg", buf.getvalue()).run()
            at.button(key="cam_add").click().run()
            assert_ok(at)
    assert "mug: 3, pen: 3" in texts(at)
    root = Path(at.session_state["lab"].settings["data_root"])
    assert sorted(p.name for p in root.iterdir()) == ["mug", "pen"]
    assert metrics(at)["Classes"] == "2"


def test_model_page_sets_the_learning_rate_for_the_depth():
    """Issue 16: switching to a full fine-tune no longer keeps the head's 1e-3; a rate the user
    (or a preset) chose is kept."""
    at = opened(MODEL)
    at.radio(key="w_freeze").set_value("full").run()
    assert_ok(at)
    assert at.session_state["lab"].settings["lr"] == 3e-4
    assert "Learning rate set to 3.0e-04" in texts(at)
    at.radio(key="w_freeze").set_value("head").run()
    assert at.session_state["lab"].settings["lr"] == 1e-3
    at.session_state["lab"].settings["lr"] = 0.005          # the user's own choice (Train page)
    at.radio(key="w_freeze").set_value("full").run()
    assert at.session_state["lab"].settings["lr"] == 0.005
