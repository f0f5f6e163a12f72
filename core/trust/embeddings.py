"""Image embeddings: one vector per image from a backbone's pooled features (the input of the
classifier head). The dataset doctor and the embedding map use them.

    from core.trust import embeddings as EM
    scan = folders.scan_folder("my_data")
    vectors = EM.embed_items(scan.root, scan.items)                   # pretrained backbone, cached
    vectors = EM.embed_items(scan.root, scan.items, model=run_model)  # a fine-tuned run's backbone

Pretrained embeddings are cached on disk (one file per data folder, backbone and size) and only
new or changed files are computed again, so a second audit of the same folder skips the network.
"""
from __future__ import annotations

import hashlib
import json
import os
import threading
from pathlib import Path
import numpy as np
import safetensors.torch
import timm
import torch

from core.data import folders
from core.data import images as imaging
from core.data import transforms
from core import paths
from core.models.backbones import DEFAULT_ARCH, create_backbone, default_weights
from core.device import pick_device
from core.progress import Progress, batched_forward

DEFAULT_SIZE = 128       # the app's default training size: a 2,000-image audit fits in a minute on 2 cores
_MODELS: dict = {}
_LOCK = threading.Lock()


def pretrained(arch: str = DEFAULT_ARCH, weights: str = "auto") -> tuple[torch.nn.Module, list, list]:
    """(backbone without classifier in eval mode, mean, std), kept per process."""
    weights = default_weights(arch) if weights == "auto" else weights
    key = (arch, weights)
    with _LOCK:
        if key not in _MODELS:
            model = create_backbone(arch, weights, num_classes=0).eval()
            cfg = timm.data.resolve_model_data_config(model)
            _MODELS[key] = (model, list(cfg["mean"]), list(cfg["std"]))
        return _MODELS[key]


def cache_file(root: str, arch: str, weights: str, size: int) -> Path:
    name = hashlib.sha1(f"{Path(root).resolve()}|{arch}|{weights}|{size}".encode()).hexdigest()[:20]
    return paths.cache_dir(root, "embeddings") / f"{name}.safetensors"


def _stamp(root: str, rel: str) -> str:
    try:
        st = (Path(root) / rel).stat()
        return f"{rel}|{st.st_size}|{st.st_mtime_ns}"
    except OSError:
        return f"{rel}|missing"


def _read_cache(path: Path) -> dict[str, np.ndarray]:
    try:
        with safetensors.safe_open(str(path), "pt") as f:
            keys = json.loads(f.metadata()["keys"])
            vectors = f.get_tensor("vectors").numpy()
        return dict(zip(keys, vectors))
    except Exception:  # noqa: BLE001 - a missing or damaged cache is only recomputed
        return {}


def _write_cache(path: Path, known: dict[str, np.ndarray]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    keys = list(known)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")   # sessions may write at once
    with paths.removed_on_error(tmp):
        safetensors.torch.save_file({"vectors": torch.from_numpy(np.stack([known[k] for k in keys]))},
                                    str(tmp), metadata={"keys": json.dumps(keys)})
        tmp.replace(path)
    from core.serve.access import trim_lab_cache
    trim_lab_cache()


def embed_items(root: str, items: list, arch: str = DEFAULT_ARCH, weights: str = "auto",
                size: int = DEFAULT_SIZE, model: torch.nn.Module | None = None,
                mean=None, std=None, batch_size: int = 64,
                progress: Progress | None = None,
                stop: threading.Event | None = None, device: str = "auto") -> np.ndarray:
    """An (N, D) float32 array, one row per item (folders.Item or relative path) of the folder `root`;
    unreadable images get a row of NaN. With `model` (a FineTuneModel or a backbone), its pooled
    features and no cache; otherwise the pretrained `arch`, cached on disk. `progress(done, total,
    message)` is called per batch; setting `stop` raises core.progress.Cancelled."""
    rels = [getattr(it, "path", it) for it in items]
    if model is not None:
        backbone = getattr(model, "backbone", model)
        if mean is None:
            cfg = timm.data.resolve_model_data_config(backbone)
            mean, std = cfg["mean"], cfg["std"]
        return _compute(root, rels, backbone, mean, std, size, batch_size, progress, stop, device)
    weights = default_weights(arch) if weights == "auto" else weights
    path = cache_file(root, arch, weights, size)
    known = _read_cache(path)
    stamps = [_stamp(root, rel) for rel in rels]
    missing = [rel for rel, s in zip(rels, stamps) if s not in known]
    if missing:
        backbone, m, s = pretrained(arch, weights)
        fresh = _compute(root, missing, backbone, mean or m, std or s, size, batch_size, progress, stop, device)
        known.update({_stamp(root, rel): vec for rel, vec in zip(missing, fresh)})
        _write_cache(path, {k: known[k] for k in set(stamps) | set(known)})
    elif progress:
        progress(len(rels), len(rels), "Embeddings read from the cache")
    return np.stack([known[s] for s in stamps]) if stamps else np.zeros((0, 0), np.float32)


def _compute(root, rels, backbone, mean, std, size, batch_size, progress, stop, device) -> np.ndarray:
    device = pick_device(device)
    transform = transforms.build_transform(size, mean, std)
    readable: list[bool] = []

    def prepare(chunk):
        # decoded per batch, so a big folder never sits in memory whole
        images, _ = imaging.decode_images(root, [folders.Item(rel, 0) for rel in chunk], size)
        readable.extend(img is not None for img in images)
        good = [transform(img) for img in images if img is not None]
        return torch.stack(good) if good else None

    out = batched_forward(backbone.to(device), rels, batch_size, device, progress, stop,
                          "Embedding images", prepare).numpy()
    rows = np.full((len(rels), out.shape[1] or 1), np.nan, np.float32)
    if len(out):
        rows[np.array(readable)] = out
    return rows
