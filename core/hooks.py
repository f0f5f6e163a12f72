"""Forward hooks and train/eval state, always put back: shared by Inspect and the frozen-prefix
cache (core.models.prefix). Hooks live only inside `hooked()`, which removes them in `finally`."""
from __future__ import annotations

import contextlib
from typing import Callable, Iterable

from torch import nn


@contextlib.contextmanager
def hooked(pairs: Iterable[tuple[nn.Module, Callable]], pre: Iterable[tuple[nn.Module, Callable]] = ()):
    """Register forward hooks (and forward pre-hooks) for the duration of the block; always
    removed, even when the forward pass fails."""
    handles = []
    try:
        for module, fn in pairs:
            handles.append(module.register_forward_hook(fn))
        for module, fn in pre:
            handles.append(module.register_forward_pre_hook(fn))
        yield
    finally:
        for handle in handles:
            handle.remove()


@contextlib.contextmanager
def eval_mode(model: nn.Module):
    """Eval mode for the block; afterwards every submodule gets back its own mode (frozen batch
    norms inside a training model stay in eval)."""
    with _mode(model, training=False):
        yield model


@contextlib.contextmanager
def train_mode(model: nn.Module):
    """Train mode for the block (a timed training step), every submodule's own mode put back."""
    with _mode(model, training=True):
        yield model


@contextlib.contextmanager
def _mode(model: nn.Module, training: bool):
    modes = {m: m.training for m in model.modules()}
    model.train(training)
    try:
        yield
    finally:
        for module, was in modes.items():
            module.training = was
