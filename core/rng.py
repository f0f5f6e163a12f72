"""Private random streams on torch's one process-wide CPU generator.

torchvision's augmentations and dropout draw from the global generator, which every thread of
the process shares: an augmentation preview on one page, drawn while a run trains in the
background, used to shift that run's random numbers (same seed, different metrics). Here each
consumer keeps its own generator state and swaps it in, under one lock, only while it draws, so
neither sees the other's numbers.
"""
from __future__ import annotations

import contextlib
import threading

import torch

_LOCK = threading.RLock()


class Stream:
    """A seeded random stream; `with stream.active():` makes it the global CPU generator for
    the block (other streams wait), then puts back whatever was there."""

    def __init__(self, seed: int):
        with _LOCK:
            saved = torch.get_rng_state()
            torch.manual_seed(seed)
            self.state = torch.get_rng_state()
            torch.set_rng_state(saved)

    @contextlib.contextmanager
    def active(self):
        with _LOCK:
            saved = torch.get_rng_state()
            torch.set_rng_state(self.state)
            try:
                yield
            finally:
                self.state = torch.get_rng_state()
                torch.set_rng_state(saved)


def active(stream: Stream | None):
    """`stream.active()`, or nothing to do when there is no stream."""
    return stream.active() if stream is not None else contextlib.nullcontext()


@contextlib.contextmanager
def exclusive():
    """Hold the generator for a draw of the global stream (a model's random init on a page), so
    it never lands inside a run's step and takes that run's numbers."""
    with _LOCK:
        yield
