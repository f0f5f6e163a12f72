"""core.results.inspection: feature maps, first conv before/after its nonlinearity, filters, activation
sparsity and attributions, on timm's tiny test models (one per family) and the bundled MobileNetV2.

Every check goes through the same contract the module relies on (`feature_info`,
`pretrained_cfg['first_conv']`), so the expectations below are computed from the model itself,
not hard-coded per architecture.
"""
from __future__ import annotations

import numpy as np
import pytest
import timm
import torch
from torch import nn

from core.hooks import eval_mode, hooked
from core.models import backbones
from core.data import transforms
from core.results import inspection

pytestmark = pytest.mark.slow

# arch -> input size: a ViT has fixed position embeddings (160 px for test_vit); CNNs take 64 px.
ARCHS = {"test_resnet": 64, "test_efficientnet": 64, "test_convnext": 64, "test_vit": 160}
RELU_ARCHS = {"test_resnet"}                       # ReLU: sparsity counts non-zeros
HAS_STEM_ACTIVATION = {"test_resnet", "test_efficientnet"}
CNNS = [a for a in ARCHS if a != "test_vit"]

arch_param = pytest.mark.parametrize("arch", list(ARCHS))


def make(arch: str, batch: int = 1, seed: int = 0):
    """(FineTuneModel with random weights and 5 classes, a normalised-looking input batch)."""
    torch.manual_seed(seed)
    model = backbones.build_model(arch, 5, weights="random")
    size = ARCHS[arch]
    return model, torch.randn(batch, 3, size, size)


def picture(size: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)


def leftover_hooks(model: nn.Module) -> list[str]:
    """Names of modules that still carry a hook of any kind."""
    return [name or "<root>" for name, m in model.named_modules()
            if m._forward_hooks or m._forward_pre_hooks or m._backward_hooks
            or getattr(m, "_backward_pre_hooks", None)]


def training_flags(model: nn.Module) -> dict[str, bool]:
    return {name: m.training for name, m in model.named_modules()}


def assert_rgb_image(img, min_side: int = 1) -> None:
    assert isinstance(img, np.ndarray), type(img)
    assert img.dtype == np.uint8
    assert img.ndim == 3 and img.shape[2] == 3, img.shape
    assert img.shape[0] >= min_side and img.shape[1] >= min_side, img.shape


# ---------------------------------------------------------------- feature maps

@arch_param
def test_feature_maps_one_per_stage_shallow_to_deep(arch):
    model, x = make(arch)
    info = model.backbone.feature_info
    fmaps = inspection.feature_maps(model, x)
    assert [f.name for f in fmaps] == [i["module"] for i in info]
    for fmap, stage in zip(fmaps, info):
        assert fmap.tensor.dim() == 3, fmap.shape                  # one image: (C, H, W)
        assert fmap.shape[0] == stage["num_chs"], (fmap.name, fmap.shape, stage)
        assert fmap.tensor.dtype == torch.float32
        assert torch.isfinite(fmap.tensor).all()
    # shallow to deep: spatial size never grows, and shrinks overall for CNNs
    sides = [f.shape[1] for f in fmaps]
    assert sides == sorted(sides, reverse=True)
    if arch in CNNS:
        assert sides[0] > sides[-1]
        # each map is what that stage's module outputs in an ordinary forward pass
        outputs = {}

        def keep(name):
            def hook(_m, _i, out):          # returns None: a hook's return value replaces the output
                outputs.setdefault(name, out[0].clone())
            return hook

        handles = [model.backbone.get_submodule(i["module"]).register_forward_hook(keep(i["module"]))
                   for i in info]
        try:
            with torch.no_grad():
                model.eval()
                model(x)
        finally:
            for h in handles:
                h.remove()
        for fmap in fmaps:
            torch.testing.assert_close(fmap.tensor, outputs[fmap.name])


@arch_param
def test_channel_grid_is_rgb_uint8(arch):
    model, x = make(arch)
    for fmap in inspection.feature_maps(model, x):
        grid = inspection.channel_grid(fmap.tensor, n=16, ncol=8, min_size=56)
        assert_rgb_image(grid, min_side=56)        # small deep maps are enlarged to be visible
        assert grid.max() > grid.min()            # not a blank tile


def test_channel_grid_handles_fewer_channels_and_constant_maps():
    grid = inspection.channel_grid(torch.zeros(3, 7, 7), n=16)       # constant map: no division by zero
    assert_rgb_image(grid)
    assert np.isfinite(grid).all()
    four = inspection.channel_grid(torch.randn(4, 8, 8), n=4, ncol=4)
    sixteen = inspection.channel_grid(torch.randn(16, 8, 8), n=16, ncol=4)
    assert four.shape[1] == sixteen.shape[1] and four.shape[0] < sixteen.shape[0]


# ---------------------------------------------------------------- first conv and filters

@arch_param
def test_first_conv_outputs(arch):
    model, x = make(arch)
    name, conv = inspection.first_conv(model)
    assert name == model.backbone.pretrained_cfg["first_conv"]
    assert isinstance(conv, nn.Conv2d)
    out, act, act_name = inspection.first_conv_outputs(model, x)
    assert out.dim() == 3 and out.shape[0] == conv.out_channels
    if arch in HAS_STEM_ACTIVATION:
        assert act is not None and act_name
        assert act.shape == out.shape
        module = model.backbone.get_submodule(act_name)
        assert isinstance(module, inspection.ACTIVATION_TYPES)
        if arch in RELU_ARCHS:
            assert (act >= 0).all() and (act == 0).any()
        else:           # SiLU: the minimum is about -0.28
            assert act.min() >= -0.3
    else:               # ConvNeXt's stem and ViT's patch embedding: no activation before stage 0
        assert act is None and act_name is None


@arch_param
def test_filter_grid_is_rgb_uint8(arch):
    model, _ = make(arch)
    _, conv = inspection.first_conv(model)
    grid = inspection.filter_grid(model, ncol=16, scale=4)
    assert_rgb_image(grid, min_side=conv.kernel_size[0] * 4)
    assert grid.max() > grid.min()


# ---------------------------------------------------------------- sparsity

@arch_param
def test_sparsity_rows_and_measure(arch):
    model, x = make(arch, batch=2)
    stages = [i["module"] for i in model.backbone.feature_info]
    seen = []
    rows = inspection.sparsity(model, [x, x[:1]], progress=lambda done, total, _m: seen.append((done, total)), total=3)
    assert seen == [(2, 3), (3, 3)]
    names = [r["stage"] for r in rows]
    assert [r["order"] for r in rows] == sorted(r["order"] for r in rows)
    assert len(set(r["order"] for r in rows)) == len(rows)
    # rows follow the stages shallow to deep; activations after the last stage form a final group
    body = [n for n in names if n != "after last stage"]
    assert body == [s for s in stages if s in body]
    assert names[-1] == "after last stage" or "after last stage" not in names
    assert names[0] == stages[0]
    expected = "non-zero" if arch in RELU_ARCHS else "positive"
    for row in rows:
        assert 0.0 <= row["fraction"] <= 1.0, row
        assert row["measure"] == expected, row


@arch_param
def test_sparsity_matches_own_count_on_one_stage(arch):
    """Stage 1 of each model holds exactly the activations of feature_info[1]'s module (nothing
    with an activation runs between stage 0 and stage 1), so count them with our own hooks."""
    model, x = make(arch, batch=2, seed=1)
    rows = {r["order"]: r for r in inspection.sparsity(model, [x])}
    stage = model.backbone.feature_info[1]["module"]
    acts = [m for n, m in model.backbone.named_modules() if n.startswith(stage + ".")
            and isinstance(m, (nn.ReLU, nn.GELU, nn.SiLU, timm.layers.activations.GELUTanh))]
    assert acts, f"no activation found in {stage}"
    counts = [0, 0]

    def hook(_m, _i, out):
        counts[0] += int(((out != 0) if arch in RELU_ARCHS else (out > 0)).sum())
        counts[1] += out.numel()

    handles = [m.register_forward_hook(hook) for m in acts]
    try:
        model.eval()
        with torch.no_grad():
            model.backbone(x)
    finally:
        for h in handles:
            h.remove()
    assert rows[1]["stage"] == stage
    assert rows[1]["fraction"] == counts[0] / counts[1]


def test_sparsity_of_relu_model_on_black_images_is_zero():
    """Random-init ResNet with eval-mode batch norm (mean 0, var 1, no shift) maps an all-zero
    image to all-zero activations: every stage's non-zero fraction is exactly 0."""
    model, _ = make("test_resnet")
    rows = inspection.sparsity(model, [torch.zeros(3, 3, 64, 64)])
    assert rows and all(r["fraction"] == 0.0 for r in rows), rows


@pytest.mark.parametrize("module, zeroes", [
    (nn.ReLU(), True), (nn.ReLU6(), True), (nn.ReLU(inplace=True), True),
    (nn.GELU(), False), (nn.SiLU(), False), (nn.LeakyReLU(), False),
    (timm.layers.activations.GELUTanh(), False)])
def test_zeroes_negatives(module, zeroes):
    assert inspection.zeroes_negatives(module) is zeroes


def test_activations_excludes_gates():
    block = nn.Sequential(nn.Conv2d(3, 4, 1), nn.ReLU(), nn.Sigmoid(), nn.Hardsigmoid(), nn.GELU(),
                          nn.Softmax(dim=1))
    assert [type(m) for _, m in inspection.activations(block)] == [nn.ReLU, nn.GELU]


@pytest.mark.parametrize("module", [nn.MultiheadAttention(8, 2),
                                    nn.Sequential(nn.Conv2d(3, 3, 1), nn.Softmax2d())],
                         ids=["multihead_attention", "softmax2d"])
def test_activations_lists_only_nonlinearities(module):
    found = inspection.activations(module)
    assert found == [], found
    for _, m in found:
        inspection.zeroes_negatives(m)


# ---------------------------------------------------------------- attributions

@arch_param
def test_attributions(arch):
    model, x = make(arch)
    image = picture(ARCHS[arch])
    maps = inspection.attributions(model, x, image, target=2)
    assert list(maps) == ["Grad-CAM", "Integrated Gradients", "Occlusion"]
    for method, result in maps.items():
        if arch == "test_vit" and method == "Grad-CAM":
            assert isinstance(result, str) and "Grad-CAM" in result and "transformer" in result
        else:
            assert_rgb_image(result)
            assert result.shape == image.shape, (method, result.shape)
    # attributions need gradients for the input only: no parameter gradients are left behind
    assert all(p.grad is None for p in model.parameters())


def test_attributions_subset_of_methods():
    model, x = make("test_resnet")
    maps = inspection.attributions(model, x, picture(64), target=0, methods=("Occlusion",))
    assert list(maps) == ["Occlusion"]


# ---------------------------------------------------------------- hooks and train/eval state

def call_everything(model, x, image, full_attributions: bool = False):
    inspection.feature_maps(model, x)
    inspection.first_conv_outputs(model, x)
    inspection.sparsity(model, [x])
    inspection.filter_grid(model)
    # Grad-CAM is the method that registers hooks (ours and Captum's); the others are slow
    if full_attributions:
        inspection.attributions(model, x, image, 0)
    else:
        inspection.attributions(model, x, image, 0, methods=("Grad-CAM",))


@arch_param
def test_hooks_never_accumulate(arch):
    model, x = make(arch)
    image = picture(ARCHS[arch])
    assert leftover_hooks(model) == []
    call_everything(model, x, image, full_attributions=True)
    assert leftover_hooks(model) == []
    for _ in range(20):
        call_everything(model, x, image)
    assert leftover_hooks(model) == []


@arch_param
def test_hooks_removed_when_forward_fails(arch):
    model, _ = make(arch)
    model.train()
    wrong = torch.randn(1, 1, ARCHS[arch], ARCHS[arch])          # one channel: the conv refuses it
    with pytest.raises(RuntimeError):
        inspection.first_conv_outputs(model, wrong)
    with pytest.raises(RuntimeError):
        inspection.sparsity(model, [wrong])
    with pytest.raises(RuntimeError):
        inspection.attributions(model, wrong, picture(ARCHS[arch]), 0, methods=("Grad-CAM",))
    assert leftover_hooks(model) == []
    assert model.training and all(training_flags(model).values())


def test_hooked_removes_hooks_on_error():
    net = nn.Sequential(nn.Linear(3, 3), nn.ReLU())
    calls = []
    with pytest.raises(RuntimeError):
        with hooked([(net[0], lambda *a: calls.append("fwd"))], pre=[(net[1], lambda *a: calls.append("pre"))]):
            net(torch.randn(2, 3))
            net(torch.randn(2, 5))                                    # shape mismatch
    assert calls == ["fwd", "pre"]
    assert not net[0]._forward_hooks and not net[1]._forward_pre_hooks
    net(torch.randn(2, 3))
    assert calls == ["fwd", "pre"]


@arch_param
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_train_eval_state_restored(arch, training):
    model, x = make(arch)
    model.train(training)
    image = picture(ARCHS[arch])
    for fn in (lambda: inspection.feature_maps(model, x), lambda: inspection.first_conv_outputs(model, x),
               lambda: inspection.sparsity(model, [x]), lambda: inspection.filter_grid(model),
               lambda: inspection.attributions(model, x, image, 1, methods=("Grad-CAM",))):
        fn()
        assert model.training is training
        assert set(training_flags(model).values()) == {training}


def test_eval_mode_restores_on_error():
    net = nn.Sequential(nn.BatchNorm1d(3)).train()
    with pytest.raises(ValueError):
        with eval_mode(net):
            assert not net.training and not net[0].training
            raise ValueError
    assert net.training and net[0].training


def test_mixed_train_eval_state_restored():
    model, x = make("test_resnet")
    backbones.apply_freeze(model, "head")
    model.train()
    backbones.freeze_norm_stats(model)
    before = training_flags(model)
    assert not all(before.values())                 # the frozen batch norms are in eval
    inspection.feature_maps(model, x)
    inspection.first_conv_outputs(model, x)
    assert training_flags(model) == before


# ---------------------------------------------------------------- bundled MobileNetV2 on photos

def test_bundled_mobilenet_sparsity_falls_with_depth():
    """A ReLU6 network's activations get sparser from the first stage to the top (the DESIGN
    note measured about 0.72 non-zero in the stem block and 0.42 after the last stage)."""
    from skimage import data as skdata
    assert backbones.bundled_file("mobilenetv2_100"), "the bundled weights are a runtime requirement (requirements-offline.txt)"
    model = backbones.create_backbone("mobilenetv2_100", "bundled", num_classes=1000)
    cfg = timm.data.resolve_model_data_config(model)
    transform = transforms.build_transform(224, cfg["mean"], cfg["std"])
    photos = [skdata.chelsea(), skdata.coffee(), skdata.astronaut(), skdata.rocket()]
    batch = torch.stack([transform(torch.from_numpy(p).permute(2, 0, 1).contiguous()) for p in photos])
    assert batch.shape == (4, 3, 224, 224)
    rows = inspection.sparsity(model, [batch[:2], batch[2:]])
    assert {r["measure"] for r in rows} == {"non-zero"}            # ReLU6 zeroes negatives
    assert rows[0]["stage"] == model.feature_info[0]["module"]
    assert all(0.0 < r["fraction"] < 1.0 for r in rows), rows
    assert rows[0]["fraction"] > rows[-1]["fraction"] + 0.1, rows
