"""The phases a run trains and, under a time budget, their fit to the clock. The planner
(core.training.budget) chooses the phases once from this machine's measured speed, and plan.json keeps
them so a resume follows the same plan; while training, BudgetClock refits the running phase to the
epoch times it sees. Each plan resolves the run's epochs (core.training.resolved)."""
from __future__ import annotations

import time
from dataclasses import replace

from core.config import RunConfig
from core.models.backbones import apply_freeze
from core.serve.store import Run
from core.training import budget
from core.training.parts import Parts
from core.training.phase_caches import views
from core.training.precision import Precision
from core.training.resolved import resolved


def phases_for(parts: Parts, cfg: RunConfig, precision: Precision, resumed: dict | None,
               started: float) -> tuple[list[budget.Phase], RunConfig]:
    """The config's phases; with a time budget, the planner's whatever the freeze setting (it
    chooses the depth), with the config they resolve."""
    if not cfg.time_budget_s or cfg.freeze == "scratch":     # from scratch: the budget only stops it
        return budget.config_phases(cfg), cfg
    saved = parts.run.read_json("plan.json")
    if resumed and saved:
        return budget.phases_from(saved["phases"]), cfg
    return _plan(parts, cfg, precision, started)


def _plan(parts: Parts, cfg: RunConfig, precision: Precision, started: float):
    run = parts.run
    parts.report("preparing", force=True, message="Measuring this machine to plan the time budget", phase="plan")
    speeds = budget.measure(parts.model, cfg.image_size, parts.device, parts.train_tf, parts.images("train"),
                            precision=precision.infer())
    counts = budget.Counts(*(len(parts.labels(s)) for s in ("train", "val", "test")))
    left = cfg.time_budget_s - (time.monotonic() - started)
    phases, notes = budget.plan(cfg, parts.model, speeds, counts, left, views(cfg))
    if cfg.max_epochs and budget.total_epochs(phases) > cfg.max_epochs:
        phases = budget.cap_epochs(phases, cfg.max_epochs)
        notes.append(f"Cut to the teacher's cap of {cfg.max_epochs} epochs.")
    apply_freeze(parts.model, "head")
    run.write_json("plan.json", dict(phases=[p.to_dict() for p in phases], notes=notes, speeds=speeds.summary(),
                                     budget_s=cfg.time_budget_s, planned_after_s=round(cfg.time_budget_s - left, 1)))
    cfg = resolved(run, cfg, epochs=budget.total_epochs(phases))
    run.set_status("preparing", plan=notes)
    return phases, cfg


UNMEASURED_IMAGE_S = 0.02   # a test image's cost when the plan measured none (a slow CPU's)
TEST_SAFETY = 2.0           # the test pass decodes and transforms too, on a CPU that may be shared


def reserve_for_testing(n_test: int, n_val: int = 0, tta: str = "", image_s: float | None = None) -> float:
    """Seconds kept back from a time budget for the final test pass: mirrored test images cost
    a second pass, and deciding on them ("auto") two passes over validation. `image_s` is the
    plan's measured forward pass plus transform per image; a fixed guess without one held back a
    quarter of a 90 s budget that a 3 s test pass never used."""
    images = n_test * (2 if tta else 1) + (2 * n_val if tta == "auto" else 0)
    per_image = UNMEASURED_IMAGE_S if image_s is None else min(UNMEASURED_IMAGE_S, TEST_SAFETY * image_s)
    return 2.0 + per_image * images


def measured_image_s(plan: dict | None) -> float | None:
    """Seconds per image of an evaluation pass from plan.json's speeds (None when not measured)."""
    speeds = (plan or {}).get("speeds") or {}
    try:
        ms = float(speeds["forward_ms"]) + float(speeds.get("augment_ms", 0.0))
    except (KeyError, TypeError, ValueError):        # plan.json is a file anyone with the folder can edit
        return None
    return ms / 1000 if ms > 0 else None


# The last phase fills the budget up to this many times its planned epochs. At 3x, a 300 s budget
# on 400 images ended after 110-150 s; beyond 10x the epochs are so short that more of them only
# churn checkpoints.
LONGEST = 10
# A last epoch starts when this share of it fits, and its training pass stops at the deadline:
# whole epochs only left up to one epoch unused (EuroSAT, 25 s epochs: 89% of 300 s used).
SHORT_EPOCH = 0.25


class BudgetClock:
    """When training must end to leave the test pass its time (no deadline without a budget)."""

    def __init__(self, deadline: float | None = None, short_epochs: bool = True):
        self.deadline = deadline
        self.longest: dict[int, int] = {}      # phase index -> the last epoch it may be lengthened to
        # An epoch cut short on one process would leave the others waiting in an all-reduce.
        self.short_epochs = short_epochs

    @classmethod
    def start(cls, cfg: RunConfig, started: float, n_test: int, n_val: int = 0,
              image_s: float | None = None, short_epochs: bool = True) -> "BudgetClock":
        if not cfg.time_budget_s:
            return cls(None)
        return cls(started + cfg.time_budget_s - reserve_for_testing(n_test, n_val, cfg.tta, image_s),
                   short_epochs)

    def running(self) -> bool:
        return bool(self.deadline)

    def over(self) -> bool:
        return self.running() and time.monotonic() > self.deadline

    def stop_training_at(self, validate_s: float) -> float | None:
        """When a training pass must stop to validate before the deadline (None: it runs whole)."""
        return self.deadline - validate_s if self.running() and self.short_epochs else None

    def refit(self, phases: list[budget.Phase], index: int, epoch: int, first: int, last: int,
              epoch_s: float) -> int:
        """The epoch phase `index` (epochs first+1..last) should end at, from its measured epoch
        time: from its first epoch on, the last phase takes as many epochs as fit (up to LONGEST
        times the plan: on a small data set an epoch takes seconds); any phase running late is cut."""
        left = max(0.0, self.deadline - time.monotonic()) / max(epoch_s, 1e-6)
        fit = int(left)
        if index == len(phases) - 1 and self.short_epochs and left - fit >= SHORT_EPOCH:
            fit += 1                            # a short last epoch, cut at the deadline
        if epoch == first + 1 and index == len(phases) - 1:
            self.longest[index] = first + LONGEST * phases[index].epochs
        # Later epochs may lengthen it again within that cap: epoch times vary, and an estimate
        # from one slow epoch left up to two epochs' time unused at the end.
        return min(epoch + fit, max(last, self.longest.get(index, last)))


def refitted(run: Run, cfg: RunConfig, phases: list[budget.Phase], index: int, epochs: int,
             at_epoch: int) -> tuple[list[budget.Phase], RunConfig]:
    """The plan with phase `index` at `epochs` epochs, kept in plan.json, and the config it resolves."""
    phases = [replace(p, epochs=epochs) if i == index else p for i, p in enumerate(phases)]
    plan = run.read_json("plan.json", {}) or {}
    plan.update(phases=[p.to_dict() for p in phases], refitted_at_epoch=at_epoch)
    run.write_json("plan.json", plan)
    return phases, resolved(run, cfg, epochs=budget.total_epochs(phases))
