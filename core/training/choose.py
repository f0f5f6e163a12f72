"""Which backbone and image size a time budget should fine-tune, chosen on the user's own data.

Each candidate (a backbone whose pretrained weights are available right now, at one of a few
image sizes) is probed the way the Doctor audits a data set: pooled features of a sample of the
training images (cached on disk), and a cross-validated logistic regression on them. The probe
accuracy says how well the pretrained features already separate these classes; the measured
forward time says how many fine-tuning epochs the budget buys. The choice is the most accurate
candidate that still leaves the fine-tune its epochs; candidates within one standard error of the
best count as tied, and the cheapest of those wins (more epochs, deeper fine-tuning). No constant
here is fitted to a data set: the sample, the regularisation and the tie margin all follow from
the data and the budget.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass

import numpy as np
import torch

from core.config import default_image_size
from core.models.backbones import CATALOG, default_weights
from core.progress import Progress, silent

PROBE_PER_CLASS = 24      # training images per class the probe embeds (fewer if the class has fewer)
PROBE_MAX = 480           # ...and at most this many in all
PROBE_SHARE = 0.2         # the probe may use this share of the budget; candidates past it are skipped
TRAIN_COST = 3.0          # a training step costs about three forwards (forward, backward, update)
TUNED_SHARE = 0.5         # the planner usually fine-tunes about half the blocks in a short budget
OFFLINE = ("bundled", "hub-cache")   # weights that need no download


@dataclass
class Probe:
    arch: str
    size: int
    weights: str
    accuracy: float = float("nan")   # cross-validated linear-probe accuracy on the sample
    images: int = 0
    forward_ms: float = 0.0          # eval forward per image on this machine
    epoch_s: float = 0.0             # one fine-tune epoch of the training split, estimated
    fits: bool = False               # the budget leaves the fine-tune its epochs
    seconds: float = 0.0             # what probing this candidate cost

    def to_dict(self) -> dict:
        return asdict(self)


def sizes_for(device_type: str) -> tuple[int, ...]:
    """The app's default size for this device and the backbones' usual 224 px."""
    return tuple(sorted({default_image_size(device_type) + 32, 224}))


def candidates(device_type: str = "cpu") -> list[tuple[str, str, int]]:
    """(arch, weights, size) for every catalogued backbone whose weights need no download."""
    found = []
    for arch in CATALOG:
        weights = default_weights(arch)
        if weights in OFFLINE:
            found += [(arch, weights, size) for size in sizes_for(device_type)]
    return found


def sample(items: list, per_class: int = PROBE_PER_CLASS, most: int = PROBE_MAX, seed: int = 0) -> list:
    """A class-balanced, seeded sample of training items (never validation or test images)."""
    rng = np.random.default_rng(seed)
    by_class: dict[int, list] = {}
    for item in items:
        by_class.setdefault(item.label, []).append(item)
    per = max(2, min(per_class, most // max(len(by_class), 1)))
    picked = []
    for label in sorted(by_class):
        group = by_class[label]
        picked += [group[i] for i in sorted(rng.permutation(len(group))[:per])]
    return picked


def probe_accuracy(vectors: np.ndarray, labels: np.ndarray) -> float:
    """Accuracy of the Doctor's cross-validated logistic regression on these features."""
    from core.trust.doctor import out_of_sample_probs
    ok = ~np.isnan(vectors).any(axis=1)
    probs = out_of_sample_probs(vectors, labels, ok)
    scored = ~np.isnan(probs).any(axis=1)
    if not scored.any():
        return float("nan")
    return float((probs[scored].argmax(1) == labels[scored]).mean())


def forward_seconds(backbone: torch.nn.Module, size: int, device: torch.device, batch: int = 8) -> float:
    """Seconds per image of an eval forward at `size` (after one warm-up batch)."""
    x = torch.randn(batch, 3, size, size, device=device)
    with torch.inference_mode():
        backbone(x)
        start = time.perf_counter()
        backbone(x)
    return (time.perf_counter() - start) / batch


def probe(root: str, train_items: list, counts: dict, budget_s: float, device: torch.device,
          progress: Progress = silent, seed: int = 0) -> list[Probe]:
    """Probe every candidate on a sample of the training split; `counts` holds the number of
    train/val/test images, for the cost of an epoch and of the cached head phase."""
    from core.trust.embeddings import embed_items, pretrained
    chosen = sample(train_items, seed=seed)
    labels = np.array([it.label for it in chosen])
    todo = candidates(device.type)
    probes, started = [], time.perf_counter()
    for i, (arch, weights, size) in enumerate(todo):
        if time.perf_counter() - started > PROBE_SHARE * budget_s:
            break            # the budget is for training: candidates past the share go unprobed
        progress(i, len(todo), f"Probing {arch} at {size} px on {len(chosen)} training images")
        began = time.perf_counter()
        backbone, _, _ = pretrained(arch, weights)
        backbone.to(device)
        vectors = embed_items(root, chosen, arch, weights, size, device=str(device))
        fwd = forward_seconds(backbone, size, device)
        p = Probe(arch, size, weights, probe_accuracy(vectors, labels), len(chosen), 1000 * fwd,
                  counts["train"] * fwd * TRAIN_COST * TUNED_SHARE)
        p.fits = fits(p, counts, budget_s - (time.perf_counter() - started))
        p.seconds = time.perf_counter() - began
        probes.append(p)
    progress(len(todo), len(todo), "Probed the backbones")
    return probes


def fits(p: Probe, counts: dict, left_s: float) -> bool:
    """One pass over every image (the cached head phase) plus the fine-tune's planned epochs."""
    from core.training.budget import MIN_EPOCHS, SAFETY
    features_s = sum(counts.values()) * p.forward_ms / 1000
    return features_s + MIN_EPOCHS * p.epoch_s <= SAFETY * left_s


def choose(probes: list[Probe]) -> tuple[Probe | None, list[str]]:
    """The most accurate candidate that fits; ties (within one standard error of the best
    probe accuracy) go to the cheapest, whose budget buys the most fine-tuning."""
    usable = [p for p in probes if p.fits and not np.isnan(p.accuracy)]
    if not usable:
        return None, ["No backbone could be probed within the budget; the chosen backbone trains."]
    best = max(usable, key=lambda p: p.accuracy)
    margin = standard_error(best.accuracy, best.images)
    tied = [p for p in usable if p.accuracy >= best.accuracy - margin]
    pick = min(tied, key=lambda p: p.epoch_s)
    notes = [f"{pick.arch} at {pick.size} px: probe accuracy {pick.accuracy:.1%} on "
             f"{pick.images} training images, about {pick.epoch_s:.0f} s per fine-tune epoch."]
    if pick is not best:
        notes.append(f"{best.arch} at {best.size} px probed {best.accuracy:.1%}, within one standard "
                     f"error ({margin:.1%}); the cheaper one gets more fine-tuning in the budget.")
    skipped = [p for p in probes if not p.fits]
    if skipped:
        notes.append("Too slow for the budget: " + ", ".join(f"{p.arch} at {p.size} px" for p in skipped) + ".")
    return pick, notes


def standard_error(accuracy: float, n: int) -> float:
    return float(np.sqrt(max(accuracy * (1 - accuracy), 1e-4) / max(n, 1)))


def table_row(probe: dict, chosen: dict) -> dict:
    """One row of the probe table the Train page shows (a probe as stored in probe.json)."""
    picked = chosen.get("arch") == probe["arch"] and chosen.get("size") == probe["size"]
    return {"backbone": probe["arch"], "size (px)": probe["size"],
            "probe accuracy": None if np.isnan(probe["accuracy"]) else round(100 * probe["accuracy"], 1),
            "s per fine-tune epoch": round(probe["epoch_s"], 1), "fits the budget": probe["fits"],
            "chosen": "✓" if picked else ""}
