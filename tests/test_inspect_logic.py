"""What the Inspect page asks of core.results.inspection, without Streamlit: which model it loads
(a pretrained backbone or a run's fine-tuned model, with its classes, size and normalisation),
the input it builds from a picture, and the seeded sample that sparsity is measured on."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import core
from conftest import class_image, tiny_run_config
from core.data import folders
from core.results import inspection
from core.results.inspection import Inspected, ModelChoice


@pytest.fixture(scope="module")
def backbone() -> Inspected:
    return inspection.pretrained_model("test_resnet")


def modes(model) -> dict[str, bool]:
    return {name: m.training for name, m in model.named_modules()}


# ---------------------------------------------------------------- which model

def test_a_choice_names_its_model_and_compares_as_a_tuple():
    run = ModelChoice("run", "0412-1", 12.5)
    assert run.label == "run 0412-1"
    assert ModelChoice("pretrained", "resnet18").label == "pretrained resnet18"
    assert ModelChoice("pretrained", "resnet18") == ("pretrained", "resnet18", 0.0)
    assert run != ModelChoice("run", "0412-1", 13.0)          # a newer checkpoint is another model


def test_a_pretrained_backbone_keeps_its_imagenet_head_and_input(backbone):
    assert len(backbone.classes) == 1000 and all(isinstance(c, str) for c in backbone.classes)
    assert backbone.size == backbone.model.pretrained_cfg["input_size"][-1]
    assert len(backbone.mean) == len(backbone.std) == 3
    assert not backbone.model.training
    assert backbone.transform()(torch.zeros(3, 50, 70, dtype=torch.uint8)).shape == (3, backbone.size, backbone.size)
    assert inspection.load_inspected("pretrained", "test_resnet").classes == backbone.classes


def test_a_run_brings_its_own_classes_size_and_normalisation(image_folder):
    run = core.train(tiny_run_config(image_folder(classes=3, per_class=6), epochs=1))
    assert run.status().state == "finished"
    inspected = inspection.load_inspected("run", run.id)
    assert inspected.classes == run.classes and inspected.size == 32
    assert not inspected.model.training
    assert inspected.model(torch.zeros(1, 3, 32, 32)).shape == (1, 3)
    norm = run.read_json("norm.json")
    if norm:
        assert list(inspected.mean) == list(norm["mean"])
    with pytest.raises(FileNotFoundError):
        inspection.load_inspected("run", "no-such-run")


# ---------------------------------------------------------------- the input and the prediction

def test_the_input_and_the_shown_picture_are_the_same_crop(backbone):
    x, image = inspection.model_input(class_image(0, size=(80, 60)), backbone)
    assert x.shape == (1, 3, backbone.size, backbone.size)
    assert image.shape == (backbone.size, backbone.size, 3) and image.dtype == np.uint8
    mean, std = torch.tensor(backbone.mean)[:, None, None], torch.tensor(backbone.std)[:, None, None]
    shown = torch.from_numpy(image).permute(2, 0, 1).float() / 255
    assert torch.allclose(x[0] * std + mean, shown, atol=1 / 255 + 1e-4)


def test_class_probabilities_sum_to_one_and_keep_the_models_mode(backbone):
    model = backbone.model.train()
    before = modes(model)
    x, _ = inspection.model_input(class_image(1), backbone)
    probs = inspection.class_probabilities(model, x)
    assert probs.shape == (1000,) and float(probs.sum()) == pytest.approx(1.0, abs=1e-4)
    assert modes(model) == before
    model.eval()


def test_class_items_are_one_class_in_scan_order(image_folder):
    scan = folders.scan_folder(image_folder(classes=2, per_class={"class_a": 3, "class_b": 2}), check=False)
    items = inspection.class_items(scan, "class_b")
    assert [scan.classes[it.label] for it in items] == ["class_b"] * 2
    assert items == [it for it in scan.items if it in items]
    assert inspection.class_items(scan, "nothing") == []


# ---------------------------------------------------------------- sparsity on a sample

def test_the_sparsity_sample_is_the_same_every_time():
    items = list(range(50))
    sample = inspection.sparsity_sample(items, 10)
    assert sample == inspection.sparsity_sample(items, 10) and len(set(sample)) == 10
    assert set(sample) <= set(items)
    assert sorted(inspection.sparsity_sample(items, 500)) == items          # all when fewer
    assert inspection.sparsity_sample(items, 10, seed=1) != sample
    assert inspection.sparsity_sample([], 10) == []


def test_sparsity_is_measured_on_the_readable_images_of_the_sample(image_folder, backbone):
    root = image_folder(classes=2, per_class=10, size=40)
    (root / "class_a" / "broken.png").write_bytes(b"not a picture")
    scan = folders.scan_folder(root, check=False)
    seen = []
    rows = inspection.measure_sparsity(backbone, scan.root, scan.items, 100, "pretrained test_resnet",
                                       progress=lambda *args: seen.append(args))
    assert rows and {r["model"] for r in rows} == {"pretrained test_resnet"}
    assert all(0 <= r["fraction"] <= 1 for r in rows)
    assert seen[-1] == (20, 20, "20/20 images")              # the broken file is left out
    assert [done for done, _, _ in seen] == [16, 20]         # batches of SPARSITY_BATCH
    again = inspection.measure_sparsity(backbone, scan.root, scan.items, 100, "pretrained test_resnet")
    assert again == rows


def test_sparsity_table_labels_stages_shallow_to_deep():
    rows = [dict(stage="layer2", order=1, fraction=0.4, measure="non-zero", model="a"),
            dict(stage="layer1", order=0, fraction=0.6, measure="non-zero", model="a"),
            dict(stage="layer1", order=0, fraction=0.7, measure="positive", model="b")]
    frame, order = inspection.sparsity_table(rows)
    assert list(frame["label"]) == ["layer2 (non-zero)", "layer1 (non-zero)", "layer1 (positive)"]
    assert order == ["layer1 (non-zero)", "layer1 (positive)", "layer2 (non-zero)"]
