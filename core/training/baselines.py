"""Baselines without a pretrained network (report 002): logistic regression on raw pixels.

(The other baseline, a small CNN from scratch, is a normal run: a small timm architecture with
random weights, e.g. `RunConfig(arch="resnet10t", freeze="scratch")`.)
"""
from __future__ import annotations

import time

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from core.config import RunConfig
from core.results.evaluate import save_evaluation
from core.serve.store import Run

PIXELS = 32     # images are shrunk to 32x32 before flattening


def _flatten(images: list[torch.Tensor]) -> np.ndarray:
    small = [torch.nn.functional.interpolate(img[None].float(), size=(PIXELS, PIXELS), mode="area")[0]
             for img in images]
    return torch.stack(small).reshape(len(images), -1).numpy() / 255.0 if small else np.zeros((0, 3 * PIXELS**2))


def train_logreg(run: Run, cfg: RunConfig, classes: list[str], data: dict) -> dict:
    """Fit on train, score val and test; writes the same files as a network run (one 'epoch')."""
    start = time.perf_counter()
    run.set_status("running", message="Fitting logistic regression on raw pixels", phase="train",
                   epoch=1, epochs=1)
    x_train, y_train = _flatten(data["train"][0]), np.asarray(data["train"][1])
    model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=500, C=0.1))
    model.fit(x_train, y_train)
    full = np.zeros((0, len(classes)))

    def probs(split):
        if not data[split][1]:
            return full
        out = np.zeros((len(data[split][1]), len(classes)))
        out[:, model.classes_] = model.predict_proba(_flatten(data[split][0]))
        return out

    p_val = probs("val")
    val_acc = float((p_val.argmax(1) == np.asarray(data["val"][1])).mean()) if len(p_val) else float("nan")
    train_acc = float(model.score(x_train, y_train))
    run.append_epoch(dict(epoch=1, phase="train", lr=0.0, train_loss=float("nan"), train_acc=train_acc,
                          val_loss=float("nan"), val_acc=val_acc, seconds=time.perf_counter() - start,
                          best=True))
    run.set_status("running", best_epoch=1, best_val_acc=val_acc)
    if data["test"][1]:
        metrics = save_evaluation(run, "test", data["test"][2], data["test"][1], probs("test"))
        run.set_status("finished", message="Finished (logistic regression)", test_acc=metrics["accuracy"],
                       phase="done")
    else:
        run.set_status("finished", message="Finished (no test images)", phase="done")
    return run.status()
