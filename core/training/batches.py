"""The batches of one phase: rows of its cache, or images through the phase's transform, in an
order drawn from (seed, epoch) alone, so a resumed run sees the batches an uninterrupted one
would."""
from __future__ import annotations

import torch

from core.models import prefix
from core.training import distributed as dist
from core.training.parts import Parts
from core.training.steps import feature_batches, loader


class PhaseBatches:
    def __init__(self, parts: Parts, seed: int, cache: dict | None, augments: bool):
        self.parts, self.seed, self.cache, self.augments = parts, seed, cache, augments
        self.loaders: dict = {}      # (split, batch size) -> DataLoader: one per phase, so workers persist

    @property
    def cached(self) -> bool:
        return self.cache is not None

    def train(self, epoch: int, batch_size: int):
        labels = self.parts.labels("train")
        if self.cached:
            order = dist.train_order(len(labels), self.seed, epoch)
            return feature_batches(self.cache["train"], labels, batch_size, order, self._view_rows(epoch))
        dl = self._loader("train", batch_size)
        dl.sampler.set_epoch(epoch)
        return dl

    def val(self, batch_size: int):
        labels = self.parts.labels("val")
        if self.cached:
            return feature_batches(self.cache["val"], labels, batch_size, dist.eval_order(len(labels)))
        return self._loader("val", batch_size)

    def _view_rows(self, epoch: int) -> torch.Tensor | None:
        """One cached augmented view per image, drawn afresh each epoch."""
        store, n = self.cache["train"], len(self.parts.labels("train"))
        views = (store.n if isinstance(store, prefix.Store) else len(store)) // max(n, 1)
        if views <= 1:
            return None
        g = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
        return torch.randint(views, (n,), generator=g) * n + torch.arange(n)

    def _loader(self, split: str, batch_size: int):
        if (split, batch_size) not in self.loaders:
            parts, n = self.parts, len(self.parts.labels(split))
            if split == "train":
                tf, order = parts.train_tf if self.augments else parts.eval_tf, dist.train_sampler(n, self.seed)
            else:
                tf, order = parts.eval_tf, dist.eval_order(n)
            self.loaders[(split, batch_size)] = loader(parts.images(split), parts.labels(split), tf, batch_size,
                                                       order, parts.device)
        return self.loaders[(split, batch_size)]

    def sample(self) -> torch.Tensor:
        """A few training inputs as the phase's step model sees them, for its precision trial."""
        parts = self.parts
        if self.cached:
            store = self.cache["train"]
            n = min(8, len(store) if isinstance(store, torch.Tensor) else store.n)
            rows = torch.arange(n)      # indexing copies: a slice of an inference tensor can't train
            picked = store.get(rows.numpy()) if isinstance(store, prefix.Store) else store[rows.to(store.device)]
            return picked.to(parts.device)
        with torch.random.fork_rng(devices=[]):   # the trial must not shift the run's augmentations
            images = [parts.train_tf(img) for img in parts.images("train")[:8]]
        return torch.stack(images).to(parts.device, memory_format=torch.channels_last)
