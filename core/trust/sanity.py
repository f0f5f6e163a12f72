"""Checked explanations: does a heat map depend on the model at all?

Two tests from Adebayo et al. 2018, "Sanity checks for saliency maps":

- **model randomisation**: recompute a map on a copy of the model whose top block (and head) is
  re-initialised, then on one whose weights are all re-initialised. A map that explains the
  model must change; one that stays the same shows the picture (its edges), not the network.
- **label randomisation**, cheap version: instead of retraining the network on shuffled labels,
  fit a new linear head (a ridge regression) on the training set's pooled features with shuffled
  labels. A map that explains *this class* should change when the head has learnt nothing.

Similarity is the Spearman rank correlation of the absolute maps (the paper's measure) and the
SSIM of the maps scaled to [0, 1]. A method is flagged when its rank correlation with the map of
the fully randomised model stays above SIMILAR = 0.5, a threshold chosen here, not the paper's:
on the bundled MobileNetV2 and a photo, Grad-CAM and Occlusion fall to about -0.2..0.3 after
randomising every weight, Integrated Gradients to about 0.35 (it multiplies by the input, so part
of the picture always shows through), while a map computed from the input alone (an edge
detector) stays at 1.0. Half-way leaves a margin on both sides.

And a per-class average Grad-CAM over test images, so a shortcut (the class is recognised by its
background) shows as heat on the background of the class's average map.

    from core.trust import sanity as S
    rows = S.sanity_check(model, x, target=3, train_features=(features, labels))
    for verdict in S.verdicts(rows):
        print(verdict["text"])

The randomised models are deep copies drawn from a private seeded stream (core.rng): the
caller's model keeps its weights and train/eval state, and the same seed gives the same maps.
"""
from __future__ import annotations

import copy
import warnings
from typing import Callable, Iterable, Mapping

import numpy as np
import torch
from matplotlib import colormaps
from torch import nn

from core.hooks import eval_mode
from core.progress import Progress
from core.results import inspection
from core import rng

SIMILAR = 0.5           # rank correlation above which a map "did not change" (see module doc)
DEFAULT_METHODS = ("Grad-CAM", "Integrated Gradients", "Occlusion")

CHECKS = {              # row key -> what was done to the model, in the order they run
    "original": "Original model",
    "top": "Top block randomised",
    "all": "All weights randomised",
    "labels": "Head fit to shuffled labels",
}
STEPS = {"top": "Randomising the top block", "all": "Randomising all weights",
         "labels": "Refitting the head on shuffled labels"}

MapFn = Callable[[nn.Module, torch.Tensor, int], np.ndarray]


# ---------------------------------------------------------------- randomised copies

def randomised(model: nn.Module, scope: str = "all", seed: int = 0,
               x: torch.Tensor | None = None) -> nn.Module:
    """A deep copy with the top block and the classifier ("top") or every weight ("all")
    re-initialised by each layer's own `reset_parameters` (the init it gets when built), drawn
    from a private seeded stream. Parameters of layers without one (layer scales, position
    embeddings) are shuffled: their scale stays, what they learnt goes. With `x`, the reset
    batch norms re-estimate their statistics on it (see `_recalibrate`)."""
    clone = copy.deepcopy(model)
    chosen = set(top_parameters(clone)) if scope == "top" else {n for n, _ in clone.named_parameters()}
    done: set[str] = set()
    reset: list[nn.Module] = []
    with rng.Stream(seed).active(), torch.no_grad():
        for prefix, module in clone.named_modules():
            own = [f"{prefix}.{n}" if prefix else n for n, _ in module.named_parameters(recurse=False)]
            if own and set(own) <= chosen and callable(getattr(module, "reset_parameters", None)):
                module.reset_parameters()
                done.update(own)
                reset.append(module)
        for name, param in clone.named_parameters():
            if name in chosen and name not in done:
                param.copy_(param.flatten()[torch.randperm(param.numel())].view_as(param))
    if x is not None:
        _recalibrate(clone, [m for m in reset if isinstance(m, nn.modules.batchnorm._BatchNorm)], x)
    return clone.eval()


def _recalibrate(model: nn.Module, norms: list[nn.Module], x: torch.Tensor) -> None:
    """Reset batch norms hold mean 0 / variance 1, so in eval mode a random network's signal
    shrinks layer after layer to ~1e-10 (and the CPU crawls on denormal numbers): estimate their
    statistics on the image itself, as a freshly built network in training mode would."""
    if not norms:
        return
    saved = [(m, m.momentum) for m in norms]
    try:
        with eval_mode(model), torch.no_grad():
            for m in norms:
                m.momentum = None           # a cumulative average: after one pass, this image's stats
                m.train()
            model(x[:1].detach())
    except ValueError:                      # a 1-D norm on one value per channel: keep the reset stats
        for m in norms:
            m.reset_running_stats()
    finally:
        for m, momentum in saved:
            m.momentum = momentum


def top_parameters(model: nn.Module) -> list[str]:
    """Names (in `model`) of the backbone's top block plus everything after it: the head of a
    FineTuneModel or the classifier of a plain timm model."""
    from core.models.backbones import block_groups
    backbone = inspection.backbone_of(model)
    prefix = "backbone." if backbone is not model else ""
    classifier = _classifier_names(backbone)
    blocks = [names for _, names in block_groups(backbone) if not set(names) <= classifier]
    top = set(blocks[-1] if blocks else []) | classifier
    inside = {prefix + n for n in top}
    outside = [n for n, _ in model.named_parameters() if not n.startswith(prefix)] if prefix else []
    return [n for n, _ in model.named_parameters() if n in inside] + outside


def _classifier_names(backbone: nn.Module) -> set[str]:
    get = getattr(backbone, "get_classifier", None)
    classifier = get() if callable(get) else None
    if not isinstance(classifier, nn.Module):
        return set()
    ids = {id(p) for p in classifier.parameters()}
    return {n for n, p in backbone.named_parameters() if id(p) in ids}


def shuffled_head(model: nn.Module, features: np.ndarray, labels, seed: int = 0) -> nn.Module:
    """A deep copy whose head is a new linear layer fit to `features`, the backbone's pooled
    output of training images, with the labels randomly permuted: a model that learnt nothing
    about the classes, on the same backbone. The fit is a ridge regression onto the one-hot
    labels (scikit-learn's RidgeClassifier): closed form, so milliseconds, not an iterative solver
    chasing noise."""
    from sklearn.linear_model import RidgeClassifier
    features = np.asarray(features, dtype=np.float32)
    labels = np.asarray(labels, dtype=np.int64)
    keep = np.isfinite(features).all(1)               # unreadable images are rows of NaN
    features, labels = features[keep], labels[keep]
    shuffled = np.random.default_rng(seed).permutation(labels)
    fit = RidgeClassifier(alpha=1.0).fit(features, shuffled)
    coef, bias = np.atleast_2d(fit.coef_), np.atleast_1d(fit.intercept_)
    if len(fit.classes_) == 2:                        # one row for two classes: logits (0, w.x + b)
        coef, bias = np.stack([np.zeros_like(coef[0]), coef[0]]), np.array([0.0, bias[0]])
    clone = copy.deepcopy(model)
    with rng.exclusive():                             # its random init is overwritten below
        head = nn.Linear(features.shape[1], _classifier_outputs(clone))
    with torch.no_grad():
        head.weight.zero_()
        head.bias.fill_(float(bias.min()) - 10)       # classes without training images: never chosen
        rows = torch.as_tensor(fit.classes_)
        head.weight[rows] = torch.as_tensor(coef, dtype=torch.float32)
        head.bias[rows] = torch.as_tensor(bias, dtype=torch.float32)
    clone.head = head
    return clone


def _classifier_outputs(model: nn.Module) -> int:
    last = [m for m in model.head.modules() if isinstance(m, nn.Linear)][-1]
    return last.out_features


# ---------------------------------------------------------------- similarity

def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Rank correlation of the absolute maps; 0 when either is constant (a flat map shares no
    ranking with anything)."""
    from scipy.stats import spearmanr
    a, b = np.abs(np.asarray(a, float)).ravel(), np.abs(np.asarray(b, float)).ravel()
    if np.ptp(a) == 0 or np.ptp(b) == 0:
        return 0.0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        value = spearmanr(a, b).statistic
    return float(value) if np.isfinite(value) else 0.0


def ssim(a: np.ndarray, b: np.ndarray) -> float:
    """Structural similarity of the two maps, each scaled to [0, 1]."""
    from skimage.metrics import structural_similarity
    a, b = _unit(a), _unit(b)
    side = min(a.shape)
    window = min(7, side if side % 2 else side - 1)
    if window < 3:
        return float(np.allclose(a, b))
    return float(structural_similarity(a, b, data_range=1.0, win_size=window))


def _unit(heat: np.ndarray) -> np.ndarray:
    heat = np.asarray(heat, float)
    heat = heat - heat.min()
    return heat / heat.max() if heat.max() > 0 else heat


# ---------------------------------------------------------------- the check

def sanity_check(model: nn.Module, x: torch.Tensor, target: int, methods=DEFAULT_METHODS,
                 train_features: tuple[np.ndarray, Iterable[int]] | None = None, seed: int = 0,
                 progress: Progress | None = None) -> list[dict]:
    """Rows of {method, check, label, map, spearman, ssim, note}: for every method the map of
    the original model, then of the top block randomised, all weights randomised, and a head
    fit to shuffled labels (`train_features` = (pooled training features, labels); without it
    that row only carries a note). `methods` are names `core.results.inspection.attribution_maps` knows,
    or (name, fn(model, x, target) -> (H, W) array) pairs, or a {name: fn} mapping.
    `progress(done, total, text)` is called before each map."""
    methods = _method_fns(methods)
    variants: list[tuple[str, Callable[[], nn.Module] | str]] = [
        ("original", lambda: model),
        ("top", lambda: randomised(model, "top", seed, x)),
        ("all", lambda: randomised(model, "all", seed, x)),
        ("labels", _labels_variant(model, train_features, seed)),
    ]
    total = len(methods) * sum(not isinstance(make, str) for _, make in variants)
    done, rows, reference = 0, [], {}
    for check, make in variants:
        if isinstance(make, str):
            rows += [_row(name, check, note=make) for name, _ in methods]
            continue
        if progress:
            progress(done, total, f"{STEPS.get(check, 'The original model')}…")
        net = make()
        for i, (name, fn) in enumerate(methods, 1):
            if progress:
                progress(done, total, f"{STEPS.get(check, 'The original model')}: {name} "
                                      f"(method {i} of {len(methods)})")
            heat = fn(net, x, target)
            done += 1
            if isinstance(heat, str):
                rows.append(_row(name, check, note=heat))
                continue
            if check == "original":
                reference[name] = heat
            real = reference.get(name)
            rows.append(_row(name, check, heat, *((spearman(real, heat), ssim(real, heat))
                                                   if real is not None else (None, None))))
    if progress:
        progress(total, total, "Done")
    return rows


def _method_fns(methods) -> list[tuple[str, MapFn]]:
    items = methods.items() if isinstance(methods, Mapping) else methods
    fns = []
    for item in items:
        name, fn = (item, None) if isinstance(item, str) else item
        fns.append((name, fn or _captum_method(name)))
    return fns


def _captum_method(name: str) -> MapFn:
    def run(model, x, target):
        return inspection.attribution_maps(model, x, target, methods=(name,))[name]
    return run


def _labels_variant(model, train_features, seed):
    """A builder of the shuffled-label model, or the reason there is none."""
    if train_features is None:
        return ("Skipped: no training features (a trained run's training images are needed to "
                "refit its head on shuffled labels).")
    if not isinstance(getattr(model, "head", None), nn.Module) or not any(
            isinstance(m, nn.Linear) for m in model.head.modules()):
        return "Skipped: this model has no separate head to refit (only a trained run's model does)."
    features, labels = train_features
    readable = np.isfinite(np.asarray(features, dtype=np.float32)).all(1)
    if len(np.unique(np.asarray(labels)[readable])) < 2:
        return "Skipped: the training features hold fewer than 2 classes."
    return lambda: shuffled_head(model, features, labels, seed)


def _row(method, check, heat=None, rank=None, structure=None, note=None) -> dict:
    return dict(method=method, check=check, label=CHECKS[check], map=heat,
                spearman=rank, ssim=structure, note=note)


def verdicts(rows: list[dict], limit: float = SIMILAR) -> list[dict]:
    """Per method: {method, status ("ok", "flagged", "unavailable"), similarity, text}, judged by
    the rank correlation after randomising all weights; a high one after shuffling the labels
    adds a caution (the map follows the image, not the class)."""
    out = []
    for method in dict.fromkeys(r["method"] for r in rows):
        by_check = {r["check"]: r for r in rows if r["method"] == method}
        whole = by_check.get("all", {}).get("spearman")
        if whole is None:
            note = by_check.get("original", {}).get("note") or "no map"
            out.append(dict(method=method, status="unavailable", similarity=None,
                            text=f"{method}: not checked ({note})"))
            continue
        if whole > limit:
            text = (f"{method} barely changes when all the weights are randomised (similarity "
                    f"{whole:.2f}): it shows the picture, not the model. Don't trust it.")
        else:
            text = (f"{method} changes when the weights are randomised (similarity {whole:.2f}): "
                    "it depends on the model.")
        labels = by_check.get("labels", {}).get("spearman")
        if labels is not None and labels > limit and whole <= limit:
            text += (f" But it barely changes with a head fit to shuffled labels ({labels:.2f}): it "
                     "shows where the network looks, not why it chose this class.")
        out.append(dict(method=method, status="flagged" if whole > limit else "ok",
                        similarity=whole, text=text))
    return out


# ---------------------------------------------------------------- per-class average Grad-CAM

def class_average_gradcam(model: nn.Module, images: list, labels: list[int], transform,
                          target: str = "label", batch_size: int = 16,
                          progress: Callable[[int, int], None] | None = None) -> dict[int, np.ndarray]:
    """{class index: mean Grad-CAM map (H, W)} over decoded uint8 CHW `images` (None entries are
    skipped), each map scaled to a maximum of 1 first so every image counts the same. `target`:
    "label" explains each image's own class, "predicted" the class the model chose.
    Raises ValueError when the model has no spatial last stage (a transformer)."""
    pairs = [(img, int(lab)) for img, lab in zip(images, labels) if img is not None]
    sums: dict[int, np.ndarray] = {}
    counts: dict[int, int] = {}
    layer = None
    for start in range(0, len(pairs), batch_size):
        chunk = pairs[start:start + batch_size]
        x = torch.stack([transform(img) for img, _ in chunk])
        ys = [lab for _, lab in chunk]
        if target == "predicted":
            with torch.inference_mode(), eval_mode(model):
                ys = model(x).argmax(-1).tolist()
        layer = layer or inspection.grad_cam_layer(model, x)
        if layer is None:
            raise ValueError(inspection.GRAD_CAM_UNAVAILABLE)
        cams = inspection.grad_cam_maps(model, x, ys, layer)
        for cam, (_, lab) in zip(cams, chunk):
            peak = cam.max()
            cam = cam / peak if peak > 0 else cam
            sums[lab] = sums.get(lab, 0) + cam
            counts[lab] = counts.get(lab, 0) + 1
        if progress:
            progress(start + len(chunk), len(pairs), "Explaining images")
    return {lab: sums[lab] / counts[lab] for lab in sorted(sums)}


def class_mean_images(images: list, labels: list[int], size: int) -> dict[int, np.ndarray]:
    """{class index: the average picture (HxWx3 uint8)}, cropped as the model sees it."""
    from core.data.transforms import build_transform
    crop = build_transform(size, (0, 0, 0), (1, 1, 1))
    sums: dict[int, torch.Tensor] = {}
    counts: dict[int, int] = {}
    for img, lab in zip(images, labels):
        if img is None:
            continue
        sums[lab] = sums.get(lab, 0) + crop(img)
        counts[lab] = counts.get(lab, 0) + 1
    return {lab: (sums[lab] / counts[lab]).permute(1, 2, 0).clamp(0, 1).mul(255).byte().numpy()
            for lab in sorted(sums)}


def heat_image(heat: np.ndarray, background: np.ndarray | None = None, cmap: str = "jet") -> np.ndarray:
    """A heat map as an RGB uint8 image: over `background` (HxWx3 uint8) when given, else plain."""
    if background is not None:
        return inspection._overlay(background, heat, cmap)
    return (colormaps[cmap](_unit(heat))[..., :3] * 255).astype(np.uint8)


# ---------------------------------------------------------------- a run's images

TRAIN_FEATURES = 300     # training images whose features the shuffled-label head is fit to


def split_items(run, split: str, per_class: int | None = None, seed: int = 0) -> tuple[str, list]:
    """(data root, D.Items of one of the run's stored splits), at most `per_class` of each class
    (a seeded sample, in the split's order)."""
    from core.data.folders import Item
    splits = run.read_json("splits.json", {}) or {}
    items = [Item(path, int(label)) for path, label in splits.get(split, [])]
    if per_class is not None:
        order = np.random.default_rng(seed).permutation(len(items))
        kept, seen = set(), {}
        for i in order:
            lab = items[i].label
            if seen.get(lab, 0) < per_class:
                kept.add(int(i))
                seen[lab] = seen.get(lab, 0) + 1
        items = [it for i, it in enumerate(items) if i in kept]
    return splits.get("root", ""), items


def run_training_features(run, model: nn.Module, mean, std, limit: int = TRAIN_FEATURES, seed: int = 0,
                      progress: Progress | None = None):
    """(pooled features, labels) of up to `limit` of the run's training images through `model`'s
    backbone, or None when the run has no readable training images."""
    from core.trust.embeddings import embed_items
    classes = max(len(run.classes), 1)
    root, items = split_items(run, "train", per_class=-(-limit // classes), seed=seed)
    if not items:
        return None
    features = embed_items(root, items, model=model, mean=mean, std=std, size=run.config.image_size,
                           progress=progress, device="cpu")
    keep = np.isfinite(features).all(1)
    if not keep.any():
        return None
    return features[keep], np.array([it.label for it in items])[keep]


def run_test_images(run, per_class: int | None = None, seed: int = 0,
                progress: Callable[[int, int], None] | None = None) -> tuple[list, list[int]]:
    """(decoded uint8 CHW images, labels) of the run's test split, unreadable files left out."""
    from core.data.images import decode_images
    root, items = split_items(run, "test", per_class, seed)
    images, _ = decode_images(root, items, run.config.image_size, progress=progress)
    pairs = [(img, it.label) for img, it in zip(images, items) if img is not None]
    return [img for img, _ in pairs], [lab for _, lab in pairs]
