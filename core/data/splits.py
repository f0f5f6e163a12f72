"""Train/val/test splits: stratified by seed, groups kept together, duplicates and leaks found."""
from __future__ import annotations

import hashlib
import os
import random
from collections import Counter, defaultdict
from pathlib import Path
from typing import Iterable

from core.data.folders import SPLITS, DataScan, Item



def split_items(scan: DataScan, ratios=(0.7, 0.15, 0.15), seed: int = 0,
                max_per_class: int | None = None) -> dict[str, list[Item]]:
    """Stratified, seeded split. Pre-split folders keep their splits; a missing val or test split
    is carved out of train with the same ratios. `max_per_class` caps training images (few-shot)."""
    total = sum(ratios)
    val_frac, test_frac = ratios[1] / total, ratios[2] / total
    rng = random.Random(seed)
    result = {s: [] for s in SPLITS}
    for label in range(len(scan.classes)):
        own = [it for it in scan.items if it.label == label]
        given = {s: [it for it in own if it.split == s] for s in SPLITS}
        pool = given["train"] if scan.presplit else own
        pool = pool[:]
        rng.shuffle(pool)
        n = len(pool)
        # Every split gets at least one image of a class when the class has three or more;
        # smaller classes keep their first image for training.
        n_val = 0 if given["val"] else _share(n, val_frac, minimum=2)
        n_test = 0 if given["test"] else _share(n, test_frac, minimum=3)
        n_test = min(n_test, max(0, n - n_val - 1))
        result["val"] += given["val"] + pool[:n_val]
        result["test"] += given["test"] + pool[n_val:n_val + n_test]
        train = pool[n_val + n_test:]
        result["train"] += train[:max_per_class] if max_per_class else train
    return keep_together(result, scan.together) if scan.together and not scan.presplit else result


def keep_together(splits: dict[str, list[Item]], groups: list[list[str]]) -> dict[str, list[Item]]:
    """Move each group's members into one split: train when any member is there (so nothing of
    it is tested), else the split of its first member. A group whose move would leave
    validation or test empty (600 copies of one picture) stays spread: an empty test split
    would make the run end with no score at all."""
    where = {it.path: split for split, items in splits.items() for it in items}
    counts = {s: len(items) for s, items in splits.items()}
    target = {}
    for group in sorted(groups, key=len):
        placed = [where[p] for p in group if p in where]
        if not placed:
            continue
        to = "train" if "train" in placed else placed[0]
        leaving = {s: sum(1 for p in placed if p != to and s == p) for s in counts}
        if any(counts[s] and counts[s] - leaving[s] <= 0 for s in ("val", "test")):
            continue
        for p in group:
            if p in where:
                counts[where[p]] -= 1
                counts[to] += 1
                target[p] = to
    out = {s: [] for s in splits}
    for split, items in splits.items():
        for it in items:
            out[target.get(it.path, split)].append(it)
    return out


def _share(n: int, frac: float, minimum: int) -> int:
    return 0 if frac <= 0 or n < minimum else max(1, round(n * frac))


# ---------------------------------------------------------------- duplicates

def identical_files(root: str | os.PathLike, rel_paths: Iterable[str]) -> list[list[str]]:
    """Groups of byte-identical files among `rel_paths` (relative to `root`). Only files that
    share a size with another are read, so a set without duplicates costs one stat per file."""
    by_size = defaultdict(list)
    for rel in rel_paths:
        try:
            by_size[(Path(root) / rel).stat().st_size].append(rel)
        except OSError:
            continue
    by_hash = defaultdict(list)
    for group in (g for g in by_size.values() if len(g) > 1):
        for rel in group:
            by_hash[_file_hash(Path(root) / rel)].append(rel)
    return [group for group in by_hash.values() if len(group) > 1]


def _file_hash(path: Path) -> bytes | str:
    try:
        with open(path, "rb") as handle:
            return hashlib.file_digest(handle, "blake2b").digest()
    except OSError:
        return str(path)      # unreadable: equal to nothing else


def duplicate_files(root: str | os.PathLike, splits_or_items) -> list[list[tuple[str, str]]]:
    """Groups of identical files that land in different splits, each as sorted (split, path)
    pairs: a test image with a copy in train makes test accuracy optimistic. Takes split_items'
    result, or items whose `split` is set."""
    return across_splits(identical_files(root, list(_split_of(splits_or_items))),
                         splits_or_items)


def across_splits(groups: list[list[str]], splits_or_items) -> list[list[tuple[str, str]]]:
    """The groups of identical_files that span more than one split."""
    where = _split_of(splits_or_items)
    placed = [sorted((where[p], p) for p in group if p in where) for group in groups]
    return [group for group in placed if len({split for split, _ in group}) > 1]


def _split_of(splits_or_items) -> dict[str, str | None]:
    if isinstance(splits_or_items, dict):
        return {it.path: split for split, items in splits_or_items.items() for it in items}
    return {it.path: it.split for it in splits_or_items}


def leaked_counts(groups: list[list[tuple[str, str]]]) -> dict[str, int]:
    """How many val and test images have an identical file in train."""
    counts = Counter()
    for group in groups:
        if any(split == "train" for split, _ in group):
            counts.update(split for split, _ in group if split != "train")
    return {split: counts.get(split, 0) for split in ("val", "test")}
