"""The training loop. It knows nothing of any UI: it reports through the run folder
(status.json, epochs.jsonl) and stops when its `stop` event is set."""
from __future__ import annotations

import contextlib
import errno
import itertools
import logging
import math
import os
import random
import shutil
import threading
import time
from collections import OrderedDict

import numpy as np
import safetensors.torch
import timm.optim
import torch
from torch import nn

from core import budget as B
from core import data as D
from core import distributed as dist
from core import estimate as E
from core import paths
from core import prefix as P
from core import rng
from core.hooks import eval_mode
from core.backbones import apply_freeze, build_model, freeze_norm_stats, native_input_size
from core.device import autocast, choose_precision, describe, grad_scaler, pick_device, precision_key, set_cpu_threads
from core.evaluate import data_config, predict_probs, save_evaluation
from core.budget import cache_refusal  # noqa: F401 - part of this module's interface
from core.paths import resolve_data_root  # noqa: F401 - part of this module's interface
from core.config import RunConfig
from core.store import Run, RunBusy, disk_problem


class Stopped(Exception):
    """Raised inside the loop when the user pressed Stop."""


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


def uses_feature_cache(cfg: RunConfig) -> bool:
    """Whether a head-only run trains on cached backbone features (augmented views included)."""
    return cfg.freeze == "head" and cfg.cache_features and (cfg.aug_views > 0 or not any(cfg.augment.values()))






def prepare_data(run: Run, cfg: RunConfig, report: Reporter):
    """Scan, split, decode once. Returns (classes, {split: (images, labels, files)})."""
    report("preparing", force=True, message="Scanning the data set", phase="scan")
    scan = D.scan_folder(resolve_data_root(cfg.data_root), check=False)
    splits = D.split_items(scan, cfg.split, cfg.split_seed, cfg.max_per_class)
    if not splits["train"]:
        raise D.DataError("The training split is empty.")
    n_images = sum(len(items) for items in splits.values())
    E.check_memory(int(n_images * 3 * cfg.image_size ** 2 * E.DECODED_ASPECT), f"Decoding {n_images:,} images at "
                   f"{cfg.image_size} px", "use a smaller image size, or fewer images per class.")
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


def features_cached(cfg: RunConfig, model, data, eval_tf, device, report, mean, std,
                    precision: str | None = None) -> dict:
    key = (cfg.arch, cfg.weights, cfg.weights_file, cfg.image_size, tuple(mean), tuple(std), str(device),
           resolve_data_root(cfg.data_root), cfg.seed if cfg.weights == "random" else None,
           tuple(tuple(data[s][2]) for s in ("train", "val", "test")), precision)
    with _CACHE_LOCK:
        hit = _FEATURES.get(key)
    if hit is not None:
        return hit
    feats = {s: extract_features(model.backbone, data[s][0], eval_tf, device, 64, report, s, precision)
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
def extract_features(backbone: nn.Module, images, transform, device, batch_size, report, label,
                     precision: str | None = None):
    was_training = backbone.training
    backbone.eval()
    feats = []
    try:
        for start in range(0, len(images), batch_size):
            batch = torch.stack([transform(img) for img in images[start:start + batch_size]])
            with autocast(device, precision):
                feats.append(backbone(batch.to(device, memory_format=torch.channels_last)).float())
            report("preparing", message=f"Computing backbone features ({label})", phase="features",
                   step=min(start + batch_size, len(images)), steps=len(images))
    finally:
        backbone.train(was_training)
    return torch.cat(feats) if feats else torch.zeros(0, backbone.num_features, device=device)


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


def save_checkpoint(model: nn.Module, run: Run, name: str = "best.safetensors") -> None:
    """Atomic: a crash mid-write leaves the previous file intact. Rank 0 of a distributed job
    writes; the others hold the same weights."""
    if not dist.is_main():
        return
    tmp = run.file(f".{name}.tmp")
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    with paths.removed_on_error(tmp), disk_errors(run):
        safetensors.torch.save_file(state, str(tmp))
        tmp.replace(run.file(name))


LOW_DISK_BYTES = 64 * 1024**2


@contextlib.contextmanager
def disk_errors(run: Run):
    """torch.save and safetensors report a full disk as their own errors (torch's reads
    "basic_ios::clear"): on a nearly full disk, say what it is."""
    try:
        yield
    except OSError:
        raise
    except Exception as err:  # noqa: BLE001 - re-raised, as an OSError when the disk is full
        try:
            full = shutil.disk_usage(run.path).free < LOW_DISK_BYTES
        except OSError:
            full = False
        if full:
            raise OSError(errno.ENOSPC, f"No space left on device ({err})") from err
        raise


def save_resume_state(run: Run, model, optimizer, scheduler, scaler, progress: dict) -> None:
    """End-of-epoch state (weights, optimiser, schedule, counters) to resume after a crash or a
    Stop. Loaded with weights_only=True: plain tensors and numbers only."""
    if not dist.is_main():
        return
    save_checkpoint(model, run, "last.safetensors")
    state = dict(progress, optimizer=optimizer.state_dict(), scaler=scaler.state_dict(),
                 scheduler=scheduler.state_dict() if scheduler else None)
    tmp = run.file(".last_state.pt.tmp")
    with paths.removed_on_error(tmp), disk_errors(run):
        torch.save(state, tmp)
        tmp.replace(run.file("last_state.pt"))
    run.set_status("running", last_epoch=progress["epoch"])


def load_resume_state(run: Run) -> dict:
    return torch.load(run.file("last_state.pt"), map_location="cpu", weights_only=True)


def feature_batches(features, labels, batch_size, order, rows=None):
    """Batches of cached tensors (a tensor or a core.prefix.Store) in `order`; `rows[i]` is the
    cached row of image i when there are several views per image."""
    order = torch.as_tensor(order, dtype=torch.long)
    labels = torch.as_tensor(labels)
    rows = order if rows is None else torch.as_tensor(rows, dtype=torch.long)[order]
    for start in range(0, len(order), batch_size):
        idx, row = order[start:start + batch_size], rows[start:start + batch_size]
        if isinstance(features, P.Store):
            yield features.get(row.numpy()), labels[idx]
        else:
            yield features[row.to(features.device)], labels[idx]


def train_run(run: Run, stop: threading.Event | None = None, resume: bool = False) -> dict:
    """Train `run` as its config says (or go on from its last finished epoch when `resume`);
    the final status is finished, stopped or failed. In a distributed job only rank 0 writes."""
    if not dist.is_main():       # the other ranks of a distributed job only read the folder
        return _train_held(run.follower(), stop, resume)
    try:
        with run.training_lock():
            return _train_held(run, stop, resume)
    except RunBusy:       # the process that holds it owns its status: leave that alone
        logging.getLogger(__name__).warning("run %s is being trained by another process", run.id)
        raise


def _train_held(run: Run, stop: threading.Event | None, resume: bool) -> dict:
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
    except OSError as err:
        run.set_status("failed", message=disk_problem(err) or failure_message(err, cfg))
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
    """(name, freeze mode, epochs) per phase of a config without a time budget."""
    return [(p.name, p.freeze, p.epochs) for p in B.config_phases(cfg)]


def _train(run: Run, cfg: RunConfig, report: Reporter, resumed: dict | None = None) -> dict:
    seed_everything(cfg.seed)
    started = time.monotonic()
    device = pick_device(cfg.device)
    if device.type == "cpu":
        set_cpu_threads()
    classes, data = prepare_data(run, cfg, report)
    if cfg.baseline == "logreg":
        from core.baselines import train_logreg
        return train_logreg(run, cfg, classes, data)
    weights = "random" if cfg.freeze == "scratch" else cfg.weights
    source = {"random": "random weights", "file": "your weights file", "hub": "a download from the hub",
              "hub-cache": "the hub cache"}.get(weights, f"{weights} weights")
    report("preparing", force=True, message=f"Building {cfg.arch} with {source} (step 1 of 3: model)",
           phase="model", step=0, steps=3)
    stream = rng.Stream(cfg.seed)      # the run's own random numbers, whatever else the process draws
    with stream.active():
        model = build_model(cfg.arch, len(classes), weights, cfg.weights_file, cfg.head, cfg.hidden,
                            cfg.dropout)
    report("preparing", force=True, message=f"Moving the model to {device.type} (step 2 of 3: model)",
           phase="model", step=1, steps=3)
    model.to(device, memory_format=torch.channels_last)
    E.check_training(model, cfg.arch, cfg.image_size, cfg.batch_size, E.TRAINED_SHARE.get(cfg.freeze, 1.0), device)
    report("preparing", force=True, message="Normalisation and loss (step 3 of 3: model)",
           phase="model", step=2, steps=3)
    mean, std = normalization(run, cfg, model, data["train"][0])
    weight = class_weights(cfg, data["train"][1], len(classes), device)
    criterion = nn.CrossEntropyLoss(weight=weight, label_smoothing=cfg.label_smoothing)
    loop = Loop(run, cfg, report, model, data, criterion, device, mean, std, stream)
    try:
        loop.phases = phases_for(run, cfg, loop, resumed, started)
        if resumed:
            loop.restore(resumed)
        if cfg.time_budget_s:
            loop.deadline = started + cfg.time_budget_s - loop.test_reserve()
        loop.fit()
    finally:
        loop.close()
    if not dist.is_main():
        return {}
    return finish(run, cfg, loop, data)


def phases_for(run: Run, cfg: RunConfig, loop: "Loop", resumed, started: float) -> list[B.Phase]:
    """The config's phases; with a time budget, the planner's, whatever the freeze setting (it
    chooses the depth), kept in plan.json so a resume follows the same plan."""
    if not cfg.time_budget_s or cfg.freeze == "scratch":     # from scratch: the budget only stops it
        return B.config_phases(cfg)
    saved = run.read_json("plan.json")
    if resumed and saved:
        return B.phases_from(saved["phases"])
    loop.report("preparing", force=True, message="Measuring this machine to plan the time budget",
                phase="plan")
    images = loop.data["train"][0]
    speeds = B.measure(loop.model, cfg.image_size, loop.device, loop.train_tf, images,
                       precision=loop.infer_precision())
    counts = B.Counts(*(len(loop.data[s][1]) for s in ("train", "val", "test")))
    left = cfg.time_budget_s - (time.monotonic() - started)
    phases, notes = B.plan(cfg, loop.model, speeds, counts, left, loop.views())
    if cfg.max_epochs and B.total_epochs(phases) > cfg.max_epochs:
        phases = B.cap_epochs(phases, cfg.max_epochs)
        notes.append(f"Cut to the teacher's cap of {cfg.max_epochs} epochs.")
    apply_freeze(loop.model, "head")
    run.write_json("plan.json", dict(phases=[p.to_dict() for p in phases], notes=notes, speeds=speeds.summary(),
                                     budget_s=cfg.time_budget_s, planned_after_s=round(cfg.time_budget_s - left, 1)))
    cfg.epochs = B.total_epochs(phases)
    run.write_json("config.json", cfg.to_dict())
    run.set_status("preparing", plan=notes)
    return phases


def class_weights(cfg: RunConfig, labels, n_classes: int, device) -> torch.Tensor | None:
    """Inverse class frequency, so a rare class counts as much as a common one in the loss."""
    if not cfg.class_weights:
        return None
    counts = torch.bincount(torch.as_tensor(labels), minlength=n_classes).float().clamp(min=1)
    return (counts.sum() / (n_classes * counts)).to(device)


class Loop:
    """The epochs of every phase, with the state a resume needs between them."""

    def __init__(self, run, cfg, report, model, data, criterion, device, mean, std, stream=None):
        self.run, self.cfg, self.report, self.model, self.data = run, cfg, report, model, data
        self.stream = stream or rng.Stream(cfg.seed)
        self.criterion, self.device, self.mean, self.std = criterion, device, mean, std
        self.eval_tf = D.build_transform(cfg.image_size, mean, std)
        self.train_tf = D.build_transform(cfg.image_size, mean, std, cfg.augment)
        self.scaler = grad_scaler(device)
        self.phases: list[B.Phase] = B.config_phases(cfg)
        self.caches: dict = {}            # (kind, cut) -> {split: tensor or Store}
        self.feats: dict = {}             # the head-only features, when cached (used by finish)
        self.loaders: dict = {}
        self.deadline: float | None = None
        self.phase_augments = True
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

    def close(self) -> None:
        for cache in self.caches.values():
            for store in cache.values():
                if isinstance(store, P.Store):
                    store.close()

    def fit(self) -> None:
        for index, phase in enumerate(self.phases):
            first = B.total_epochs(self.phases[:index])       # a refitted phase moves the next ones
            last = first + phase.epochs
            if self.epoch < last and not self.phase(index, phase, first, last):
                return     # early stop (or the time budget) ends every phase

    # ---------------------------------------------------------------- caches and precision

    def augmenting(self, phase: B.Phase | None = None) -> bool:
        return any(self.cfg.augment.values()) and (phase is None or phase.augment)

    def views(self, phase: B.Phase | None = None) -> int:
        return self.cfg.aug_views if self.augmenting(phase) else 1

    def cache_for(self, phase: B.Phase) -> tuple[str, P.Split | None, str]:
        """("features" | "prefix" | "", split, why not) for the layers this phase keeps frozen."""
        refusal = cache_refusal(self.cfg) if phase.augment else ("" if self.cfg.cache_features else
                                                                 "caching is off in the settings.")
        if refusal or phase.freeze == "scratch":
            return "", None, refusal or "from scratch, every layer trains."
        if phase.freeze == "head":
            return "features", None, ""
        split = P.find_split(self.model.backbone, self.cfg.image_size)
        return ("prefix", split, "") if split.ok else ("", None, split.reason)

    def build_cache(self, kind: str, split: P.Split | None, phase: B.Phase) -> dict:
        augmenting = self.augmenting(phase)
        key = (kind, split.cut_name if split else "", augmenting)
        if key in self.caches:
            return self.caches[key]
        if kind == "features" and not augmenting:
            cache = features_cached(self.cfg, self.model, self.data, self.eval_tf, self.device, self.report,
                                    self.mean, self.std, self.infer_precision())
        else:
            cache = self.compute_cache(split, self.views(phase), self.train_tf if augmenting else self.eval_tf)
        self.caches[key] = cache
        return cache

    def compute_cache(self, split: P.Split | None, views: int, train_tf) -> dict:
        backbone, n = self.model.backbone, {s: len(self.data[s][1]) for s in ("train", "val")}
        per_image = (P.bytes_per_image(backbone, split, self.cfg.image_size) if split
                     else 2 * backbone.num_features)
        total = per_image * (views * n["train"] + n["val"])
        on_disk = total > P.ram_budget_bytes()
        where = "disk (memory-mapped)" if on_disk else "memory"
        what = f"block {split.cut_name}" if split else "the backbone's features"
        cache = {}
        for name, tf, v in (("train", train_tf, views), ("val", self.eval_tf, 1)):
            def progress(done, total_, name=name, v=v):
                self.report("preparing", message=f"Caching {what} ({name}, {v} view(s) per image)",
                            phase="features", step=done, steps=total_)
            disk = paths.home() / "cache" / f"{self.run.id}-{what.split()[-1]}-{name}.npy" if on_disk else None
            cache[name] = P.compute(backbone, split, self.data[name][0], tf, self.device, v,
                                    progress=progress, disk=disk, precision=self.infer_precision(),
                                    stream=self.stream)
        self.run.set_status("preparing", cache=dict(what=what, views=views, mb=round(total / 2**20, 1),
                                                    where=where))
        return cache

    def infer_precision(self) -> str:
        if "infer" not in getattr(self, "_precision", {}):
            images = [self.eval_tf(img) for img in self.data["train"][0][:8]]
            x = torch.stack(images).to(self.device, memory_format=torch.channels_last) if images else None

            def step(precision):
                if x is not None:
                    with torch.inference_mode(), eval_mode(self.model), autocast(self.device, precision):
                        self.model(x)
            self._note_precision("infer", step)
        return self._precision["infer"]["precision"]

    def train_precision(self, kind: str, step_model, sample) -> str:
        def step(precision):
            with eval_mode(step_model), autocast(self.device, precision):
                loss = step_model(sample).float().logsumexp(1).mean()
            loss.backward()
            for p in step_model.parameters():
                p.grad = None
        self._note_precision(kind, step)
        return self._precision[kind]["precision"]

    def _note_precision(self, kind: str, step) -> None:
        self._precision = getattr(self, "_precision", {})
        key = precision_key(self.device, self.cfg.arch, self.cfg.image_size, kind)
        self._precision[kind] = choose_precision(self.device, key, step, paths.home() / "precision.json")
        self.run.set_status("preparing", precision={k: v["precision"] for k, v in self._precision.items()})
        self.run.write_json("precision.json", self._precision)

    def test_reserve(self) -> float:
        """Seconds kept back from a time budget for the final test pass."""
        return 2.0 + 0.02 * len(self.data["test"][1])

    # ---------------------------------------------------------------- one phase

    def phase(self, index: int, phase: B.Phase, first: int, last: int) -> bool:
        """Epochs first+1..last of one phase; False when early stopping or the budget ends training."""
        cfg, model = self.cfg, self.model
        apply_freeze(model, phase.freeze, phase.top_k)
        kind, split, why_not = self.cache_for(phase)
        self.run.set_status("preparing", device=describe(self.device), feature_cache=kind == "features",
                            prefix_cache=split.cut_name if split else "", cache_off=why_not,
                            phase_name=phase.name)
        cache = self.build_cache(kind, split, phase) if kind else None
        if kind == "features" and not self.augmenting(phase):
            self.feats = cache
        self.phase_augments = self.augmenting(phase)
        step_model = model.head if kind == "features" else P.SuffixModel(model, split) if kind else model
        sample = self.sample_input(cache)
        precision = self.train_precision(f"train@{split.cut_name}" if split else
                                         "train@head" if kind else "train", step_model, sample)
        step_model = dist.wrap(step_model, self.device)
        self.loaders = {}
        optimizer = make_optimizer(cfg, model, head_only=phase.freeze == "head", lr=phase.lr,
                                   backbone_lr_mult=phase.backbone_lr_mult)
        scheduler = make_scheduler(cfg, optimizer, last - first)
        if self.resumed and self.resumed.get("phase_index") == index:
            self.load_optimizer(optimizer, scheduler)
        while self.epoch < last:
            self.epoch += 1
            started = time.monotonic()
            self.one_epoch(index, phase.name, cache, step_model, optimizer, scheduler, precision)
            if cfg.patience and self.since_best >= cfg.patience:
                self.run.set_status("running", early_stopped=self.epoch)
                return False
            if self.deadline and self.epoch < last:
                last, scheduler = self.fit_deadline(index, first, last, time.monotonic() - started,
                                                    optimizer, scheduler)
        return not (self.deadline and time.monotonic() > self.deadline)

    def fit_deadline(self, index, first, last, epoch_s, optimizer, scheduler):
        """Fit a time-budget phase to the clock, from its measured epoch time: after its first
        epoch the last phase takes as many epochs as fit (up to 3x the plan, when the estimate
        was pessimistic); any phase running late is cut. The schedule is re-made for the new
        length, so the learning rate still anneals."""
        fit = int(max(0.0, self.deadline - time.monotonic()) // max(epoch_s, 1e-6))
        grow = self.epoch == first + 1 and index == len(self.phases) - 1
        new_last = min(self.epoch + fit, first + 3 * self.phases[index].epochs) if grow else \
            min(self.epoch + fit, last)
        if new_last == last:
            return last, scheduler
        self.phases[index].epochs = new_last - first
        self.cfg.epochs = B.total_epochs(self.phases)
        plan = self.run.read_json("plan.json", {}) or {}
        plan.update(phases=[p.to_dict() for p in self.phases], refitted_at_epoch=self.epoch)
        self.run.write_json("plan.json", plan)
        self.run.write_json("config.json", self.cfg.to_dict())
        self.run.set_status("running", message=f"Epochs take {epoch_s:.0f} s: this phase now ends at "
                                               f"epoch {new_last} to use the time budget")
        if scheduler is not None and fit:
            scheduler = make_scheduler(self.cfg, optimizer, new_last - first, done=self.epoch - first)
        return new_last, scheduler

    def sample_input(self, cache) -> torch.Tensor:
        """A few training inputs as the step model sees them, for the precision trial."""
        if cache is not None:
            store = cache["train"]
            n = min(8, len(store) if isinstance(store, torch.Tensor) else store.n)
            rows = torch.arange(n)      # indexing copies: a slice of an inference tensor can't train
            return (store.get(rows.numpy()) if isinstance(store, P.Store) else store[rows.to(store.device)]).to(self.device)
        with torch.random.fork_rng(devices=[]):   # the trial must not shift the run's augmentations
            images = [self.train_tf(img) for img in self.data["train"][0][:8]]
        return torch.stack(images).to(self.device, memory_format=torch.channels_last)

    def load_optimizer(self, optimizer, scheduler) -> None:
        optimizer.load_state_dict(self.resumed["optimizer"])
        if scheduler and self.resumed.get("scheduler"):
            scheduler.load_state_dict(self.resumed["scheduler"])
        self.scaler.load_state_dict(self.resumed["scaler"])

    def batches(self, split: str, cache, batch_size: int):
        labels = self.data[split][1]
        if cache is not None:
            order = (dist.train_order(len(labels), self.cfg.seed, self.epoch) if split == "train"
                     else dist.eval_order(len(labels)))
            return feature_batches(cache[split], labels, batch_size, order, self.view_rows(split, cache))
        if (split, batch_size) not in self.loaders:      # one per phase, so workers persist
            self.loaders[(split, batch_size)] = self.image_loader(split, batch_size)
        dl = self.loaders[(split, batch_size)]
        if split == "train":
            dl.sampler.set_epoch(self.epoch)
        return dl

    def view_rows(self, split: str, cache) -> torch.Tensor | None:
        """One cached augmented view per image, drawn afresh each epoch (seeded by seed and epoch)."""
        store, n = cache[split], len(self.data[split][1])
        views = (store.n if isinstance(store, P.Store) else len(store)) // max(n, 1)
        if split != "train" or views <= 1:
            return None
        g = torch.Generator().manual_seed(self.cfg.seed * 100_003 + self.epoch)
        return torch.randint(views, (n,), generator=g) * n + torch.arange(n)

    def image_loader(self, split: str, batch_size: int):
        images, labels = self.data[split][:2]
        if split == "train":
            order = dist.train_sampler(len(labels), self.cfg.seed)
            tf = self.train_tf if self.phase_augments else self.eval_tf
            return loader(images, labels, tf, batch_size, order, self.device)
        return loader(images, labels, self.eval_tf, batch_size, dist.eval_order(len(labels)), self.device)

    def one_epoch(self, index, phase, cache, step_model, optimizer, scheduler, precision) -> None:
        cfg, epoch, start = self.cfg, self.epoch, time.perf_counter()
        per_rank = dist.local_batch(cfg.batch_size)
        val_batch = 256 if cache is not None else per_rank
        n_train = math.ceil(len(self.data["train"][1]) / cfg.batch_size)
        n_val = math.ceil(len(self.data["val"][1]) / (val_batch * dist.world()))
        lr = optimizer.param_groups[0]["lr"]
        step_model.train()
        freeze_norm_stats(self.model)
        train_loss, train_acc = run_epoch(step_model, self.batches("train", cache, per_rank), self.criterion,
                                          optimizer, self.scaler, self.device, self.report, epoch,
                                          cfg.epochs, n_train, precision, self.stream)
        step_model.eval()
        val_loss, val_acc = run_epoch(step_model, self.batches("val", cache, val_batch), self.criterion,
                                      None, self.scaler, self.device, self.report, epoch, cfg.epochs, n_val,
                                      precision, self.stream)
        if scheduler:
            scheduler.step()
        score = val_acc if self.data["val"][1] else -train_loss
        improved = score > self.best
        self.best, self.since_best = (score, 0) if improved else (self.best, self.since_best + 1)
        if improved:
            save_checkpoint(self.model, self.run)
        row = dict(epoch=epoch, phase=phase, lr=lr, train_loss=train_loss, train_acc=train_acc,
                   val_loss=val_loss, val_acc=val_acc, seconds=time.perf_counter() - start, best=improved)
        # The row first, so a run killed once its resume state is on disk always shows the epoch;
        # killed in between, Resume drops the row (keep_epochs) and trains that epoch again. The
        # resume state carries the row too, for a row lost to a full disk.
        self.record(row)
        save_resume_state(self.run, self.model, optimizer, scheduler, self.scaler,
                          dict(epoch=epoch, phase_index=index, best=self.best, since_best=self.since_best,
                               row=row))
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
