"""What a run writes to survive: the best weights (atomically), the epoch rows, and the state
Resume needs (ResumeState: saved after every epoch, restored when a run goes on)."""
from __future__ import annotations

import contextlib
import errno
import shutil

import safetensors.torch
import torch
from torch import nn

from core import paths
from core.serve.store import Run
from core.training import distributed as dist


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


def record_epoch(run: Run, row: dict) -> None:
    run.append_epoch(row)
    if row["best"]:
        run.set_status("running", best_epoch=row["epoch"], best_val_acc=row["val_acc"])


class ResumeState:
    """A run's end-of-epoch state (`state`, from load_resume_state, when the run is resumed). The
    weights and counters come back before the first phase; the optimiser, schedule and loss scaler
    when the phase they belong to starts, as only then do they exist."""

    def __init__(self, run: Run, state: dict | None = None):
        self.run, self.state = run, state

    def restore(self, model: nn.Module, device) -> tuple[float, int, int]:
        """The last finished epoch's weights into `model`; returns (best score, epochs since it, epoch)."""
        run, state = self.run, self.state
        model.load_state_dict(safetensors.torch.load_file(str(run.file("last.safetensors")), device=str(device)))
        epoch = state["epoch"]
        run.keep_epochs(epoch)
        if state.get("row") and not any(r["epoch"] == epoch for r in run.epochs()):
            record_epoch(run, state["row"])
        run.set_status("running", message=f"Resuming after epoch {epoch}")
        return state["best"], state["since_best"], epoch

    def load_optimizer(self, phase_index: int, optimizer, scheduler, scaler) -> None:
        if not self.state or self.state.get("phase_index") != phase_index:
            return
        optimizer.load_state_dict(self.state["optimizer"])
        if scheduler and self.state.get("scheduler"):
            scheduler.load_state_dict(self.state["scheduler"])
        scaler.load_state_dict(self.state["scaler"])

    def save(self, model: nn.Module, optimizer, scheduler, scaler, progress: dict) -> None:
        save_resume_state(self.run, model, optimizer, scheduler, scaler, progress)
