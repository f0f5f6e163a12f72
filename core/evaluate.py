"""Predictions and metrics for a trained run."""
from __future__ import annotations

import numpy as np
import pandas as pd
import safetensors.torch
import timm
import torch
from sklearn.metrics import accuracy_score, confusion_matrix

from core import data as D
from core.backbones import FineTuneModel, build_model
from core.device import autocast, pick_device
from core.runs import Run


def load_run_model(run: Run, device: torch.device | str = "cpu") -> FineTuneModel:
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


@torch.inference_mode()
def predict_probs(model: torch.nn.Module, images: list[torch.Tensor], transform,
                  device: torch.device, batch_size: int = 64) -> np.ndarray:
    """Softmax probabilities for pre-decoded uint8 images."""
    was_training = model.training
    model.eval()
    out = []
    try:
        for start in range(0, len(images), batch_size):
            batch = torch.stack([transform(img) for img in images[start:start + batch_size]])
            batch = batch.to(device, memory_format=torch.channels_last)
            with autocast(device):
                out.append(model(batch).float().softmax(-1).cpu())
    finally:
        model.train(was_training)
    return torch.cat(out).numpy() if out else np.zeros((0, 0))


def summarize(probs: np.ndarray, labels: list[int], classes: list[str]) -> dict:
    """Accuracy and confusion matrix (rows: true class, columns: predicted)."""
    preds = probs.argmax(1) if len(probs) else np.array([], dtype=int)
    return dict(
        accuracy=float(accuracy_score(labels, preds)) if len(labels) else float("nan"),
        n=len(labels),
        classes=classes,
        confusion=confusion_matrix(labels, preds, labels=list(range(len(classes)))).tolist(),
    )


def predictions_frame(files: list[str], labels: list[int], probs: np.ndarray,
                      classes: list[str]) -> pd.DataFrame:
    preds = probs.argmax(1)
    frame = pd.DataFrame(dict(file=files, true=[classes[i] for i in labels],
                              predicted=[classes[i] for i in preds], confidence=probs.max(1)))
    for i, name in enumerate(classes):
        frame[f"p_{name}"] = probs[:, i]
    return frame


def evaluate_run(run: Run, split: str = "test", device: str = "auto", progress=None) -> dict:
    """Evaluate the run's best checkpoint on one of its stored splits; writes
    `{split}_metrics.json` and `{split}_predictions.csv` into the run folder."""
    cfg = run.config
    splits = run.read_json("splits.json", {})
    items = [D.Item(p, label) for p, label in splits.get(split, [])]
    if not items:
        raise ValueError(f"The run's {split} split is empty.")
    dev = pick_device(device)
    model = load_run_model(run, dev)
    images, failures = D.decode_images(splits["root"], items, cfg.image_size, progress=progress)
    keep = [i for i, img in enumerate(images) if img is not None]
    dc = data_config(model, cfg.image_size)
    transform = D.build_transform(cfg.image_size, dc["mean"], dc["std"])
    probs = predict_probs(model, [images[i] for i in keep], transform, dev)
    return save_evaluation(run, split, [items[i].path for i in keep],
                           [items[i].label for i in keep], probs, failures)


def save_evaluation(run: Run, split: str, files, labels, probs, failures=()) -> dict:
    metrics = summarize(probs, labels, run.classes)
    metrics["skipped"] = list(failures)
    run.write_json(f"{split}_metrics.json", metrics)
    predictions_frame(files, labels, probs, run.classes).to_csv(
        run.file(f"{split}_predictions.csv"), index=False)
    return metrics
