"""The frozen layers' output a phase trains on, so they run once per image rather than once per
epoch: the backbone's features for a head-only phase (shared with later runs of a sweep through
core.training.caches), a frozen prefix's output for a top-k phase, with a bank of augmented views
when the run augments. Phases that freeze the same layers share one cache."""
from __future__ import annotations

from core import paths
from core.config import RunConfig
from core.models import prefix
from core.models.backbones import feature_dim
from core.training.budget import Phase, cache_refusal
from core.training.caches import features_cached
from core.training.parts import Parts
from core.training.precision import Precision


def augmenting(cfg: RunConfig, phase: Phase | None = None) -> bool:
    return any(cfg.augment.values()) and (phase is None or phase.augment)


def views(cfg: RunConfig, phase: Phase | None = None) -> int:
    return cfg.aug_views if augmenting(cfg, phase) else 1


class PhaseCaches:
    def __init__(self, parts: Parts, cfg: RunConfig, precision: Precision):
        self.parts, self.cfg, self.precision = parts, cfg, precision
        self.built: dict = {}        # (kind, cut, augmenting) -> {split: tensor or prefix.Store}
        self.features: dict = {}     # the head-only features of plain images: the test pass reuses them

    def choose(self, phase: Phase) -> tuple[str, prefix.Split | None, str]:
        """("features" | "prefix" | "", split, why not) for the layers this phase keeps frozen."""
        cfg = self.cfg
        refusal = cache_refusal(cfg) if phase.augment else ("" if cfg.cache_features else
                                                            "caching is off in the settings.")
        if refusal or phase.freeze == "scratch":
            return "", None, refusal or "from scratch, every layer trains."
        if phase.freeze == "head":
            return "features", None, ""
        split = prefix.find_split(self.parts.model.backbone, cfg.image_size)
        return ("prefix", split, "") if split.ok else ("", None, split.reason)

    def build(self, kind: str, split: prefix.Split | None, phase: Phase) -> dict:
        plain = not augmenting(self.cfg, phase)
        key = (kind, split.cut_name if split else "", not plain)
        if key not in self.built:
            self.built[key] = (self._features() if kind == "features" and plain else
                               self._compute(split, views(self.cfg, phase),
                                             self.parts.eval_tf if plain else self.parts.train_tf))
        if kind == "features" and plain:
            self.features = self.built[key]
        return self.built[key]

    def close(self) -> None:
        for cache in self.built.values():
            for store in cache.values():
                if isinstance(store, prefix.Store):
                    store.close()

    def _features(self) -> dict:
        p = self.parts
        return features_cached(self.cfg, p.model, p.data, p.eval_tf, p.device, p.report, p.mean, p.std,
                               self.precision.infer())

    def _compute(self, split: prefix.Split | None, views: int, train_tf) -> dict:
        parts, backbone = self.parts, self.parts.model.backbone
        n_train, n_val = len(parts.labels("train")), len(parts.labels("val"))
        per_image = (prefix.bytes_per_image(backbone, split, self.cfg.image_size) if split
                     else 2 * feature_dim(backbone))
        total = per_image * (views * n_train + n_val)
        on_disk = total > prefix.ram_budget_bytes()     # memory-mapped when it would not fit in memory
        what = f"block {split.cut_name}" if split else "the backbone's features"
        cache = {name: self._compute_split(split, name, tf, v, what, on_disk)
                 for name, tf, v in (("train", train_tf, views), ("val", parts.eval_tf, 1))}
        parts.run.set_status("preparing", cache=dict(what=what, views=views, mb=round(total / 2**20, 1),
                                                     where="disk (memory-mapped)" if on_disk else "memory"))
        return cache

    def _compute_split(self, split: prefix.Split | None, name: str, tf, views: int, what: str, on_disk: bool):
        parts = self.parts

        def progress(done, total):
            parts.report("preparing", message=f"Caching {what} ({name}, {views} view(s) per image)",
                         phase="features", step=done, steps=total)
        disk = paths.home() / "cache" / f"{parts.run.id}-{what.split()[-1]}-{name}.npy" if on_disk else None
        return prefix.compute(parts.model.backbone, split, parts.images(name), tf, parts.device, views,
                              progress=progress, disk=disk, precision=self.precision.infer(), stream=parts.stream)
