"""The training loop. It knows nothing of any UI: it reports through the run folder
(status.json, epochs.jsonl) and stops when its `stop` event is set."""
from __future__ import annotations

import math
import random
import threading
import time

import numpy as np
import safetensors.torch
import timm.optim
import torch
from torch import nn

from core import data as D
from core.backbones import apply_freeze, build_model, freeze_norm_stats, native_input_size
from core.device import autocast, describe, grad_scaler, pick_device, set_cpu_threads
from core.evaluate import data_config, predict_probs, save_evaluation
from core.paths import REPO_ROOT
from core.runs import Run, RunConfig


class Stopped(Exception):
    """Raised inside the loop when the user pressed Stop."""


class Diverged(Exception):
    """The loss became NaN or infinite."""


class Reporter:
    """Writes progress into status.json at most every `every` seconds."""

    def __init__(self, run: Run, stop: threading.Event | None, every: float = 0.5):
        self.run, self.stop, self.every, self._last = run, stop, every, 0.0

    def __call__(self, state="running", force=False, **info):
        if self.stop is not None and self.stop.is_set():
            raise Stopped()
        now = time.monotonic()
        if force or now - self._last >= self.every:
            self._last = now
            self.run.set_status(state, **info)


def seed_everything(seed: int) -> torch.Generator:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def uses_feature_cache(cfg: RunConfig) -> bool:
    return cfg.freeze == "head" and cfg.cache_features and not any(cfg.augment.values())


def resolve_data_root(root: str) -> str:
    """Configs may store the demo set relative to the repo, so presets travel between machines."""
    return str(REPO_ROOT / root) if root.startswith("assets/") else root


def prepare_data(run: Run, cfg: RunConfig, report: Reporter):
    """Scan, split, decode once. Returns (classes, {split: (images, labels, files)})."""
    report("preparing", force=True, message="Scanning the data set", phase="scan")
    scan = D.scan_folder(resolve_data_root(cfg.data_root), check=False)
    splits = D.split_items(scan, cfg.split, cfg.split_seed, cfg.max_per_class)
    if not splits["train"]:
        raise D.DataError("The training split is empty.")
    run.write_json("classes.json", scan.classes)
    run.write_json("splits.json", dict(root=scan.root, **{s: [(it.path, it.label) for it in items]
                                                          for s, items in splits.items()}))
    out, skipped = {}, []
    for name, items in splits.items():
        def progress(done, total, name=name):
            report("preparing", message=f"Decoding {name} images", phase="decode",
                   step=done, steps=total)
        images, failures = D.decode_images(scan.root, items, cfg.image_size, progress=progress)
        skipped += failures
        keep = [i for i, img in enumerate(images) if img is not None]
        out[name] = ([images[i] for i in keep], [items[i].label for i in keep],
                     [items[i].path for i in keep])
    run.write_json("skipped.json", skipped)
    return scan.classes, out


def loader(images, labels, transform, batch_size, shuffle, generator):
    dataset = D.TensorDataset(images, labels, transform)
    return torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=shuffle,
                                       generator=generator, num_workers=0, drop_last=False)


@torch.inference_mode()
def extract_features(backbone: nn.Module, images, transform, device, batch_size, report, label):
    backbone.eval()
    feats = []
    for start in range(0, len(images), batch_size):
        batch = torch.stack([transform(img) for img in images[start:start + batch_size]])
        with autocast(device):
            feats.append(backbone(batch.to(device, memory_format=torch.channels_last)).float())
        report("preparing", message=f"Computing backbone features ({label})", phase="features",
               step=min(start + batch_size, len(images)), steps=len(images))
    return torch.cat(feats) if feats else torch.zeros(0, backbone.num_features, device=device)


def make_optimizer(cfg: RunConfig, module: nn.Module):
    kwargs = dict(momentum=cfg.momentum) if cfg.optimizer in ("sgd", "rmsprop") else {}
    return timm.optim.create_optimizer_v2(module, opt=cfg.optimizer, lr=cfg.lr,
                                          weight_decay=cfg.weight_decay, **kwargs)


def make_scheduler(cfg: RunConfig, optimizer):
    if cfg.scheduler == "step":
        return torch.optim.lr_scheduler.StepLR(optimizer, cfg.step_size, cfg.gamma)
    if cfg.scheduler == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, max(1, cfg.epochs))
    return None


def run_epoch(model, batches, criterion, optimizer, scaler, device, report, epoch, total_epochs,
              n_batches):
    """One pass over `batches`; trains when `optimizer` is given. Returns (mean loss, accuracy)."""
    training = optimizer is not None
    total_loss, correct, seen = 0.0, 0, 0
    with torch.set_grad_enabled(training):
        for step, (x, y) in enumerate(batches, 1):
            x = x.to(device, non_blocking=True)
            if x.dim() == 4:
                x = x.contiguous(memory_format=torch.channels_last)
            y = torch.as_tensor(y, device=device)
            with autocast(device):
                logits = model(x)
                loss = criterion(logits.float(), y)
            if not torch.isfinite(loss):
                raise Diverged()
            if training:
                optimizer.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                scaler.step(optimizer)
                scaler.update()
            total_loss += loss.item() * len(y)
            correct += (logits.argmax(1) == y).sum().item()
            seen += len(y)
            report(message=f"Epoch {epoch}/{total_epochs} · {'train' if training else 'val'}",
                   phase="train" if training else "val", epoch=epoch, epochs=total_epochs,
                   step=step, steps=n_batches)
    return (total_loss / seen, correct / seen) if seen else (float("nan"), float("nan"))


def save_checkpoint(model: nn.Module, run: Run) -> None:
    """Atomic: a crash mid-write leaves the previous best intact."""
    tmp = run.file(".best.safetensors.tmp")
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    safetensors.torch.save_file(state, str(tmp))
    tmp.replace(run.checkpoint)


def feature_batches(features, labels, batch_size, generator):
    order = torch.randperm(len(labels), generator=generator)
    labels = torch.as_tensor(labels)
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        yield features[idx.to(features.device)], labels[idx]


def train_run(run: Run, stop: threading.Event | None = None) -> dict:
    """Train `run` as its config says; the final status is finished, stopped or failed."""
    cfg = run.config
    report = Reporter(run, stop)
    try:
        native = native_input_size(cfg.arch)
        if native and native != cfg.image_size:       # e.g. ViT: position embeddings fix the size
            cfg.image_size = native
            run.write_json("config.json", cfg.to_dict())
        return _train(run, cfg, report)
    except Stopped:
        run.set_status("stopped", message="Stopped by the user. The best checkpoint so far is kept.")
    except Diverged:
        run.set_status("failed", message="The loss became NaN/infinite: the learning rate is "
                       "probably too high. The best checkpoint so far is kept.")
    except torch.OutOfMemoryError:
        run.set_status("failed", message="Out of memory: try a smaller batch size or image size.")
    except (D.DataError, ValueError) as err:
        run.set_status("failed", message=str(err))
    except Exception as err:  # noqa: BLE001 - record every failure instead of a stale 'running'
        run.set_status("failed", message=f"Unexpected error: {type(err).__name__}: {err}")
    return run.status()


def _train(run: Run, cfg: RunConfig, report: Reporter) -> dict:
    generator = seed_everything(cfg.seed)
    device = pick_device(cfg.device)
    if device.type == "cpu":
        set_cpu_threads()
    classes, data = prepare_data(run, cfg, report)
    report("preparing", force=True, message="Building the model", phase="model")
    weights = "random" if cfg.freeze == "scratch" else cfg.weights
    model = build_model(cfg.arch, len(classes), weights, cfg.weights_file, cfg.head, cfg.hidden,
                        cfg.dropout)
    apply_freeze(model, cfg.freeze, cfg.top_k)
    model.to(device, memory_format=torch.channels_last)
    dc = data_config(model, cfg.image_size)
    eval_tf = D.build_transform(cfg.image_size, dc["mean"], dc["std"])
    train_tf = D.build_transform(cfg.image_size, dc["mean"], dc["std"], cfg.augment)
    cached = uses_feature_cache(cfg)
    run.set_status("preparing", device=describe(device), feature_cache=cached)

    if cached:
        feats = {s: extract_features(model.backbone, data[s][0], eval_tf, device, 64, report, s)
                 for s in ("train", "val", "test")}
        trainable = model.head
        train_batches = lambda: feature_batches(feats["train"], data["train"][1], cfg.batch_size, generator)  # noqa: E731
        val_batches = lambda: feature_batches(feats["val"], data["val"][1], 256, None)  # noqa: E731
        step_model = model.head
    else:
        trainable = model
        train_dl = loader(*data["train"][:2], train_tf, cfg.batch_size, True, generator)
        val_dl = loader(*data["val"][:2], eval_tf, cfg.batch_size, False, None)
        train_batches, val_batches, step_model = (lambda: train_dl), (lambda: val_dl), model

    optimizer = make_optimizer(cfg, trainable)
    scheduler = make_scheduler(cfg, optimizer)
    scaler = grad_scaler(device)
    criterion = nn.CrossEntropyLoss()
    n_train = math.ceil(len(data["train"][1]) / cfg.batch_size)
    n_val = math.ceil(len(data["val"][1]) / (256 if cached else cfg.batch_size))
    best = -math.inf
    for epoch in range(1, cfg.epochs + 1):
        start = time.perf_counter()
        lr = optimizer.param_groups[0]["lr"]
        step_model.train()
        if not cached:
            freeze_norm_stats(model)
        train_loss, train_acc = run_epoch(step_model, train_batches(), criterion, optimizer, scaler,
                                          device, report, epoch, cfg.epochs, n_train)
        step_model.eval()
        val_loss, val_acc = run_epoch(step_model, val_batches(), criterion, None, scaler, device,
                                      report, epoch, cfg.epochs, n_val)
        if scheduler:
            scheduler.step()
        score = val_acc if data["val"][1] else -train_loss
        improved = score > best
        if improved:
            best = score
            save_checkpoint(model, run)
        row = dict(epoch=epoch, lr=lr, train_loss=train_loss, train_acc=train_acc,
                   val_loss=val_loss, val_acc=val_acc, seconds=time.perf_counter() - start,
                   best=improved)
        run.append_epoch(row)
        if improved:
            run.set_status("running", best_epoch=epoch, best_val_acc=val_acc)
        report(force=True, message=f"Epoch {epoch}/{cfg.epochs} done", epoch=epoch,
               epochs=cfg.epochs, phase="train", step=n_train, steps=n_train)

    report("running", force=True, message="Testing the best checkpoint", phase="test")
    model.load_state_dict(safetensors.torch.load_file(str(run.checkpoint), device=str(device)))
    images, labels, files = data["test"]
    if labels:
        if cached:     # the backbone is unchanged: its test features are already computed
            with torch.inference_mode():
                probs = model.head.eval()(feats["test"]).float().softmax(-1).cpu().numpy()
        else:
            probs = predict_probs(model, images, eval_tf, device)
        metrics = save_evaluation(run, "test", files, labels, probs)
        run.set_status("finished", message="Finished", test_acc=metrics["accuracy"], phase="done")
    else:
        run.set_status("finished", message="Finished (no test images)", phase="done")
    return run.status()
