"""Predictions and metrics for a trained run."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import torch
from sklearn.metrics import (accuracy_score, average_precision_score, confusion_matrix,
                             precision_recall_fscore_support)

from core.data import DataError
from core.data import folders
from core.data import images as imaging
from core.data import transforms
from core.models.backbones import load_run_model, run_normalization
from core.device import pick_device
from core.progress import Progress, batched_forward, part
from core.serve.store import Run


def predict_probs(model: torch.nn.Module, images: list[torch.Tensor], transform,
                  device: torch.device, batch_size: int = 64,
                  progress: Progress | None = None, flip: bool = False) -> np.ndarray:
    """Softmax probabilities for pre-decoded uint8 images; with `flip`, the mean of the image's
    and its mirror image's. `progress(done, total, message)` per batch (it may raise to stop)."""
    net = FlipAverage(model) if flip else model
    logits = batched_forward(net, images, batch_size, device, progress, message="Predicting images",
                             prepare=lambda chunk: torch.stack([transform(img) for img in chunk]))
    return logits.softmax(-1).numpy() if len(logits) else np.zeros((0, 0))


class FlipAverage(torch.nn.Module):
    """Test-time augmentation: log of the mean probability over the image and its horizontal
    mirror, so a softmax of the output gives that mean."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        probs = self.model(x).float().softmax(-1) + self.model(x.flip(-1)).float().softmax(-1)
        return (probs / 2).clamp_min(1e-12).log()


def summarize(probs: np.ndarray, labels: list[int], classes: list[str]) -> dict:
    """Accuracy, mean average precision (one-vs-rest, macro over classes present), macro and
    per-class precision/recall/F1/support, and the confusion matrix (rows: true class)."""
    labels = np.asarray(labels, dtype=int)
    preds = probs.argmax(1) if len(probs) else np.array([], dtype=int)
    ids = list(range(len(classes)))
    p, r, f, support = precision_recall_fscore_support(labels, preds, labels=ids, zero_division=0)
    ap = [float(average_precision_score(labels == i, probs[:, i])) if (labels == i).any() else float("nan")
          for i in ids] if len(labels) else [float("nan")] * len(ids)
    present = support > 0
    return dict(
        accuracy=float(accuracy_score(labels, preds)) if len(labels) else float("nan"),
        mAP=float(np.nanmean(ap)) if present.any() else float("nan"),
        macro_precision=float(p[present].mean()) if present.any() else float("nan"),
        macro_recall=float(r[present].mean()) if present.any() else float("nan"),
        macro_f1=float(f[present].mean()) if present.any() else float("nan"),
        n=int(len(labels)),
        classes=classes,
        per_class=[dict(cls=c, precision=float(p[i]), recall=float(r[i]), f1=float(f[i]),
                        support=int(support[i]), ap=ap[i]) for i, c in enumerate(classes)],
        confusion=confusion_matrix(labels, preds, labels=ids).tolist(),
    )


def predictions_frame(files: list[str], labels: list[int], probs: np.ndarray,
                      classes: list[str]) -> pd.DataFrame:
    preds = probs.argmax(1)
    frame = pd.DataFrame(dict(file=files, true=[classes[i] for i in labels],
                              predicted=[classes[i] for i in preds], confidence=probs.max(1)))
    for i, name in enumerate(classes):
        frame[f"p_{name}"] = probs[:, i]
    return frame


def evaluate_run(run: Run, split: str = "test", device: str = "auto", progress: Progress | None = None,
                 root: str | Path | None = None, store_as: str | None = None, data: dict | None = None) -> dict:
    """Evaluate the run's best checkpoint on one of its stored splits; writes
    `{split}_metrics.json` and `{split}_predictions.csv` into the run folder. `progress(done,
    total, message)`: reading the images, then predicting them. `root` reads the split's files
    from another folder with the same layout (a stored version holding the pinned files);
    `store_as` names the files instead of `split` (an evaluation on changed files kept apart);
    `data` is recorded in the metrics (what was scored)."""
    cfg = run.config
    splits = run.read_json("splits.json", {})
    items = [folders.Item(p, label) for p, label in splits.get(split, [])]
    if not items:
        raise ValueError(f"The run's {split} split is empty.")
    root = str(root or splits["root"])
    dev = pick_device(device)
    model = load_run_model(run, dev)
    images, failures = imaging.decode_images(root, items, cfg.image_size,
                                             progress=part(progress, 0.0, 0.5, "Reading images"))
    keep = [i for i, img in enumerate(images) if img is not None]
    if not keep:
        raise DataError(f"None of the {len(items)} {split} images can be read any more: was the "
                         f"data set at {root} moved or deleted?")
    mean, std = run_normalization(run, model)
    transform = transforms.build_transform(cfg.image_size, mean, std)
    probs = predict_probs(model, [images[i] for i in keep], transform, dev,
                          progress=part(progress, 0.5, 1.0, "Predicting images"), flip=cfg.tta == "hflip")
    return save_evaluation(run, store_as or split, [items[i].path for i in keep],
                           [items[i].label for i in keep], probs, failures, data=dict(data or {}, root=root))


def save_evaluation(run: Run, split: str, files, labels, probs, failures=(), data: dict | None = None) -> dict:
    metrics = summarize(probs, labels, run.classes)
    metrics["skipped"] = list(failures)
    if data is not None:
        metrics["data"] = data
    metrics["checkpoint_mtime"] = run.checkpoint.stat().st_mtime if run.checkpoint.exists() else None
    run.write_json(f"{split}_metrics.json", metrics)
    predictions_frame(files, labels, probs, run.classes).to_csv(
        run.file(f"{split}_predictions.csv"), index=False)
    return metrics


# ---------------------------------------------------------------- views over stored predictions

def load_predictions(run: Run, split: str = "test") -> pd.DataFrame | None:
    """The stored per-image predictions of a split (computed once per run), or None."""
    path = run.file(f"{split}_predictions.csv")
    if not path.exists():
        return None
    # class names such as "0" or "NA" must stay text
    return pd.read_csv(path, dtype={"file": str, "true": str, "predicted": str}, keep_default_na=False)


def class_probs(frame: pd.DataFrame) -> list[str]:
    return [c for c in frame.columns if c.startswith("p_")]


def rank_class(frame: pd.DataFrame, cls: str, n: int = 10) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Among the images of `cls`, the n the model is most and least sure belong to it
    (by the softmax probability of `cls`)."""
    own = frame[frame["true"] == cls].sort_values(f"p_{cls}", ascending=False)
    return own.head(n), own.tail(n).iloc[::-1]


def misclassified(frame: pd.DataFrame, k: int = 3) -> pd.DataFrame:
    """Wrong predictions, most confident first, with the top-k classes and probabilities."""
    wrong = frame[frame["true"] != frame["predicted"]].copy()
    cols = class_probs(frame)
    probs = wrong[cols].to_numpy()
    order = np.argsort(-probs, axis=1)[:, :k]
    wrong["top"] = [[(cols[j][2:], float(row[j])) for j in idx] for row, idx in zip(probs, order)]
    return wrong.sort_values("confidence", ascending=False)


def cell(frame: pd.DataFrame, true: str, predicted: str) -> pd.DataFrame:
    """Images in one confusion-matrix cell, most confident first."""
    hit = frame[(frame["true"] == true) & (frame["predicted"] == predicted)]
    return hit.sort_values("confidence", ascending=False)


# ---------------------------------------------------------------- what the Evaluate page shows

def is_stale(metrics: dict | None, checkpoint: Path) -> bool:
    """Whether stored metrics must be computed again: there are none, they predate mAP, or they
    were computed from another checkpoint than the one the run holds now (a resumed or re-trained
    run's best epoch moved on)."""
    if metrics is None or "mAP" not in metrics:
        return True
    mtime = checkpoint.stat().st_mtime if checkpoint.exists() else None
    return metrics.get("checkpoint_mtime") != mtime


def stored_evaluation(run: Run, split: str) -> tuple[pd.DataFrame, dict] | None:
    """The split's stored predictions and metrics, or None when evaluate_run must (re)compute them."""
    frame, metrics = load_predictions(run, split), run.read_json(f"{split}_metrics.json")
    if frame is None or is_stale(metrics, run.checkpoint):
        return None
    return frame, metrics


def images_root(run: Run) -> Path:
    """The folder the run's split files are relative to (where the Evaluate page finds images)."""
    return Path(run.read_json("splits.json", {}).get("root", "."))


def confusion_frame(metrics: dict) -> pd.DataFrame:
    """The confusion matrix in long form, one row per (true, predicted) cell: its count, and its
    share of the true class's images (a class without images shares 0)."""
    classes = metrics["classes"]
    long = pd.DataFrame(metrics["confusion"], index=classes, columns=classes).rename_axis("true") \
        .reset_index().melt("true", var_name="predicted", value_name="count")
    long["share"] = long["count"] / long.groupby("true")["count"].transform("sum").clip(lower=1)
    return long
