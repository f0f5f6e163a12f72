"""Class folders in: finding classes and images below a folder, and the bundled demo set.

A data set is a folder of class folders (`root/<class>/<image>`), or a folder that already holds
`train/`, `val/` and/or `test/` folders of class folders.
"""
from __future__ import annotations

import json
import os
import unicodedata
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from core import paths
from core.data import DataError
from core.data.images import IMAGE_EXTENSIONS, check_image

SPLIT_NAMES = {"train": "train", "training": "train", "val": "val", "valid": "val",
               "validation": "val", "test": "test", "testing": "test"}
SPLITS = ("train", "val", "test")
ZIP_NOTES = ".unpack_skipped.json"    # entries extraction left out, with reasons; scan_folder lists them
MIN_SPLITTABLE = 3                    # images a class needs to appear in train, val and test
IMBALANCE_WARN = 5.0                  # largest / smallest class size from which the Data page warns
                                      # and the Train page suggests the class-weighted loss


@dataclass
class Item:
    path: str          # relative to the data set root
    label: int
    split: str | None = None   # set when the folder came pre-split


@dataclass
class DataScan:
    root: str
    classes: list[str]
    items: list[Item]
    skipped: list[tuple[str, str]] = field(default_factory=list)   # (path, reason)
    presplit: bool = False
    # Images that must land in one split (near-duplicates the dataset doctor found), from the
    # folder's hidden SAME_SPLIT_FILE: a copy in train and one in test would flatter the test score.
    together: list[list[str]] = field(default_factory=list)

    def counts(self) -> dict[str, int]:
        per_label = Counter(item.label for item in self.items)
        return {name: per_label.get(i, 0) for i, name in enumerate(self.classes)}

    def imbalance(self) -> float:
        """Largest class size over smallest: 1.0 is balanced. Classes too small to split (under
        MIN_SPLITTABLE images) are left out: they have a warning of their own."""
        sizes = [n for n in self.counts().values() if n >= MIN_SPLITTABLE]
        return max(sizes) / min(sizes) if len(sizes) > 1 else 1.0

    def errors(self) -> list[str]:
        """Problems that make training impossible."""
        if len(self.classes) < 2:
            return [f"Only one class found ('{self.classes[0]}'): training needs at least 2 classes. "
                    "Put the images of each class in its own folder, e.g. cats/1.jpg and dogs/2.jpg."]
        return []

    def warnings(self) -> list[str]:
        notes = []
        counts = self.counts()
        for name, n in counts.items():
            if n < MIN_SPLITTABLE:
                notes.append(f"Class '{name}' has only {n} image(s): it can't appear in train, "
                             "val and test at once, so its results will be unreliable. Add images.")
        if is_imbalanced(self.imbalance()):
            sized = {name: n for name, n in counts.items() if n >= MIN_SPLITTABLE}
            big, small = max(sized, key=sized.get), min(sized, key=sized.get)
            notes.append(f"The classes are imbalanced: '{big}' has {self.imbalance():.0f}× the images of "
                         f"'{small}' ({counts[big]} vs {counts[small]}), so a model can score well by "
                         "favouring the big classes. Consider the class-weighted loss option on the "
                         "Train page, or add images to the small classes.")
        return notes


def is_imbalanced(ratio: float) -> bool:
    """Whether a largest-over-smallest class ratio (DataScan.imbalance) is worth a warning: the one
    rule behind the Data page's warning and the Train page's hint at the class-weighted loss."""
    return ratio >= IMBALANCE_WARN


def image_files(folder: str | os.PathLike) -> list[Path]:
    """Every image file below `folder`, sorted, leaving out hidden files and folders (.git,
    __MACOSX): the images a batch prediction runs on."""
    folder = Path(folder)
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS
                  and not any(is_hidden(part) for part in p.relative_to(folder).parts))


def is_hidden(part: str) -> bool:
    return part.startswith(".") or part == "__MACOSX" or part.startswith("__")


def _subdirs(folder: Path) -> list[Path]:
    return [p for p in folder.iterdir() if p.is_dir() and not is_hidden(p.name)]


def _data_root(root: Path) -> Path:
    """Descend through wrapper folders (a zip often holds one top folder) to the real root. A lone
    folder with no sub-folders is a class, not a wrapper, so a one-class set reads as one class."""
    while True:
        subdirs = _subdirs(root)
        files = [p for p in root.iterdir() if p.is_file() and not is_hidden(p.name)]
        if (len(subdirs) == 1 and not files and subdirs[0].name.lower() not in SPLIT_NAMES
                and _subdirs(subdirs[0])):
            root = subdirs[0]
        else:
            return root


def scan_folder(folder: str | os.PathLike, check: bool = True) -> DataScan:
    """Find classes and images below `folder`; unusable files are listed in `skipped`, and so are
    class folders without image files (they are not classes). `check` opens each image's header."""
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise DataError(f"Folder not found: {folder}")
    root = _data_root(folder.resolve())
    split_dirs = {SPLIT_NAMES[p.name.lower()]: p for p in sorted(root.iterdir())
                  if p.is_dir() and p.name.lower() in SPLIT_NAMES}
    found, skipped = _class_files(root, split_dirs or {None: root}), _zip_notes(folder)
    skipped += [(str(p.relative_to(root)), "not inside a class folder") for p in found.pop("", [])]
    if not found:
        raise DataError(_no_classes_message(skipped))
    classes = sorted(name for name, files in found.items() if _has_images(files))
    skipped += [(f"{name}/", "empty class folder: ignored (no image files)")
                for name in sorted(found) if name not in classes]
    items = []
    for label, name in enumerate(classes):
        for path, split in found[name]:
            rel = str(path.relative_to(root))
            reason = check_image(path) if check else _type_reason(path)
            if reason:
                skipped.append((rel, reason))
            else:
                items.append(Item(rel, label, split))
    if not items:
        raise DataError("The class folders hold no readable images "
                        f"({len(skipped)} file(s) skipped; see the list of skipped files).")
    return DataScan(str(root), classes, items, skipped, presplit=bool(split_dirs), together=read_together(root))


SAME_SPLIT_FILE = ".same-split.json"


def read_together(root: Path) -> list[list[str]]:
    """The groups of SAME_SPLIT_FILE (relative paths), or none when it is missing or unreadable."""
    try:
        groups = json.loads((Path(root) / SAME_SPLIT_FILE).read_text())
        return [[str(p) for p in group] for group in groups if isinstance(group, list) and len(group) > 1]
    except (OSError, ValueError, TypeError):
        return []


def _class_files(root: Path, sources: dict) -> dict[str, list[tuple[Path, str | None]]]:
    """{class folder name: [(file, split)]}, split by split; key "" holds images lying loose
    next to the class folders. Names are NFC, so folders spelt in composed and decomposed Unicode
    (café from Windows and from macOS) are one class, not two that look alike."""
    found = defaultdict(list)
    for split, base in sources.items():
        for entry in sorted(base.iterdir()):
            if is_hidden(entry.name):
                continue
            if entry.is_dir():
                found[unicodedata.normalize("NFC", entry.name)] += [
                    (p, split) for p in sorted(entry.rglob("*"))
                    if p.is_file() and not any(is_hidden(x) for x in p.relative_to(root).parts)]
            elif entry.suffix.lower() in IMAGE_EXTENSIONS:
                found[""].append(entry)
    return dict(found)


def _type_reason(path: Path) -> str | None:
    return None if path.suffix.lower() in IMAGE_EXTENSIONS else \
        f"not an image type ({path.suffix or 'no extension'})"


def _has_images(files) -> bool:
    return any(_type_reason(path) is None for path, _ in files)


def _no_classes_message(skipped) -> str:
    loose = sum(reason == "not inside a class folder" for _, reason in skipped)
    where = f" ({loose} image(s) lie directly in the top folder)" if loose else ""
    return (f"No class folders found{where}. Put the images of each class in its own folder, "
            "e.g. cats/1.jpg and dogs/2.jpg (in a zip: the same structure).")


def _zip_notes(folder: Path) -> list[tuple[str, str]]:
    """What safe_extract_zip left out of this folder, as (zip entry, reason)."""
    try:
        return [tuple(pair) for pair in json.loads((folder / ZIP_NOTES).read_text(encoding="utf-8"))]
    except (OSError, ValueError, TypeError):
        return []


def demo_dataset() -> Path:
    """The built-in demo set: 10 Fashion-MNIST classes, 100 photos each, shipped in assets/."""
    return paths.DEMO_DATA


# ---------------------------------------------------------------- what the Data and Model pages show

def tree_stamp(root: Path) -> float:
    """A number that changes when files are added to a data set: the sum of the mtimes of `root`,
    its folders and their sub-folders (a cache key for a scan); 0.0 when it can't be read."""
    try:
        return sum(p.stat().st_mtime for p in [root, *root.iterdir(), *root.glob("*/*")] if p.is_dir())
    except OSError:
        return 0.0


def class_count(root: str | os.PathLike, fallback: int = 10) -> int:
    """How many classes the data set at `root` has (a new head's size); `fallback` when it can't
    be read, so a model can still be shown before a data set is chosen."""
    try:
        return len(scan_folder(root, check=False).classes)
    except (DataError, OSError):
        return fallback


def class_folder_name(name: str) -> str:
    """A class name typed by a user as a folder name: letters, digits, space, '-' and '_', at
    most 60 characters; "class" when nothing is left."""
    return "".join(c for c in name.strip() if c.isalnum() or c in " -_")[:60] or "class"


def class_counts(folder: Path) -> dict[str, int]:
    """Files per class folder directly below `folder` (by name), e.g. photos taken so far."""
    return {p.name: len(list(p.glob("*.*"))) for p in sorted(folder.iterdir()) if p.is_dir()}
