"""The training loop. It knows nothing of any UI: it reports through the run folder
(status.json, epochs.jsonl) and stops when its `stop` event is set."""
from __future__ import annotations

import math
import os
import random
import threading
import time
from collections import OrderedDict

import numpy as np
import safetensors.torch
import timm.optim
import torch
from torch import nn

from core import data as D
from core import distributed as dist
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
        images, failures = decode_cached(scan.root, items, cfg.image_size, progress)
        skipped += failures
        keep = [i for i, img in enumerate(images) if img is not None]
        out[name] = ([images[i] for i in keep], [items[i].label for i in keep],
                     [items[i].path for i in keep])
    run.write_json("skipped.json", skipped)
    return scan.classes, out


# In-process caches shared by the runs of a sweep: decoded images per (folder, size), and
# frozen-backbone features per (backbone, weights, size, normalisation, images). Both are exact:
# a key differs whenever anything that changes the values differs.
_DECODED: "OrderedDict[tuple, dict]" = OrderedDict()
_FEATURES: "OrderedDict[tuple, dict]" = OrderedDict()
_CACHE_LOCK = threading.Lock()


def _remember(cache: OrderedDict, key, value, keep: int) -> None:
    with _CACHE_LOCK:
        cache[key] = value
        cache.move_to_end(key)
        while len(cache) > keep:
            cache.popitem(last=False)


def decode_cached(root: str, items, size: int, progress):
    """decode_images, reusing images this process already decoded at this size."""
    key = (root, size)
    with _CACHE_LOCK:
        known = _DECODED.get(key, {})
    missing = [it for it in items if it.path not in known]
    fresh, failures = D.decode_images(root, missing, size, progress=progress) if missing else ([], [])
    known = dict(known)
    known.update({it.path: img for it, img in zip(missing, fresh)})
    _remember(_DECODED, key, known, keep=2)
    if progress:
        progress(len(items), len(items))
    failed = {path for path, _ in failures}
    return [known.get(it.path) if it.path not in failed else None for it in items], failures


def features_cached(cfg: RunConfig, model, data, eval_tf, device, report, mean, std) -> dict:
    key = (cfg.arch, cfg.weights, cfg.weights_file, cfg.image_size, tuple(mean), tuple(std), str(device),
           resolve_data_root(cfg.data_root), cfg.seed if cfg.weights == "random" else None,
           tuple(tuple(data[s][2]) for s in ("train", "val", "test")))
    with _CACHE_LOCK:
        hit = _FEATURES.get(key)
    if hit is not None:
        return hit
    feats = {s: extract_features(model.backbone, data[s][0], eval_tf, device, 64, report, s)
             for s in ("train", "val", "test")}
    _remember(_FEATURES, key, feats, keep=2)
    return feats


def loader(images, labels, transform, batch_size, order, device: torch.device | None = None):
    """Batches of this rank's `order`: a list of indices or a sampler (core.distributed).
    On CUDA, worker processes run the augmentations and hand over pinned memory; on CPU they would
    only compete with the training threads for the same cores."""
    dataset = D.TensorDataset(images, labels, transform)
    cuda = device is not None and device.type == "cuda"
    workers = min(4, (os.cpu_count() or 1) // dist.world()) if cuda else 0
    return torch.utils.data.DataLoader(dataset, batch_size=batch_size, sampler=order, num_workers=workers,
                                       persistent_workers=workers > 0, pin_memory=cuda, drop_last=False)


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


def make_optimizer(cfg: RunConfig, model: nn.Module, head_only: bool):
    """The head learns at `lr`; a training backbone at `lr x backbone_lr_mult`. Frozen
    parameters are left out."""
    groups = [{"params": [p for p in model.head.parameters() if p.requires_grad], "lr": cfg.lr}]
    backbone = [p for p in model.backbone.parameters() if p.requires_grad] if not head_only else []
    if backbone:
        groups.append({"params": backbone, "lr": cfg.lr * cfg.backbone_lr_mult})
    kwargs = dict(momentum=cfg.momentum) if cfg.optimizer in ("sgd", "rmsprop") else {}
    return timm.optim.create_optimizer_v2(groups, opt=cfg.optimizer, lr=cfg.lr,
                                          weight_decay=cfg.weight_decay, **kwargs)


def make_scheduler(cfg: RunConfig, optimizer, epochs: int):
    """Stepped once per epoch."""
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
    total_loss, correct, seen = dist.sum_all(total_loss, correct, seen)
    return (total_loss / seen, correct / seen) if seen else (float("nan"), float("nan"))


def save_checkpoint(model: nn.Module, run: Run, name: str = "best.safetensors") -> None:
    """Atomic: a crash mid-write leaves the previous file intact. Rank 0 of a distributed job
    writes; the others hold the same weights."""
    if not dist.is_main():
        return
    tmp = run.file(f".{name}.tmp")
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    safetensors.torch.save_file(state, str(tmp))
    tmp.replace(run.file(name))


def save_resume_state(run: Run, model, optimizer, scheduler, scaler, progress: dict) -> None:
    """End-of-epoch state (weights, optimiser, schedule, counters) to resume after a crash or a
    Stop. Loaded with weights_only=True: plain tensors and numbers only."""
    if not dist.is_main():
        return
    save_checkpoint(model, run, "last.safetensors")
    state = dict(progress, optimizer=optimizer.state_dict(), scaler=scaler.state_dict(),
                 scheduler=scheduler.state_dict() if scheduler else None)
    tmp = run.file(".last_state.pt.tmp")
    torch.save(state, tmp)
    tmp.replace(run.file("last_state.pt"))
    run.set_status("running", last_epoch=progress["epoch"])


def load_resume_state(run: Run) -> dict:
    return torch.load(run.file("last_state.pt"), map_location="cpu", weights_only=True)


def feature_batches(features, labels, batch_size, order):
    order = torch.as_tensor(order, dtype=torch.long)
    labels = torch.as_tensor(labels)
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        yield features[idx.to(features.device)], labels[idx]


def train_run(run: Run, stop: threading.Event | None = None, resume: bool = False) -> dict:
    """Train `run` as its config says (or go on from its last finished epoch when `resume`);
    the final status is finished, stopped or failed. In a distributed job only rank 0 writes."""
    if not dist.is_main():
        run = run.follower()
    cfg = run.config
    report = Reporter(run, stop)
    try:
        native = native_input_size(cfg.arch)
        if native and native != cfg.image_size:       # e.g. ViT: position embeddings fix the size
            cfg.image_size = native
            run.write_json("config.json", cfg.to_dict())
        return _train(run, cfg, report, load_resume_state(run) if resume else None)
    except Stopped:
        run.set_status("stopped", message="Stopped by the user. Finished epochs and the best "
                       "checkpoint are kept; Resume goes on from the last finished epoch.")
    except Diverged:
        run.set_status("failed", message="The loss became NaN/infinite: the learning rate is "
                       "probably too high. The best checkpoint so far is kept.")
    except (D.DataError, ValueError) as err:
        run.set_status("failed", message=str(err))
    except Exception as err:  # noqa: BLE001 - record every failure instead of a stale 'running'
        run.set_status("failed", message=failure_message(err, cfg))
    return run.status()


def failure_message(err: Exception, cfg: RunConfig) -> str:
    if is_out_of_memory(err):
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        return (f"Out of memory at batch size {cfg.batch_size} and {cfg.image_size} px: try a smaller "
                "batch size or image size. The best checkpoint so far is kept.")
    return f"Unexpected error: {type(err).__name__}: {err}"


def is_out_of_memory(err: Exception) -> bool:
    """CUDA raises OutOfMemoryError; the CPU allocator raises a RuntimeError that says so."""
    text = str(err).lower()
    return isinstance(err, (torch.OutOfMemoryError, MemoryError)) or (
        isinstance(err, RuntimeError) and ("out of memory" in text or "can't allocate memory" in text))


def plan_phases(cfg: RunConfig) -> list[tuple[str, str, int]]:
    """(name, freeze mode, epochs) per phase: two-phase runs train the head alone first."""
    if cfg.phase1_epochs > 0 and cfg.freeze not in ("head", "scratch") and cfg.epochs > cfg.phase1_epochs:
        return [("head", "head", cfg.phase1_epochs), ("fine-tune", cfg.freeze, cfg.epochs - cfg.phase1_epochs)]
    return [("train", cfg.freeze, cfg.epochs)]


def _train(run: Run, cfg: RunConfig, report: Reporter, resumed: dict | None = None) -> dict:
    seed_everything(cfg.seed)
    device = pick_device(cfg.device)
    if device.type == "cpu":
        set_cpu_threads()
    classes, data = prepare_data(run, cfg, report)
    if cfg.baseline == "logreg":
        from core.baselines import train_logreg
        return train_logreg(run, cfg, classes, data)
    report("preparing", force=True, message="Building the model", phase="model")
    weights = "random" if cfg.freeze == "scratch" else cfg.weights
    model = build_model(cfg.arch, len(classes), weights, cfg.weights_file, cfg.head, cfg.hidden,
                        cfg.dropout)
    model.to(device, memory_format=torch.channels_last)
    mean, std = normalization(run, cfg, model, data["train"][0])
    weight = class_weights(cfg, data["train"][1], len(classes), device)
    criterion = nn.CrossEntropyLoss(weight=weight, label_smoothing=cfg.label_smoothing)
    loop = Loop(run, cfg, report, model, data, criterion, device, mean, std)
    if resumed:
        loop.restore(resumed)
    loop.fit()
    if not dist.is_main():
        return {}
    return finish(run, cfg, loop, data)


def class_weights(cfg: RunConfig, labels, n_classes: int, device) -> torch.Tensor | None:
    """Inverse class frequency, so a rare class counts as much as a common one in the loss."""
    if not cfg.class_weights:
        return None
    counts = torch.bincount(torch.as_tensor(labels), minlength=n_classes).float().clamp(min=1)
    return (counts.sum() / (n_classes * counts)).to(device)


class Loop:
    """The epochs of every phase, with the state a resume needs between them."""

    def __init__(self, run, cfg, report, model, data, criterion, device, mean, std):
        self.run, self.cfg, self.report, self.model, self.data = run, cfg, report, model, data
        self.criterion, self.device, self.mean, self.std = criterion, device, mean, std
        self.eval_tf = D.build_transform(cfg.image_size, mean, std)
        self.train_tf = D.build_transform(cfg.image_size, mean, std, cfg.augment)
        self.scaler = grad_scaler(device)
        self.feats: dict = {}
        self.loaders: dict = {}
        self.best, self.since_best, self.epoch, self.resumed = -math.inf, 0, 0, None

    def restore(self, state: dict) -> None:
        """Weights and counters from the last finished epoch; the optimiser and schedule are
        restored when their phase starts."""
        self.model.load_state_dict(safetensors.torch.load_file(str(self.run.file("last.safetensors")),
                                                               device=str(self.device)))
        self.best, self.since_best, self.epoch = state["best"], state["since_best"], state["epoch"]
        self.resumed = state
        self.run.keep_epochs(self.epoch)
        if state.get("row") and not any(r["epoch"] == self.epoch for r in self.run.epochs()):
            self.record(state["row"])
        self.run.set_status("running", message=f"Resuming after epoch {self.epoch}")

    def fit(self) -> None:
        first = 0
        for index, (phase, freeze, n_epochs) in enumerate(plan_phases(self.cfg)):
            last = first + n_epochs
            if self.epoch < last and not self.phase(index, phase, freeze, first, last):
                return     # early stop ends every phase
            first = last

    def phase(self, index, phase, freeze, first, last) -> bool:
        """Epochs first+1..last of one phase; False when early stopping ends training."""
        cfg, model = self.cfg, self.model
        apply_freeze(model, freeze, cfg.top_k)
        cached = freeze == "head" and cfg.cache_features and not any(cfg.augment.values())
        self.run.set_status("preparing", device=describe(self.device), feature_cache=cached)
        if cached and not self.feats:
            self.feats = features_cached(cfg, model, self.data, self.eval_tf, self.device, self.report,
                                         self.mean, self.std)
        step_model = dist.wrap(model.head if cached else model, self.device)
        self.loaders = {}
        optimizer = make_optimizer(cfg, model, head_only=freeze == "head")
        scheduler = make_scheduler(cfg, optimizer, last - first)
        if self.resumed and self.resumed.get("phase_index") == index:
            self.load_optimizer(optimizer, scheduler)
        for _ in range(self.epoch - first, last - first):
            self.epoch += 1
            self.one_epoch(index, phase, cached, step_model, optimizer, scheduler)
            if cfg.patience and self.since_best >= cfg.patience:
                self.run.set_status("running", early_stopped=self.epoch)
                return False
        return True

    def load_optimizer(self, optimizer, scheduler) -> None:
        optimizer.load_state_dict(self.resumed["optimizer"])
        if scheduler and self.resumed.get("scheduler"):
            scheduler.load_state_dict(self.resumed["scheduler"])
        self.scaler.load_state_dict(self.resumed["scaler"])

    def batches(self, split: str, cached: bool, batch_size: int):
        labels = self.data[split][1]
        if cached:
            order = (dist.train_order(len(labels), self.cfg.seed, self.epoch) if split == "train"
                     else dist.eval_order(len(labels)))
            return feature_batches(self.feats[split], labels, batch_size, order)
        if (split, batch_size) not in self.loaders:      # one per phase, so workers persist
            self.loaders[(split, batch_size)] = self.image_loader(split, batch_size)
        dl = self.loaders[(split, batch_size)]
        if split == "train":
            dl.sampler.set_epoch(self.epoch)
        return dl

    def image_loader(self, split: str, batch_size: int):
        images, labels = self.data[split][:2]
        if split == "train":
            order = dist.train_sampler(len(labels), self.cfg.seed)
            return loader(images, labels, self.train_tf, batch_size, order, self.device)
        return loader(images, labels, self.eval_tf, batch_size, dist.eval_order(len(labels)), self.device)

    def one_epoch(self, index, phase, cached, step_model, optimizer, scheduler) -> None:
        cfg, epoch, start = self.cfg, self.epoch, time.perf_counter()
        per_rank = dist.local_batch(cfg.batch_size)
        val_batch = 256 if cached else per_rank
        n_train = math.ceil(len(self.data["train"][1]) / cfg.batch_size)
        n_val = math.ceil(len(self.data["val"][1]) / (val_batch * dist.world()))
        lr = optimizer.param_groups[0]["lr"]
        step_model.train()
        freeze_norm_stats(self.model)
        train_loss, train_acc = run_epoch(step_model, self.batches("train", cached, per_rank), self.criterion,
                                          optimizer, self.scaler, self.device, self.report, epoch,
                                          cfg.epochs, n_train)
        step_model.eval()
        val_loss, val_acc = run_epoch(step_model, self.batches("val", cached, val_batch), self.criterion,
                                      None, self.scaler, self.device, self.report, epoch, cfg.epochs, n_val)
        if scheduler:
            scheduler.step()
        score = val_acc if self.data["val"][1] else -train_loss
        improved = score > self.best
        self.best, self.since_best = (score, 0) if improved else (self.best, self.since_best + 1)
        if improved:
            save_checkpoint(self.model, self.run)
        row = dict(epoch=epoch, phase=phase, lr=lr, train_loss=train_loss, train_acc=train_acc,
                   val_loss=val_loss, val_acc=val_acc, seconds=time.perf_counter() - start, best=improved)
        # The resume state carries the epoch's row, so a kill between the two writes loses nothing.
        save_resume_state(self.run, self.model, optimizer, scheduler, self.scaler,
                          dict(epoch=epoch, phase_index=index, best=self.best, since_best=self.since_best,
                               row=row))
        self.record(row)
        self.report(force=True, message=f"Epoch {epoch}/{cfg.epochs} done", epoch=epoch,
                    epochs=cfg.epochs, phase="train", step=n_train, steps=n_train)

    def record(self, row: dict) -> None:
        self.run.append_epoch(row)
        if row["best"]:
            self.run.set_status("running", best_epoch=row["epoch"], best_val_acc=row["val_acc"])


def finish(run: Run, cfg: RunConfig, loop: Loop, data) -> dict:
    """Test the best checkpoint (rank 0 only) and record the final status."""
    report, model, device = loop.report, loop.model, loop.device
    report("running", force=True, message="Testing the best checkpoint", phase="test")
    model.load_state_dict(safetensors.torch.load_file(str(run.checkpoint), device=str(device)))
    images, labels, files = data["test"]
    epoch = loop.epoch
    done = "Finished" + (f" (early stop at epoch {epoch})" if epoch < cfg.epochs else "")
    if labels:
        if loop.feats and not any(p.requires_grad for p in model.backbone.parameters()):
            with torch.inference_mode():     # backbone never changed: reuse its test features
                probs = model.head.eval()(loop.feats["test"]).float().softmax(-1).cpu().numpy()
        else:
            probs = predict_probs(model, images, loop.eval_tf, device, progress=lambda done, total: report(
                "running", message="Testing the best checkpoint", phase="test", step=done, steps=total))
        metrics = save_evaluation(run, "test", files, labels, probs)
        run.set_status("finished", message=done, test_acc=metrics["accuracy"], phase="done")
    else:
        run.set_status("finished", message=done + ", no test images", phase="done")
    return run.status()


def normalization(run: Run, cfg: RunConfig, model, train_images) -> tuple[list, list]:
    """The backbone's pretrained mean/std, or the training images' own (streaming pass);
    stored in norm.json so evaluation and export use the same numbers."""
    if cfg.normalize == "dataset":
        mean, std = D.dataset_stats(train_images)
        std = [max(s, 1e-3) for s in std]
    else:
        dc = data_config(model, cfg.image_size)
        mean, std = list(dc["mean"]), list(dc["std"])
    run.write_json("norm.json", dict(mean=mean, std=std, source=cfg.normalize))
    return mean, std
