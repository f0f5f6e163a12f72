"""The epochs of one run: which cache each phase trains on, its precision, its batches, and the
refit of the plan to the time budget."""
from __future__ import annotations

import math
import time

import safetensors.torch
import torch

from core import paths, rng
from core.config import RunConfig
from core.data import transforms
from core.device import autocast, choose_precision, describe, grad_scaler, precision_key
from core.hooks import eval_mode
from core.models import prefix
from core.models.backbones import apply_freeze, freeze_norm_stats
from core.serve.store import Run
from core.train import budget
from core.train import distributed as dist
from core.train.budget import cache_refusal
from core.train.caches import features_cached
from core.train.checkpoints import save_checkpoint, save_resume_state
from core.train.steps import feature_batches, loader, make_optimizer, make_scheduler, run_epoch


def phases_for(run: Run, cfg: RunConfig, loop: "Loop", resumed, started: float) -> list[budget.Phase]:
    """The config's phases; with a time budget, the planner's, whatever the freeze setting (it
    chooses the depth), kept in plan.json so a resume follows the same plan."""
    if not cfg.time_budget_s or cfg.freeze == "scratch":     # from scratch: the budget only stops it
        return budget.config_phases(cfg)
    saved = run.read_json("plan.json")
    if resumed and saved:
        return budget.phases_from(saved["phases"])
    loop.report("preparing", force=True, message="Measuring this machine to plan the time budget",
                phase="plan")
    images = loop.data["train"][0]
    speeds = budget.measure(loop.model, cfg.image_size, loop.device, loop.train_tf, images,
                       precision=loop.infer_precision())
    counts = budget.Counts(*(len(loop.data[s][1]) for s in ("train", "val", "test")))
    left = cfg.time_budget_s - (time.monotonic() - started)
    phases, notes = budget.plan(cfg, loop.model, speeds, counts, left, loop.views())
    if cfg.max_epochs and budget.total_epochs(phases) > cfg.max_epochs:
        phases = budget.cap_epochs(phases, cfg.max_epochs)
        notes.append(f"Cut to the teacher's cap of {cfg.max_epochs} epochs.")
    apply_freeze(loop.model, "head")
    run.write_json("plan.json", dict(phases=[p.to_dict() for p in phases], notes=notes, speeds=speeds.summary(),
                                     budget_s=cfg.time_budget_s, planned_after_s=round(cfg.time_budget_s - left, 1)))
    cfg.epochs = budget.total_epochs(phases)
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
        self.eval_tf = transforms.build_transform(cfg.image_size, mean, std)
        self.train_tf = transforms.build_transform(cfg.image_size, mean, std, cfg.augment)
        self.scaler = grad_scaler(device)
        self.phases: list[budget.Phase] = budget.config_phases(cfg)
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
                if isinstance(store, prefix.Store):
                    store.close()

    def fit(self) -> None:
        for index, phase in enumerate(self.phases):
            first = budget.total_epochs(self.phases[:index])       # a refitted phase moves the next ones
            last = first + phase.epochs
            if self.epoch < last and not self.phase(index, phase, first, last):
                return     # early stop (or the time budget) ends every phase

    # ---------------------------------------------------------------- caches and precision

    def augmenting(self, phase: budget.Phase | None = None) -> bool:
        return any(self.cfg.augment.values()) and (phase is None or phase.augment)

    def views(self, phase: budget.Phase | None = None) -> int:
        return self.cfg.aug_views if self.augmenting(phase) else 1

    def cache_for(self, phase: budget.Phase) -> tuple[str, prefix.Split | None, str]:
        """("features" | "prefix" | "", split, why not) for the layers this phase keeps frozen."""
        refusal = cache_refusal(self.cfg) if phase.augment else ("" if self.cfg.cache_features else
                                                                 "caching is off in the settings.")
        if refusal or phase.freeze == "scratch":
            return "", None, refusal or "from scratch, every layer trains."
        if phase.freeze == "head":
            return "features", None, ""
        split = prefix.find_split(self.model.backbone, self.cfg.image_size)
        return ("prefix", split, "") if split.ok else ("", None, split.reason)

    def build_cache(self, kind: str, split: prefix.Split | None, phase: budget.Phase) -> dict:
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

    def compute_cache(self, split: prefix.Split | None, views: int, train_tf) -> dict:
        backbone, n = self.model.backbone, {s: len(self.data[s][1]) for s in ("train", "val")}
        per_image = (prefix.bytes_per_image(backbone, split, self.cfg.image_size) if split
                     else 2 * backbone.num_features)
        total = per_image * (views * n["train"] + n["val"])
        on_disk = total > prefix.ram_budget_bytes()
        where = "disk (memory-mapped)" if on_disk else "memory"
        what = f"block {split.cut_name}" if split else "the backbone's features"
        cache = {}
        for name, tf, v in (("train", train_tf, views), ("val", self.eval_tf, 1)):
            def progress(done, total_, name=name, v=v):
                self.report("preparing", message=f"Caching {what} ({name}, {v} view(s) per image)",
                            phase="features", step=done, steps=total_)
            disk = paths.home() / "cache" / f"{self.run.id}-{what.split()[-1]}-{name}.npy" if on_disk else None
            cache[name] = prefix.compute(backbone, split, self.data[name][0], tf, self.device, v,
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

    def phase(self, index: int, phase: budget.Phase, first: int, last: int) -> bool:
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
        step_model = model.head if kind == "features" else prefix.SuffixModel(model, split) if kind else model
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
        self.cfg.epochs = budget.total_epochs(self.phases)
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
            return (store.get(rows.numpy()) if isinstance(store, prefix.Store) else store[rows.to(store.device)]).to(self.device)
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
        views = (store.n if isinstance(store, prefix.Store) else len(store)) // max(n, 1)
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
