"""One protocol for progress and cancel, shared by every long job in core/.

    progress(done, total, message)       # Progress: `done` of `total` units, and what is going on

Why this shape: most jobs count something (images decoded, embedded, predicted, maps drawn), so
`(done, total)` is what most callers already reported; the message is what the step-by-step jobs
(Doctor audit, embedding maps, export checks) need to name their steps. A fraction is just
`done / total`, so a page bar or status.json needs nothing else. Totals may change between calls:
a job made of parts reports each on its own scale through `part`.

A job stops early by raising `Cancelled`: `batched_forward` does when its `cancel` event is set, and
any progress callback may raise it (a page's Stop, a task's time cap). `core.training.steps.Stopped`
is the training loop's subclass of it.

    vectors = batched_forward(model, images, 64, device, progress, cancel=stop, prepare=to_batch)
"""
from __future__ import annotations

import threading
from typing import Callable, Sequence

import torch

from core.device import autocast
from core.hooks import eval_mode

Progress = Callable[[int, int, str], None]


class Cancelled(Exception):
    """The user pressed Stop (or a time cap was reached); the job ends without a result."""


def silent(done: int, total: int, message: str = "") -> None:
    """A progress callback that shows nothing."""


def part(progress: Progress | None, start: float, end: float, text: str = "") -> Progress:
    """Progress of one part of a longer job, spanning fractions `start`..`end` of the whole. With
    `text` the message becomes "text done/total". The callback also takes bare (done, total), so it
    can be handed to functions that only count (core.data.images.decode_images)."""
    say = progress or silent

    def report(done: int, total: int, message: str = "") -> None:
        fraction = start + (end - start) * done / max(total, 1)
        say(round(1000 * fraction), 1000, f"{text} {done}/{total}" if text else message)
    return report


def check_cancel(cancel: threading.Event | None) -> None:
    """Raise Cancelled once `cancel` is set."""
    if cancel is not None and cancel.is_set():
        raise Cancelled("Stopped.")


def batched_forward(model: torch.nn.Module, inputs: torch.Tensor | Sequence, batch_size: int = 64,
                    device: torch.device | str | None = None, progress: Progress | None = None,
                    cancel: threading.Event | None = None, message: str = "",
                    prepare: Callable[[Sequence], torch.Tensor | None] | None = None,
                    precision: str | None = None) -> torch.Tensor:
    """`model` over `inputs` in batches, under eval_mode and inference_mode: the outputs as one
    float32 CPU tensor (0x0 when nothing ran). `inputs` is a tensor split by rows, or a sequence
    that `prepare(chunk)` turns into a batch (decoding, transforms; None or empty skips the chunk).
    After each batch `progress(done, total, "message done/total")`, counted in inputs; `cancel`
    raises Cancelled before the next one. Mixed precision follows core.device.autocast
    (`precision="fp32"` where outputs are compared exactly). The model is not moved: `device`
    (default: the model's) is where the batches go."""
    device = torch.device(device) if device is not None else _device_of(model)
    say, total, outs = progress or silent, len(inputs), []
    with eval_mode(model), torch.inference_mode():
        for start in range(0, total, batch_size):
            check_cancel(cancel)
            batch = inputs[start:start + batch_size]
            batch = prepare(batch) if prepare else batch
            if batch is not None and len(batch):
                outs.append(_forward(model, batch, device, precision))
            done = min(start + batch_size, total)
            say(done, total, f"{message} {done}/{total}".lstrip())
    return torch.cat(outs) if outs else torch.zeros(0, 0)


def _forward(model, batch: torch.Tensor, device: torch.device, precision: str | None) -> torch.Tensor:
    # channels_last is the faster layout for convolutions; it only exists for image batches
    layout = torch.channels_last if batch.dim() == 4 else torch.preserve_format
    with autocast(device, precision):
        return model(batch.to(device, memory_format=layout)).float().cpu()


def _device_of(model: torch.nn.Module) -> torch.device:
    param = next(model.parameters(), None)
    return param.device if param is not None else torch.device("cpu")
