"""The Evaluate and Predict pages with Streamlit's AppTest (no browser).

One tiny run is trained once per module (in the foreground, outside any test's lab home) and
copied into each test's FINETUNE_LAB_HOME, so the pages find a finished run without training.
AppTest in Streamlit 1.67 supports `st.file_uploader` (`FileUploader.set_value`), so uploads
are tested through the page itself.
"""
from __future__ import annotations

import io
import json
import re
import shutil
import time
from pathlib import Path

import pandas as pd
import pytest
from streamlit.testing.v1 import AppTest

from apptest_helpers import assert_ok, opened, texts

from conftest import class_folders, class_image, tiny_run_config, train_apart
from core import paths
from core.models.backbones import bundled_file
from core.serve.store import get_run
from core.serve.worker import MANAGER

pytestmark = pytest.mark.slow

REPO_ROOT = Path(__file__).resolve().parents[1]
ENTRY = str(REPO_ROOT / "streamlit_app.py")
EVALUATE, PREDICT = "pages/4_Evaluate.py", "pages/5_Predict.py"
TIMEOUT = 90


# ---------------------------------------------------------------- fixtures and helpers

@pytest.fixture(autouse=True)
def no_background_training():
    """These tests train nothing in the background; make sure no other test left a run going."""
    end = time.monotonic() + 60
    while MANAGER.busy() and time.monotonic() < end:
        time.sleep(0.1)
    assert not MANAGER.busy(), "a background run from an earlier test is still going"
    yield
    assert not MANAGER.busy(), "this test started background training"


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory) -> Path:
    """Folder of a finished tiny run (test_resnet, 3 classes, linear head) on its own data."""
    base = tmp_path_factory.mktemp("results_pages")
    return train_apart(tiny_run_config(class_folders(base / "data")), base).path


@pytest.fixture
def run(trained_run, lab_home):
    """The trained run, copied into this test's lab home."""
    target = paths.runs_dir() / trained_run.name
    shutil.copytree(trained_run, target)
    return get_run(trained_run.name)


def drilldown_count(at: AppTest) -> tuple[int, str, str]:
    for md in at.markdown:
        hit = re.fullmatch(r"\*\*(\d+) image\(s\)\*\* labelled \*(.+)\*, predicted \*(.+)\*", md.value)
        if hit:
            return int(hit[1]), hit[2], hit[3]
    raise AssertionError(f"no drill-down line in {[m.value for m in at.markdown]}")


def png_bytes(label: int, index: int, size=40) -> bytes:
    buf = io.BytesIO()
    class_image(label, index, size).save(buf, "PNG")
    return buf.getvalue()


# ---------------------------------------------------------------- Evaluate

def test_evaluate_shows_metrics_tabs_and_drilldown(run):
    at = opened(EVALUATE)
    labels = {m.label: m.value for m in at.metric}
    assert {"Accuracy", "mAP", "Macro precision", "Macro recall", "Macro F1"} <= set(labels)
    stored = run.read_json("test_metrics.json")
    assert labels["Accuracy"] == f"{stored['accuracy']:.1%}"
    assert labels["mAP"] == f"{stored['mAP']:.1%}"
    assert len(at.tabs) == 7
    assert [t.label for t in at.tabs][:2] == ["Confusion matrix", "Per class"]
    # AppTest renders every tab's contents: the per-class table, galleries, download buttons
    assert any(d.value.shape[0] == 3 for d in at.dataframe)
    assert {"Predictions (CSV)", "Metrics (JSON)"} <= {b.label for b in at.get("download_button")}
    assert any("misclassified" in m.value for m in at.markdown)
    assert at.button(key="export") is not None

    frame = pd.read_csv(run.file("test_predictions.csv"))
    counts = frame.groupby(["true", "predicted"]).size()
    n, true, pred = drilldown_count(at)
    assert (true, pred) == ("class_a", "class_a")
    assert n == counts.get(("class_a", "class_a"), 0)
    seen = {n}
    for t in ("class_a", "class_b", "class_c"):
        for p in ("class_a", "class_b", "class_c"):
            at.selectbox(key="cm_true").set_value(t)
            at.selectbox(key="cm_pred").set_value(p)
            at.run()
            assert_ok(at)
            assert drilldown_count(at) == (counts.get((t, p), 0), t, p)
            seen.add(counts.get((t, p), 0))
    assert len(seen) > 1, "the drill-down count never changed"
    assert sum(counts) == len(frame)


def test_evaluate_val_split_is_computed_and_stored(run):
    assert not run.file("val_predictions.csv").exists()
    at = opened(EVALUATE)
    at.radio(key="eval_split").set_value("val").run()
    assert_ok(at)
    assert run.file("val_predictions.csv").is_file() and run.file("val_metrics.json").is_file()
    n_val = len(run.read_json("splits.json")["val"])
    assert f"{n_val} val images" in texts(at)
    assert {"Accuracy", "mAP", "Macro F1"} <= {m.label for m in at.metric}
    stored = run.read_json("val_metrics.json")
    assert {m.label: m.value for m in at.metric}["Accuracy"] == f"{stored['accuracy']:.1%}"


def test_evaluate_export_writes_model_files(run):
    at = opened(EVALUATE)
    assert not run.file("export").exists()
    at.button(key="export").click().run()
    assert_ok(at)
    weights, info = run.file("export/model.safetensors"), run.file("export/model.json")
    assert weights.is_file() and weights.stat().st_size > 0
    meta = json.loads(info.read_text())
    assert meta["arch"] == "test_resnet" and meta["classes"] == run.classes
    downloads = {b.label for b in at.get("download_button")}
    assert {"model.safetensors", "model.json"} <= downloads
    at.button(key="onnx").click().run()
    assert_ok(at)
    assert run.file("export/model.onnx").is_file()
    assert not at.warning, [w.value for w in at.warning]
    assert "model.onnx" in {b.label for b in at.get("download_button")}


def test_evaluate_explains_when_the_data_set_is_gone(run, tmp_path):
    splits = run.read_json("splits.json")
    splits["root"] = str(tmp_path / "moved_away")
    run.write_json("splits.json", splits)
    at = opened(EVALUATE)                      # test predictions are stored: still shown
    assert {"Accuracy", "mAP", "Macro F1"} <= {m.label for m in at.metric}
    at.radio(key="eval_split").set_value("val").run()
    assert_ok(at)
    assert any("moved or deleted" in e.value for e in at.error), texts(at)
    assert not run.file("val_predictions.csv").exists()


# ---------------------------------------------------------------- Predict

def test_predict_with_a_run_uploads_and_folder(run, tmp_path):
    at = opened(PREDICT)
    assert at.radio(key="pred_source").value == "run"
    assert "3 classes · 32 px" in texts(at)

    # images dropped on the page: one chart per readable image, a warning for the broken one
    at.file_uploader(key="pred_files").set_value([
        ("one.png", png_bytes(0, 1), "image/png"),
        ("two.png", png_bytes(2, 2, 56), "image/png"),
        ("broken.png", b"not an image", "image/png")])
    at.run()
    assert_ok(at)
    assert len(at.get("arrow_vega_lite_chart")) + len(at.get("vega_lite_chart")) == 2
    assert any("broken.png" in w.value for w in at.warning)

    # a folder on the server, batch-predicted, with an unreadable file reported in its row
    folder = tmp_path / "new_photos"
    (folder / "sub").mkdir(parents=True)
    for i in range(4):
        class_image(i % 3, 50 + i, 40).save(folder / ("sub" if i % 2 else "") / f"p{i}.png")
    (folder / "bad.jpg").write_bytes(b"garbage")
    at.text_input(key="pred_folder").input(str(folder)).run()
    assert_ok(at)
    assert "5 images found." in texts(at)
    at.button(key="pred_all").click().run()
    assert_ok(at)
    _, frame = at.session_state["lab"].page["pred_frame"]      # (what it was computed for, the table)
    assert len(frame) == 5
    rows = frame.set_index("file")
    assert isinstance(rows.loc["bad.jpg", "error"], str)
    assert set(rows.drop(index="bad.jpg")["predicted"]) <= set(run.classes)
    assert "sub/p1.png" in rows.index
    assert any(len(d.value) == 5 for d in at.dataframe)


def test_predict_with_an_uploaded_export(run):
    from core.models.export import export_run
    weights, info = export_run(run, run.file("export"))
    at = opened(PREDICT)
    at.radio(key="pred_source").set_value("export").run()
    assert_ok(at)
    assert "classes ·" not in texts(at)        # nothing to predict with until both files are there
    at.file_uploader(key="exp_w").set_value(("model.safetensors", weights.read_bytes(),
                                             "application/octet-stream"))
    at.file_uploader(key="exp_j").set_value(("model.json", info.read_bytes(), "application/json"))
    at.run()
    assert_ok(at)
    assert "3 classes · 32 px" in texts(at)
    at.file_uploader(key="pred_files").set_value(("x.png", png_bytes(1, 3), "image/png"))
    at.run()
    assert_ok(at)
    assert not at.warning


@pytest.mark.parametrize("case", ["corrupt weights", "weights of another head"])
def test_predict_rejects_a_bad_export_upload_politely(run, case):
    from core.models.export import export_run
    weights, info = export_run(run, run.file("export"))
    meta = json.loads(info.read_text())
    if case == "corrupt weights":
        blob = b"not a safetensors file" * 4
    else:
        blob = weights.read_bytes()
        meta["head"] = dict(type="mlp", hidden=16, dropout=0.0)
        meta["keys"] = "finetune-lab"
    at = opened(PREDICT)
    at.radio(key="pred_source").set_value("export").run()
    at.file_uploader(key="exp_w").set_value(("model.safetensors", blob, "application/octet-stream"))
    at.file_uploader(key="exp_j").set_value(("model.json", json.dumps(meta).encode(), "application/json"))
    at.run()
    assert_ok(at)
    assert any("Can't load that model" in e.value for e in at.error)


def test_predict_with_imagenet_backbone():
    assert bundled_file("mobilenetv2_100"), "the bundled weights are a runtime requirement (requirements-offline.txt)"
    at = opened(PREDICT)
    at.radio(key="pred_source").set_value("imagenet").run()
    assert_ok(at)
    at.selectbox(key="pred_arch").set_value("mobilenetv2_100").run()
    assert_ok(at)
    assert not at.error, [e.value for e in at.error]
    assert "1000 classes" in texts(at)


# ---------------------------------------------------------------- pages opened directly, no runs

@pytest.mark.parametrize("page", [EVALUATE, PREDICT])
def test_page_opened_directly_without_runs(page):
    at = AppTest.from_file(str(REPO_ROOT / page), default_timeout=TIMEOUT).run()
    assert_ok(at)
    assert at.title
    assert "No trained run yet" in texts(at)


def test_predict_classifies_a_camera_snapshot(run):
    at = opened(PREDICT)
    at.toggle(key="pred_cam_on").set_value(True).run()
    assert_ok(at)
    buf = io.BytesIO()
    class_image(1, 5, 64).save(buf, "JPEG")
    at.camera_input(key="pred_camera").upload("shot.jpg", buf.getvalue()).run()
    assert_ok(at)
    assert len(at.get("arrow_vega_lite_chart")) + len(at.get("vega_lite_chart")) == 1
