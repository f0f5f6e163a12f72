"""core.trust.embedding_map (projection, frames, the before/after maps of a run, the report figure)
and the Evaluate page's "Embedding map" tab (AppTest, PCA so no numba compile)."""
from __future__ import annotations

import base64
import io
import json
import shutil

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from apptest_helpers import assert_ok, opened
from conftest import class_folders, tiny_run_config, train_apart
from core.data import DataError
from core.data import folders
from core.trust import embedding_map, embeddings
from core import paths
from core.serve.store import Run


@pytest.fixture(scope="module")
def full_run(tmp_path_factory) -> Run:
    """Full fine-tuning from random weights: the backbone changes, so "after" differs."""
    base = tmp_path_factory.mktemp("map_full")
    return train_apart(tiny_run_config(class_folders(base / "data", 3, 12), freeze="full"), base)


def clusters(n_per: int = 20, width: int = 32, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.normal(0, 5, (2, width))
    return np.concatenate([c + rng.normal(0, 0.3, (n_per, width)) for c in centres]).astype(np.float32)


# ---------------------------------------------------------------- projection

def test_project_keeps_nan_rows_and_falls_back_to_pca_for_few_images():
    vectors = clusters(10)                   # 20 rows: too few for UMAP
    vectors[[3, 7]] = np.nan
    coords, used = embedding_map._project(vectors, "umap", 0)
    assert coords.shape == (20, 2) and used == "pca"
    assert np.isnan(coords[[3, 7]]).all()
    assert np.isfinite(np.delete(coords, [3, 7], axis=0)).all()
    assert np.array_equal(coords, embedding_map.project(vectors, "umap"), equal_nan=True)


def test_project_edge_cases():
    assert embedding_map.project(np.zeros((0, 8)), "pca").shape == (0, 2)
    assert np.isnan(embedding_map.project(np.full((3, 4), np.nan), "pca")).all()
    one = embedding_map.project(np.array([[1.0, 2.0], [np.nan, 0.0]]), "pca")
    assert np.isfinite(one[0]).all() and np.isnan(one[1]).all()
    two = embedding_map.project(np.array([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]), "pca")
    assert two.shape == (2, 2) and np.isfinite(two).all()


def test_project_without_umap_uses_pca(monkeypatch):
    monkeypatch.setattr(embedding_map, "_umap_module", lambda: None)
    coords, used = embedding_map._project(clusters(30), "umap", 0)
    assert used == "pca" and coords.shape == (60, 2)


@pytest.mark.slow
def test_umap_projection_is_seeded_and_separates_clusters():
    """The one test that compiles umap-learn's numba code (tens of seconds on 2 busy cores)."""
    vectors = clusters(25, width=80)
    a, used = embedding_map._project(vectors, "umap", 0)
    assert used == "umap" and np.isfinite(a).all()
    assert np.allclose(a, embedding_map.project(vectors, "umap", seed=0))
    gap = np.linalg.norm(a[:25].mean(0) - a[25:].mean(0))
    assert gap > 3 * max(a[:25].std(0).max(), a[25:].std(0).max())


# ---------------------------------------------------------------- frames

def decoded(uri: str) -> Image.Image:
    header, payload = uri.split(",", 1)
    assert header == "data:image/jpeg;base64"
    img = Image.open(io.BytesIO(base64.b64decode(payload, validate=True)))
    img.load()
    return img


def test_map_frame_columns_marks_and_thumbnails(image_folder):
    scan = folders.scan_folder(image_folder(classes=2, per_class=5, size=80))
    vectors = np.random.default_rng(0).normal(size=(len(scan.items), 16)).astype(np.float32)
    first, second = scan.items[0].path, scan.items[-1].path
    predictions = pd.DataFrame({"file": [first, second], "true": ["class_a", "class_b"],
                                "predicted": ["class_b", "class_b"]})
    frame = embedding_map.map_frame(scan.root, scan.items, scan.classes, vectors, "pca", predictions,
                        flags={second: "near-duplicate"})
    assert list(frame.columns) == ["x", "y", "path", "class", "predicted", "misclassified", "flag", "thumb"]
    assert len(frame) == 10 and frame[["x", "y"]].notna().all().all()
    assert frame["misclassified"].tolist() == [True] + [False] * 9
    assert frame.loc[frame["path"] == second, "flag"].item() == "near-duplicate"
    assert (frame["predicted"] == "").sum() == 8
    assert frame.attrs["method"] == "pca" and frame.attrs["root"] == scan.root
    assert max(decoded(frame["thumb"][0]).size) == embedding_map.THUMB_PX
    flagged = embedding_map.map_frame(scan.root, scan.items, scan.classes, vectors, "pca", flags=[first])
    assert flagged["flag"].tolist() == ["flagged"] + [""] * 9


def test_thumbnails_stop_at_the_budget_and_skip_broken_files(image_folder):
    root = image_folder(classes=1, per_class=6)
    (root / "class_a" / "broken.png").write_bytes(b"not an image")
    rels = [f"class_a/img_{i:03d}.png" for i in range(6)] + ["class_a/broken.png"]
    full = embedding_map.thumb_uris(str(root), rels)
    assert all(full[:6]) and full[6] == ""
    capped = embedding_map.thumb_uris(str(root), rels, budget=len(full[0]) * 2 + 10)
    assert sum(bool(u) for u in capped) == 2


def test_sample_is_seeded_capped_and_ordered():
    picked = embedding_map.sample(list(range(100)), 10, seed=3)
    assert picked == sorted(picked) and len(picked) == 10 and picked == embedding_map.sample(list(range(100)), 10, seed=3)
    assert embedding_map.sample([1, 2], 10) == [1, 2]


def test_map_figure_draws_marks(tmp_path):
    frame = pd.DataFrame({"x": [0.0, 1.0, np.nan], "y": [0.0, 1.0, 2.0], "path": ["a", "b", "c"],
                          "class": ["$5 & $6", "dog", "dog"], "predicted": ["dog", "dog", ""],
                          "misclassified": [True, False, False], "flag": ["", "blurry", ""], "thumb": ""})
    frame.attrs["method"] = "umap"
    fig = embedding_map.map_figure(frame, "After fine-tuning")
    fig.savefig(tmp_path / "map.png")
    labels = fig.axes[0].get_legend_handles_labels()[1]
    assert {"misclassified", "flagged", "dog"} <= set(labels)
    assert Image.open(tmp_path / "map.png").size[0] > 100


def test_dataset_frame_uses_the_cached_pretrained_embeddings(image_folder, monkeypatch):
    scan = folders.scan_folder(image_folder(classes=2, per_class=4))
    steps = []
    frame = embedding_map.dataset_frame(scan.root, scan.items, scan.classes, "pca", flags=[scan.items[0].path],
                            arch="test_resnet", size=32, progress=lambda d, t, text: steps.append(text))
    assert len(frame) == 8 and frame["flag"].tolist() == ["flagged"] + [""] * 7
    assert steps[0].startswith("Embedding images with the pretrained backbone") and "Projecting (PCA)…" in steps
    monkeypatch.setattr(embeddings, "_compute", lambda *a, **k: pytest.fail("embedded again"))
    again = embedding_map.dataset_frame(scan.root, [(it.path, it.label) for it in scan.items], scan.classes, "pca",
                            arch="test_resnet", size=32)
    assert np.allclose(again[["x", "y"]].to_numpy(), frame[["x", "y"]].to_numpy())


# ---------------------------------------------------------------- a trained run

def test_run_map_frames_before_and_after(full_run):
    steps = []
    before, after = embedding_map.run_map_frames(full_run, "pca", progress=lambda d, t, text: steps.append((text, d / t)))
    assert len(before) == len(after) == 36
    assert before["path"].tolist() == after["path"].tolist()
    assert not np.allclose(before[["x", "y"]].to_numpy(), after[["x", "y"]].to_numpy())
    splits = full_run.read_json("splits.json")
    assert before["stage"].value_counts().to_dict() == {s: len(splits[s]) for s in ("train", "val", "test")
                                                        if splits[s]}
    test = pd.read_csv(full_run.file("test_predictions.csv"), dtype=str, keep_default_na=False)
    wrong = set(test.loc[test["true"] != test["predicted"], "file"])
    assert set(after.loc[after["misclassified"], "path"]) == wrong
    assert (after.loc[after["stage"] != "test", "predicted"] == "").all()
    assert before.attrs["title"] == "Before fine-tuning" and after.attrs["title"] == "After fine-tuning"
    assert "random weights" in before.attrs["note"]
    texts = [t for t, _ in steps]
    assert any(t.startswith("Embedding images with the untrained backbone") for t in texts)
    assert any(t.startswith("Embedding images with the fine-tuned model") for t in texts)
    assert "Projecting (PCA)…" in texts and steps[-1][1] == 1.0
    assert [f for _, f in steps] == sorted(f for _, f in steps)


def test_frozen_backbone_maps_the_head_scores(tmp_path):
    run = train_apart(tiny_run_config(class_folders(tmp_path / "data", 3, 12), freeze="head", epochs=1), tmp_path)
    before, after = embedding_map.run_map_frames(run, "pca")
    assert "frozen" in after.attrs["note"]
    assert not np.allclose(before[["x", "y"]].to_numpy(), after[["x", "y"]].to_numpy())


def test_moved_data_is_a_clear_error(full_run, tmp_path):
    shutil.copytree(full_run.path, tmp_path / "copy")
    run = Run(tmp_path / "copy")
    splits = run.read_json("splits.json")
    run.write_json("splits.json", {**splits, "root": str(tmp_path / "gone")})
    with pytest.raises(DataError, match="moved or deleted"):
        embedding_map.run_map_frames(run, "pca")


# ---------------------------------------------------------------- the page

def test_selected_rows_from_a_box_or_a_click():
    from pages.common.maps import selected_rows
    frame = pd.DataFrame({"x": [0.0, 1.0, 2.0, np.nan], "y": [0.0, 1.0, 2.0, 0.0], "path": list("abcd")})
    assert selected_rows(frame, {}).empty and selected_rows(frame, None).empty
    assert selected_rows(frame, {"brush": {"x": [2.5, 0.5], "y": [0.5, 2.5]}})["path"].tolist() == ["b", "c"]
    assert selected_rows(frame, {"pick": [{"path": "a"}]})["path"].tolist() == ["a"]


def test_evaluate_page_embedding_map_tab(full_run, monkeypatch):
    shutil.copytree(full_run.path, paths.runs_dir() / full_run.id)
    at = opened("pages/4_Evaluate.py")
    assert any("dots close together" in c.value for c in at.caption)
    at.radio(key="map_method").set_value("pca").run()
    assert_ok(at)
    at.button(key="map_compute").click().run()
    assert_ok(at)
    charts = {chart.key: json.loads(chart.proto.spec) for chart in at.get("vega_lite_chart")}
    assert {"map_before", "map_after"} <= set(charts)
    assert "Before fine-tuning" in json.dumps(charts["map_before"])
    assert "After fine-tuning" in json.dumps(charts["map_after"])
    assert '"title": "image"' in json.dumps(charts["map_after"])     # the hover thumbnail field
    assert any("Drag a box over points" in c.value for c in at.caption)
    monkeypatch.setattr(embedding_map, "run_map_frames", lambda *a, **k: pytest.fail("computed again on a rerun"))
    at.run()                               # kept for the session: a rerun draws the same maps
    assert_ok(at)
    assert {"map_before", "map_after"} <= {chart.key for chart in at.get("vega_lite_chart")}
    assert "Compute again" in {b.label for b in at.button}


def show_dataset_map(root: str, classes: list[str], flags: list[str]):
    from core.data import folders           # AppTest runs this function's source alone: imports inside
    from pages.common import maps
    maps.dataset_map(root, folders.scan_folder(root).items, classes, flags, arch="test_resnet", size=32)


def test_dataset_map_component(image_folder):
    from streamlit.testing.v1 import AppTest
    scan = folders.scan_folder(image_folder(classes=2, per_class=4))
    at = AppTest.from_function(show_dataset_map, args=(scan.root, scan.classes, [scan.items[0].path]),
                               default_timeout=60).run()
    assert_ok(at)
    at.radio(key="dataset_map_method").set_value("pca").run()
    at.button(key="dataset_map_compute").click().run()
    assert_ok(at)
    assert "dataset_map_chart" in {chart.key for chart in at.get("vega_lite_chart")}
    assert any("Ringed points" in c.value for c in at.caption)


@pytest.mark.slow
def test_maps_kept_with_the_run_appear_in_its_report(tmp_path):
    """Frames saved by the Evaluate tab come back equal (thumbnails aside) and the report draws them."""
    from conftest import class_folders, tiny_run_config, train_apart
    from core.trust import embedding_map
    from core.results import report as reports
    run = train_apart(tiny_run_config(class_folders(tmp_path / "d", 3, 10), freeze="full", epochs=1), tmp_path)
    frames = embedding_map.run_map_frames(run, "pca")
    assert "Not computed" in reports.run_report(run, include_inspection=False)
    embedding_map.save_run_maps(run, frames)
    loaded = embedding_map.load_run_maps(run)
    for saved, back in zip(frames, loaded):
        assert back["path"].tolist() == saved["path"].tolist()
        assert back["misclassified"].tolist() == saved["misclassified"].tolist()
        assert (back["flag"] == "").all() and abs(back["x"] - saved["x"]).max() < 1e-6
        assert back.attrs["title"] == saved.attrs["title"]
    html = reports.run_report(run, include_inspection=False)
    assert '<section id="map">' in html and "Not computed" not in html
