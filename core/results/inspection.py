"""Look inside a network: feature maps per stage, the first conv before/after its nonlinearity,
activation sparsity, first-layer filters and attributions (Captum).

Everything goes through timm's contract (`forward_intermediates`, `feature_info`,
`pretrained_cfg['first_conv']`), so it works for any architecture without name checks. Hooks live
only inside `hooked()`, which removes them in `finally`; train/eval state is restored.
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Iterable, NamedTuple, Sequence

import numpy as np
import pandas as pd
import timm
import timm.layers.activations as timm_acts
import torch
from matplotlib import colormaps
from PIL import Image
from torch import nn
from torch.nn.modules import activation as torch_acts
from torchvision.transforms import v2
from torchvision.utils import make_grid

from core.data.images import decode_images
from core.data.transforms import build_transform
from core.hooks import eval_mode, hooked
from core.models import backbones
from core.progress import Progress, silent

GATES = (nn.Sigmoid, nn.Softmax, nn.Softmax2d, nn.Hardsigmoid, nn.Tanh, nn.Softmin, nn.LogSoftmax,
         nn.MultiheadAttention, nn.Linear, timm_acts.Sigmoid, timm_acts.HardSigmoid, timm_acts.Tanh)
ACTIVATION_TYPES = tuple({cls for mod in (torch_acts, timm_acts) for cls in vars(mod).values()
                          if isinstance(cls, type) and issubclass(cls, nn.Module)
                          and cls is not nn.Module and not issubclass(cls, GATES)})


# ---------------------------------------------------------------- plumbing

def backbone_of(model: nn.Module) -> nn.Module:
    """The timm model inside a FineTuneModel, or the model itself."""
    return getattr(model, "backbone", model)


def activations(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Nonlinearity modules (ReLU, SiLU, GELU, … including timm's own), gates excluded."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, ACTIVATION_TYPES)]


def zeroes_negatives(module: nn.Module) -> bool:
    """True for ReLU-like activations (exact zeros for negative input); False for smooth ones."""
    with torch.no_grad():
        return bool((module(torch.tensor([-3.5, -1.0])) == 0).all())


# ---------------------------------------------------------------- feature maps

@dataclass
class FeatureMap:
    name: str
    tensor: torch.Tensor     # (C, H, W) for one image

    @property
    def shape(self) -> tuple:
        return tuple(self.tensor.shape)


@torch.inference_mode()
def feature_maps(model: nn.Module, x: torch.Tensor) -> list[FeatureMap]:
    """Every stage's output for one image (batch of 1), shallow to deep."""
    backbone = backbone_of(model)
    names = [info["module"] for info in backbone.feature_info]
    with eval_mode(backbone):
        outs = backbone.forward_intermediates(x, indices=len(names), intermediates_only=True)
    return [FeatureMap(name, out[0].float()) for name, out in zip(names, outs)]


def channel_grid(fmap: torch.Tensor, n: int = 16, cmap: str = "viridis", ncol: int = 8,
                 min_size: int = 56) -> np.ndarray:
    """The first `n` channels as heat maps (each normalised on its own), in one RGB image;
    small maps of deep stages are enlarged (nearest) to `min_size` pixels so they stay visible."""
    chans = fmap[:n].float()
    if chans.shape[-1] < min_size:
        scale = -(-min_size // chans.shape[-1])
        chans = torch.nn.functional.interpolate(chans[None], scale_factor=scale, mode="nearest")[0]
    lo = chans.amin(dim=(1, 2), keepdim=True)
    hi = chans.amax(dim=(1, 2), keepdim=True)
    norm = ((chans - lo) / (hi - lo).clamp_min(1e-8)).cpu().numpy()
    rgb = torch.from_numpy(colormaps[cmap](norm)[..., :3]).permute(0, 3, 1, 2)
    grid = make_grid(rgb, nrow=ncol, padding=1, pad_value=1.0)
    return (grid.permute(1, 2, 0).numpy() * 255).astype(np.uint8)


# ---------------------------------------------------------------- first conv

def first_conv(model: nn.Module) -> tuple[str, nn.Module]:
    backbone = backbone_of(model)
    name = backbone.pretrained_cfg["first_conv"]
    return name, backbone.get_submodule(name)


@torch.inference_mode()
def first_conv_outputs(model: nn.Module, x: torch.Tensor):
    """(conv output, output of the first nonlinearity after it, its module name); the last two
    are None when no activation runs between the first conv and the first stage (ConvNeXt's stem,
    a ViT patch embedding)."""
    backbone = backbone_of(model)
    _, conv = first_conv(model)
    stage0 = backbone.get_submodule(backbone.feature_info[0]["module"])
    seen: dict = {}

    def on_conv(_m, _i, out):
        seen.setdefault("conv", out[0].detach().clone())

    def on_act(name, module):
        def hook(_m, _i, out):
            fits = out.dim() == 4 and out.shape[1] == conv.out_channels
            before_stage = "stage_started" not in seen or module is stage0
            if "conv" in seen and "act" not in seen and fits and before_stage:
                seen["act"], seen["act_name"] = out[0].detach().clone(), name
        return hook

    def on_stage_start(_m, _i):
        seen.setdefault("stage_started", True)

    pairs = [(conv, on_conv)] + [(m, on_act(n, m)) for n, m in activations(backbone)]
    with eval_mode(backbone), hooked(pairs, pre=[(stage0, on_stage_start)]):
        backbone(x)
    return seen.get("conv"), seen.get("act"), seen.get("act_name")


def filter_grid(model: nn.Module, ncol: int = 16, scale: int = 4) -> np.ndarray:
    """First-layer filters as small RGB images, each normalised to its own range."""
    _, conv = first_conv(model)
    w = conv.weight.detach().float().cpu()
    if w.shape[1] != 3:
        w = w.mean(1, keepdim=True).expand(-1, 3, -1, -1)
    lo = w.amin(dim=(1, 2, 3), keepdim=True)
    hi = w.amax(dim=(1, 2, 3), keepdim=True)
    w = (w - lo) / (hi - lo).clamp_min(1e-8)
    w = torch.nn.functional.interpolate(w, scale_factor=scale, mode="nearest")
    grid = make_grid(w, nrow=ncol, padding=2, pad_value=1.0)
    return (grid.permute(1, 2, 0).numpy() * 255).astype(np.uint8)


# ---------------------------------------------------------------- sparsity

@torch.inference_mode()
def sparsity(model: nn.Module, batches: Iterable[torch.Tensor],
             progress: Progress | None = None, total: int | None = None) -> list[dict]:
    """Per stage (in execution order, as timm's feature_info splits the network), the fraction of
    activation outputs that are non-zero (ReLU-like) or positive (smooth activations), averaged
    over every element of every image. Activations after the last stage form a final group."""
    backbone = backbone_of(model)
    stage_names = [info["module"] for info in backbone.feature_info]
    acts = activations(backbone)
    kinds = {name: zeroes_negatives(m) for name, m in acts}
    totals: dict[int, list] = {}
    state = {"stage": 0}

    def on_act(name):
        def hook(_m, _i, out):
            hits = (out != 0) if kinds[name] else (out > 0)
            entry = totals.setdefault(state["stage"], [0, 0, set()])
            entry[0] += int(hits.sum())
            entry[1] += out.numel()
            entry[2].add(kinds[name])
        return hook

    def on_stage(index):
        def hook(_m, _i, _out):
            state["stage"] = index + 1
        return hook

    pairs = [(m, on_act(n)) for n, m in acts]
    pairs += [(backbone.get_submodule(n), on_stage(i)) for i, n in enumerate(stage_names)]
    seen = 0
    with eval_mode(backbone), hooked(pairs):
        for batch in batches:
            state["stage"] = 0
            backbone(batch)
            seen += len(batch)
            if progress:
                progress(seen, total or seen, f"{seen}/{total} images" if total else f"{seen} images")
    rows = []
    for index in sorted(totals):
        nonzero, count, zero_kind = totals[index]
        name = stage_names[index] if index < len(stage_names) else "after last stage"
        measure = "non-zero" if zero_kind == {True} else "positive" if zero_kind == {False} else "non-zero/positive"
        rows.append(dict(stage=name, order=index, fraction=nonzero / max(count, 1), measure=measure))
    return rows


# ---------------------------------------------------------------- attributions

def _overlay(image: np.ndarray, heat: np.ndarray, cmap: str = "jet", alpha: float = 0.45) -> np.ndarray:
    heat = heat - heat.min()
    heat = heat / max(heat.max(), 1e-8)
    colour = colormaps[cmap](heat)[..., :3]
    return ((1 - alpha) * image / 255.0 + alpha * colour).clip(0, 1).__mul__(255).astype(np.uint8)


def attributions(model: nn.Module, x: torch.Tensor, image: np.ndarray, target: int,
                 methods=("Integrated Gradients", "Grad-CAM", "Occlusion")) -> dict:
    """Overlays (HxWx3 uint8) per method, or a string saying why a method is unavailable.
    `x` is the normalised input (1, 3, H, W); `image` the same picture as uint8 HxWx3."""
    maps = attribution_maps(model, x, target, methods)
    return {method: heat if isinstance(heat, str) else _overlay(image, heat) for method, heat in maps.items()}


def attribution_maps(model: nn.Module, x: torch.Tensor, target: int,
                     methods=("Integrated Gradients", "Grad-CAM", "Occlusion")) -> dict:
    """The raw heat maps behind `attributions`: a float (H, W) array per method at the input's
    size (larger = more important), or a string saying why a method is unavailable."""
    from captum.attr import IntegratedGradients, Occlusion
    out = {}
    size = x.shape[-1]
    with eval_mode(model):
        x = x.clone().requires_grad_(True)
        # fast first (Grad-CAM: one backward pass), so a page can show it while the others run
        if "Grad-CAM" in methods:
            out["Grad-CAM"] = grad_cam_maps(model, x, target)
            if not isinstance(out["Grad-CAM"], str):
                out["Grad-CAM"] = out["Grad-CAM"][0]
        if "Integrated Gradients" in methods:     # all 16 path steps in one batch
            attr = IntegratedGradients(model).attribute(x, target=target, n_steps=IG_STEPS,
                                                        internal_batch_size=IG_STEPS)
            out["Integrated Gradients"] = attr[0].abs().sum(0).detach().cpu().numpy()
        if "Occlusion" in methods:                # an 8x8 grid of patches, all in one batch
            window = max(4, size // OCCLUSION_GRID)
            with torch.no_grad():
                attr = Occlusion(model).attribute(x.detach(), target=target, sliding_window_shapes=(3, window, window),
                                                  strides=(3, window, window),
                                                  perturbations_per_eval=OCCLUSION_GRID ** 2)
            out["Occlusion"] = attr[0].sum(0).clamp_min(0).detach().cpu().numpy()
    return out


IG_STEPS = 16           # path steps of Integrated Gradients (captum's default is 50)
OCCLUSION_GRID = 8      # occluded patches per side: the window is the image size / 8


GRAD_CAM_UNAVAILABLE = ("Grad-CAM needs a spatial feature map; this model's last stage outputs tokens "
                        "(a transformer), so use Integrated Gradients or Occlusion.")


def grad_cam_layer(model: nn.Module, x: torch.Tensor) -> nn.Module | None:
    """The last stage (timm's feature_info), or None when its output for `x` is not a
    (B, C, H, W) map."""
    backbone = backbone_of(model)
    prefix = "backbone." if backbone is not model else ""
    layer = model.get_submodule(prefix + backbone.feature_info[-1]["module"])
    probe: dict = {}

    def on_layer(_m, _i, out):      # a hook that returns something would replace the output
        probe["dim"] = out.dim() if torch.is_tensor(out) else 0

    with eval_mode(model), hooked([(layer, on_layer)]), torch.no_grad():
        model(x[:1].detach())
    return layer if probe.get("dim") == 4 else None


def grad_cam_maps(model: nn.Module, x: torch.Tensor, target, layer: nn.Module | None = None):
    """Grad-CAM of the last stage for a batch: (B, H, W) float array at the input's size, or the
    string GRAD_CAM_UNAVAILABLE. `target` is one class index or one per image."""
    from captum.attr import LayerAttribution, LayerGradCam
    layer = layer or grad_cam_layer(model, x)
    if layer is None:
        return GRAD_CAM_UNAVAILABLE
    with eval_mode(model):
        x = x.clone().requires_grad_(True)
        cam = LayerGradCam(model, layer).attribute(x, target=target, relu_attributions=True)
        cam = LayerAttribution.interpolate(cam, tuple(x.shape[-2:]), interpolate_mode="bilinear")
    return cam[:, 0].detach().float().cpu().numpy()


# ---------------------------------------------------------------- what a page inspects: the model and its input

class ModelChoice(NamedTuple):
    """A model to look inside: kind "run" (name = the run's id; stamp = its checkpoint's time, so
    a run that trained on is loaded again) or kind "pretrained" (name = a backbone)."""
    kind: str
    name: str
    stamp: float = 0.0

    @property
    def label(self) -> str:
        """How charts name the model: "run <id>" or "pretrained <backbone>"."""
        return f"{self.kind} {self.name}"


@dataclass
class Inspected:
    """A model in eval mode with what its input needs: class names, image size, normalisation."""
    model: nn.Module
    classes: list[str]
    size: int
    mean: Sequence[float]
    std: Sequence[float]

    def transform(self):
        """The eval transform the model was made for: resize, centre crop to `size`, normalise."""
        return build_transform(self.size, self.mean, self.std)


def load_inspected(kind: str, name: str) -> Inspected:
    """A run's fine-tuned model (kind "run", `name` its id) or a pretrained backbone with its
    ImageNet head (kind "pretrained", `name` the architecture)."""
    if kind == "run":
        from core.serve.store import get_run
        return run_model(get_run(name))
    return pretrained_model(name)


def run_model(run) -> Inspected:
    """The run's best checkpoint, its classes and image size, and the normalisation it trained with."""
    model = backbones.load_run_model(run)
    mean, std = backbones.run_normalization(run, model)
    return Inspected(model, list(run.classes), run.config.image_size, mean, std)


def pretrained_model(arch: str) -> Inspected:
    """The backbone with its 1000-class ImageNet head, at the input size and normalisation of its
    pretrained weights (a backbone without weights here comes with a random init)."""
    model = backbones.create_backbone(arch, "auto", num_classes=1000).eval()
    cfg = timm.data.resolve_model_data_config(model)
    info = timm.data.ImageNetInfo()
    classes = [info.index_to_description(i) for i in range(1000)]
    return Inspected(model, classes, int(cfg["input_size"][-1]), cfg["mean"], cfg["std"])


def model_input(picture: Image.Image, inspected: Inspected) -> tuple[torch.Tensor, np.ndarray]:
    """(the normalised batch of one the model takes, the same crop as HxWx3 uint8 to show and to
    draw attributions on)."""
    tensor = v2.functional.pil_to_tensor(picture)
    x = inspected.transform()(tensor)[None]
    shown = build_transform(inspected.size, (0, 0, 0), (1, 1, 1))(tensor)     # same crop, unnormalised
    return x, (shown.permute(1, 2, 0).clamp(0, 1).numpy() * 255).astype(np.uint8)


@torch.inference_mode()
def class_probabilities(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Softmax over the classes for the first image of `x`."""
    with eval_mode(model):
        return model(x).softmax(-1)[0]


def class_items(scan, cls: str) -> list:
    """The items of a folders.Scan that belong to class `cls`, in scan order."""
    return [item for item in scan.items if scan.classes[item.label] == cls]


# ---------------------------------------------------------------- sparsity over a sample of a data set

SPARSITY_BATCH = 16


def sparsity_sample(items: Sequence, count: int, seed: int = 0) -> list:
    """`count` of `items` (all when fewer), the same ones on every call: two models compared on
    one chart must see the same images."""
    return random.Random(seed).sample(list(items), min(count, len(items)))


def measure_sparsity(inspected: Inspected, root: str, items: Sequence, count: int, label: str,
                     progress: Progress | None = None) -> list[dict]:
    """`sparsity` rows of `inspected`'s model over a seeded sample of `count` items under `root`,
    each tagged with model=`label`. Unreadable images are left out; `progress(done, total,
    "done/total images")` follows the images measured."""
    images, _ = decode_images(root, sparsity_sample(items, count), inspected.size)
    images = [img for img in images if img is not None]
    transform, say = inspected.transform(), progress or silent
    batches = (torch.stack([transform(img) for img in images[i:i + SPARSITY_BATCH]])
               for i in range(0, len(images), SPARSITY_BATCH))
    rows = sparsity(inspected.model, batches, progress=say, total=len(images))
    return [dict(row, model=label) for row in rows]


def sparsity_table(rows: list[dict]) -> tuple[pd.DataFrame, list[str]]:
    """(the rows as a table with a "stage (measure)" label column, those labels shallow to deep)."""
    frame = pd.DataFrame(rows)
    frame["label"] = frame["stage"] + " (" + frame["measure"] + ")"
    return frame, frame.sort_values("order")["label"].drop_duplicates().tolist()
