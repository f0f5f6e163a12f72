"""The dataset doctor, measured: known label noise is injected into a copy of a data set (a fixed
share of labels flipped to another class, fixed seed; the copy is hard links, the original is not
touched), then the audit runs and its "label" findings are compared with the flipped files.
Also times the audit with and without cached embeddings.

    python bench/bench_doctor.py                       # the demo, then ../shared/datasets/eurosat_rgb if present
    python bench/bench_doctor.py --data FOLDER --rate 0.05
"""
from __future__ import annotations

import argparse
import os
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from core.data import folders
from core.trust import doctor

SHARED = ROOT.parent / "shared" / "datasets" / "eurosat_rgb"


def noisy_copy(src: str, dest: Path, rate: float, seed: int = 0) -> set[str]:
    """Hard-link `src`'s images into `dest` with `rate` of them moved to another (random) class
    folder; returns the moved files' paths relative to `dest`."""
    scan = folders.scan_folder(src)
    rng = random.Random(seed)
    flip = set(rng.sample(range(len(scan.items)), round(rate * len(scan.items))))
    moved = set()
    for i, item in enumerate(scan.items):
        cls = scan.classes[item.label]
        if i in flip:
            cls = rng.choice([c for c in scan.classes if c != cls])
        target = dest / cls / f"{i:05d}{Path(item.path).suffix}"
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(Path(scan.root) / item.path, target)
        except OSError:
            shutil.copy2(Path(scan.root) / item.path, target)
        if i in flip:
            moved.add(str(target.relative_to(dest)))
    return moved


def measure(record, data: str, name: str, rate: float = 0.05) -> dict:
    with tempfile.TemporaryDirectory() as home, tempfile.TemporaryDirectory() as tmp:
        os.environ["FINETUNE_LAB_HOME"] = home          # an empty embedding cache
        dest = Path(tmp) / "noisy"
        flipped = noisy_copy(data, dest, rate)
        start = time.perf_counter()
        result = doctor.audit(dest)
        cold = time.perf_counter() - start
        start = time.perf_counter()
        result = doctor.audit(dest)
        warm = time.perf_counter() - start
    found = set(result.of("label")["path"])
    hits = len(found & flipped)
    precision = hits / len(found) if found else 0.0
    recall = hits / len(flipped) if flipped else 0.0
    n = len(result.items)
    record(f"doctor {name}: {n} images, {rate:.0%} labels flipped: precision", precision * 100, "%")
    record(f"doctor {name}: recall of the flipped labels", recall * 100, "%")
    record(f"doctor {name}: flagged as label errors / flipped", len(found), f"/{len(flipped)}")
    target_cold = 60 * n / 2000
    record(f"doctor audit of {n} images, embeddings computed (s)", cold, "s",
           f"<= {target_cold:.0f}", cold <= target_cold)
    record(f"doctor audit of {n} images, embeddings cached (s)", warm, "s", "<= 10", warm <= 10)
    return dict(precision=precision, recall=recall, flagged=len(found), flipped=len(flipped), cold=cold, warm=warm)


def bench_doctor(record, data: str | None = None, rate: float = 0.05) -> None:
    sets = [(data, Path(data).name)] if data else [(str(folders.demo_dataset()), "demo")] + \
        ([(str(SHARED), "EuroSAT")] if SHARED.is_dir() else [])
    for folder, name in sets:
        measure(record, folder, name, rate)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--data")
    parser.add_argument("--rate", type=float, default=0.05)
    args = parser.parse_args()

    def show(name, value, unit, target="", ok=None):
        print(f"{name:<66} {value:>8.1f} {unit:<4} {target:<8} {'' if ok is None else 'PASS' if ok else 'FAIL'}",
              flush=True)
    bench_doctor(show, args.data, args.rate)
