"""Image folders in, tensors out: scanning, safe zip extraction, splits, decoding and transforms.

A data set is a folder of class folders (`root/<class>/<image>`), or a folder that already holds
`train/`, `val/` and/or `test/` folders of class folders.
"""
from __future__ import annotations

import hashlib
import os
import random
import zipfile
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from torchvision.transforms import v2

from core import paths

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
SPLIT_NAMES = {"train": "train", "training": "train", "val": "val", "valid": "val",
               "validation": "val", "test": "test", "testing": "test"}
SPLITS = ("train", "val", "test")
MAX_ZIP_FILES = 200_000
MAX_ZIP_BYTES = 8 * 1024**3


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

    def counts(self) -> dict[str, int]:
        per_label = Counter(item.label for item in self.items)
        return {name: per_label.get(i, 0) for i, name in enumerate(self.classes)}

    def warnings(self) -> list[str]:
        notes = []
        for name, n in self.counts().items():
            if n < 3:
                notes.append(f"Class '{name}' has only {n} image(s): it can't appear in train, "
                             "val and test at once, so its results will be unreliable. Add images.")
        return notes


def is_hidden(part: str) -> bool:
    return part.startswith(".") or part == "__MACOSX" or part.startswith("__")


def _data_root(root: Path) -> Path:
    """Descend through wrapper folders (a zip often holds one top folder) to the real root."""
    while True:
        subdirs = [p for p in root.iterdir() if p.is_dir() and not is_hidden(p.name)]
        files = [p for p in root.iterdir() if p.is_file() and not is_hidden(p.name)]
        if len(subdirs) == 1 and not files and subdirs[0].name.lower() not in SPLIT_NAMES:
            root = subdirs[0]
        else:
            return root


def check_image(path: Path) -> str | None:
    """Return why an image can't be used, or None. Reads the header only (fast)."""
    if path.suffix.lower() not in IMAGE_EXTENSIONS:
        return f"not an image type ({path.suffix or 'no extension'})"
    if path.stat().st_size == 0:
        return "empty file"
    try:
        with Image.open(path) as img:
            img.size  # noqa: B018 - header parse
    except (UnidentifiedImageError, OSError, Image.DecompressionBombError) as err:
        return f"unreadable image ({type(err).__name__})"
    return None


def scan_folder(folder: str | os.PathLike, check: bool = True) -> DataScan:
    """Find classes and images below `folder`; unusable files are listed in `skipped`."""
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise DataError(f"Folder not found: {folder}")
    root = _data_root(folder.resolve())
    split_dirs = {SPLIT_NAMES[p.name.lower()]: p for p in sorted(root.iterdir())
                  if p.is_dir() and p.name.lower() in SPLIT_NAMES}
    sources = split_dirs if split_dirs else {None: root}
    class_names = sorted({c.name for d in sources.values() for c in d.iterdir()
                          if c.is_dir() and not is_hidden(c.name)})
    if not class_names:
        raise DataError("No class folders found. Put the images of each class in its own folder, "
                        "e.g. cats/1.jpg and dogs/2.jpg (in a zip: the same structure).")
    index = {name: i for i, name in enumerate(class_names)}
    items, skipped = [], []
    for split, base in sources.items():
        for entry in sorted(base.iterdir()):
            if entry.is_file() and entry.suffix.lower() in IMAGE_EXTENSIONS and not is_hidden(entry.name):
                skipped.append((str(entry.relative_to(root)), "not inside a class folder"))
            if not entry.is_dir() or is_hidden(entry.name):
                continue
            for path in sorted(entry.rglob("*")):
                rel = path.relative_to(root)
                if not path.is_file() or any(is_hidden(p) for p in rel.parts):
                    continue
                reason = check_image(path) if check else None
                if reason:
                    skipped.append((str(rel), reason))
                else:
                    items.append(Item(str(rel), index[entry.name], split))
    if not items:
        raise DataError("The class folders hold no readable images "
                        f"({len(skipped)} file(s) skipped; see the list of skipped files).")
    return DataScan(str(root), class_names, items, skipped, presplit=bool(split_dirs))


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
    return result


def _share(n: int, frac: float, minimum: int) -> int:
    return 0 if frac <= 0 or n < minimum else max(1, round(n * frac))


# ---------------------------------------------------------------- uploads

def safe_extract_zip(zip_path: str | os.PathLike, dest: str | os.PathLike) -> Path:
    """Extract a zip below `dest`, refusing entries that would land outside it and archives
    whose size or file count is out of proportion (zip bombs), before writing anything."""
    dest = Path(dest).resolve()
    try:
        archive = zipfile.ZipFile(zip_path)
    except zipfile.BadZipFile as err:
        raise DataError("That file is not a valid zip archive.") from err
    with archive:
        members = [m for m in archive.infolist() if not m.is_dir()]
        if len(members) > MAX_ZIP_FILES:
            raise DataError(f"The zip holds {len(members):,} files; the limit is {MAX_ZIP_FILES:,}.")
        if sum(m.file_size for m in members) > MAX_ZIP_BYTES:
            raise DataError("The zip would unpack to more than 8 GB; refused.")
        dest.mkdir(parents=True, exist_ok=True)
        for member in members:
            name = member.filename.replace("\\", "/")
            target = (dest / name).resolve()
            is_link = (member.external_attr >> 16) & 0o170000 == 0o120000
            if is_link or not target.is_relative_to(dest) or name.startswith("/"):
                continue     # traversal, absolute path or symlink: never written
            target.parent.mkdir(parents=True, exist_ok=True)
            with archive.open(member) as src, open(target, "wb") as out:
                out.write(src.read())
    return dest


def upload_dir(data: bytes, name: str) -> Path:
    """A folder for an upload, named by its content hash so re-uploading reuses it."""
    digest = hashlib.sha256(data).hexdigest()[:16]
    stem = "".join(c if c.isalnum() or c in "-_" else "_" for c in Path(name).stem)[:40]
    return paths.datasets_dir() / f"{stem}-{digest}"


def save_upload_zip(data: bytes, name: str) -> Path:
    folder = upload_dir(data, name)
    if not folder.exists():
        tmp = folder.with_name(folder.name + ".zip")
        tmp.write_bytes(data)
        try:
            safe_extract_zip(tmp, folder)
        finally:
            tmp.unlink(missing_ok=True)
    return folder


def save_upload_file(folder: Path, relative_name: str, data: bytes) -> Path | None:
    """Store one uploaded file under `folder`, keeping only safe path parts of its name."""
    parts = [p for p in relative_name.replace("\\", "/").split("/") if p not in ("", ".", "..")]
    if not parts:
        return None
    target = (folder.joinpath(*parts)).resolve()
    if not target.is_relative_to(folder.resolve()):
        return None
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(data)
    return target


# ---------------------------------------------------------------- decoding

def open_rgb(path: str | os.PathLike, size: int | None = None) -> Image.Image:
    """Open any common image as RGB: EXIF rotation honoured, alpha put on white, and JPEGs
    decoded at reduced scale when only `size` pixels on the short side are needed."""
    with Image.open(path) as img:
        if size and img.format == "JPEG":
            img.draft("RGB", (size, size))
        img.seek(0)
        img = to_rgb(ImageOps.exif_transpose(img))
    if size:
        img = ImageOps.contain(img, _fit(img.size, size), Image.Resampling.BILINEAR) \
            if min(img.size) != size else img
    return img


def to_rgb(img: Image.Image) -> Image.Image:
    """Any mode to RGB the way training sees it: transparency on white, 16-bit scaled down."""
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        img = img.convert("RGBA")
        background = Image.new("RGBA", img.size, (255, 255, 255, 255))
        img = Image.alpha_composite(background, img)
    if img.mode in ("I;16", "I"):
        img = img.point(lambda v: v / 256).convert("L")
    return img.convert("RGB")


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
