"""In-process caches shared by the runs of a sweep: decoded images and frozen-backbone features."""
from __future__ import annotations

import threading
from collections import OrderedDict

from core.config import RunConfig
from core.data import images as imaging
from core.paths import resolve_data_root
from core.training.steps import extract_features


def uses_feature_cache(cfg: RunConfig) -> bool:
    """Whether a head-only run trains on cached backbone features (augmented views included)."""
    return cfg.freeze == "head" and cfg.cache_features and (cfg.aug_views > 0 or not any(cfg.augment.values()))


# In-process caches shared by the runs of a sweep: decoded images per (folder, size), and
# frozen-backbone features per (backbone, weights, size, normalisation, images). Both are exact:
# a key differs whenever anything that changes the values differs.
_DECODED: "OrderedDict[tuple, dict]" = OrderedDict()
_FEATURES: "OrderedDict[tuple, dict]" = OrderedDict()
_CACHE_LOCK = threading.Lock()


def _remember(cache: OrderedDict, key, value, keep: int) -> None:
    with _CACHE_LOCK:
        cache[key] = value
        cache.move_to_end(key)
        while len(cache) > keep:
            cache.popitem(last=False)


def decode_cached(root: str, items, size: int, progress):
    """decode_images, reusing images this process already decoded at this size."""
    key = (root, size)
    with _CACHE_LOCK:
        known = _DECODED.get(key, {})
    missing = [it for it in items if it.path not in known]
    fresh, failures = imaging.decode_images(root, missing, size, progress=progress) if missing else ([], [])
    known = dict(known)
    known.update({it.path: img for it, img in zip(missing, fresh)})
    _remember(_DECODED, key, known, keep=2)
    if progress:
        progress(len(items), len(items), "Decoded")
    failed = {path for path, _ in failures}
    return [known.get(it.path) if it.path not in failed else None for it in items], failures


def features_cached(cfg: RunConfig, model, data, eval_tf, device, report, mean, std,
                    precision: str | None = None) -> dict:
    key = (cfg.arch, cfg.weights, cfg.weights_file, cfg.image_size, tuple(mean), tuple(std), str(device),
           resolve_data_root(cfg.data_root), cfg.seed if cfg.weights == "random" else None,
           tuple(tuple(data[s][2]) for s in ("train", "val", "test")), precision)
    with _CACHE_LOCK:
        hit = _FEATURES.get(key)
    if hit is not None:
        return hit
    feats = {s: extract_features(model.backbone, data[s][0], eval_tf, device, 64, report, s, precision)
             for s in ("train", "val", "test")}
    _remember(_FEATURES, key, feats, keep=2)
    return feats
