"""Torchvision's own weight files (resnet18-f37072fd.pth, vgg16_bn-6c64b313.pth, ...) as
`weights="file"`: converted by timm's torchvision configs, they give torchvision's logits, the
fine-tune model gets torchvision's features, a run trains from one, and uploads of them pass the
Model page's checks. The files here are torchvision models at random init, saved as torchvision
saves its downloads (a plain state_dict through torch.save), so no download is needed."""
from __future__ import annotations

import hashlib
import json
import shutil
import tomllib

import pytest
import torch
import torchvision
from conftest import REPO_ROOT, class_folders, tiny_run_config
from torch import nn

from core.models import WeightsError
from core import cli
from core.models import backbones
from core.models.torchvision_weights import torchvision_tag
from core.serve import access
from core.serve.store import list_runs

# ResNet-18 and VGG-16-BN from the catalog: plain residual keys, and the classifier timm reshapes
# into convs, with BatchNorm statistics in both. ResNet-50/101 and VGG-16 take the same route.
ARCHS = ["resnet18", "vgg16_bn"]
ATOL = 1e-4


def save_torchvision(arch: str, path, seed: int = 0) -> nn.Module:
    """A random-init torchvision model in eval mode, saved the way torchvision's files are."""
    torch.manual_seed(seed)
    model = getattr(torchvision.models, arch)(weights=None)
    with torch.no_grad():           # moves BatchNorm's statistics off 0/1, so they must be carried over
        model.train()(torch.randn(4, 3, 64, 64))
    torch.save(model.state_dict(), path)
    return model.eval()


@pytest.fixture(scope="module", params=ARCHS)
def tv_file(request, tmp_path_factory):
    arch = request.param
    path = tmp_path_factory.mktemp(arch) / f"{arch}-0123abcd.pth"
    model = save_torchvision(arch, path)
    yield arch, path, model
    path.unlink(missing_ok=True)          # VGG's file is over 500 MB


def images(seed: int = 1) -> torch.Tensor:
    return torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(seed))


def without_last_linear(model: nn.Module) -> nn.Module:
    """torchvision's model up to its classifier's last Linear: the features a new head sees."""
    name = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)][-1]
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, nn.Identity())
    return model


def test_torchvision_configs_exist_for_the_seed_backbones():
    """The route is chosen from timm's registry: these archs have `tv` configs, test_resnet none."""
    for arch in ["resnet18", "resnet50", "resnet101", "vgg16", "vgg16_bn"]:
        assert torchvision_tag(arch) == f"{arch}.tv_in1k"
    assert torchvision_tag("test_resnet") is None
    detail = {s.kind: s.detail for s in backbones.weight_sources("vgg16_bn")}["file"]
    assert "torchvision" in detail


def test_same_logits_as_torchvision(tv_file):
    arch, path, reference = tv_file
    model = backbones.create_backbone(arch, "file", str(path), num_classes=1000).eval()
    assert model.pretrained_cfg["tag"] == torchvision_tag(arch).split(".", 1)[1]  # timm's conversion ran
    x = images()
    with torch.no_grad():
        ours, theirs = model(x), reference(x)
    diff = (ours - theirs).abs().max().item()
    print(f"{arch}: max logit difference {diff:.2e} (logits up to {theirs.abs().max().item():.3g})")
    assert diff < ATOL
    assert ours.argmax(1).tolist() == theirs.argmax(1).tolist()


def test_new_head_gets_torchvision_features(tv_file):
    arch, path, reference = tv_file
    model = backbones.build_model(arch, 3, "file", str(path)).eval()
    x = images(2)
    with torch.no_grad():
        ours, theirs = model.backbone(x), without_last_linear(reference)(x)
        logits = model(x)
    assert ours.shape == theirs.shape and logits.shape == (2, 3)
    assert (ours - theirs).abs().max().item() < ATOL


def test_an_upload_of_a_torchvision_file_passes_the_model_page_checks(tv_file):
    """As pages/2_Model.py stores an upload: within Streamlit's and the student's caps, named by
    content (torchvision's file name is gone), then checked by create_backbone."""
    arch, path, _ = tv_file
    size = path.stat().st_size
    config = tomllib.loads((REPO_ROOT / ".streamlit" / "config.toml").read_text(encoding="utf-8"))
    assert size <= config["server"]["maxUploadSize"] * 1024 * 1024
    student = access.User("student")
    assert size <= access.upload_allowance(student, access.Policy())
    digest = hashlib.sha256(path.read_bytes()).hexdigest()[:16]
    target = access.weights_dir(student) / f"{digest}.pth"
    shutil.copyfile(path, target)
    try:
        backbone = backbones.create_backbone(arch, "file", str(target))
        assert backbone.pretrained_cfg["tag"].startswith("tv")
    finally:
        target.unlink()


def test_a_torchvision_file_lacking_a_tensor_is_refused(tmp_path):
    """timm's conversion loads strictly; a file it rejects goes to the generic path, whose error
    names what is missing (never a half-loaded model)."""
    state = torchvision.models.resnet18(weights=None).state_dict()
    del state["layer4.1.bn2.weight"]
    torch.save(state, tmp_path / "broken.pth")
    with pytest.raises(WeightsError, match="layer4.1.bn2.weight"):
        backbones.create_backbone("resnet18", "file", str(tmp_path / "broken.pth"))


def test_cli_trains_from_a_torchvision_file(tmp_path, capsys):
    path = tmp_path / "resnet18-f37072fd.pth"
    save_torchvision("resnet18", path)
    data = class_folders(tmp_path / "data", classes=2, per_class=6, size=40)
    cfg = tiny_run_config(data, arch="resnet18", weights="file", weights_file=str(path),
                          epochs=1, image_size=32, freeze="top_k")
    cfg_file = tmp_path / "cfg.json"
    cfg_file.write_text(json.dumps(cfg.to_dict()), encoding="utf-8")
    assert cli.main(["train", str(cfg_file), "--quiet"]) == 0, capsys.readouterr().out
    (run,) = list_runs()
    assert run.status()["state"] == "finished"
    assert run.config.weights == "file" and run.config.weights_file == str(path)
