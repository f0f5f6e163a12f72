"""The epochs of a run's phases: each trains, validates, keeps the best weights and saves the state
a resume goes on from. What a phase trains on comes from PhaseCaches and PhaseBatches, in the
precision Precision chose; a time budget's BudgetClock may lengthen or cut the running phase;
ResumeState saves and restores the state between epochs."""
from __future__ import annotations

import math
import time

from core.config import RunConfig
from core.device import describe, grad_scaler
from core.models import prefix
from core.models.backbones import apply_freeze, freeze_norm_stats
from core.training import budget
from core.training import distributed as dist
from core.training.batches import PhaseBatches
from core.training.checkpoints import ResumeState, record_epoch, save_checkpoint
from core.training.parts import Parts
from core.training.phase_caches import PhaseCaches, augmenting
from core.training.plan import BudgetClock, refitted
from core.training.precision import Precision
from core.training.steps import make_optimizer, make_scheduler, run_epoch


class Loop:
    def __init__(self, parts: Parts, cfg: RunConfig, criterion, phases: list[budget.Phase],
                 caches: PhaseCaches, precision: Precision, clock: BudgetClock, resume: ResumeState):
        self.parts, self.criterion, self.caches, self.precision = parts, criterion, caches, precision
        self.clock, self.resume = clock, resume
        # Both are replaced, never edited, when the budget refits a phase: the config then
        # resolves the run's new epoch count.
        self.cfg, self.phases = cfg, phases
        self.scaler = grad_scaler(parts.device)
        self.best, self.since_best, self.epoch = -math.inf, 0, 0
        self.validate_s = 0.0        # the last validation pass's seconds: a short epoch leaves it time

    def restore(self) -> None:
        self.best, self.since_best, self.epoch = self.resume.restore(self.parts.model, self.parts.device)

    def fit(self) -> None:
        for index in range(len(self.phases)):
            first = budget.total_epochs(self.phases[:index])       # a refitted phase moves the next ones
            last = first + self.phases[index].epochs
            if self.epoch < last and not self.phase(index, first, last):
                return     # early stop (or the time budget) ends every phase

    def phase(self, index: int, first: int, last: int) -> bool:
        """Epochs first+1..last of one phase; False when early stopping or the budget ends training."""
        step_model, batches, precision = self.prepare(self.phases[index])
        optimizer, scheduler = self.optimizer(index, last - first)
        while self.epoch < last:
            self.epoch += 1
            started = time.monotonic()
            if self.one_epoch(index, batches, step_model, optimizer, scheduler, precision):
                return False       # cut short at the budget's deadline: its time says nothing of the next
            if self.cfg.patience and self.since_best >= self.cfg.patience:
                self.parts.run.set_status("running", early_stopped=self.epoch)
                return False
            if self.clock.running() and self.epoch < last:
                last, scheduler = self.refit(index, first, last, time.monotonic() - started, optimizer, scheduler)
        return not self.clock.over()

    def prepare(self, phase: budget.Phase):
        """The phase's frozen layers and cache: (the model its steps run, its batches, their precision)."""
        parts, model = self.parts, self.parts.model
        apply_freeze(model, phase.freeze, phase.top_k)
        kind, split, why_not = self.caches.choose(phase)
        parts.run.set_status("preparing", device=describe(parts.device), feature_cache=kind == "features",
                             prefix_cache=split.cut_name if split else "", cache_off=why_not, phase_name=phase.name)
        cache = self.caches.build(kind, split, phase) if kind else None
        batches = PhaseBatches(parts, self.cfg.seed, cache, augmenting(self.cfg, phase))
        step_model = model.head if kind == "features" else prefix.SuffixModel(model, split) if kind else model
        trial = f"train@{split.cut_name}" if split else "train@head" if kind else "train"
        precision = self.precision.train(trial, step_model, batches.sample())
        return dist.wrap(step_model, parts.device), batches, precision

    def optimizer(self, index: int, epochs: int):
        phase = self.phases[index]
        optimizer = make_optimizer(self.cfg, self.parts.model, head_only=phase.freeze == "head", lr=phase.lr,
                                   backbone_lr_mult=phase.backbone_lr_mult)
        scheduler = make_scheduler(self.cfg, optimizer, epochs)
        self.resume.load_optimizer(index, optimizer, scheduler, self.scaler)
        return optimizer, scheduler

    def refit(self, index: int, first: int, last: int, epoch_s: float, optimizer, scheduler):
        """The running phase fitted to the budget's clock, with its schedule re-made for the new
        length so the learning rate still anneals."""
        new_last = self.clock.refit(self.phases, index, self.epoch, first, last, epoch_s)
        if new_last == last:
            return last, scheduler
        self.phases, self.cfg = refitted(self.parts.run, self.cfg, self.phases, index, new_last - first, self.epoch)
        self.parts.run.set_status("running", message=f"Epochs take {epoch_s:.0f} s: this phase now ends at "
                                                     f"epoch {new_last} to use the time budget")
        if scheduler is not None and new_last > self.epoch:      # a phase cut to end now needs none
            scheduler = make_scheduler(self.cfg, optimizer, new_last - first, done=self.epoch - first)
        return new_last, scheduler

    def one_epoch(self, index: int, batches: PhaseBatches, step_model, optimizer, scheduler, precision) -> int:
        """Trains, validates and records one epoch; returns how many batches trained if the
        budget's deadline cut it short, else 0."""
        parts, epoch, start = self.parts, self.epoch, time.perf_counter()
        lr = optimizer.param_groups[0]["lr"]
        (train_loss, train_acc), (val_loss, val_acc), n_train, cut = self.passes(batches, step_model, optimizer,
                                                                                  precision)
        if scheduler:
            scheduler.step()
        improved = self.keep_best(val_acc if parts.labels("val") else -train_loss)
        row = dict(epoch=epoch, phase=self.phases[index].name, lr=lr, train_loss=train_loss, train_acc=train_acc,
                   val_loss=val_loss, val_acc=val_acc, seconds=time.perf_counter() - start, best=improved)
        if cut:
            row["train_batches"] = cut     # a short last epoch, stopped at the time budget
        # The row first, so a run killed once its resume state is on disk always shows the epoch;
        # killed in between, Resume drops the row (keep_epochs) and trains that epoch again. The
        # resume state carries the row too, for a row lost to a full disk.
        record_epoch(parts.run, row)
        self.resume.save(parts.model, optimizer, scheduler, self.scaler,
                         dict(epoch=epoch, phase_index=index, best=self.best, since_best=self.since_best, row=row))
        done = f"stopped after {cut} of {n_train} batches, at the time budget" if cut else "done"
        parts.report(force=True, message=f"Epoch {epoch}/{self.cfg.epochs} {done}", epoch=epoch,
                     epochs=self.cfg.epochs, phase="train", step=n_train, steps=n_train)
        return cut

    def passes(self, batches: PhaseBatches, step_model, optimizer, precision):
        """This epoch's training pass, then its validation pass: ((loss, acc), (loss, acc), training
        batches, how many of them trained if the budget's deadline cut the pass short, else 0)."""
        parts, cfg = self.parts, self.cfg
        per_rank = dist.local_batch(cfg.batch_size)
        val_batch = 256 if batches.cached else per_rank
        n_train = math.ceil(len(parts.labels("train")) / cfg.batch_size)
        n_val = math.ceil(len(parts.labels("val")) / (val_batch * dist.world()))
        step_model.train()
        freeze_norm_stats(parts.model)
        counted = Until(batches.train(self.epoch, per_rank), self.clock.stop_training_at(self.validate_s))
        train = self.run_pass(step_model, counted, optimizer, n_train, precision)
        step_model.eval()
        started = time.monotonic()
        val = self.run_pass(step_model, batches.val(val_batch), None, n_val, precision)
        self.validate_s = time.monotonic() - started
        return train, val, n_train, counted.taken if counted.cut else 0

    def run_pass(self, step_model, batches, optimizer, n_batches: int, precision):
        parts = self.parts
        return run_epoch(step_model, batches, self.criterion, optimizer, self.scaler, parts.device, parts.report,
                         self.epoch, self.cfg.epochs, n_batches, precision, parts.stream)

    def keep_best(self, score: float) -> bool:
        """Whether `score` beats the best so far; its weights then become best.safetensors."""
        improved = score > self.best
        self.best, self.since_best = (score, 0) if improved else (self.best, self.since_best + 1)
        if improved:
            save_checkpoint(self.parts.model, self.parts.run)
        return improved


class Until:
    """Batches until a moment (time.monotonic()), at least one: how a short last epoch stops at
    the budget's deadline. Iterated lazily, so the batches' own iterator starts where the caller
    starts this one (under the run's random stream)."""

    def __init__(self, batches, stop_at: float | None):
        self.batches, self.stop_at = batches, stop_at
        self.taken, self.cut = 0, False

    def __iter__(self):
        for batch in self.batches:
            if self.taken and self.stop_at is not None and time.monotonic() > self.stop_at:
                self.cut = True
                return
            self.taken += 1
            yield batch
