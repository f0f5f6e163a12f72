"""Decoding images: size and shape limits, any mode to RGB, and parallel decoding to a fixed size."""
from __future__ import annotations

import os
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Protocol

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError
from torchvision.transforms import v2

from core.data import DataError


class Item(Protocol):
    """What decoding needs of a data set item (core.data.folders.Item has it)."""
    path: str


IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}

# Images over Image.MAX_IMAGE_PIXELS are refused outright (check_image, open_rgb), so Pillow's
# warning for sizes between that and twice that adds nothing but noise.
warnings.simplefilter("ignore", Image.DecompressionBombWarning)


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
                progress(i, len(items), "Decoding images")   # may raise to stop: pending decodes are cancelled
    finally:
        pool.shutdown(wait=False, cancel_futures=True)
    return out, failures
