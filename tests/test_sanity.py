"""core.trust.sanity: the sanity check of attribution maps (model and label randomisation, Adebayo et
al. 2018) and the per-class average Grad-CAM, on tiny timm models and generated images; plus the
Inspect page's buttons for both (AppTest, on a tiny trained run)."""
from __future__ import annotations

import numpy as np
from PIL import Image
import pytest
import torch
from scipy import ndimage

from core.models import backbones
from core.data import images as imaging
from core.data import transforms
from core.trust import sanity
from conftest import class_image

SIZE = 64


def tiny(classes: int = 3, seed: int = 0) -> backbones.FineTuneModel:
    torch.manual_seed(seed)
    return backbones.build_model("test_resnet", classes, weights="random")


def picture(label: int = 1, size: int = SIZE) -> torch.Tensor:
    return torch.from_numpy(np.array(class_image(label, 0, size))).permute(2, 0, 1).contiguous()


def normalised(img: torch.Tensor, size: int = SIZE) -> torch.Tensor:
    return transforms.build_transform(size, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))(img)[None]


def edges(_model, x, _target) -> np.ndarray:
    """A "method" that never looks at the model: the input's edge strength."""
    grey = x[0].mean(0).numpy()
    return np.hypot(ndimage.sobel(grey, 0), ndimage.sobel(grey, 1))


def by(rows, method, check):
    return next(r for r in rows if r["method"] == method and r["check"] == check)


def test_model_independent_method_is_flagged_and_grad_cam_is_not_identical():
    model = tiny().eval()
    x = normalised(picture())
    rows = sanity.sanity_check(model, x, 0, methods=["Grad-CAM", ("Edges", edges)])
    assert [(r["method"], r["check"]) for r in rows] == [
        (m, c) for c in sanity.CHECKS for m in ("Grad-CAM", "Edges")]
    for check in ("original", "top", "all"):
        row = by(rows, "Edges", check)
        assert row["spearman"] == pytest.approx(1.0) and row["ssim"] == pytest.approx(1.0)
        assert by(rows, "Grad-CAM", check)["map"].shape == (SIZE, SIZE)
    assert not np.allclose(by(rows, "Grad-CAM", "all")["map"], by(rows, "Grad-CAM", "original")["map"])
    assert "no training features" in by(rows, "Edges", "labels")["note"]

    verdicts = {v["method"]: v for v in sanity.verdicts(rows)}
    assert verdicts["Edges"]["status"] == "flagged" and "Don't trust it" in verdicts["Edges"]["text"]
    assert verdicts["Grad-CAM"]["status"] in ("ok", "flagged")
    assert verdicts["Grad-CAM"]["similarity"] < 0.99


@pytest.mark.slow
def test_grad_cam_of_a_pretrained_model_changes_when_randomised():
    """On a real network (bundled MobileNetV2 with its ImageNet classifier) and a real photo,
    Grad-CAM's map for the predicted class loses its structure once the weights are random."""
    assert backbones.bundled_file("mobilenetv2_100"), "the bundled weights are a runtime requirement (requirements-offline.txt)"
    from skimage import data as photos
    model = backbones.create_backbone("mobilenetv2_100", "bundled", num_classes=1000).eval()
    image = np.array(imaging.to_rgb(Image.fromarray(photos.chelsea())).resize((96, 96)))
    x = transforms.build_transform(96, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))(
        torch.from_numpy(image).permute(2, 0, 1).contiguous())[None]
    with torch.inference_mode():
        target = int(model(x).argmax())
    rows = sanity.sanity_check(model, x, target, methods=("Grad-CAM",))
    assert by(rows, "Grad-CAM", "all")["spearman"] < sanity.SIMILAR
    assert sanity.verdicts(rows)[0]["status"] == "ok"
    assert "no separate head" in by(rows, "Grad-CAM", "labels")["note"] or \
        "no training features" in by(rows, "Grad-CAM", "labels")["note"]


def test_original_model_is_left_as_it_was():
    model = tiny()
    model.train()
    model.backbone.layer1.eval()              # a frozen block inside a training model
    before = {k: v.clone() for k, v in model.state_dict().items()}
    flags = {n: m.training for n, m in model.named_modules()}
    calls = []
    features = np.random.default_rng(0).normal(size=(30, model.backbone.num_features)).astype(np.float32)
    rows = sanity.sanity_check(model, normalised(picture()), 1, methods=("Grad-CAM", ("Edges", edges)),
                          train_features=(features, np.arange(30) % 3),
                          progress=lambda done, total, text: calls.append((done, total, text)))
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert {n: m.training for n, m in model.named_modules()} == flags
    assert all(p.grad is None for p in model.parameters())
    assert not [n for n, m in model.named_modules() if m._forward_hooks or m._backward_hooks]
    # the label test ran, and progress named every step with method x of y
    assert by(rows, "Grad-CAM", "labels")["spearman"] is not None
    texts = " | ".join(t for _, _, t in calls)
    for step in ("Randomising the top block", "Randomising all weights",
                 "Refitting the head on shuffled labels", "(method 2 of 2)"):
        assert step in texts, texts
    assert calls[-1][0] == calls[-1][1] == 8


@pytest.mark.slow
def test_reproducible_with_a_seed():
    model = tiny().eval()
    x = normalised(picture())
    features = np.random.default_rng(0).normal(size=(30, model.backbone.num_features)).astype(np.float32)
    run = [sanity.sanity_check(model, x, 0, methods=("Grad-CAM",), seed=seed,
                          train_features=(features, np.arange(30) % 3)) for seed in (7, 7, 8)]
    for a, b in zip(run[0], run[1]):
        assert np.array_equal(a["map"], b["map"]), a["check"]
    assert not np.array_equal(by(run[0], "Grad-CAM", "all")["map"], by(run[2], "Grad-CAM", "all")["map"])


def test_top_block_scope():
    """The top block is the backbone's last group plus what follows it (a run's head, or a
    timm model's classifier); the rest keeps its weights."""
    model = tiny().eval()
    with torch.no_grad():                     # as after training: no weight equals its init value
        for param in model.parameters():
            param.add_(0.1 * torch.randn_like(param))
    top = sanity.top_parameters(model)
    last_group = backbones.block_groups(model.backbone)[-1][1]
    assert set(top) == {f"backbone.{n}" for n in last_group} | {n for n, _ in model.named_parameters()
                                                                  if n.startswith("head.")}
    clone = sanity.randomised(model, "top", seed=0)
    for name, param in clone.named_parameters():
        assert torch.equal(param, model.get_parameter(name)) != (name in top), name

    import timm
    plain = timm.create_model("test_resnet", num_classes=4)
    top = sanity.top_parameters(plain)
    assert "fc.weight" in top and any(n.startswith("layer4") for n in top)
    assert not any(n.startswith("layer3") for n in top)


def test_shuffled_head_two_classes_of_three():
    """Training features with 2 of the model's 3 classes: the ridge head's one row becomes two
    logits, and the class without training images is never chosen; the model keeps its head."""
    model = tiny(3).eval()
    head = model.head
    features = np.random.default_rng(0).normal(size=(20, model.backbone.num_features)).astype(np.float32)
    features[3] = np.nan                       # an unreadable image
    clone = sanity.shuffled_head(model, features, np.arange(20) % 2, seed=0)
    assert model.head is head and clone.head is not head
    assert clone.head.weight.shape == (3, model.backbone.num_features)
    logits = clone.head(torch.from_numpy(np.nan_to_num(features)))
    assert (logits.argmax(1) != 2).all()


def test_similarity_measures():
    rng = np.random.default_rng(0)
    a = rng.random((32, 32))
    assert sanity.spearman(a, a) == pytest.approx(1.0) and sanity.ssim(a, a) == pytest.approx(1.0)
    assert abs(sanity.spearman(a, rng.random((32, 32)))) < 0.2
    assert sanity.spearman(a, np.zeros((32, 32))) == 0.0          # a flat map shares no ranking


def test_class_average_gradcam():
    model = tiny(3).eval()
    images = [picture(label % 3, 40) for label in range(7)] + [None]
    labels = [i % 3 for i in range(8)]
    transform = transforms.build_transform(SIZE, (0.5,) * 3, (0.25,) * 3)
    seen = []
    heat = sanity.class_average_gradcam(model, images, labels, transform, batch_size=4,
                                   progress=lambda d, t, _m: seen.append((d, t)))
    assert sorted(heat) == [0, 1, 2]
    for cam in heat.values():
        assert cam.shape == (SIZE, SIZE) and np.isfinite(cam).all()
        assert cam.min() >= 0 and cam.max() <= 1 + 1e-6
    assert seen[-1] == (7, 7)
    assert sorted(sanity.class_average_gradcam(model, images, labels, transform, target="predicted")) == [0, 1, 2]

    means = sanity.class_mean_images(images, labels, SIZE)
    assert sorted(means) == [0, 1, 2] and means[0].shape == (SIZE, SIZE, 3)
    assert sanity.heat_image(heat[0], means[0]).shape == (SIZE, SIZE, 3)
    assert sanity.heat_image(heat[0]).dtype == np.uint8


def test_class_average_refuses_a_transformer():
    torch.manual_seed(0)
    vit = backbones.build_model("test_vit", 2, weights="random").eval()
    images = [picture(0, 160)]
    with pytest.raises(ValueError, match="Grad-CAM"):
        sanity.class_average_gradcam(vit, images, [0], transforms.build_transform(160, (0.5,) * 3, (0.25,) * 3))


# ---------------------------------------------------------------- the Inspect page

@pytest.mark.slow
def test_inspect_page_sanity_check_and_class_averages(image_folder):
    import core
    from apptest_helpers import assert_ok, opened
    from core.config import RunConfig
    root = image_folder(classes=3, per_class=12, size=40)
    run = core.train(RunConfig(data_root=str(root), arch="test_resnet", weights="random", image_size=32,
                               epochs=1, batch_size=8, lr=1e-2, device="cpu", seed=0))
    assert run.status()["state"] == "finished"
    at = opened()
    at.session_state["lab"].settings.update(data_root=str(root), data_label="Test images")
    at.switch_page("pages/6_Inspect.py").run()
    at.radio(key="ins_kind").set_value("run").run()
    assert_ok(at)
    before = len(at.get("image"))
    at.button(key="ins_sanity").click().run()
    assert_ok(at)
    verdicts = [m.value for m in at.markdown if "randomised (similarity" in m.value]
    assert len(verdicts) == 3, [m.value for m in at.markdown]
    assert all(v.startswith((":green[:material/check_circle:]", ":orange[:material/warning:]")) for v in verdicts)
    assert len(at.get("vega_lite_chart")) == 1
    assert len(at.get("image")) == before + 3 * 4          # every method: real, top, all, labels
    captions = [img.proto.imgs[0].caption for img in at.get("image")[before:]]
    assert captions[0] == "Original model" and captions[3].startswith("Head fit to shuffled labels · ")

    at.select_slider(key="ins_avg_n").set_value(10)
    at.button(key="ins_avg").click().run()
    assert_ok(at)
    grid = [c.value for c in at.caption if "images)" in c.value]
    assert [g.split("**")[1] for g in grid] == run.classes
