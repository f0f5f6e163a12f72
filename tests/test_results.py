"""Results in core: metrics (core.results.evaluate), export (core.models.export) and prediction (core.models.predict).

The metric tests use a small fixed prediction set whose values are computed by hand in the
comments. The export/predict tests share two tiny trained runs (module-scoped, stored outside
FINETUNE_LAB_HOME so every test still gets its own lab home).
"""
from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pandas as pd
import pytest
import timm
import torch
from PIL import Image

from conftest import class_folders, class_image, tiny_run_config, train_apart
from core.models.backbones import load_run_model
from core.results import evaluate as evaluation
from core.models import predict
from core.models.backbones import bundled_file
from core.models.export import export_onnx, export_run, load_exported
from core.serve.store import Run
from core.serve.worker import MANAGER

pytestmark = pytest.mark.slow

CLASSES = ["a", "b", "c"]
# Seven images, true classes a a a b b c c. No ties inside any probability column, so each
# class's average precision is the mean of the precisions at the ranks of its positives.
LABELS = [0, 0, 0, 1, 1, 2, 2]
PROBS = np.array([
    [0.80, 0.15, 0.05],   # s0 a -> a
    [0.55, 0.30, 0.15],   # s1 a -> a
    [0.25, 0.61, 0.14],   # s2 a -> b  (wrong, confidence .61)
    [0.10, 0.70, 0.20],   # s3 b -> b
    [0.20, 0.35, 0.45],   # s4 b -> c  (wrong, confidence .45)
    [0.05, 0.10, 0.85],   # s5 c -> c
    [0.30, 0.46, 0.24],   # s6 c -> b  (wrong, confidence .46)
])
FILES = [f"s{i}.png" for i in range(len(LABELS))]


# ---------------------------------------------------------------- summarize

def test_summarize_matches_hand_computed_metrics():
    m = evaluation.summarize(PROBS, LABELS, CLASSES)
    # predictions a a b b c c b: s0 s1 s3 s5 right -> 4/7
    assert m["accuracy"] == pytest.approx(4 / 7)
    assert m["n"] == 7 and m["classes"] == CLASSES
    # rows = true class, columns = predicted class
    assert m["confusion"] == [[2, 1, 0],
                              [0, 1, 1],
                              [0, 1, 1]]
    per = {row["cls"]: row for row in m["per_class"]}
    # a: predicted for s0 s1 (both a) -> P 1, R 2/3, F1 2*(2/3)/(5/3) = 4/5
    # b: predicted for s2 s3 s6 (one b) -> P 1/3, R 1/2, F1 (1/3)/(5/6) = 2/5
    # c: predicted for s4 s5 (one c) -> P 1/2, R 1/2, F1 1/2
    expected = {"a": (1.0, 2 / 3, 0.8, 3), "b": (1 / 3, 1 / 2, 0.4, 2), "c": (0.5, 0.5, 0.5, 2)}
    for cls, (p, r, f1, support) in expected.items():
        assert per[cls]["precision"] == pytest.approx(p), cls
        assert per[cls]["recall"] == pytest.approx(r), cls
        assert per[cls]["f1"] == pytest.approx(f1), cls
        assert per[cls]["support"] == support, cls
    assert m["macro_precision"] == pytest.approx((1 + 1 / 3 + 1 / 2) / 3)   # 11/18
    assert m["macro_recall"] == pytest.approx((2 / 3 + 1 / 2 + 1 / 2) / 3)  # 5/9
    assert m["macro_f1"] == pytest.approx((0.8 + 0.4 + 0.5) / 3)            # 17/30
    # Average precision, one-vs-rest, ranking by that class's probability:
    # a: s0 .80+ s1 .55+ s6 .30- s2 .25+ ...  -> positives at ranks 1,2,4: (1 + 1 + 3/4)/3 = 11/12
    # b: s3 .70+ s2 .61- s6 .46- s4 .35+ ...  -> ranks 1,4: (1 + 2/4)/2 = 3/4
    # c: s5 .85+ s4 .45- s6 .24+ ...          -> ranks 1,3: (1 + 2/3)/2 = 5/6
    assert [per[c]["ap"] for c in CLASSES] == pytest.approx([11 / 12, 3 / 4, 5 / 6])
    assert m["mAP"] == pytest.approx((11 / 12 + 3 / 4 + 5 / 6) / 3)           # 5/6
    json.dumps(m)   # stored as JSON by save_evaluation


def test_summarize_macro_averages_only_over_classes_present():
    # Class c has no true images but is predicted once (s1).
    probs = np.array([[0.7, 0.2, 0.1],    # a -> a
                      [0.2, 0.1, 0.7],    # a -> c
                      [0.3, 0.6, 0.1],    # b -> b
                      [0.4, 0.5, 0.1]])   # b -> b
    m = evaluation.summarize(probs, [0, 0, 1, 1], CLASSES)
    per = {row["cls"]: row for row in m["per_class"]}
    assert m["accuracy"] == pytest.approx(3 / 4)
    assert per["c"]["support"] == 0 and per["c"]["precision"] == 0 and math.isnan(per["c"]["ap"])
    # over a and b only: P (1 + 1)/2, R (1/2 + 1)/2, F1 (2/3 + 1)/2
    assert m["macro_precision"] == pytest.approx(1.0)
    assert m["macro_recall"] == pytest.approx(0.75)
    assert m["macro_f1"] == pytest.approx(5 / 6)
    # AP a: s0 .7+ s3 .4- s2 .3- s1 .2+ -> (1 + 2/4)/2 = 3/4;  AP b: s2 .6+ s3 .5+ -> 1
    assert m["mAP"] == pytest.approx((3 / 4 + 1) / 2)
    assert m["confusion"] == [[1, 0, 1], [0, 2, 0], [0, 0, 0]]


# ---------------------------------------------------------------- views over predictions

@pytest.fixture
def frame() -> pd.DataFrame:
    return evaluation.predictions_frame(FILES, LABELS, PROBS, CLASSES)


def test_predictions_frame_columns(frame):
    assert list(frame.columns) == ["file", "true", "predicted", "confidence", "p_a", "p_b", "p_c"]
    assert list(frame["predicted"]) == ["a", "a", "b", "b", "c", "c", "b"]
    assert frame["confidence"].tolist() == pytest.approx(PROBS.max(1).tolist())


def test_rank_class_best_and_worst(frame):
    best, worst = evaluation.rank_class(frame, "a", n=2)
    assert set(best["true"]) == {"a"} and set(worst["true"]) == {"a"}
    assert list(best["file"]) == ["s0.png", "s1.png"]          # p_a .80, .55: descending
    assert list(worst["file"]) == ["s2.png", "s1.png"]         # p_a .25, .55: ascending
    best, worst = evaluation.rank_class(frame, "b", n=10)               # more than there are
    assert list(best["file"]) == ["s3.png", "s4.png"]          # p_b .70, .35
    assert list(worst["file"]) == ["s4.png", "s3.png"]
    assert list(best["p_b"]) == sorted(best["p_b"], reverse=True)


def test_misclassified_sorted_with_top3(frame):
    wrong = evaluation.misclassified(frame, 3)
    assert list(wrong["file"]) == ["s2.png", "s6.png", "s4.png"]   # confidence .61, .46, .45
    assert (wrong["true"] != wrong["predicted"]).all()
    tops = list(wrong["top"])
    assert [[c for c, _ in top] for top in tops] == [["b", "a", "c"], ["b", "a", "c"], ["c", "b", "a"]]
    assert [p for _, p in tops[0]] == pytest.approx([0.61, 0.25, 0.14])
    for top in tops:
        assert len(top) == 3
        probs = [p for _, p in top]
        assert probs == sorted(probs, reverse=True)
    assert evaluation.misclassified(frame[frame["true"] == frame["predicted"]]).empty


def test_cell_filters_true_and_predicted(frame):
    assert list(evaluation.cell(frame, "a", "a")["file"]) == ["s0.png", "s1.png"]   # most confident first
    assert list(evaluation.cell(frame, "c", "b")["file"]) == ["s6.png"]
    assert list(evaluation.cell(frame, "b", "c")["file"]) == ["s4.png"]
    assert evaluation.cell(frame, "b", "a").empty
    m = evaluation.summarize(PROBS, LABELS, CLASSES)
    for i, t in enumerate(CLASSES):
        for j, p in enumerate(CLASSES):
            assert len(evaluation.cell(frame, t, p)) == m["confusion"][i][j]


def test_load_predictions_keeps_numeric_class_names_as_text(tmp_path):
    run = Run(tmp_path / "run")
    run.path.mkdir()
    run.write_json("classes.json", ["0", "1", "NA"])
    evaluation.save_evaluation(run, "test", FILES, LABELS, PROBS, [])
    frame = evaluation.load_predictions(run, "test")
    assert len(evaluation.cell(frame, "0", "0")) == 2
    assert len(evaluation.cell(frame, "NA", "1")) == 1
    assert len(evaluation.rank_class(frame, "1")[0]) == 2


# ---------------------------------------------------------------- tiny trained runs

@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Two finished tiny runs trained in the foreground: a linear head on a frozen backbone
    (head-only, feature cache) and an MLP head with the whole network fine-tuned."""
    base = tmp_path_factory.mktemp("results_runs")
    data = class_folders(base / "data")
    linear = train_apart(tiny_run_config(data), base)
    mlp = train_apart(tiny_run_config(data, head="mlp", hidden=16, freeze="full", epochs=1), base)
    assert not MANAGER.busy()
    return dict(linear=linear, mlp=mlp, data=data)


def test_load_predictions_and_evaluate_val(trained):
    run = trained["linear"]
    splits = run.read_json("splits.json")
    test = evaluation.load_predictions(run, "test")
    assert len(test) == len(splits["test"]) > 0
    assert set(test["true"]) <= set(run.classes)
    val_csv, val_json = run.file("val_predictions.csv"), run.file("val_metrics.json")
    val_csv.unlink(missing_ok=True)
    val_json.unlink(missing_ok=True)
    assert evaluation.load_predictions(run, "val") is None
    metrics = evaluation.evaluate_run(run, "val", device="cpu")
    val = evaluation.load_predictions(run, "val")
    assert len(val) == metrics["n"] == len(splits["val"])
    assert metrics["accuracy"] == pytest.approx((val["true"] == val["predicted"]).mean())
    assert run.read_json("val_metrics.json")["mAP"] == pytest.approx(metrics["mAP"])


def test_evaluate_run_reproduces_training_test_predictions(trained, tmp_path):
    """Training scores the test split from cached features; evaluate_run runs the whole model."""
    src = trained["linear"]
    run = Run(tmp_path / src.id)
    shutil.copytree(src.path, run.path)
    before = evaluation.load_predictions(run, "test")
    metrics = evaluation.evaluate_run(run, "test", device="cpu")
    after = evaluation.load_predictions(run, "test")
    assert list(after["file"]) == list(before["file"])
    cols = evaluation.class_probs(after)
    np.testing.assert_allclose(after[cols].to_numpy(), before[cols].to_numpy(), atol=1e-5)
    assert metrics["accuracy"] == pytest.approx(src.read_json("test_metrics.json")["accuracy"])


# ---------------------------------------------------------------- export

def logits(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        return model.eval()(x)


@pytest.mark.parametrize("kind, keys", [("linear", "timm"), ("mlp", "finetune-lab")])
def test_export_roundtrip_gives_identical_logits(trained, tmp_path, kind, keys):
    run = trained[kind]
    weights, info = export_run(run, tmp_path / "export")
    assert weights.name == "model.safetensors" and info.name == "model.json"
    meta = json.loads(info.read_text())
    assert meta["keys"] == keys
    assert meta["arch"] == "test_resnet" and meta["classes"] == ["class_a", "class_b", "class_c"]
    assert meta["image_size"] == 32 and len(meta["mean"]) == len(meta["std"]) == 3
    assert meta["head"]["type"] == kind and meta["run"] == run.id
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    reference = logits(load_run_model(run), x)
    loaded = logits(load_exported(weights, meta), x)
    assert torch.allclose(loaded, reference, atol=1e-6, rtol=0)


def test_linear_export_loads_in_plain_timm(trained, tmp_path):
    import safetensors.torch
    run = trained["linear"]
    weights, info = export_run(run, tmp_path / "export")
    keys = safetensors.torch.load_file(str(weights)).keys()
    assert "fc.weight" in keys and not any(k.startswith(("backbone.", "head.")) for k in keys)
    meta = json.loads(info.read_text())
    n = len(meta["classes"])
    model = timm.create_model(meta["arch"], num_classes=n, pretrained=True,
                              pretrained_cfg_overlay=dict(file=str(weights), num_classes=n))
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    assert torch.allclose(logits(model, x), logits(load_run_model(run), x), atol=1e-6, rtol=0)


@pytest.mark.parametrize("kind", ["linear", "mlp"])
def test_export_onnx_matches_torch(trained, tmp_path, kind):
    import onnxruntime as ort     # a runtime requirement: a broken install must fail, not skip
    model = load_run_model(trained[kind])
    model.train()
    path = export_onnx(model, 32, tmp_path / "model.onnx")
    assert path == tmp_path / "model.onnx" and path.stat().st_size > 0
    assert model.training, "export_onnx must restore the model's mode"
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(2))   # batch is dynamic
    (out,) = session.run(["logits"], {"image": x.numpy()})
    np.testing.assert_allclose(out, logits(model, x).numpy(), atol=1e-4, rtol=0)


def test_export_onnx_failure_raises_runtime_error(tmp_path):
    model = torch.nn.Conv2d(1, 2, 3)      # expects 1 channel; the exporter feeds 3
    with pytest.raises(RuntimeError, match="ONNX export failed") as info:
        export_onnx(model, 16, tmp_path / "bad.onnx")
    assert len(str(info.value)) > len("ONNX export failed for this architecture: ")
    assert model.training


# ---------------------------------------------------------------- predict

def pil_images() -> list[Image.Image]:
    """Any size and mode: RGB of odd shapes, grayscale, and RGBA."""
    return [class_image(0, 5, 50), class_image(1, 6, (64, 40)), class_image(2, 7, 33).convert("L"),
            class_image(1, 8, 36).convert("RGBA")]


@pytest.mark.parametrize("kind", ["linear", "mlp"])
def test_from_run_and_from_export_agree(trained, tmp_path, kind):
    run = trained[kind]
    by_run = predict.from_run(run)
    weights, info = export_run(run, tmp_path / "export")
    by_export = predict.from_export(weights, info)                        # a path to the JSON
    by_dict = predict.from_export(weights, json.loads(info.read_text()))  # or the parsed dict
    assert by_run.classes == by_export.classes == run.classes
    assert by_run.image_size == by_export.image_size == 32
    images = pil_images()
    a = by_run.probs(images)
    assert a.shape == (len(images), 3)
    np.testing.assert_allclose(a.sum(1), 1, atol=1e-5)
    np.testing.assert_allclose(by_export.probs(images), a, atol=1e-6)
    np.testing.assert_allclose(by_dict.probs(images), a, atol=1e-6)
    top = by_run.top_k(a[0], k=2)
    assert len(top) == 2 and top[0][1] >= top[1][1] and top[0][0] == run.classes[int(a[0].argmax())]
    assert by_run.probs([]).shape == (0, 3)


def test_predict_files_reports_unreadable_files(trained, tmp_path):
    predictor = predict.from_run(trained["linear"])
    folder = tmp_path / "new"
    folder.mkdir()
    good = []
    for i in range(5):
        path = folder / f"img_{i}.{'png' if i % 2 else 'jpg'}"
        class_image(i % 3, i, 40).save(path)
        good.append(path)
    broken = folder / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    files = sorted(good + [broken])
    seen = []
    frame = predict.predict_files(predictor, files, batch_size=4, progress=lambda d, t, _m: seen.append((d, t)))
    assert len(frame) == len(files)
    assert set(frame["file"]) == {str(f) for f in files}
    rows = frame.set_index("file")
    assert isinstance(rows.loc[str(broken), "error"], str) and rows.loc[str(broken), "error"]
    assert pd.isna(rows.loc[str(broken), "predicted"])
    ok = rows.drop(index=str(broken))
    assert ok["error"].isna().all()
    assert set(ok["predicted"]) <= set(predictor.classes)
    probs = ok[[f"p_{c}" for c in predictor.classes]].to_numpy()
    np.testing.assert_allclose(probs.sum(1), 1, atol=1e-5)
    assert ok["confidence"].tolist() == pytest.approx(probs.max(1).tolist())
    expected = predictor.probs([Image.open(good[0])])[0]
    np.testing.assert_allclose(probs[list(ok.index).index(str(good[0]))], expected, atol=1e-5)
    assert seen[-1] == (len(files), len(files))


def test_probs_treats_transparency_like_training(trained, tmp_path):
    from core.data.images import open_rgb
    predictor = predict.from_run(trained["linear"])
    pixels = np.zeros((40, 40, 4), np.uint8)
    pixels[:, :20] = (220, 40, 40, 255)           # left half opaque red, right half transparent black
    path = tmp_path / "alpha.png"
    Image.fromarray(pixels, "RGBA").save(path)
    as_trained = predictor.probs([open_rgb(path)])
    np.testing.assert_allclose(predictor.probs([Image.open(path)]), as_trained, atol=1e-6)


def test_imagenet_predictor_knows_cats_and_espresso():
    assert bundled_file("mobilenetv2_100"), "the bundled weights are a runtime requirement (requirements-offline.txt)"
    from skimage import data as skimage_data
    predictor = predict.imagenet("mobilenetv2_100")
    assert len(predictor.classes) == 1000 and predictor.image_size == 224
    images = [Image.fromarray(skimage_data.chelsea()), Image.fromarray(skimage_data.coffee())]
    probs = predictor.probs(images)
    cat, coffee = (predictor.top_k(p, 1)[0][0] for p in probs)
    assert "cat" in cat.lower(), predictor.top_k(probs[0], 5)
    assert "espresso" in coffee.lower(), predictor.top_k(probs[1], 5)
