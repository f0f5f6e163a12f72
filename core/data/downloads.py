"""One-click standard data sets from torchvision, exported as class folders the app can read.

Downloading needs internet; `reachable()` answers within seconds so the UI can say "offline"
instead of hanging.
"""
from __future__ import annotations

import shutil
import socket
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlparse

import torchvision.datasets as tvd

from core.progress import Progress, part, silent
from core import paths


@dataclass(frozen=True)
class StandardSet:
    title: str
    cls: str                      # torchvision.datasets class name
    url: str                      # a file the download fetches; its host is checked first
    size_mb: int
    splits: dict = field(default_factory=dict)    # our split name -> constructor kwargs


STANDARD_SETS = {
    "flowers102": StandardSet("Oxford Flowers-102 (102 classes)", "Flowers102",
                              "https://www.robots.ox.ac.uk/~vgg/data/flowers/102/102flowers.tgz", 330,
                              {"train": dict(split="train"), "val": dict(split="val"),
                               "test": dict(split="test")}),
    "oxford_pets": StandardSet("Oxford-IIIT Pet (37 breeds)", "OxfordIIITPet",
                               "https://www.robots.ox.ac.uk/~vgg/data/pets/data/images.tar.gz", 800,
                               {"train": dict(split="trainval"), "test": dict(split="test")}),
    "dtd": StandardSet("Describable Textures (47 classes)", "DTD",
                       "https://www.robots.ox.ac.uk/~vgg/data/dtd/download/dtd-r1.0.1.tar.gz", 600,
                       {"train": dict(split="train"), "val": dict(split="val"),
                        "test": dict(split="test")}),
    "eurosat": StandardSet("EuroSAT satellite tiles (10 classes)", "EuroSAT",
                           "https://huggingface.co/datasets/torchgeo/eurosat", 90, {"train": {}}),
    "cifar10": StandardSet("CIFAR-10 (10 classes, 32 px)", "CIFAR10",
                           "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz", 170,
                           {"train": dict(train=True), "test": dict(train=False)}),
}


def reachable(name: str, timeout: float = 2.0) -> bool:
    host = urlparse(STANDARD_SETS[name].url).hostname
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def target_dir(name: str) -> Path:
    return paths.shared_dir() / f"std-{name}"


def download(name: str, max_per_class: int | None = None,
             progress: Progress | None = None) -> Path:
    """Download with torchvision, then write `train/`, `val/`, `test/` class folders of JPEGs
    (at most `max_per_class` per class and split). Returns the folder; reuses a finished one."""
    spec = STANDARD_SETS[name]
    out = target_dir(name)
    if (out / ".complete").exists():
        return out
    if not reachable(name):
        raise ConnectionError(f"Can't reach {urlparse(spec.url).hostname}: this machine seems to be "
                              "offline. Use the built-in demo, a zip, or a folder instead.")
    raw = paths.datasets_dir() / "raw" / name
    shutil.rmtree(out, ignore_errors=True)
    say = progress or silent
    for i, (split, kwargs) in enumerate(spec.splits.items()):
        share = (i / len(spec.splits), (i + 1) / len(spec.splits))
        say(i, len(spec.splits), f"Downloading {spec.title} ({split}, about {spec.size_mb} MB in all)…")
        dataset = getattr(tvd, spec.cls)(str(raw), download=True, **kwargs)
        _export(dataset, out / split, max_per_class, part(say, *share, f"Writing {split} images"))
    (out / ".complete").touch()
    return out


def _export(dataset, folder: Path, max_per_class, progress) -> None:
    names = getattr(dataset, "classes", None)
    counts: dict[int, int] = {}
    total = len(dataset)
    for i in range(total):
        image, label = dataset[i]
        label = int(label)
        if max_per_class and counts.get(label, 0) >= max_per_class:
            continue
        counts[label] = counts.get(label, 0) + 1
        cls = names[label] if names else f"class_{label:03d}"
        target = folder / cls.replace("/", "_") / f"{i:06d}.jpg"
        target.parent.mkdir(parents=True, exist_ok=True)
        image.convert("RGB").save(target, quality=92)
        if i % 200 == 0:
            progress(i, total)
