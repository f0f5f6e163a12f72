"""One training step, one epoch, optimizers and schedulers, and the batches they draw."""
from __future__ import annotations

import itertools
import math
import os
import random
import threading
import time

import numpy as np
import timm.optim
import torch
from torch import nn

from core import rng
from core.config import RunConfig
from core.data import transforms
from core.device import autocast
from core.hooks import eval_mode
from core.models.backbones import feature_dim
from core.models import prefix
from core.progress import Cancelled
from core.serve.store import Run
from core.training import distributed as dist


class Stopped(Cancelled):
    """Raised inside the loop when the user pressed Stop; a Cancelled, so code that stops any
    job catches it too, while `except Stopped` still means the training loop's own Stop."""


class Diverged(Exception):
    """The loss became NaN or infinite."""


class Reporter:
    """Writes progress into status.json at most every `every` seconds."""

    def __init__(self, run: Run, stop: threading.Event | None, every: float = 0.5):
        self.run, self.stop, self.every, self._last = run, stop, every, 0.0

    def check(self) -> None:
        """Raise Stopped if the user pressed Stop (also called between a step's forward and
        backward passes, so a stop never waits for a whole batch)."""
        if self.stop is not None and self.stop.is_set():
            raise Stopped()

    def __call__(self, state="running", force=False, **info):
        self.check()
        now = time.monotonic()
        if force or now - self._last >= self.every:
            self._last = now
            self.run.set_status(state, **info)


def seed_everything(seed: int) -> torch.Generator:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def loader(images, labels, transform, batch_size, order, device: torch.device | None = None):
    """Batches of this rank's `order`: a list of indices or a sampler (core.training.distributed).
    On CUDA, worker processes run the augmentations and hand over pinned memory; on CPU they would
    only compete with the training threads for the same cores."""
    dataset = transforms.TensorDataset(images, labels, transform)
    cuda = device is not None and device.type == "cuda"
    workers = min(4, (os.cpu_count() or 1) // dist.world()) if cuda else 0
    return torch.utils.data.DataLoader(dataset, batch_size=batch_size, sampler=order, num_workers=workers,
                                       persistent_workers=workers > 0, pin_memory=cuda, drop_last=False)


@torch.inference_mode()
def extract_features(backbone: nn.Module, images, transform, device, batch_size, report, label,
                     precision: str | None = None):
    """Pooled features of every image, kept on `device` for the head to train on (no_grad, not
    inference_mode: the head's backward saves its inputs)."""
    feats = []
    with eval_mode(backbone), torch.no_grad():
        for start in range(0, len(images), batch_size):
            batch = torch.stack([transform(img) for img in images[start:start + batch_size]])
            with autocast(device, precision):
                feats.append(backbone(batch.to(device, memory_format=torch.channels_last)).float())
            report("preparing", message=f"Computing backbone features ({label})", phase="features",
                   step=min(start + batch_size, len(images)), steps=len(images))
    return torch.cat(feats) if feats else torch.zeros(0, feature_dim(backbone), device=device)


def make_optimizer(cfg: RunConfig, model: nn.Module, head_only: bool, lr: float | None = None,
                   backbone_lr_mult: float | None = None):
    """The head learns at `lr` (the config's unless a planned phase sets its own); a training
    backbone at `lr x backbone_lr_mult`. Frozen parameters are left out."""
    lr = cfg.lr if lr is None else lr
    mult = cfg.backbone_lr_mult if backbone_lr_mult is None else backbone_lr_mult
    groups = [{"params": [p for p in model.head.parameters() if p.requires_grad], "lr": lr}]
    backbone = [p for p in model.backbone.parameters() if p.requires_grad] if not head_only else []
    if backbone:
        groups.append({"params": backbone, "lr": lr * mult})
    kwargs = dict(momentum=cfg.momentum) if cfg.optimizer in ("sgd", "rmsprop") else {}
    params = [p for g in groups for p in g["params"]]
    if cfg.optimizer in ("adam", "adamw") and params and params[0].device.type in ("cpu", "cuda"):
        kwargs["fused"] = True       # one kernel for all tensors: ~6x faster steps on a CPU
    return timm.optim.create_optimizer_v2(groups, opt=cfg.optimizer, lr=lr,
                                          weight_decay=cfg.weight_decay, **kwargs)


def make_scheduler(cfg: RunConfig, optimizer, epochs: int, done: int = 0):
    """Stepped once per epoch; `done` epochs of it already passed (a schedule re-made shorter)."""
    scheduler = _scheduler(cfg, optimizer, epochs)
    for _ in range(done if scheduler else 0):
        scheduler.step()
    return scheduler


def _scheduler(cfg: RunConfig, optimizer, epochs: int):
    if cfg.scheduler == "step":
        return torch.optim.lr_scheduler.StepLR(optimizer, cfg.step_size, cfg.gamma)
    if cfg.scheduler == "cosine":
        warm = max(0, min(cfg.warmup_epochs, epochs - 1))

        def factor(e):     # linear warm-up, then cosine decay to zero
            if e < warm:
                return (e + 1) / (warm + 1)
            return 0.5 * (1 + math.cos(math.pi * (e - warm) / max(1, epochs - warm)))
        return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    if cfg.scheduler == "onecycle":
        return torch.optim.lr_scheduler.OneCycleLR(
            optimizer, max_lr=[g["lr"] for g in optimizer.param_groups], total_steps=max(2, epochs + 1))
    return None


def run_epoch(model, batches, criterion, optimizer, scaler, device, report, epoch, total_epochs,
              n_batches, precision: str | None = None, stream: rng.Stream | None = None):
    """One pass over `batches`; trains when `optimizer` is given. Returns (mean loss, accuracy).
    Each step (its augmentations and dropout) draws from the run's own random `stream`."""
    training = optimizer is not None
    total_loss, correct, seen = 0.0, 0, 0
    with rng.active(stream):       # a DataLoader draws its workers' seed as iteration starts
        batches = iter(batches)
    started = time.perf_counter()
    with torch.set_grad_enabled(training):
        for step in itertools.count(1):
            with rng.active(stream):
                batch = next(batches, None)
                if batch is None:
                    break
                loss, hits, n = train_step(model, batch, criterion, optimizer, scaler, device, precision,
                                           getattr(report, "check", None))
            total_loss, correct, seen = total_loss + loss * n, correct + hits, seen + n
            report(**step_progress(training, epoch, total_epochs, step, n_batches, seen,
                                   time.perf_counter() - started, total_loss / seen, correct / seen))
    total_loss, correct, seen = dist.sum_all(total_loss, correct, seen)
    return (total_loss / seen, correct / seen) if seen else (float("nan"), float("nan"))


def step_progress(training: bool, epoch: int, epochs: int, step: int, steps: int, seen: int,
                  elapsed: float, loss: float, acc: float) -> dict:
    """The status of a step as people read it: batch x/y, images per second, time left in this
    pass, running loss and accuracy (status.json keeps the numbers too)."""
    speed = seen / max(elapsed, 1e-9)
    left = elapsed / step * max(steps - step, 0) if steps else 0.0
    what = "train" if training else "val"
    message = (f"Epoch {epoch}/{epochs} · {what} batch {step}/{steps} · {speed:,.0f} img/s · "
               f"{clock(left)} left · loss {loss:.3f} · acc {acc:.0%}")
    return dict(message=message, phase=what, epoch=epoch, epochs=epochs, step=step, steps=steps,
                images_per_s=round(speed, 1), seconds_left=round(left, 1), running_loss=loss, running_acc=acc)


def clock(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 60}:{seconds % 60:02d}" if seconds >= 60 else f"{seconds} s"


def train_step(model, batch, criterion, optimizer, scaler, device, precision,
               check=None) -> tuple[float, int, int]:
    """One batch forward (and backward, with an optimizer): (mean loss, correct, images).
    `check()` runs between the passes and may raise to stop."""
    x, y = batch
    x = x.to(device, non_blocking=True)
    if x.dim() == 4:
        x = x.contiguous(memory_format=torch.channels_last)
    y = torch.as_tensor(y, device=device)
    with autocast(device, precision):
        logits = model(x)
        loss = criterion(logits.float(), y)
    if not torch.isfinite(loss):
        raise Diverged()
    if check is not None:
        check()
    if optimizer is not None:
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
    return loss.item(), (logits.argmax(1) == y).sum().item(), len(y)


def feature_batches(features, labels, batch_size, order, rows=None):
    """Batches of cached tensors (a tensor or a core.models.prefix.Store) in `order`; `rows[i]` is the
    cached row of image i when there are several views per image."""
    order = torch.as_tensor(order, dtype=torch.long)
    labels = torch.as_tensor(labels)
    rows = order if rows is None else torch.as_tensor(rows, dtype=torch.long)[order]
    for start in range(0, len(order), batch_size):
        idx, row = order[start:start + batch_size], rows[start:start + batch_size]
        if isinstance(features, prefix.Store):
            yield features.get(row.numpy()), labels[idx]
        else:
            yield features[row.to(features.device)], labels[idx]
