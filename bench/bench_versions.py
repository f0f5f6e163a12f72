"""Data set versions, measured: the disk that ten versions of a data set take when each differs
from its parent by a few images (3 added, 1 removed, 1 moved to another class), against one copy
of the data set and against ten plain copies; and the time to snapshot, derive and pin a run.

    python bench/bench_versions.py                     # a generated set: 5 classes x 40 photos-like PNGs
    python bench/bench_versions.py --data FOLDER       # a class folder of your own (it is only read)

Sizes are bytes of distinct inodes (what `du` counts), so hard links count once. Everything is
written to a temporary data directory that is deleted at the end.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

TARGET_RATIO = 1.5        # ten versions may cost at most this many single copies
FLOOR_RATIO = 1.05        # ... and within a few percent of their distinct images stored once


def make_images(folder: Path, classes: int, per_class: int, size: int = 128, start: int = 0) -> list[Path]:
    """Noisy PNGs (noise doesn't compress: sizes like photos' JPEGs)."""
    made = []
    for c in range(classes):
        (folder / f"class_{c}").mkdir(parents=True, exist_ok=True)
        for i in range(start, start + per_class):
            pixels = np.random.default_rng(10_000 * c + i).integers(0, 255, (size, size, 3), dtype=np.uint8)
            made.append(folder / f"class_{c}" / f"img_{i:04d}.png")
            Image.fromarray(pixels).save(made[-1])
    return made


def timed(fn, *args, **kwargs):
    start = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - start


def bench_versions(show, data: str | None, n_versions: int = 10, per_class: int = 40) -> None:
    from core.data import versions
    work = Path(tempfile.mkdtemp(prefix="bench-versions-"))
    os.environ["FINETUNE_LAB_HOME"] = str(work / "home")
    source = Path(data) if data else work / "data"
    if not data:
        make_images(source, classes=5, per_class=per_class)
    v, seconds = timed(versions.snapshot, source, "bench", "bench")
    show("snapshot (copy into the object store, hash, link)", seconds, "s")
    chain, derive_s, incoming = [v], [], work / "incoming"
    classes = v.classes()
    for k in range(1, n_versions):
        new = make_images(incoming, classes=1, per_class=3, start=1000 + 3 * k)
        files = chain[-1].files
        child, seconds = timed(versions.derive, chain[-1], add=[(p, classes[k % len(classes)]) for p in new],
                               remove=[files[0]["path"]], author="bench",
                               relabel={files[-1]["path"]: classes[(k + 1) % len(classes)]})
        chain.append(child)
        derive_s.append(seconds)
    show(f"derive (+3 images, 1 removed, 1 moved), mean of {len(derive_s)}", sum(derive_s) / len(derive_s), "s")
    report_storage(show, source, chain, versions)
    items = {"train": [[e["path"], 0] for e in chain[-1].files]}
    _, cold = timed(versions.pin_for, chain[-1].folder, items)
    show(f"pin a run on the newest version ({len(items['train'])} files, hashes known)", cold * 1000, "ms")
    _, first = timed(versions.manifest_of_folder, source)
    _, again = timed(versions.manifest_of_folder, source)
    show("manifest_of_folder of the source, first look (hashing)", first * 1000, "ms")
    show("manifest_of_folder of the source, second look (cached)", again * 1000, "ms")
    import shutil
    shutil.rmtree(work, ignore_errors=True)


def report_storage(show, source: Path, chain, versions) -> None:
    from core.serve.access import folder_bytes
    one_copy = folder_bytes(source)
    plain = sum(v.size() for v in chain)
    stored = folder_bytes(versions.store() / "objects", *(v.folder for v in chain))
    books = folder_bytes(versions.store() / "manifests") + (versions.store() / "hashes.sqlite").stat().st_size
    mb = 1024 ** 2
    show("one copy of the data set", one_copy / mb, "MB")
    show(f"{len(chain)} versions as plain copies", plain / mb, "MB")
    show(f"{len(chain)} versions in the store (objects + linked folders)", stored / mb, "MB")
    show("  + manifests and hash cache", books / mb, "MB")
    ratio = (stored + books) / one_copy
    show(f"{len(chain)} versions / one copy", ratio, "x", f"<= {TARGET_RATIO}", ratio <= TARGET_RATIO)
    # the floor: every distinct image any version holds, once (what the versions added, and what
    # later ones removed, is content the older versions need)
    distinct = sum({e["sha256"]: e["size"] for v in chain for e in v.files}.values())
    show(f"{len(chain)} versions' distinct images, once each (the floor)", distinct / mb, "MB")
    floor = (stored + books) / distinct
    show(f"{len(chain)} versions / the floor", floor, "x", f"<= {FLOOR_RATIO}", floor <= FLOOR_RATIO)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", help="a class folder (default: a generated one)")
    parser.add_argument("--versions", type=int, default=10)
    parser.add_argument("--per-class", type=int, default=40, help="images per class of the generated set (5 classes)")
    args = parser.parse_args()

    def show(name, value, unit, target="", ok=None):
        print(f"{name:<66} {value:>9.2f} {unit:<4} {target:<8} {'' if ok is None else 'PASS' if ok else 'FAIL'}",
              flush=True)
    bench_versions(show, args.data, args.versions, args.per_class)
