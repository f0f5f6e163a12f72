"""Training phases, and a planner that fits them into a time budget ("train for N minutes").

A plan is a list of `Phase`s. Without a budget it is the config's own (one phase, or head-only
first for two-phase runs). With `time_budget_s` the planner measures the real model on this
machine (seconds per image of each block, forward and training) and chooses:

1. the head alone on cached backbone features (seconds, always first: it gives a good head to
   start from, so deeper training doesn't wreck the pretrained features with a random one);
2. then the deepest fine-tune whose epochs still fit what is left: the top blocks trained on the
   frozen-prefix cache (with a bank of augmented views), or the whole network when even that fits.

Learning rates follow the depth (`core.config.depth_lr`): the more of the backbone trains, the smaller.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass, replace

import torch
from torch import nn

from core.config import HEAD_LR, depth_lr
from core.device import autocast
from core.hooks import eval_mode, hooked, train_mode
from core.models import prefix
from core.models.backbones import apply_freeze, block_groups, feature_dim

PLAN_EPOCHS = 8          # fine-tuning epochs the planner aims for
MIN_EPOCHS = 4           # fewer than this is not worth a phase (a cosine schedule needs room)
HEAD_EPOCHS = 8          # a linear head converges in a few epochs on cached features; more overfits it
SAFETY = 0.85            # plan this share of the time left: estimates are rough, a CPU is shared
STEP_OVERHEAD = 1.2      # a real training step (loss, optimiser, batching) over the timed forward+backward


@dataclass
class Phase:
    name: str
    freeze: str                   # head, top_k, full, scratch
    epochs: int
    top_k: int = 1
    lr: float | None = None       # None: the config's lr
    backbone_lr_mult: float | None = None
    seconds: float = 0.0          # the planner's estimate (0 when not planned)
    augment: bool = True          # False: this phase trains on plain images even if the config augments

    def to_dict(self) -> dict:
        return asdict(self)


def cache_refusal(cfg) -> str:
    """Why no frozen layers are cached for this config ("" when they can be)."""
    if not cfg.cache_features:
        return "caching is off in the settings."
    if any(cfg.augment.values()) and not cfg.aug_views:
        return ("augmentation runs live on every image; choose a number of augmented views to "
                "cache instead.")
    return ""


def config_phases(cfg) -> list[Phase]:
    """The phases a config asks for without a budget: two-phase runs train the head alone first."""
    if cfg.phase1_epochs > 0 and cfg.freeze not in ("head", "scratch") and cfg.epochs > cfg.phase1_epochs:
        return [Phase("head", "head", cfg.phase1_epochs, cfg.top_k),
                Phase("fine-tune", cfg.freeze, cfg.epochs - cfg.phase1_epochs, cfg.top_k)]
    return [Phase("train", cfg.freeze, cfg.epochs, cfg.top_k)]


# ---------------------------------------------------------------- measuring this machine

@dataclass
class Speeds:
    """Seconds per image on this machine for one model at one image size."""
    block_s: list            # forward, per block of the chain (eval mode)
    head_s: float            # forward_head + the new head
    train_factor: float      # a training step costs this many forwards (backward, optimiser)
    augment_s: float         # the training transform, per image
    names: list

    @property
    def forward_s(self) -> float:
        return sum(self.block_s) + self.head_s

    def from_block(self, cut: int) -> float:
        return sum(self.block_s[cut:]) + self.head_s

    def summary(self) -> dict:
        return dict(forward_ms=round(1000 * self.forward_s, 3), train_factor=round(self.train_factor, 2),
                    augment_ms=round(1000 * self.augment_s, 3),
                    block_ms={n: round(1000 * t, 3) for n, t in zip(self.names, self.block_s)})


def measure(model: nn.Module, image_size: int, device, train_tf, images, batch: int = 16,
            precision: str | None = None) -> Speeds:
    """Time each block of the chain on one batch (hooks record when each starts), then one training
    step of the whole model. Leaves weights, gradients, train/eval flags and the RNG as they were."""
    backbone = model.backbone
    chain = prefix.block_chain(backbone, image_size)
    sample = [images[i % len(images)] for i in range(batch)]
    with torch.random.fork_rng(devices=[]):        # the transform may draw: keep the run's RNG as it was
        start = time.perf_counter()
        x = torch.stack([train_tf(img) for img in sample]).to(device, memory_format=torch.channels_last)
        augment_s = (time.perf_counter() - start) / batch
    stamps: list[tuple[str, float]] = []

    def stamp(name):
        return lambda _m, _a: stamps.append((name, time.perf_counter()))

    with torch.random.fork_rng(devices=[]), eval_mode(model), torch.inference_mode(), \
            autocast(device, precision):
        model(x)                                   # warm-up
        with hooked((), pre=[(m, stamp(n)) for n, m in chain]):
            begin = time.perf_counter()
            feats = backbone.forward_features(x)
            end_features = time.perf_counter()
        model.head(backbone.forward_head(feats))
        head_s = (time.perf_counter() - end_features) / batch
    times = [t for _, t in stamps] + [end_features]
    block_s = [max(0.0, b - a) / batch for a, b in zip(times[:-1], times[1:])]
    if stamps:
        block_s[0] += (stamps[0][1] - begin) / batch       # anything before the first block
    forward = sum(block_s) + head_s
    _train_factor(model, x, device, precision)                  # warm-up: autograd's buffers
    factor = _train_factor(model, x, device, precision) / max(forward * batch, 1e-9)
    return Speeds(block_s, head_s, max(1.5, factor) * STEP_OVERHEAD, augment_s, [n for n, _ in stamps])


def _train_factor(model: nn.Module, x, device, precision) -> float:
    """Seconds of one training-mode forward+backward of the whole model on `x`; gradients,
    batch-norm statistics, train/eval flags and the RNG are put back after."""
    flags = {p: p.requires_grad for p in model.parameters()}
    buffers = {name: b.clone() for name, b in model.named_buffers()}
    for p in model.parameters():
        p.requires_grad_(True)
    try:
        with torch.random.fork_rng(devices=[]), train_mode(model):
            start = time.perf_counter()
            with autocast(device, precision):
                loss = model(x).float().logsumexp(1).mean()
            loss.backward()
            return time.perf_counter() - start
    finally:
        with torch.no_grad():
            for name, b in model.named_buffers():
                b.copy_(buffers[name])
        for p, flag in flags.items():
            p.grad = None
            p.requires_grad_(flag)


# ---------------------------------------------------------------- the plan

@dataclass
class Counts:
    train: int
    val: int
    test: int


def plan(cfg, model: nn.Module, speeds: Speeds, counts: Counts, seconds: float,
         views: int) -> tuple[list[Phase], list[str]]:
    """Phases that fit `seconds` of training, and one sentence per decision."""
    groups = len(block_groups(model.backbone))
    budget = seconds * SAFETY
    notes = []
    features_s = (counts.train + counts.val + counts.test) * speeds.forward_s
    head = Phase("head", "head", HEAD_EPOCHS, lr=HEAD_LR, seconds=features_s, augment=False)
    left = budget - features_s
    notes.append(f"Head on cached features: {HEAD_EPOCHS} epochs, about {features_s:.0f} s "
                 f"(one backbone pass over {counts.train + counts.val + counts.test} images).")
    # The deepest fine-tune that gets the epochs fine-tuning usually needs; failing that, the
    # deepest that gets a few. Depth only pays once the network had the epochs to use it.
    options = [(k, *_fine_tune_cost(cfg, model, speeds, counts, k, groups, views, left))
               for k in range(groups, 0, -1)]      # deepest first
    best = next((o for o in options if o[2] >= PLAN_EPOCHS), None) or \
        next((o for o in options if o[2] >= MIN_EPOCHS), None)
    apply_freeze(model, "head")
    if best is None:
        head.epochs = HEAD_EPOCHS * 2
        notes.append(f"No fine-tuning fits the {seconds:.0f} s budget at {cfg.image_size} px, so the "
                     "head trains longer. Give more time or use smaller images to fine-tune.")
        return [head], notes
    k, cost, epochs, cached = best
    freeze = "full" if k == groups else "top_k"
    lr = depth_lr(k / groups)
    what = "every block" if freeze == "full" else f"the top {k} of {groups} blocks"
    notes.append(f"Then {what} for {epochs} epochs at learning rate {lr:.1e}, about {cost:.0f} s"
                 + (f" on the frozen-prefix cache ({views} augmented views per image)." if cached else "."))
    if freeze != "full":
        notes.append("Deeper fine-tuning would not fit the budget with enough epochs.")
    return [head, Phase("fine-tune", freeze, epochs, k, lr=lr, backbone_lr_mult=1.0, seconds=cost)], notes


def _fine_tune_cost(cfg, model, speeds: Speeds, counts: Counts, k: int, groups: int, views: int,
                    left: float) -> tuple[float, int, bool]:
    """(seconds, epochs that fit `left` up to PLAN_EPOCHS, uses the prefix cache) for top-k."""
    apply_freeze(model, "full" if k == groups else "top_k", k)
    split = prefix.find_split(model.backbone, cfg.image_size) if cfg.cache_features else prefix.Split(reason="off")
    if split.ok:
        cut = _speed_index(speeds, split)
        prefix_s = speeds.forward_s - speeds.from_block(cut)
        build = (views * counts.train + counts.val) * (prefix_s + speeds.augment_s)
        epoch = (counts.train * speeds.from_block(cut) * speeds.train_factor
                 + counts.val * speeds.from_block(cut))
    else:
        build = 0.0
        epoch = (counts.train * (speeds.forward_s * speeds.train_factor + speeds.augment_s)
                 + counts.val * speeds.forward_s)
    epochs = min(PLAN_EPOCHS, int(max(0.0, left - build) // max(epoch, 1e-9)))
    return build + epochs * epoch, epochs, split.ok


def _speed_index(speeds: Speeds, split: prefix.Split) -> int:
    if split.cut >= len(split.blocks):
        return len(speeds.block_s)
    name = split.blocks[split.cut][0]
    return speeds.names.index(name) if name in speeds.names else split.cut


def total_epochs(phases: list[Phase]) -> int:
    return sum(p.epochs for p in phases)


def estimate(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 90 else f"{seconds / 60:.1f} min"


def cap_epochs(phases: list[Phase], cap: int) -> list[Phase]:
    """The plan cut to `cap` epochs in all: later phases lose epochs first (then go)."""
    out, left = [], cap
    for phase in phases:
        if left <= 0:
            break
        out.append(replace(phase, epochs=min(phase.epochs, left)))
        left -= out[-1].epochs
    return out


def phases_from(rows) -> list[Phase]:
    """A saved plan read back (plan.json, which anyone with the folder can edit): checked like a
    config, ValueError with one sentence for the first problem."""
    if not isinstance(rows, list) or not rows or len(rows) > 20:
        raise ValueError("plan.json is damaged (no phases): delete it, or start a new run.")
    return [_checked_phase(i, row) for i, row in enumerate(rows, 1)]


def _checked_phase(i: int, row) -> Phase:
    where = f"plan.json, phase {i}"
    if not isinstance(row, dict) or set(row) - set(Phase.__dataclass_fields__):
        raise ValueError(f"{where}: not a phase (unknown fields).")
    try:
        phase = Phase(**row)
    except TypeError as err:
        raise ValueError(f"{where}: {err}.") from None
    numbers = {"epochs": (phase.epochs, 1, 10_000), "top_k": (phase.top_k, 1, 1_000)}
    for name, (value, low, high) in numbers.items():
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
            raise ValueError(f"{where}: {name} must be a whole number from {low} to {high}, got {value!r}.")
    for name in ("lr", "backbone_lr_mult"):
        value = getattr(phase, name)
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                                  or not 0 < value <= 10 or value != value):
            raise ValueError(f"{where}: {name} must be a number above 0 and at most 10, got {value!r}.")
    if phase.freeze not in ("head", "top_k", "full", "scratch"):
        raise ValueError(f"{where}: freeze must be head, top_k, full or scratch, got {phase.freeze!r}.")
    return phase


def describe_plan(phases: list[Phase]) -> list[dict]:
    """Rows for a table: phase, what trains, epochs, learning rate, estimated time."""
    return [dict(phase=p.name, trains={"head": "head only", "full": "every layer",
                                        "scratch": "every layer (random init)"}.get(p.freeze, f"top {p.top_k} blocks + head"),
                 epochs=p.epochs, lr=p.lr, estimate=estimate(p.seconds) if p.seconds else "–")
            for p in phases]


# ---------------------------------------------------------------- what a page shows before Start

def preview(cfg) -> dict:
    """Before a run starts: what its frozen-layer cache will hold (and the memory it needs), and
    with a time budget the plan, measured on a few of its images. Returns {"cache": sentence,
    "cache_mb", "phases", "notes"}."""
    from core.data import folders, transforms
    from core.data import images as imaging
    from core.data import splits as splitting
    from core.device import pick_device
    from core.models.backbones import build_model
    from core.paths import resolve_data_root
    from core.models.backbones import data_config

    scan = folders.scan_folder(resolve_data_root(cfg.data_root), check=False)
    splits = splitting.split_items(scan, cfg.split, cfg.split_seed, cfg.max_per_class)
    counts = Counts(*(len(splits[s]) for s in ("train", "val", "test")))
    model = build_model(cfg.arch, len(scan.classes), "random" if cfg.freeze == "scratch" else cfg.weights,
                        cfg.weights_file, cfg.head, cfg.hidden, cfg.dropout)
    views = cfg.aug_views if any(cfg.augment.values()) else 1
    out = dict(counts=counts, phases=[], notes=[])
    out.update(cache_sentence(cfg, model, counts, views, cache_refusal(cfg)))
    if cfg.time_budget_s and cfg.freeze != "scratch":
        dc = data_config(model, cfg.image_size)
        train_tf = transforms.build_transform(cfg.image_size, dc["mean"], dc["std"], cfg.augment)
        images, _ = imaging.decode_images(scan.root, splits["train"][:16], cfg.image_size)
        images = [img for img in images if img is not None]
        if images:
            speeds = measure(model, cfg.image_size, pick_device(cfg.device), train_tf, images)
            out["phases"], out["notes"] = plan(cfg, model, speeds, counts, cfg.time_budget_s * 0.9, views)
    return out


def cache_sentence(cfg, model, counts: Counts, views: int, refusal: str) -> dict:
    """One sentence on what is cached for the config's freeze depth, and its size in MB."""
    if refusal:
        return dict(cache=f"No caching: {refusal}", cache_mb=0.0)
    if cfg.freeze == "scratch":
        return dict(cache="No caching: from scratch, every layer trains.", cache_mb=0.0)
    apply_freeze(model, cfg.freeze, cfg.top_k)
    if cfg.freeze == "head":
        per_image, where = 2 * feature_dim(model.backbone), "the backbone's pooled features"
    else:
        split = prefix.find_split(model.backbone, cfg.image_size)
        if not split.ok:
            return dict(cache=f"No caching: {split.reason}", cache_mb=0.0)
        per_image = prefix.bytes_per_image(model.backbone, split, cfg.image_size)
        where = f"the frozen layers' output (the input of block {split.cut_name})"
    mb = per_image * (views * counts.train + counts.val + counts.test) / 2**20
    disk = mb * 2**20 > prefix.ram_budget_bytes()
    return dict(cache=f"Caches {where}: {views} view(s) per training image, about {mb:,.0f} MB "
                      f"{'on disk (memory-mapped; more than a third of free memory)' if disk else 'in memory'}.",
                cache_mb=mb)
