"""The Inspect page (pages/6_Inspect.py) with Streamlit's AppTest: the default pretrained
MobileNetV2 on the demo data, a tiny trained run on generated images, and a deep link.

Every tab's content is drawn on each script run (tabs only hide content in the browser), so one
run exercises feature maps, the first conv, filters and the sparsity/attribution buttons.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import streamlit as st
from streamlit.testing.v1 import AppTest

import core
from core.models import backbones
from core.config import RunConfig

pytestmark = pytest.mark.slow

REPO_ROOT = Path(__file__).resolve().parents[1]
ENTRY = str(REPO_ROOT / "streamlit_app.py")
INSPECT = "pages/6_Inspect.py"
TIMEOUT = 120


def assert_ok(at: AppTest) -> None:
    assert not at.exception, [e.value for e in at.exception]
    assert not at.error, [e.value for e in at.error]


def predicted(at: AppTest) -> str:
    lines = [m.value for m in at.markdown if m.value.startswith("Predicted:")]
    assert len(lines) == 1, [m.value for m in at.markdown]
    return lines[0]


def images(at: AppTest) -> list:
    return list(at.get("image"))


def charts(at: AppTest) -> list:
    return list(at.get("vega_lite_chart"))


def inspect_page(**settings) -> AppTest:
    """The app run from its entry file, `settings` applied, then switched to Inspect."""
    at = AppTest.from_file(ENTRY, default_timeout=TIMEOUT).run()
    assert_ok(at)
    at.session_state["lab"].settings.update(settings)
    at.switch_page(INSPECT).run()
    assert_ok(at)
    return at


def test_default_pretrained_model_on_demo_data():
    """The defaults (demo data, MobileNetV2 with its bundled weights) at 224 px: render, then
    measure sparsity on 10 images and compute the three attributions."""
    assert backbones.bundled_file("mobilenetv2_100"), "the bundled weights are a runtime requirement (requirements-offline.txt)"
    at = inspect_page()
    assert at.title[0].value.endswith("Inspect")
    assert predicted(at).startswith("Predicted: **")
    # input, one grid per stage, first conv before/after, filters
    stages = len(backbones.create_backbone("mobilenetv2_100", "random").feature_info)
    assert len(images(at)) == 1 + stages + 2 + 1
    assert not charts(at)
    names = "\n".join(m.value for m in at.markdown)
    assert "(layer `conv_stem`)" in names and "(layer `bn1.act`)" in names

    at.slider(key="ins_sparse_n").set_value(10)
    at.button(key="ins_measure").click().run()
    assert_ok(at)
    assert len(charts(at)) == 1
    frame = at.dataframe[0].value
    assert list(frame["stage"])[0] == "blocks.0" and set(frame["measure"]) == {"non-zero"}
    assert frame["fraction"].between(0, 1).all()

    before = len(images(at))
    at.button(key="ins_attr").click().run()
    assert_ok(at)
    assert len(images(at)) == before + 4              # input + three overlays
    captions = [img.proto.imgs[0].caption for img in images(at)[before:]]
    assert captions == ["input", "Grad-CAM", "Integrated Gradients", "Occlusion"]
    assert len(charts(at)) == 1                        # the sparsity chart stays


def test_trained_run_with_comparison_and_attributions(image_folder):
    root = image_folder(classes=3, per_class={"class_a": 12, "class_b": 4, "class_c": 12}, size=40)
    run = core.train(RunConfig(data_root=str(root), arch="test_resnet", weights="random", image_size=32,
                               epochs=1, batch_size=8, lr=1e-2, device="cpu", seed=0))
    assert run.status()["state"] == "finished"
    at = inspect_page(data_root=str(root), data_label="Test images")
    at.radio(key="ins_kind").set_value("run").run()
    assert_ok(at)
    assert at.selectbox(key="ins_run").value == run.id
    assert any(f"**{c}**" in predicted(at) for c in run.classes), predicted(at)
    assert at.selectbox(key="ins_class").options == run.classes
    assert "input, 32×32" in [img.proto.imgs[0].caption for img in images(at)]

    # a class with fewer images: the image number stays in range
    at.number_input(key="ins_index").set_value(10).run()
    at.selectbox(key="ins_class").set_value("class_b").run()
    assert_ok(at)
    assert at.number_input(key="ins_index").value <= 3

    # sparsity of the run next to a second model (efficientnet_b0, SiLU: "positive")
    at.slider(key="ins_sparse_n").set_value(10)
    at.checkbox(key="ins_compare").check().run()
    at.radio(key="ins2_kind").set_value("pretrained").run()     # a trained run is offered first
    at.selectbox(key="ins2_arch").set_value("efficientnet_b0").run()
    assert_ok(at)
    at.button(key="ins_measure").click().run()
    assert_ok(at)
    assert len(charts(at)) == 1
    frame = at.dataframe[0].value
    models = list(dict.fromkeys(frame["model"]))
    assert len(models) == 2 and models[0] == f"run {run.id}"
    measures = frame.groupby("model")["measure"].agg(set)
    assert measures[f"run {run.id}"] == {"non-zero"}                    # ReLU
    assert measures["pretrained efficientnet_b0"] == {"positive"}      # SiLU
    assert frame["fraction"].between(0, 1).all()

    # changing the image count hides the stale chart until measured again
    at.slider(key="ins_sparse_n").set_value(20).run()
    assert_ok(at)
    assert not charts(at)

    before = len(images(at))
    at.button(key="ins_attr").click().run()
    assert_ok(at)
    assert len(images(at)) == before + 4
    assert not at.warning

    # a file of the run's data set edited since it trained: the page says so
    edited = run.read_json("splits.json")["test"][0][0]
    Path(root / edited).write_bytes((root / run.read_json("splits.json")["train"][0][0]).read_bytes())
    st.cache_data.clear()             # the check is cached for 15 s
    at.run()
    assert_ok(at)
    assert any("changed since it trained" in w.value and edited in w.value for w in at.warning), \
        [w.value for w in at.warning]


def test_upload_without_file_stops_quietly():
    at = inspect_page()
    at.radio(key="ins_img_src").set_value("upload").run()
    assert_ok(at)
    assert not [m for m in at.markdown if m.value.startswith("Predicted:")]


def test_page_opened_directly():
    """A deep link on a fresh server runs the page file as the main script."""
    at = AppTest.from_file(str(REPO_ROOT / INSPECT), default_timeout=TIMEOUT).run()
    assert_ok(at)
    assert at.title[0].value.endswith("Inspect")
    predicted(at)
