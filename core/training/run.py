"""A training run from start to end: data, model, phases, the loop, the final evaluation. It knows
nothing of any UI: it reports through the run folder (status.json, epochs.jsonl) and stops when its
`stop` event is set."""
from __future__ import annotations

import logging
import threading
import time

import numpy as np
import safetensors.torch
import torch
from torch import nn

from core import rng
from core.config import RunConfig
from core.data import DataError, folders, transforms, versions
from core.data import splits as splitting
from core.device import pick_device, set_cpu_threads
from core.models.backbones import build_model, data_config
from core.paths import resolve_data_root
from core.results.evaluate import predict_probs, save_evaluation
from core.serve.store import Run, RunBusy, disk_problem
from core.training import budget
from core.training import distributed as dist
from core.training import estimate
from core.training.caches import decode_cached
from core.training.checkpoints import ResumeState, load_resume_state
from core.training.loop import Loop
from core.training.parts import Parts
from core.training.phase_caches import PhaseCaches
from core.training.plan import BudgetClock, measured_image_s, phases_for
from core.training.precision import Precision
from core.training import choose
from core.training.resolved import at_native_size, resolved
from core.training.steps import Diverged, Reporter, Stopped, seed_everything


def prepare_data(run: Run, cfg: RunConfig, report: Reporter, resumed: bool = False):
    """Scan, split, decode once. Returns (classes, {split: (images, labels, files)}). A resumed
    run goes on with the split it started with, on the same files (checked against its pin)."""
    report("preparing", force=True, message="Scanning the data set", phase="scan")
    scan = folders.scan_folder(resolve_data_root(cfg.data_root), check=False)
    stored = run.read_json("splits.json", {}) or {}
    if resumed and stored.get("pin"):
        classes, splits = pinned_splits(run, scan.root, stored)
    else:
        classes, splits = scan.classes, splitting.split_items(scan, cfg.split, cfg.split_seed, cfg.max_per_class)
    if not splits["train"]:
        raise DataError("The training split is empty.")
    n_images = sum(len(items) for items in splits.values())
    estimate.check_memory(int(n_images * 3 * cfg.image_size ** 2 * estimate.DECODED_ASPECT), f"Decoding {n_images:,} images at "
                   f"{cfg.image_size} px", "use a smaller image size, or fewer images per class.")
    if not (resumed and stored.get("pin")):
        run.write_json("classes.json", classes)
        rows = dict(root=scan.root, **{s: [(it.path, it.label) for it in items] for s, items in splits.items()})
        if dist.is_main():      # the exact files (sha256) the run used: Evaluate and Resume check them
            report("preparing", force=True, message="Fingerprinting the data set", phase="scan")
            rows["pin"] = versions.pin_for(scan.root, splits, present=[it.path for it in scan.items])
        run.write_json("splits.json", rows)
    out, skipped = {}, []
    for name, items in splits.items():
        def progress(done, total, _message="", name=name):
            report("preparing", message=f"Decoding {name} images", phase="decode",
                   step=done, steps=total)
        images, failures = decode_cached(scan.root, items, cfg.image_size, progress)
        skipped += failures
        keep = [i for i, img in enumerate(images) if img is not None]
        out[name] = ([images[i] for i in keep], [items[i].label for i in keep],
                     [items[i].path for i in keep])
    run.write_json("skipped.json", skipped)
    return classes, out


def pinned_splits(run: Run, root: str, stored: dict) -> tuple[list[str], dict[str, list[folders.Item]]]:
    """The classes and split a run started with, when its pinned files are still there as they
    were: a re-split would move images between train and test once one was added. DataError,
    saying what changed, when one was removed, edited or moved to another class."""
    change = versions.check_pin(root, stored["pin"])
    if change.removed or change.changed or change.relabelled:
        lines = "; ".join(line for line in change.lines(quote="") if "added:" not in line)
        raise DataError(f"The data set changed since this run started ({lines}): Resume needs the files it "
                        "trained on. Start a new run on the data as it is now, or put the files back.")
    classes = run.read_json("classes.json", [])
    return classes, {s: [folders.Item(path, label) for path, label in stored.get(s, [])] for s in folders.SPLITS}


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
        cfg = at_native_size(run, cfg)
        return _train(run, cfg, report, load_resume_state(run) if resume else None)
    except Stopped:
        run.set_status("stopped", message="Stopped by the user. Finished epochs and the best "
                       "checkpoint are kept; Resume goes on from the last finished epoch.")
    except Diverged:
        run.set_status("failed", message="The loss became NaN/infinite: the learning rate is "
                       "probably too high. The best checkpoint so far is kept.")
    except (DataError, ValueError) as err:
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
    return [(p.name, p.freeze, p.epochs) for p in budget.config_phases(cfg)]


def _train(run: Run, cfg: RunConfig, report: Reporter, resumed: dict | None = None) -> dict:
    seed_everything(cfg.seed)
    started = time.monotonic()
    device = pick_device(cfg.device)
    if device.type == "cpu":
        set_cpu_threads()
    if cfg.pick_backbone and cfg.time_budget_s and not resumed:
        cfg = pick_backbone(run, cfg, report, device)
    classes, data = prepare_data(run, cfg, report, resumed=resumed is not None)
    if cfg.baseline == "logreg":
        from core.training.baselines import train_logreg
        return train_logreg(run, cfg, classes, data)
    stream = rng.Stream(cfg.seed)      # the run's own random numbers, whatever else the process draws
    model = _model(cfg, report, len(classes), device, stream)
    report("preparing", force=True, message="Normalisation and loss (step 3 of 3: model)",
           phase="model", step=2, steps=3)
    mean, std = normalization(run, cfg, model, data["train"][0])
    weight = class_weights(cfg, data["train"][1], len(classes), device)
    criterion = nn.CrossEntropyLoss(weight=weight, label_smoothing=cfg.label_smoothing)
    loop = _fit(Parts.build(run, cfg, report, model, data, device, mean, std, stream), cfg, criterion,
                resumed, started)
    if not dist.is_main():
        return {}
    return finish(loop)


def pick_backbone(run: Run, cfg: RunConfig, report: Reporter, device) -> RunConfig:
    """Probe the backbones whose weights are here on a sample of the training split and train
    the best that fits the budget (core.training.choose); probe.json keeps the table and why."""
    scan = folders.scan_folder(resolve_data_root(cfg.data_root), check=False)
    splits = splitting.split_items(scan, cfg.split, cfg.split_seed, cfg.max_per_class)
    counts = {name: len(items) for name, items in splits.items()}

    def progress(done, total, message):
        report("preparing", message=message, phase="probe", step=done, steps=total)
    probes = choose.probe(scan.root, splits["train"], counts, cfg.time_budget_s, device, progress, cfg.seed)
    pick, notes = choose.choose(probes)
    run.write_json("probe.json", dict(probes=[p.to_dict() for p in probes], notes=notes,
                                      chosen=pick and dict(arch=pick.arch, size=pick.size)))
    if pick is None:
        return resolved(run, cfg, pick_backbone=False)
    return resolved(run, cfg, arch=pick.arch, image_size=pick.size, weights=pick.weights,
                    weights_file=None, pick_backbone=False)


def _model(cfg: RunConfig, report: Reporter, n_classes: int, device, stream: rng.Stream):
    weights = "random" if cfg.freeze == "scratch" else cfg.weights
    source = {"random": "random weights", "file": "your weights file", "hub": "a download from the hub",
              "hub-cache": "the hub cache"}.get(weights, f"{weights} weights")
    report("preparing", force=True, message=f"Building {cfg.arch} with {source} (step 1 of 3: model)",
           phase="model", step=0, steps=3)
    with stream.active():
        model = build_model(cfg.arch, n_classes, weights, cfg.weights_file, cfg.head, cfg.hidden, cfg.dropout)
    report("preparing", force=True, message=f"Moving the model to {device.type} (step 2 of 3: model)",
           phase="model", step=1, steps=3)
    model.to(device, memory_format=torch.channels_last)
    estimate.check_training(model, cfg.arch, cfg.image_size, cfg.batch_size,
                            estimate.TRAINED_SHARE.get(cfg.freeze, 1.0), device)
    return model


def class_weights(cfg: RunConfig, labels, n_classes: int, device) -> torch.Tensor | None:
    """Inverse class frequency, so a rare class counts as much as a common one in the loss."""
    if not cfg.class_weights:
        return None
    counts = torch.bincount(torch.as_tensor(labels), minlength=n_classes).float().clamp(min=1)
    return (counts.sum() / (n_classes * counts)).to(device)


def _fit(parts: Parts, cfg: RunConfig, criterion, resumed: dict | None, started: float) -> Loop:
    """Every phase's epochs, planned first under a time budget."""
    precision = Precision(parts, cfg)
    caches = PhaseCaches(parts, cfg, precision)
    try:
        phases, cfg = phases_for(parts, cfg, precision, resumed, started)
        clock = BudgetClock.start(cfg, started, len(parts.labels("test")), len(parts.labels("val")),
                                  measured_image_s(parts.run.read_json("plan.json")), short_epochs=dist.world() == 1)
        loop = Loop(parts, cfg, criterion, phases, caches, precision, clock, ResumeState(parts.run, resumed))
        if resumed:
            loop.restore()
        loop.fit()
    finally:
        caches.close()
    return loop


def finish(loop: Loop) -> dict:
    """Test the best checkpoint (rank 0 only) and record the final status."""
    parts, epoch = loop.parts, loop.epoch
    run, report, model = parts.run, parts.report, parts.model
    report("running", force=True, message="Testing the best checkpoint", phase="test")
    model.load_state_dict(safetensors.torch.load_file(str(run.checkpoint), device=str(parts.device)))
    images, labels, files = parts.data["test"]
    done = "Finished" + (f" (early stop at epoch {epoch})" if epoch < loop.cfg.epochs else "")
    if not labels:
        run.set_status("finished", message=done + ", no test images", phase="done")
        return run.status()
    cfg = choose_flip(loop)
    features = loop.caches.features
    if features and not cfg.tta and not any(p.requires_grad for p in model.backbone.parameters()):
        with torch.inference_mode():     # backbone never changed: reuse its test features
            probs = model.head.eval()(features["test"]).float().softmax(-1).cpu().numpy()
    else:
        probs = predict_probs(model, images, parts.eval_tf, parts.device, progress=lambda done, total, _m: report(
            "running", message="Testing the best checkpoint", phase="test", step=done, steps=total),
            flip=cfg.tta == "hflip")
    metrics = save_evaluation(run, "test", files, labels, probs)
    run.set_status("finished", message=done, test_acc=metrics["accuracy"], phase="done")
    return run.status()


def choose_flip(loop: Loop) -> RunConfig:
    """tta="auto": mirror-averaged predictions when they beat plain ones on validation (ties
    keep the plain, cheaper ones); the answer is written as the run's tta setting."""
    cfg, parts = loop.cfg, loop.parts
    if cfg.tta != "auto":
        return cfg
    images, labels, _ = parts.data["val"]
    if not labels:
        return resolved(parts.run, cfg, tta="")
    parts.report("running", force=True, message="Trying mirrored test images on validation", phase="test")
    scores = [(predict_probs(parts.model, images, parts.eval_tf, parts.device, flip=flip).argmax(1)
               == np.asarray(labels)).mean() for flip in (False, True)]
    return resolved(parts.run, cfg, tta="hflip" if scores[1] > scores[0] else "")


def normalization(run: Run, cfg: RunConfig, model, train_images) -> tuple[list, list]:
    """The backbone's pretrained mean/std, or the training images' own (streaming pass);
    stored in norm.json so evaluation and export use the same numbers."""
    if cfg.normalize == "dataset":
        mean, std = transforms.dataset_stats(train_images)
        std = [max(s, 1e-3) for s in std]
    else:
        dc = data_config(model, cfg.image_size)
        mean, std = list(dc["mean"]), list(dc["std"])
    run.write_json("norm.json", dict(mean=mean, std=std, source=cfg.normalize))
    return mean, std
