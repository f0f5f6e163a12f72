"""core.models.backbones: building, freezing, parameter tables and loading weights files safely."""
from __future__ import annotations

import os
import pickle
import time

import pytest
import safetensors.torch
import timm
import torch
from torch import nn

from core.models import backbones
from core.models import WeightsError
from core.models.backbones import apply_freeze, block_groups, build_model, parameter_table

TEST_ARCHS = ["test_resnet", "test_efficientnet", "test_convnext", "test_vit"]

# Parameter-name prefixes from stem to top, in the order block_groups must give them.
STAGE_MARKERS = {
    "test_resnet": ["conv1.", "layer1.", "layer2.", "layer3.", "layer4."],
    "test_efficientnet": ["conv_stem.", "blocks.0.", "blocks.1.", "blocks.2.", "blocks.3.", "blocks.4."],
    "test_convnext": ["stem.", "stages.0.", "stages.1.", "stages.2.", "stages.3."],
    "test_vit": ["patch_embed."] + [f"blocks.{i}." for i in range(6)],
}


def n_params(module: nn.Module, trainable_only=False) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)


def trainable_backbone_names(model) -> set[str]:
    return {n for n, p in model.backbone.named_parameters() if p.requires_grad}


# ---------------------------------------------------------------- building

@pytest.mark.parametrize("arch", TEST_ARCHS)
@pytest.mark.parametrize("head", ["linear", "mlp"])
def test_build_model_random(arch, head):
    model = build_model(arch, 5, weights="random", head=head, hidden=16, dropout=0.1)
    assert isinstance(model, backbones.FineTuneModel)
    assert model.backbone.num_features > 0
    assert [m for m in model.head.modules() if isinstance(m, nn.Linear)][-1].out_features == 5
    model.eval()
    with torch.no_grad():
        out = model(torch.randn(2, 3, 32, 32))
    assert out.shape == (2, 5) and torch.isfinite(out).all()


def test_create_backbone_errors_are_clear():
    with pytest.raises(WeightsError, match="no model called 'not_a_model'"):
        backbones.create_backbone("not_a_model", "random")
    with pytest.raises(WeightsError, match="No bundled weights available for test_resnet"):
        backbones.create_backbone("test_resnet", "bundled")
    with pytest.raises(WeightsError, match="No file weights"):
        backbones.create_backbone("test_resnet", "file", weights_file=None)


# ---------------------------------------------------------------- freezing and groups

@pytest.mark.parametrize("arch", TEST_ARCHS)
def test_block_groups_cover_backbone_in_stem_to_top_order(arch):
    backbone = backbones.create_backbone(arch, "random")
    groups = block_groups(backbone)
    assert len(groups) >= 3
    names = [n for _, group in groups for n in group]
    assert sorted(names) == sorted(n for n, _ in backbone.named_parameters())   # each exactly once
    assert all(isinstance(label, str) and label for label, _ in groups)
    where = [next(i for i, (_, group) in enumerate(groups) if any(n.startswith(m) for n in group))
             for m in STAGE_MARKERS[arch]]
    assert where[0] == 0, "the stem comes first"
    assert where == sorted(where) and len(set(where)) == len(where), where
    assert backbones.count_blocks(arch) == len(groups)


@pytest.mark.parametrize("arch", TEST_ARCHS)
def test_apply_freeze_modes(arch):
    model = build_model(arch, 3, weights="random")
    groups = block_groups(model.backbone)
    head_total = n_params(model.head)
    total = n_params(model)

    apply_freeze(model, "head")
    assert trainable_backbone_names(model) == set()
    assert n_params(model, trainable_only=True) == head_total
    assert all(p.requires_grad for p in model.head.parameters())

    for mode in ("full", "scratch"):
        apply_freeze(model, mode)
        assert n_params(model, trainable_only=True) == total

    for k in (1, 2):
        apply_freeze(model, "top_k", top_k=k)
        expected = {n for _, group in groups[-k:] for n in group}
        assert trainable_backbone_names(model) == expected
        backbone_params = dict(model.backbone.named_parameters())
        assert n_params(model, trainable_only=True) == head_total + sum(backbone_params[n].numel() for n in expected)

    apply_freeze(model, "top_k", top_k=len(groups))
    assert n_params(model, trainable_only=True) == total


@pytest.mark.parametrize("arch", [
    "test_resnet", "test_efficientnet", "test_vit",
    "test_convnext",
])
def test_top_k_1_trains_the_last_real_block(arch):
    """'Top 1 block + head' must train the last stage of the network, not a lone norm layer."""
    model = build_model(arch, 3, weights="random")
    apply_freeze(model, "top_k", top_k=1)
    trainable = trainable_backbone_names(model)
    params = dict(model.backbone.named_parameters())
    assert any(params[n].ndim >= 2 for n in trainable), sorted(trainable)
    assert any(n.startswith(STAGE_MARKERS[arch][-1]) for n in trainable), sorted(trainable)


@pytest.mark.parametrize("arch", TEST_ARCHS)
@pytest.mark.parametrize("mode", ["head", "top_k", "full"])
def test_parameter_table_sums(arch, mode):
    model = build_model(arch, 4, weights="random", head="mlp", hidden=8)
    apply_freeze(model, mode, top_k=1)
    rows = parameter_table(model)
    assert len(rows) == len(block_groups(model.backbone)) + 1
    assert rows[-1]["block"] == "head (new)" and rows[-1]["params"] == rows[-1]["trainable"] == n_params(model.head)
    assert rows[0]["block"].startswith("0: ")
    assert sum(r["params"] for r in rows) == n_params(model)
    assert sum(r["trainable"] for r in rows) == n_params(model, trainable_only=True)
    assert all(0 <= r["trainable"] <= r["params"] for r in rows)
    if mode == "top_k":
        assert [r["trainable"] > 0 for r in rows[:-1]] == [False] * (len(rows) - 2) + [True]


def test_freeze_norm_stats_keeps_frozen_batchnorm_in_eval():
    model = build_model("test_resnet", 3, weights="random")
    apply_freeze(model, "top_k", top_k=1)
    model.train()
    backbones.freeze_norm_stats(model)
    trainable = trainable_backbone_names(model)
    for name, module in model.backbone.named_modules():
        if isinstance(module, nn.BatchNorm2d):
            assert module.training == (f"{name}.weight" in trainable), name


# ---------------------------------------------------------------- weights files

def save_backbone(arch: str, path, seed: int, num_classes: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = timm.create_model(arch, pretrained=False, num_classes=num_classes)
    safetensors.torch.save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return model


def assert_same_backbone(model: nn.Module, reference: nn.Module):
    ref = reference.state_dict()
    for key, value in model.state_dict().items():
        assert torch.equal(value, ref[key]), key


@pytest.mark.parametrize("arch", ["test_resnet", "test_vit"])
def test_load_safetensors_same_arch_by_name(tmp_path, arch):
    path = tmp_path / "w.safetensors"
    source = save_backbone(arch, path, seed=1, num_classes=1000)   # with a classifier the backbone lacks
    torch.manual_seed(2)
    target = backbones.create_backbone(arch, "random")
    assert not torch.equal(next(iter(target.parameters())), next(iter(source.parameters())))
    backbones.load_weights_file(target, path)
    assert_same_backbone(target, source)
    via_file = backbones.create_backbone(arch, "file", weights_file=str(path))
    assert_same_backbone(via_file, source)
    model = build_model(arch, 3, weights="file", weights_file=str(path))
    assert_same_backbone(model.backbone, source)


def test_load_pth_state_dict_wrapped_and_prefixed(tmp_path):
    torch.manual_seed(3)
    source = timm.create_model("test_resnet", pretrained=False, num_classes=0)
    path = tmp_path / "ckpt.pth"
    torch.save({"epoch": 3, "state_dict": {f"module.{k}": v for k, v in source.state_dict().items()}}, path)
    target = backbones.create_backbone("test_resnet", "file", weights_file=str(path))
    assert_same_backbone(target, source)


def test_load_by_position_when_names_differ(tmp_path):
    """How the bundled files fit: other key names, same order and shapes as timm's 1000-class model."""
    torch.manual_seed(4)
    source = timm.create_model("test_resnet", pretrained=False)
    state = backbones._drop_counters(source.state_dict())
    path = tmp_path / "renamed.safetensors"
    safetensors.torch.save_file({f"features.{i:03d}": v.contiguous() for i, v in enumerate(state.values())},
                                str(path))
    target = backbones.create_backbone("test_resnet", "file", weights_file=str(path))
    ref = source.state_dict()
    for key, value in target.state_dict().items():
        if not key.endswith("num_batches_tracked"):
            assert torch.equal(value, ref[key]), key

    broken = dict(enumerate(state.values()))
    broken[5] = torch.zeros(broken[5].numel() + 1)                  # one shape off
    safetensors.torch.save_file({f"k{i:03d}": v.contiguous() for i, v in broken.items()},
                                str(tmp_path / "broken.safetensors"))
    with pytest.raises(WeightsError, match="don't fit"):
        backbones.create_backbone("test_resnet", "file", weights_file=str(tmp_path / "broken.safetensors"))


@pytest.mark.parametrize("ext", [".safetensors", ".pth"])
def test_weights_for_another_architecture_are_refused(tmp_path, ext):
    path = tmp_path / f"effnet{ext}"
    source = save_backbone("test_efficientnet", tmp_path / "effnet.safetensors", seed=0)
    if ext == ".pth":
        torch.save(source.state_dict(), path)
    target = backbones.create_backbone("test_resnet", "random")
    before = {k: v.clone() for k, v in target.state_dict().items()}
    with pytest.raises(WeightsError, match="another architecture") as err:
        backbones.load_weights_file(target, path)
    assert "test_resnet" in str(err.value)
    for key, value in target.state_dict().items():
        assert torch.equal(value, before[key]), "a refused file must not change the model"
    with pytest.raises(WeightsError):
        build_model("test_resnet", 3, weights="file", weights_file=str(path))


class ExecPayload:
    """Unpickling this runs Python code that writes a marker file."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return exec, (f"open({self.marker!r}, 'w').write('pwned')",)


class SystemPayload(ExecPayload):
    """Unpickling this runs a shell command that creates a marker file."""

    def __reduce__(self):
        return os.system, (f"touch '{self.marker}'",)


@pytest.mark.parametrize("payload", [ExecPayload, SystemPayload])
@pytest.mark.parametrize("container", ["torch_zip", "raw_pickle"])
def test_pickle_that_runs_code_is_refused_and_never_runs(tmp_path, payload, container):
    marker = tmp_path / "marker.txt"
    path = tmp_path / "evil.pth"
    tensors = {k: v for k, v in timm.create_model("test_resnet", num_classes=0).state_dict().items()}
    evil = {"state_dict": tensors, "extra": payload(marker)}
    if container == "torch_zip":
        torch.save(evil, path)
    else:
        path.write_bytes(pickle.dumps(evil, protocol=2))

    target = backbones.create_backbone("test_resnet", "random")
    with pytest.raises(WeightsError, match="only .safetensors"):
        backbones.load_weights_file(target, path)
    with pytest.raises(WeightsError):
        backbones.create_backbone("test_resnet", "file", weights_file=str(path))
    assert not marker.exists(), "the pickle's code ran"

    # The payload is armed: an unrestricted load would have run it.
    if container == "torch_zip":
        torch.load(path, weights_only=False)
    else:
        pickle.loads(path.read_bytes())
    assert marker.exists()


@pytest.mark.parametrize("ext", [".safetensors", ".pth"])
def test_truncated_or_empty_weights_file(tmp_path, ext):
    full = tmp_path / f"full{ext}"
    model = timm.create_model("test_resnet", num_classes=0)
    if ext == ".safetensors":
        safetensors.torch.save_file(model.state_dict(), str(full))
    else:
        torch.save(model.state_dict(), full)
    data = full.read_bytes()
    for name, content in (("half", data[: len(data) // 2]), ("header", data[:40]), ("empty", b"")):
        cut = tmp_path / f"{name}{ext}"
        cut.write_bytes(content)
        with pytest.raises(WeightsError):
            backbones.load_weights_file(backbones.create_backbone("test_resnet", "random"), cut)


def test_weights_file_without_tensors(tmp_path):
    path = tmp_path / "meta.pth"
    torch.save({"epoch": 1, "note": "no tensors here"}, path)
    with pytest.raises(WeightsError, match="no tensors|0 tensors"):
        backbones.load_weights_file(backbones.create_backbone("test_resnet", "random"), path)


# ---------------------------------------------------------------- bundled offline weights

IMAGENET_CATS = range(281, 286)      # tabby, tiger cat, Persian, Siamese, Egyptian cat
ESPRESSO, CUP = 967, 968


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["mobilenetv2_100", "tf_efficientnet_lite0"])
def test_bundled_weights_classify_imagenet_photos(arch):
    """The positional remap of the bundled files must give a working ImageNet classifier."""
    from skimage import data as skdata
    assert backbones.bundled_file(arch), "the bundled weights are a runtime requirement (requirements-offline.txt)"
    from PIL import Image
    model = backbones.create_backbone(arch, "bundled", num_classes=1000).eval()
    transform = timm.data.create_transform(**timm.data.resolve_model_data_config(model))
    with torch.no_grad():
        cat = model(transform(Image.fromarray(skdata.chelsea())).unsqueeze(0)).argmax(1).item()
        coffee = model(transform(Image.fromarray(skdata.coffee())).unsqueeze(0)).argmax(1).item()
    assert cat in IMAGENET_CATS
    assert coffee in (ESPRESSO, CUP)


def test_weight_sources_offline_is_fast():
    start = time.monotonic()
    sources = backbones.weight_sources("mobilenetv2_100")
    assert time.monotonic() - start < 5
    by_kind = {s.kind: s for s in sources}
    assert {"bundled", "file", "random"} <= set(by_kind)
    assert by_kind["random"].available and by_kind["file"].available
    if "hub" in by_kind:
        assert by_kind["hub"].available is False          # HF_HUB_OFFLINE=1
    if backbones.bundled_file("mobilenetv2_100") is not None:
        assert by_kind["bundled"].available
        assert backbones.default_weights("mobilenetv2_100") == "bundled"
    else:
        assert not by_kind["bundled"].available and "not installed" in by_kind["bundled"].detail


def test_native_input_size():
    assert backbones.native_input_size("vit_small_patch16_224") == 224
    assert backbones.native_input_size("test_vit") == 160
    assert backbones.native_input_size("test_resnet") is None
    assert backbones.native_input_size("mobilenetv2_100") is None


def test_weight_sources_for_unbundled_arch():
    kinds = [s.kind for s in backbones.weight_sources("test_resnet")]
    assert "bundled" not in kinds and kinds[-2:] == ["file", "random"]
    assert backbones.default_weights("test_resnet") in ("hub-cache", "random")
