"""fp32 or bf16 for each kind of pass of one run ("infer", "train", "train@head", "train@<block>"):
a short trial of the real model decides (core.device.choose_precision), and the choices are shown
in the status and kept in the run's precision.json."""
from __future__ import annotations

import torch

from core import paths
from core.config import RunConfig
from core.device import autocast, choose_precision, precision_key
from core.hooks import eval_mode
from core.training.parts import Parts


class Precision:
    def __init__(self, parts: Parts, cfg: RunConfig):
        self.parts, self.arch, self.image_size = parts, cfg.arch, cfg.image_size
        self.chosen: dict = {}       # kind -> {"precision", "why", timings}

    def infer(self) -> str:
        """For passes without gradients (measuring, caching); tried once per run."""
        if "infer" not in self.chosen:
            self._choose("infer", self._inference_step())
        return self.chosen["infer"]["precision"]

    def _inference_step(self):
        parts = self.parts
        images = [parts.eval_tf(img) for img in parts.images("train")[:8]]
        x = torch.stack(images).to(parts.device, memory_format=torch.channels_last) if images else None

        def step(precision):
            if x is not None:
                with torch.inference_mode(), eval_mode(parts.model), autocast(parts.device, precision):
                    parts.model(x)
        return step

    def train(self, kind: str, step_model, sample: torch.Tensor) -> str:
        """For the training steps of `step_model` (what a phase trains) on inputs like `sample`."""
        device = self.parts.device

        def step(precision):
            with eval_mode(step_model), autocast(device, precision):
                loss = step_model(sample).float().logsumexp(1).mean()
            loss.backward()
            for p in step_model.parameters():
                p.grad = None
        self._choose(kind, step)
        return self.chosen[kind]["precision"]

    def _choose(self, kind: str, step) -> None:
        run, device = self.parts.run, self.parts.device
        key = precision_key(device, self.arch, self.image_size, kind)
        self.chosen[kind] = choose_precision(device, key, step, paths.home() / "precision.json")
        run.set_status("preparing", precision={k: v["precision"] for k, v in self.chosen.items()})
        run.write_json("precision.json", self.chosen)
