"""Image folders in, tensors out: scanning, safe zip extraction, splits, decoding and transforms.

A data set is a folder of class folders (`root/<class>/<image>`), or a folder that already holds
`train/`, `val/` and/or `test/` folders of class folders.
"""
from __future__ import annotations

import contextlib
import errno
import hashlib
import io
import json
import lzma
import os
import random
import secrets
import shutil
import unicodedata
import warnings
import zipfile
import zlib
from collections import Counter, defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import IO, Callable, Iterable

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from torchvision.transforms import v2

from core import paths

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
SPLIT_NAMES = {"train": "train", "training": "train", "val": "val", "valid": "val",
               "validation": "val", "test": "test", "testing": "test"}
SPLITS = ("train", "val", "test")
# Zip bomb guards, checked against the sizes the zip declares before anything is written and
# counted across a zip and the zips inside it. Module constants so tests and admins can change them.
MAX_ZIP_FILES = 200_000               # entries, files and folders alike
MAX_ZIP_BYTES = 8 * 1024**3           # unpacked; safe_extract_zip(max_bytes=...) sets another
MAX_ZIP_RATIO = 1000                  # unpacked / packed size of one entry; deflate tops out near 1030
ZIP_RATIO_FROM = 4 * 1024**2          # ...checked for entries over this, where a bomb starts to hurt
MAX_ZIP_DIRECTORY = 64 * 1024**2      # a zip's list of entries, which zipfile reads into memory whole
ZIP_NOTES = ".unpack_skipped.json"    # entries extraction left out, with reasons; scan_folder lists them
IMBALANCE_WARN = 5.0                  # largest / smallest class size from which the Data page warns
MIN_SPLITTABLE = 3                    # images a class needs to appear in train, val and test

# Images over Image.MAX_IMAGE_PIXELS are refused outright (check_image, open_rgb), so Pillow's
# warning for sizes between that and twice that adds nothing but noise.
warnings.simplefilter("ignore", Image.DecompressionBombWarning)


class DataError(ValueError):
    """Input the user can fix; the message says how."""


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
        if self.imbalance() >= IMBALANCE_WARN:
            sized = {name: n for name, n in counts.items() if n >= MIN_SPLITTABLE}
            big, small = max(sized, key=sized.get), min(sized, key=sized.get)
            notes.append(f"The classes are imbalanced: '{big}' has {self.imbalance():.0f}× the images of "
                         f"'{small}' ({counts[big]} vs {counts[small]}), so a model can score well by "
                         "favouring the big classes. Consider the class-weighted loss option on the "
                         "Train page, or add images to the small classes.")
        return notes


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


def check_image(path: Path) -> str | None:
    """Return why an image can't be used, or None. Reads the header only (fast), so a truncated
    file is caught later, when decode_images reads it in full."""
    if path.suffix.lower() not in IMAGE_EXTENSIONS:
        return f"not an image type ({path.suffix or 'no extension'})"
    if path.stat().st_size == 0:
        return "empty file"
    try:
        with Image.open(path) as img:
            return _too_large(img)
    except Image.DecompressionBombError:
        return f"too large: over {2 * Image.MAX_IMAGE_PIXELS:,} pixels (decompression bomb guard)"
    except UnidentifiedImageError:
        return "unreadable image: the content is not a known image format"
    except Exception as err:  # noqa: BLE001 - any parser failure means "unusable"
        return f"unreadable image ({type(err).__name__})"


MAX_ASPECT = 20     # long side / short side; images are resized by their short side
MAX_SIDE = 30_000   # px, either side: beyond any camera or scanner, and a decode of rows that long


def _too_large(img: Image.Image) -> str | None:
    """Pillow only warns between MAX_IMAGE_PIXELS and twice that; decoding such a file can still
    take gigabytes, so it is refused as well. So is an extreme aspect ratio: resized by its short
    side, a 1×20000 strip would become a 224×4,480,000 tensor (gigabytes from a 164-byte file)."""
    w, h = img.size
    if w * h > Image.MAX_IMAGE_PIXELS:
        return (f"too large: {w}×{h} is over {Image.MAX_IMAGE_PIXELS:,} pixels "
                "(decompression bomb guard)")
    if max(w, h) > MAX_SIDE:
        return f"too large: {w}×{h} has a side over {MAX_SIDE:,} px"
    if max(w, h) > MAX_ASPECT * max(1, min(w, h)):
        return (f"extreme shape: {w}×{h} is more than {MAX_ASPECT}:1; crop it to the object first")
    return None


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


# ---------------------------------------------------------------- uploads

def safe_extract_zip(zip_file: str | os.PathLike | IO[bytes], dest: str | os.PathLike,
                     max_bytes: int | None = None) -> Path:
    """Extract a zip below `dest`.

    Every check runs before the first write, zips inside the zip included (read straight from the
    outer one): a zip that declares more than MAX_ZIP_FILES entries, more than `max_bytes` (at
    most and by default MAX_ZIP_BYTES) unpacked, an entry packed over MAX_ZIP_RATIO times or a
    directory over MAX_ZIP_DIRECTORY is refused whole (zip bombs). Zips inside the zip are unpacked one level deep
    into a folder named after them (cats.zip -> cats/); deeper ones are left out. Left out too,
    with the reason kept in ZIP_NOTES for scan_folder: entries that would land outside `dest`,
    symlinks, encrypted or damaged entries, names too long for the disk, the later of two entries
    with one name, a file where the zip also has a folder of that name. Names are NFC-normalised.
    Hidden files and __MACOSX are skipped silently. The tree is built in a staging folder and
    moved into place, so a refused zip leaves nothing behind."""
    dest = Path(dest).resolve()
    staging = dest.parent / f".{dest.name}.unpacking-{secrets.token_hex(4)}"
    # max_bytes (a user's quota) can lower the bomb guard, never lift it.
    limit = MAX_ZIP_BYTES if max_bytes is None else min(max_bytes, MAX_ZIP_BYTES)
    budget = _Budget(MAX_ZIP_FILES, limit, MAX_ZIP_DIRECTORY)
    with contextlib.ExitStack() as stack:
        entries, notes = _plan(_open_outer(zip_file, budget, stack), staging, budget, stack)
        dest.parent.mkdir(parents=True, exist_ok=True)
        staging.mkdir()
        try:
            notes += _unpack(entries, staging)
            if notes:
                (staging / ZIP_NOTES).write_text(json.dumps(notes), encoding="utf-8")
            _move_into(staging, dest)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return dest


# What a damaged zip or entry raises while being read (bz2 raises OSError).
_ZIP_ERRORS = (zipfile.BadZipFile, zlib.error, lzma.LZMAError, EOFError, ValueError,
               NotImplementedError, OSError)


def _open_outer(zip_file, budget: _Budget, stack: contextlib.ExitStack) -> zipfile.ZipFile:
    try:
        source = zip_file if hasattr(zip_file, "read") else stack.enter_context(open(zip_file, "rb"))
        return stack.enter_context(_read_zip(source, budget, "The zip"))
    except DataError:
        raise
    except _ZIP_ERRORS as err:
        raise DataError("That file is not a valid zip archive.") from err


def _read_zip(source: IO[bytes], budget: _Budget, what: str) -> zipfile.ZipFile:
    """zipfile reads a zip's whole directory into memory, an object per entry, before anything
    can be counted: so the count and size the zip declares for its directory are checked first."""
    end = zipfile._EndRecData(source)     # private but stable since Python 2; None: not a zip
    if end:
        budget.expect(end[zipfile._ECD_ENTRIES_TOTAL], end[zipfile._ECD_SIZE], what)
    return zipfile.ZipFile(source)


@dataclass
class _Budget:
    """Entries, bytes and directory bytes still allowed, shared by a zip and the zips inside it."""
    files: int
    nbytes: int
    directory: int

    def __post_init__(self):
        self.max_files, self.max_bytes, self.max_directory = self.files, self.nbytes, self.directory

    def expect(self, entries: int, directory: int, what: str) -> None:
        self.directory -= directory
        if entries > self.files:
            self._refuse(f"{what} holds more than {self.max_files:,} files and folders")
        if self.directory < 0:
            self._refuse(f"{what} has a list of entries over {_size(self.max_directory)}")

    def take(self, members: list[zipfile.ZipInfo], what: str) -> None:
        self.files -= len(members)
        self.nbytes -= sum(m.file_size for m in members)
        if self.files < 0:
            self._refuse(f"{what} holds more than {self.max_files:,} files and folders")
        if self.nbytes < 0:
            self._refuse(f"{what} would unpack to more than {_size(self.max_bytes)}")
        for m in members:   # after the totals, so a zip both too big and too packed names its size
            if m.file_size > ZIP_RATIO_FROM and m.file_size > MAX_ZIP_RATIO * max(1, m.compress_size):
                self._refuse(f"{what} holds {_entry_name(m)!r}, packed over {MAX_ZIP_RATIO:,} times "
                             f"({_size(m.compress_size)} unpacking to {_size(m.file_size)})")

    @staticmethod
    def _refuse(problem: str):
        raise DataError(f"{problem} (counting zips inside it): refused before unpacking, as a "
                        "likely zip bomb.")


def _size(n: int) -> str:
    if n >= 1024**3:
        return f"{n / 1024**3:.1f} GB"
    return f"{n / 1024**2:.1f} MB" if n >= 1024**2 else f"{n / 1024:.1f} kB"


@dataclass
class _Entry:
    archive: zipfile.ZipFile
    member: zipfile.ZipInfo
    label: str              # as notes show it: cats.zip/1.png for an entry of an inner zip
    rel: PurePosixPath      # where it lands, relative to the unpacking folder


def _plan(archive: zipfile.ZipFile, root: Path, budget: _Budget,
          stack: contextlib.ExitStack) -> tuple[list[_Entry], list[list[str]]]:
    """What to write and what to leave out (with why), decided before anything is written."""
    planner = _Planner(root, budget, stack)
    entries, clashes = _settle(planner.entries(archive, PurePosixPath("."), prefix=""))
    return entries, planner.notes + clashes


@dataclass
class _Planner:
    root: Path                                  # the unpacking folder, not created yet
    budget: _Budget
    stack: contextlib.ExitStack                 # keeps inner zips open until they are written
    notes: list = field(default_factory=list)   # [entry, reason] for each entry left out
    inner_zips: set = field(default_factory=set)

    def entries(self, archive: zipfile.ZipFile, base: PurePosixPath, prefix: str) -> list[_Entry]:
        """The entries of `archive` (unpacking into root/base) and of the zips inside it."""
        nested = bool(prefix)
        self.budget.take(archive.infolist(), "The zip inside the zip" if nested else "The zip")
        entries = []
        for member in archive.infolist():
            name = _entry_name(member)
            if any(is_hidden(part) for part in name.split("/") if part not in (".", "..")):
                continue        # __MACOSX, .DS_Store: archiver metadata, not data
            label, folder = prefix + name, self.root / base
            # normpath, not resolve: nothing exists below root yet, so there are no links to follow.
            target = Path(os.path.normpath(folder / name))
            reason = _refusal(member, name, target, folder, nested)
            if reason:
                self.notes.append([label, reason])
                continue
            rel = PurePosixPath(target.relative_to(self.root))
            if not nested and not member.is_dir() and name.lower().endswith(".zip"):
                entries += self.inner(archive, member, rel, label)
            else:
                entries.append(_Entry(archive, member, label, rel))
        return entries

    def inner(self, archive: zipfile.ZipFile, member: zipfile.ZipInfo, rel: PurePosixPath,
              label: str) -> list[_Entry]:
        """A zip inside the zip, read from the outer one (its stream is seekable) so that its
        entries count against the limits before anything is written."""
        if rel in self.inner_zips:
            self.notes.append([label, _DUPLICATE])
            return []
        self.inner_zips.add(rel)
        try:
            stream = self.stack.enter_context(archive.open(member))
            inner = self.stack.enter_context(_read_zip(stream, self.budget, "The zip inside the zip"))
        except DataError:
            raise
        except _ZIP_ERRORS:
            self.notes.append([label, "not a valid zip archive: left out"])
            return []
        return self.entries(inner, rel.with_suffix(""), f"{label}/")


_DUPLICATE = "duplicate name: an earlier entry of the zip has it; not unpacked"


def _settle(entries: list[_Entry]) -> tuple[list[_Entry], list[list[str]]]:
    """Of two entries with one name the first wins (zipfile's own lookup would take the last,
    silently). A disk can't hold a file `cats` and a folder `cats/`: the folder wins."""
    kept, notes, files = [], [], set()
    for entry in entries:
        if not entry.member.is_dir():
            if entry.rel in files:
                notes.append([entry.label, _DUPLICATE])
                continue
            files.add(entry.rel)
        kept.append(entry)
    folders = {p for e in kept for p in e.rel.parents} | {e.rel for e in kept if e.member.is_dir()}
    fits = [e.member.is_dir() or e.rel not in folders for e in kept]
    notes += [[e.label, "a folder of the zip has the same name: the file is not unpacked"]
              for e, ok in zip(kept, fits) if not ok]
    return [e for e, ok in zip(kept, fits) if ok], notes


def _entry_name(member: zipfile.ZipInfo) -> str:
    """The entry's path with / separators, in NFC (macOS writes decomposed names, so one class
    would otherwise unpack as two look-alike folders). Without the UTF-8 flag zipfile decodes
    names as cp437, yet many archivers write UTF-8 without setting it: try UTF-8 first, keep
    cp437 otherwise (it never fails, so odd encodings such as Shift-JIS still unpack, garbled)."""
    name = member.filename
    if not member.flag_bits & 0x800:
        try:
            name = name.encode("cp437").decode("utf-8")
        except UnicodeError:
            pass
    return unicodedata.normalize("NFC", name.replace("\\", "/"))


def _refusal(member: zipfile.ZipInfo, name: str, target: Path, dest: Path, nested: bool) -> str | None:
    if (member.external_attr >> 16) & 0o170000 == 0o120000:
        return "symbolic link: not unpacked (it could point anywhere on the server)"
    if name.startswith("/") or PureWindowsPath(name).drive or not target.is_relative_to(dest):
        return "path leads outside the upload folder: not unpacked"
    if member.flag_bits & 0x1:
        return "encrypted: not unpacked (zip the files again without a password)"
    if nested and name.lower().endswith(".zip"):
        return "zip inside a zip inside a zip: not unpacked (only one level of nesting is)"
    return _name_too_long(target)


NAME_MAX_BYTES = 255       # the longest file or folder name Linux file systems take
PATH_MAX_BYTES = 4096      # the longest path, the unpacking folder's included


def _name_too_long(target: Path) -> str | None:
    if any(len(os.fsencode(part)) > NAME_MAX_BYTES for part in target.parts):
        return f"name too long: a part of it is over {NAME_MAX_BYTES} bytes; not unpacked"
    if len(os.fsencode(target)) >= PATH_MAX_BYTES:
        return f"name too long: its path is over {PATH_MAX_BYTES:,} bytes; not unpacked"
    return None


def _unpack(entries: list[_Entry], root: Path) -> list[list[str]]:
    """Write the planned entries; returns [entry, reason] for each that could not be."""
    notes = []
    for entry in entries:
        reason = _write(entry.archive, entry.member, root / entry.rel)
        if reason:
            notes.append([entry.label, reason])
    return notes


def _write(archive: zipfile.ZipFile, member: zipfile.ZipInfo, target: Path) -> str | None:
    """Copy one entry to disk in chunks; returns why it could not be, if so."""
    try:
        if member.is_dir():             # kept, so an empty class folder shows up as one
            target.mkdir(parents=True, exist_ok=True)
            return None
        target.parent.mkdir(parents=True, exist_ok=True)
        with archive.open(member) as src, open(target, "wb") as out:
            shutil.copyfileobj(src, out, 1 << 20)
        return None
    except OSError as err:
        if err.errno == errno.ENOSPC:
            raise DataError("The disk is full: the zip could not be unpacked.") from err
        reason = f"could not be written ({err.strerror or type(err).__name__}): not unpacked"
        if err.errno is None:           # bz2's "Invalid data stream": the entry, not the disk
            reason = f"damaged or unsupported entry ({type(err).__name__}): not unpacked"
    except _ZIP_ERRORS as err:
        reason = f"damaged or unsupported entry ({type(err).__name__}): not unpacked"
    with contextlib.suppress(OSError):
        target.unlink(missing_ok=True)  # a half-written file; a folder stays
    return reason


def _move_into(staging: Path, dest: Path) -> None:
    """A new folder appears complete in one rename; an existing one gets the files merged in."""
    if not dest.exists():
        os.replace(staging, dest)
        return
    for path in sorted(staging.rglob("*")):
        target = dest / path.relative_to(staging)
        if path.is_dir():
            target.mkdir(exist_ok=True)
        else:
            os.replace(path, target)


def upload_dir(data: bytes, name: str, parent: Path | None = None) -> Path:
    """A folder for an upload below `parent` (default: the data directory's datasets folder),
    named by its content hash so re-uploading reuses it."""
    digest = hashlib.sha256(data).hexdigest()[:16]
    stem = Path(unicodedata.normalize("NFC", name)).stem
    stem = "".join(c if c.isalnum() or c in "-_" else "_" for c in stem)[:40]
    return Path(parent or paths.datasets_dir()) / f"{stem}-{digest}"


def save_upload_zip(data: bytes, name: str, folder: Path | None = None,
                    max_bytes: int | None = None) -> Path:
    """Unpack an uploaded zip into its own folder below `folder` (default: the data directory's
    datasets folder); the same content uploaded again reuses the folder. `max_bytes` caps what it
    may unpack to (at most and by default MAX_ZIP_BYTES)."""
    target = upload_dir(data, name, parent=folder)
    if not target.exists():
        safe_extract_zip(io.BytesIO(data), target, max_bytes=max_bytes)
    return target


def save_upload_file(folder: Path, relative_name: str, data: bytes) -> Path | None:
    """Store one uploaded file under `folder`, keeping only safe path parts of its name (the
    browser sends a folder upload's relative paths), in NFC like zip entries. Returns None for a
    name that is refused: nothing usable left, NUL or other control characters, too long."""
    relative_name = unicodedata.normalize("NFC", relative_name)
    parts = [p for p in relative_name.replace("\\", "/").split("/") if p not in ("", ".", "..")]
    if not parts or any(ord(c) < 32 for c in relative_name):
        return None
    target = (folder.joinpath(*parts)).resolve()
    if not target.is_relative_to(folder.resolve()) or _name_too_long(target):
        return None
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)
    except OSError as err:
        raise DataError(f"Could not save {parts[-1]!r}: {err.strerror or err}.") from err
    return target


# ---------------------------------------------------------------- decoding

def open_rgb(path: str | os.PathLike, size: int | None = None) -> Image.Image:
    """Open any common image as RGB: first frame, EXIF rotation honoured, alpha put on white.
    With `size` (the short side needed) a big image is shrunk while it is decoded (JPEG draft)
    or right after (whole-factor reduce), before any copy, so memory stays near one decode."""
    with Image.open(path) as img:
        reason = _too_large(img)
        if reason:
            raise DataError(reason)
        full = img.size
        if size and img.format == "JPEG":
            img.draft("RGB", (size, size))
        img.seek(0)
        img.load()
        img = _reduce(img, size) if size else img
        stored = img.size
        img = to_rgb(ImageOps.exif_transpose(img))
    if img.size != stored:
        full = full[::-1]            # rotated by 90°
    # The output size comes from the full size, so it is the same whichever shortcut decoded it.
    target = _fit(full, size) if size else img.size
    return img if img.size == target else img.resize(target, Image.Resampling.BILINEAR)


def _reduce(img: Image.Image, size: int) -> Image.Image:
    """Shrink by the largest whole factor that keeps the short side >= `size`. Only for modes
    whose pixels can be averaged: palette indices and the 16-bit modes can't."""
    factor = min(img.size) // size
    if factor < 2 or img.mode not in ("L", "LA", "RGB", "RGBA", "CMYK", "I", "F"):
        return img
    return img.reduce(factor)


def to_rgb(img: Image.Image) -> Image.Image:
    """Any mode to RGB the way training sees it: transparency on white, 16-bit scaled down,
    float brought into 0..255 (see _float_to_l)."""
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        img = img.convert("RGBA")
        background = Image.new("RGBA", img.size, (255, 255, 255, 255))
        img = Image.alpha_composite(background, img)
    if img.mode.startswith("I;16") or img.mode == "I":
        img = img.point(lambda v: v / 256).convert("L")
    if img.mode == "F":
        img = _float_to_l(img)
    return img.convert("RGB")


def _float_to_l(img: Image.Image) -> Image.Image:
    """Float images (scientific TIFFs) have no fixed range, and Pillow's own conversion truncates
    them to 0..255, so 0..1 data comes out black. Here 0..1 data is scaled by 255, data within
    0..255 kept, anything else stretched from its minimum to its maximum; NaN is black, ±inf
    the ends of the range."""
    arr = np.asarray(img, dtype=np.float32)
    finite = np.isfinite(arr)
    lo, hi = (float(arr[finite].min()), float(arr[finite].max())) if finite.any() else (0.0, 0.0)
    with np.errstate(over="ignore", invalid="ignore"):     # extreme values just end up at 0 or 255
        if 0 <= lo and hi <= 1:
            arr = arr * 255
        elif lo < 0 or hi > 255:
            arr = (arr - lo) * (255 / max(hi - lo, 1e-30))
    arr = np.nan_to_num(arr, nan=0.0, posinf=255.0, neginf=0.0)
    return Image.fromarray(np.clip(arr, 0, 255).round().astype(np.uint8))


def _fit(wh: tuple[int, int], short: int) -> tuple[int, int]:
    scale = short / min(wh)
    return max(1, round(wh[0] * scale)), max(1, round(wh[1] * scale))


def decode_images(root: str, items: list[Item], size: int, workers: int | None = None,
                  progress: Callable[[int, int], None] | None = None):
    """Decode every item once to a uint8 CHW tensor with short side `size`.
    Returns (tensors, failures); failures are (path, reason) and their tensors are None."""
    def load(item: Item):
        try:
            img = open_rgb(Path(root) / item.path, size)
            return v2.functional.pil_to_tensor(img), None
        except Exception as err:  # noqa: BLE001 - any decoder failure means "skip this file"
            return None, f"could not decode ({type(err).__name__}: {err})"[:200]

    out, failures = [], []
    pool = ThreadPoolExecutor(max_workers=workers or min(4, os.cpu_count() or 1))
    try:
        for i, (tensor, reason) in enumerate(pool.map(load, items), 1):
            out.append(tensor)
            if reason:
                failures.append((items[i - 1].path, reason))
            if progress and (i % 32 == 0 or i == len(items)):
                progress(i, len(items))   # may raise to stop: pending decodes are cancelled
    finally:
        pool.shutdown(wait=False, cancel_futures=True)
    return out, failures


# ---------------------------------------------------------------- datasets and transforms

AUGMENTATIONS = {
    "hflip": "Horizontal flip",
    "vflip": "Vertical flip",
    "rotation": "Rotation (± degrees)",
    "affine": "Random affine (translate fraction)",
    "random_resized_crop": "Random resized crop (min scale)",
    "color_jitter": "Colour jitter (strength)",
    "hue": "Hue jitter (0-0.5)",
    "grayscale": "Grayscale (probability)",
    "invert": "Invert (probability)",
    "blur": "Gaussian blur (kernel px)",
    "auto": "RandAugment / TrivialAugment",
}
AUGMENT_RANGES = {   # augmentation -> (min, max, default) of its strength, as the Train page offers it
    "rotation": (1.0, 180.0, 30.0), "affine": (0.02, 0.4, 0.1),
    "random_resized_crop": (0.05, 0.95, 0.5), "color_jitter": (0.05, 0.9, 0.2),
    "hue": (0.01, 0.5, 0.1), "grayscale": (0.05, 1.0, 0.2), "invert": (0.05, 1.0, 0.2),
    "blur": (3.0, 15.0, 5.0)}
AUTO_AUGMENTS = ("trivialaugment", "randaugment")

# Named sets of augmentations: the presets sweeps vary and the seed reports used.
PRESETS = {
    "none": {},
    "flips": {"hflip": True},
    "light": {"hflip": True, "random_resized_crop": 0.8},
    "report 003": {"rotation": 30.0, "random_resized_crop": 0.5, "hflip": True, "vflip": True,
                   "color_jitter": 0.2},
    "photos": {"hflip": True, "random_resized_crop": 0.5, "color_jitter": 0.2, "rotation": 15.0},
    "trivialaugment": {"hflip": True, "auto": "trivialaugment"},
    "randaugment": {"hflip": True, "auto": "randaugment"},
}


def build_transform(image_size: int, mean, std, augment: dict | None = None):
    """Eval transform when `augment` is empty; otherwise the chosen augmentations first.
    Works on uint8 CHW tensors; output is float, normalised."""
    augment = {k: v for k, v in (augment or {}).items() if v}
    steps = []
    if "random_resized_crop" in augment:
        steps.append(v2.RandomResizedCrop(image_size, scale=(float(augment["random_resized_crop"]), 1.0),
                                          antialias=True))
    else:
        steps += [v2.Resize(image_size, antialias=True), v2.CenterCrop(image_size)]
    if augment.get("auto") == "randaugment":
        steps.append(v2.RandAugment())
    elif augment.get("auto"):
        steps.append(v2.TrivialAugmentWide())
    if "hflip" in augment:
        steps.append(v2.RandomHorizontalFlip())
    if "vflip" in augment:
        steps.append(v2.RandomVerticalFlip())
    if "rotation" in augment:
        steps.append(v2.RandomRotation(float(augment["rotation"])))
    if "affine" in augment:
        t = float(augment["affine"])
        steps.append(v2.RandomAffine(degrees=0, translate=(t, t), scale=(1 - t, 1 + t)))
    if "color_jitter" in augment or "hue" in augment:
        s = float(augment.get("color_jitter", 0))
        steps.append(v2.ColorJitter(brightness=s, contrast=s, saturation=s,
                                    hue=min(0.5, float(augment.get("hue", 0)))))
    if "grayscale" in augment:
        steps.append(v2.RandomGrayscale(float(augment["grayscale"])))
    if "invert" in augment:
        steps.append(v2.RandomInvert(float(augment["invert"])))
    if "blur" in augment:
        k = int(augment["blur"]) // 2 * 2 + 1      # odd kernel
        steps.append(v2.GaussianBlur(k))
    steps += [v2.ToDtype(torch.float32, scale=True), v2.Normalize(list(mean), list(std))]
    return v2.Compose(steps)


def preview_augmentations(images, image_size: int, augment: dict, seed: int, copies: int = 4) -> list[np.ndarray]:
    """`copies` augmented versions of each decoded image, as uint8 HWC arrays. Drawn from a
    private random stream, so a run training meanwhile gets the same numbers as without it."""
    from core import rng
    tf = build_transform(image_size, (0, 0, 0), (1, 1, 1), augment)
    with rng.Stream(seed).active():
        return [(tf(img).clamp(0, 1).permute(1, 2, 0).numpy() * 255).astype("uint8")
                for img in images if img is not None for _ in range(copies)]


def dataset_stats(images) -> tuple[list[float], list[float]]:
    """Per-channel mean and std of uint8 CHW images, in one streaming pass: each image's
    (count, mean, M2) is merged into the running totals with the pairwise formula
    (Chan et al.), so nothing but three numbers per channel is kept."""
    n = 0
    mean = torch.zeros(3, dtype=torch.float64)
    m2 = torch.zeros(3, dtype=torch.float64)
    for img in images:
        x = img.reshape(img.shape[0], -1).to(torch.float64) / 255.0
        nb = x.shape[1]
        mb = x.mean(1)
        m2b = ((x - mb[:, None]) ** 2).sum(1)
        delta = mb - mean
        total = n + nb
        mean = mean + delta * nb / total
        m2 = m2 + m2b + delta ** 2 * n * nb / total
        n = total
    std = (m2 / max(n, 1)).sqrt()
    return mean.tolist(), std.tolist()


class TensorDataset(torch.utils.data.Dataset):
    """Pre-decoded uint8 images plus labels; the transform runs per access."""

    def __init__(self, images: list[torch.Tensor], labels: list[int], transform):
        self.images, self.labels, self.transform = images, labels, transform

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return self.transform(self.images[i]), self.labels[i]


def demo_dataset() -> Path:
    """The built-in demo set: 10 Fashion-MNIST classes, 100 photos each, shipped in assets/."""
    return paths.DEMO_DATA
