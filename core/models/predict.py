"""Predict classes of new images with a trained run, an exported model, or a pretrained
backbone with its original ImageNet head."""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd
import timm
import torch
from PIL import Image
from torchvision.transforms import v2

from core.progress import batched_forward
from core.data import images as imaging
from core.data import transforms
from core.models.backbones import create_backbone, weight_sources
from core.models.backbones import load_run_model, run_normalization
from core.models.export import load_exported
from core.serve.store import Run


@dataclass
class Predictor:
    model: torch.nn.Module
    classes: list[str]
    image_size: int
    mean: tuple
    std: tuple

    @property
    def transform(self):
        return transforms.build_transform(self.image_size, self.mean, self.std)

    def probs(self, images: list[Image.Image], batch_size: int = 32) -> np.ndarray:
        """Softmax probabilities for PIL images (any mode, any size)."""
        tf = self.transform

        def prepare(chunk):
            return torch.stack([tf(v2.functional.pil_to_tensor(imaging.to_rgb(img))) for img in chunk])
        logits = batched_forward(self.model, images, batch_size, prepare=prepare)
        return logits.softmax(-1).numpy() if len(logits) else np.zeros((0, len(self.classes)))

    def top_k(self, probs: np.ndarray, k: int = 5) -> list[tuple[str, float]]:
        order = np.argsort(-probs)[:k]
        return [(self.classes[i], float(probs[i])) for i in order]


def from_run(run: Run) -> Predictor:
    model = load_run_model(run)
    mean, std = run_normalization(run, model)
    return Predictor(model, run.classes, run.config.image_size, tuple(mean), tuple(std))


def from_export(weights: str | Path, meta_json: str | Path | dict) -> Predictor:
    meta = meta_json if isinstance(meta_json, dict) else json.loads(Path(meta_json).read_text())
    problem = export_meta_problem(meta)
    if problem:
        raise ValueError(f"model.json can't be used: {problem}")
    model = load_exported(weights, meta)
    return Predictor(model, meta["classes"], meta["image_size"], tuple(meta["mean"]), tuple(meta["std"]))


def export_meta_problem(meta) -> str:
    """One sentence on what is wrong with an exported model.json ("" when nothing): checked
    before anything is allocated, since an image_size of 100000 would ask for gigabytes."""
    from core.config import RANGES
    if not isinstance(meta, dict):
        return "it is not a JSON object."
    classes = meta.get("classes")
    if not isinstance(classes, list) or not classes or not all(isinstance(c, str) for c in classes):
        return "\"classes\" must be a non-empty list of class names."
    low, high = RANGES["image_size"]
    size = meta.get("image_size")
    if not isinstance(size, int) or isinstance(size, bool) or not low <= size <= high:
        return f"\"image_size\" is {size!r}; it must be a whole number from {low} to {high}."
    for key, positive in (("mean", False), ("std", True)):
        values = meta.get(key)
        ok = (isinstance(values, list) and len(values) == 3
              and all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
                      and (v > 0 or not positive) for v in values))
        if not ok:
            return f"\"{key}\" must be three finite numbers{' above 0' if positive else ''}, not {values!r}."
    return ""


def imagenet(arch: str, weights: str = "auto") -> Predictor:
    """A pretrained backbone with its 1000-class head; class names from timm's ImageNet info."""
    model = create_backbone(arch, weights, num_classes=1000).eval()
    cfg = timm.data.resolve_model_data_config(model)
    info = timm.data.ImageNetInfo()
    names = [info.index_to_description(i) for i in range(1000)]
    return Predictor(model, names, int(cfg["input_size"][-1]), cfg["mean"], cfg["std"])


def predict_files(predictor: Predictor, files: list[str | Path], batch_size: int = 32,
                  progress: Callable[[int, int], None] | None = None) -> pd.DataFrame:
    """One row per file: predicted class, confidence and every class's probability;
    unreadable files get an `error` instead."""
    rows = []
    for start in range(0, len(files), batch_size):
        chunk, images = [], []
        for f in files[start:start + batch_size]:
            try:
                images.append(imaging.open_rgb(f, predictor.image_size))
                chunk.append(f)
            except Exception as err:  # noqa: BLE001 - report and go on
                rows.append(dict(file=str(f), error=f"{type(err).__name__}: {err}"[:160]))
        for f, p in zip(chunk, predictor.probs(images)):
            row = dict(file=str(f), predicted=predictor.classes[int(p.argmax())], confidence=float(p.max()))
            row.update({f"p_{c}": float(v) for c, v in zip(predictor.classes, p)})
            rows.append(row)
        if progress:
            progress(min(start + batch_size, len(files)), len(files), "Predicting images")
    return pd.DataFrame(rows)


IMAGENET_SOURCES = ("bundled", "hub-cache", "hub")    # weights that come with the ImageNet head


def imagenet_available(arch: str) -> bool:
    """Whether `arch` has pretrained ImageNet weights to load now (bundled, cached or reachable):
    an uploaded file or a random init has no ImageNet head to predict with."""
    return any(s.available and s.kind in IMAGENET_SOURCES for s in weight_sources(arch))


def predict_folder(predictor: Predictor, folder: str | Path, files: list[Path],
                   progress: Callable[[int, int], None] | None = None) -> pd.DataFrame:
    """predict_files on `files` below `folder`, each named by its path relative to `folder`."""
    frame = predict_files(predictor, files, progress=progress)
    if "file" in frame:
        frame["file"] = [str(Path(f).relative_to(folder)) for f in frame["file"]]
    return frame
