"""What the pieces of one run's training share (core.training.loop and the caches, precision, plan
and resume pieces it uses), fixed once the model is built."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from core import rng
from core.config import RunConfig
from core.data import transforms
from core.serve.store import Run
from core.training.steps import Reporter


@dataclass(frozen=True)
class Parts:
    run: Run
    report: Reporter
    model: nn.Module
    data: dict                    # {split: (images, labels, files)}
    device: torch.device
    mean: list
    std: list
    stream: rng.Stream            # the run's own random numbers, whatever else the process draws
    eval_tf: Callable
    train_tf: Callable

    @classmethod
    def build(cls, run: Run, cfg: RunConfig, report: Reporter, model: nn.Module, data: dict, device,
              mean: list, std: list, stream: rng.Stream) -> "Parts":
        return cls(run, report, model, data, device, mean, std, stream,
                   transforms.build_transform(cfg.image_size, mean, std),
                   transforms.build_transform(cfg.image_size, mean, std, cfg.augment))

    def images(self, split: str) -> list:
        return self.data[split][0]

    def labels(self, split: str) -> list:
        return self.data[split][1]
