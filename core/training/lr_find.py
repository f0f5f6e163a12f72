"""A learning-rate range test (Smith 2015, as fastai's lr_find): train briefly while the learning
rate grows exponentially, watch the loss, and suggest a rate a little below where it was lowest.

It runs on a throwaway copy of the model on a sample of the training images, through the same
caches as training (backbone features for head-only, the frozen prefix for top-k), so on a CPU it
takes seconds, not minutes. The suggestion depends on the freeze depth: the more layers train, the
smaller the rate that still lowers the loss.
"""
from __future__ import annotations

import math
import random

import torch
from torch import nn

from core.data import DataError, folders, transforms
from core.data import images as imaging
from core.data import splits as splitting
from core.device import autocast, pick_device
from core.models import prefix
from core.models.backbones import apply_freeze, build_model, freeze_norm_stats
from core.paths import resolve_data_root
from core.models.backbones import data_config
from core.training import estimate
from core.training.steps import make_optimizer

START_LR, END_LR = 1e-6, 1.0


def suggest_lr(cfg, steps: int = 60, max_images: int = 320, progress=None) -> dict:
    """Range test for `cfg` (data, backbone, freeze depth, optimiser). Returns {"lrs", "losses"
    (smoothed), "suggestion", "lowest", "sentence", "trains"}. `progress(done, total, message)`
    may raise to stop."""
    say = progress or (lambda *_: None)
    say(0, steps, "Reading a sample of the training images")
    images, labels, classes = _sample(cfg, max_images)
    model = build_model(cfg.arch, classes, "random" if cfg.freeze == "scratch" else cfg.weights,
                        cfg.weights_file, cfg.head, cfg.hidden, cfg.dropout)
    apply_freeze(model, cfg.freeze, cfg.top_k)
    dc = data_config(model, cfg.image_size)
    transform = transforms.build_transform(cfg.image_size, dc["mean"], dc["std"])
    device = pick_device(cfg.device)
    model.to(device, memory_format=torch.channels_last)
    estimate.check_training(model, cfg.arch, cfg.image_size, cfg.batch_size, estimate.TRAINED_SHARE.get(cfg.freeze, 1.0), device)
    step_model, inputs, trains = _step_model(model, cfg, images, transform, device, say, steps)
    optimizer = make_optimizer(cfg, model, head_only=cfg.freeze == "head", lr=START_LR)
    lrs, losses = _range_test(step_model, inputs, torch.as_tensor(labels), optimizer, model, cfg.batch_size,
                              device, steps, say)
    return dict(lrs=lrs, losses=losses, trains=trains, **_suggestion(lrs, losses))


def _sample(cfg, max_images: int):
    scan = folders.scan_folder(resolve_data_root(cfg.data_root), check=False)
    train = splitting.split_items(scan, cfg.split, cfg.split_seed, cfg.max_per_class)["train"]
    items = random.Random(cfg.seed).sample(train, min(max_images, len(train)))
    estimate.check_memory(int(len(items) * 3 * cfg.image_size ** 2 * estimate.DECODED_ASPECT),
                   f"Decoding {len(items)} images at {cfg.image_size} px", "use a smaller image size.")
    decoded, _ = imaging.decode_images(scan.root, items, cfg.image_size)
    keep = [i for i, img in enumerate(decoded) if img is not None]
    if not keep:
        raise DataError("No training image could be read.")
    return [decoded[i] for i in keep], [items[i].label for i in keep], len(scan.classes)


def _step_model(model, cfg, images, transform, device, say, steps):
    """What trains, and its inputs: cached features or prefix outputs where the backbone's lower
    part is frozen, else the images themselves."""
    def progress(done, total):
        say(0, steps, f"Caching the frozen layers' output ({done}/{total} images)")
    if cfg.freeze == "head":
        return model.head, prefix.compute(model.backbone, None, images, transform, device, progress=progress), "the head"
    split = prefix.find_split(model.backbone, cfg.image_size)
    what = "every layer" if cfg.freeze in ("full", "scratch") else f"the top {cfg.top_k} block(s) and the head"
    if split.ok:
        return prefix.SuffixModel(model, split), prefix.compute(model.backbone, split, images, transform, device,
                                                      progress=progress), what
    return model, [transform(img) for img in images], what


def _range_test(step_model, inputs, labels, optimizer, model, batch_size, device, steps, say):
    criterion = nn.CrossEntropyLoss()
    factor = (END_LR / START_LR) ** (1 / max(1, steps - 1))
    base = [g["lr"] for g in optimizer.param_groups]
    n = len(labels)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(0))
    lrs, losses, smooth, best = [], [], 0.0, math.inf
    step_model.train()
    freeze_norm_stats(model)
    for step in range(steps):
        scale = factor ** step
        for group, lr in zip(optimizer.param_groups, base):
            group["lr"] = lr * scale
        idx = order[(torch.arange(batch_size) + step * batch_size) % n]
        x = _batch(inputs, idx).to(device)
        with autocast(device):
            loss = criterion(step_model(x).float(), labels[idx].to(device))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        value = loss.item()
        smooth = 0.9 * smooth + 0.1 * value if step else value
        lrs.append(START_LR * scale)
        losses.append(smooth)
        say(step + 1, steps, f"Learning-rate test: step {step + 1}/{steps}, lr {START_LR * scale:.1e}")
        best = min(best, smooth)
        if not math.isfinite(value) or (step > 10 and smooth > 4 * best):
            break       # diverged: higher rates tell nothing more
    return lrs, losses


def _batch(inputs, idx):
    if isinstance(inputs, prefix.Store):
        return inputs.get(idx.numpy())
    x = torch.stack([inputs[i] for i in idx.tolist()])
    return x.contiguous(memory_format=torch.channels_last)


def _suggestion(lrs: list[float], losses: list[float]) -> dict:
    """A tenth of the rate with the lowest smoothed loss: at the minimum the loss is about to blow
    up, so one order of magnitude below is where it still falls fast and steadily."""
    if not losses:
        return dict(suggestion=None, lowest=None, sentence="The test did not run.")
    lowest = lrs[min(range(len(losses)), key=losses.__getitem__)]
    suggestion = float(f"{lowest / 10:.1g}")
    sentence = (f"The loss was lowest at a learning rate of about {lowest:.0e}; past that it climbs. "
                f"A tenth of it, {suggestion:g}, still learns fast without overshooting.")
    return dict(suggestion=suggestion, lowest=lowest, sentence=sentence)
