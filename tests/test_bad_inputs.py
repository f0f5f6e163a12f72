"""Bad and awkward inputs (issue #7): hostile zips, odd images, lopsided labels, unsafe weights
files and upload names. Every fixture is built here; each test checks the message the user sees
and that nothing was written outside the folder it belongs in."""
from __future__ import annotations

import io
import os
import shutil
import struct
import subprocess
import sys
import zipfile
import zlib
from pathlib import Path

import numpy as np
import pytest
import safetensors.torch
import timm
import torch
from PIL import Image

from apptest_helpers import assert_ok, opened
from conftest import REPO_ROOT, class_image
from core.models import WeightsError
from core.models import backbones
from core.data import folders
from core.data import images as imaging
from core.data import splits as splitting
from core.data import zips
from core import paths
from core.data import DataError
from core.data.folders import Item, scan_folder

DATA_PAGE = "pages/1_Data.py"
OUTSIDE = "path leads outside the upload folder: not unpacked"


# ---------------------------------------------------------------- helpers

def png(label: int = 0, index: int = 0, size: int = 16) -> bytes:
    buf = io.BytesIO()
    class_image(label, index, size).save(buf, "PNG")
    return buf.getvalue()


def make_zip(entries: dict) -> bytes:
    """{name or ZipInfo: bytes} -> zip bytes."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, data in entries.items():
            archive.writestr(name, data)
    return buf.getvalue()


def two_classes(prefix: str = "", n: int = 2) -> dict:
    return {f"{prefix}{cls}/{i}.png": png(label, i)
            for label, cls in enumerate(["cats", "dogs"]) for i in range(n)}


def listing(folder: Path) -> set[str]:
    """What is below folder, less lab_home: the lab's own background queue ticks there (it
    follows FINETUNE_LAB_HOME into every test) and is no part of what the data layer writes."""
    return {name for p in folder.rglob("*") if not (name := str(p.relative_to(folder))).startswith("lab_home")}


def new_paths(before: set[str], folder: Path) -> set[str]:
    return listing(folder) - before


def png_header(path: Path, width: int, height: int) -> None:
    """A PNG that declares `width`×`height` but holds no pixels: enough for any size check."""
    def chunk(kind, body):
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
                     + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b""))


def solid_png(path: Path, width: int, height: int, rgb=(30, 140, 200)) -> None:
    """An RGB PNG streamed row by row, so the test never holds the full image."""
    def chunk(kind, body):
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
    row = b"\x00" + bytes(rgb) * width
    squeeze = zlib.compressobj(1)
    idat = b"".join(squeeze.compress(row) for _ in range(height)) + squeeze.flush()
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
                     + chunk(b"IDAT", idat) + chunk(b"IEND", b""))


# ---------------------------------------------------------------- zips

def test_zip_traversal_absolute_and_symlink_entries_stay_out(tmp_path):
    absolute = tmp_path / "abs_evil.jpg"
    link = zipfile.ZipInfo("cats/link.png")
    link.external_attr = 0o120777 << 16                      # S_IFLNK: a symlink entry
    entries = two_classes() | {"../x.jpg": b"evil", "cats/../../y.jpg": b"evil", "..\\z.jpg": b"evil",
                               str(absolute): b"evil", "C:/windows.jpg": b"evil", link: "/etc/passwd"}
    (tmp_path / "upload.zip").write_bytes(make_zip(entries))
    before = listing(tmp_path)
    dest = tmp_path / "out" / "dest"
    zips.safe_extract_zip(tmp_path / "upload.zip", dest)
    added = new_paths(before, tmp_path)
    assert all(p == "out" or p.startswith("out/dest") for p in added), added
    assert not absolute.exists() and not any(p.is_symlink() for p in dest.rglob("*"))
    scan = scan_folder(dest)
    assert scan.classes == ["cats", "dogs"] and len(scan.items) == 4
    reasons = dict(scan.skipped)
    for name in ("../x.jpg", "cats/../../y.jpg", "../z.jpg", str(absolute), "C:/windows.jpg"):
        assert reasons[name] == OUTSIDE, name
    assert reasons["cats/link.png"].startswith("symbolic link: not unpacked")


@pytest.mark.parametrize("limit", ["bytes", "files"])
def test_zip_bomb_refused_before_anything_is_written(tmp_path, monkeypatch, lab_home, limit):
    if limit == "bytes":
        monkeypatch.setattr(zips, "MAX_ZIP_BYTES", 1024**2)
        entries = two_classes() | {"cats/bomb.png": bytes(5 * 1024**2)}     # 5 MB of zeros, ~5 kB zipped
        message = "would unpack to more than 1.0 MB"
    else:
        monkeypatch.setattr(zips, "MAX_ZIP_FILES", 3)
        entries = two_classes()
        message = "holds more than 3 files"
    data = make_zip(entries)
    assert len(data) < 100_000
    before = listing(tmp_path)
    written = []
    monkeypatch.setattr(zips, "_write", lambda *args: written.append(args))
    with pytest.raises(DataError, match=message) as err:
        zips.save_upload_zip(data, "bomb.zip")
    assert "refused before unpacking" in str(err.value)
    assert written == []
    assert not any(p.is_file() for p in paths.datasets_dir().rglob("*"))
    assert new_paths(before, tmp_path) == set()


def test_nested_zips_unpack_one_level_into_folders_named_after_them(tmp_path):
    innermost = make_zip({"deep/1.png": png(2)})
    cats = make_zip({f"{i}.png": png(0, i) for i in range(3)} | {"more.zip": innermost})
    dogs = make_zip({f"{i}.png": png(1, i) for i in range(3)})
    outer = make_zip({"cats.zip": cats, "dogs.zip": dogs, "broken.zip": b"not a zip"})
    dest = zips.safe_extract_zip(io.BytesIO(outer), tmp_path / "dest")
    assert sorted(listing(dest)) == [zips.ZIP_NOTES, "cats", "cats/0.png", "cats/1.png", "cats/2.png",
                                     "dogs", "dogs/0.png", "dogs/1.png", "dogs/2.png"]
    scan = scan_folder(dest)
    assert scan.classes == ["cats", "dogs"] and len(scan.items) == 6
    reasons = dict(scan.skipped)
    assert reasons["cats.zip/more.zip"].startswith("zip inside a zip inside a zip: not unpacked")
    assert reasons["broken.zip"] == "not a valid zip archive: left out"


def test_nested_zip_counts_against_the_same_limits(tmp_path, monkeypatch):
    monkeypatch.setattr(zips, "MAX_ZIP_FILES", 5)
    inner = make_zip({f"{i}.png": png(1, i) for i in range(4)})
    outer = make_zip({"cats/1.png": png(0), "cats/2.png": png(0, 1), "dogs.zip": inner})   # 3 + 4 > 5
    before = listing(tmp_path)
    with pytest.raises(DataError, match="The zip inside the zip holds more than 5 files"):
        zips.safe_extract_zip(io.BytesIO(outer), tmp_path / "dest")
    assert new_paths(before, tmp_path) == set()          # the staging folder is gone too


def test_zip_macosx_and_hidden_files_are_not_unpacked(tmp_path):
    entries = two_classes("set/") | {"__MACOSX/set/cats/._0.png": b"apple double", "set/.DS_Store": b"junk",
                                     "set/cats/.hidden.png": png(0), "set/.git/config": b"[core]"}
    dest = zips.safe_extract_zip(io.BytesIO(make_zip(entries)), tmp_path / "dest")
    assert not any(part.startswith((".", "__")) for p in listing(dest) for part in Path(p).parts)
    scan = scan_folder(dest)
    assert scan.classes == ["cats", "dogs"] and scan.skipped == []


def zip_with_raw_names(names: list[bytes], flag_utf8=False) -> bytes:
    """A zip whose entry names are the given bytes, without the UTF-8 flag (as old Windows and
    Japanese archivers write them): written under ASCII placeholders, then patched in."""
    placeholders = [(b"Q%d" % i).ljust(len(raw), b"Z") for i, raw in enumerate(names)]
    data = make_zip({ph.decode(): png(i % 2, i) for i, ph in enumerate(placeholders)})
    for ph, raw in zip(placeholders, names):
        assert data.count(ph) == 2                       # local header and central directory
        data = data.replace(ph, raw)
    return data


def test_zip_names_in_legacy_encodings_and_unicode(tmp_path):
    raw = ["café/1.png".encode("cp437"), "猫/1.png".encode("shift_jis"), "ñandú/1.png".encode("utf-8")]
    dest = zips.safe_extract_zip(io.BytesIO(zip_with_raw_names(raw)), tmp_path / "legacy")
    scan = scan_folder(dest)
    assert len(scan.classes) == 3 and len(scan.items) == 3 and scan.skipped == []
    assert "café" in scan.classes and "ñandú" in scan.classes    # cp437 and unflagged UTF-8 read right
    assert "猫".encode("shift_jis").decode("cp437") in scan.classes   # Shift-JIS: unpacked, garbled name

    flagged = make_zip({f"{name}/{i}.png": png(label, i) for label, name in enumerate(["猫", "犬 🐕"])
                        for i in range(2)})
    scan = scan_folder(zips.safe_extract_zip(io.BytesIO(flagged), tmp_path / "unicode"))
    assert scan.classes == sorted(["猫", "犬 🐕"]) and len(scan.items) == 4


def test_zip_images_without_class_folders_says_so(tmp_path):
    flat = make_zip({"1.png": png(0), "2.png": png(1), "notes.txt": b"hi"})
    dest = zips.safe_extract_zip(io.BytesIO(flat), tmp_path / "flat")
    with pytest.raises(DataError, match=r"No class folders found \(2 image\(s\) lie directly in the top "
                                        r"folder\)\. Put the images of each class in its own folder"):
        scan_folder(dest)


@pytest.mark.parametrize("prefix", ["", "wrapper/"])
def test_zip_with_a_single_class_says_two_are_needed(tmp_path, prefix):
    one = make_zip({f"{prefix}cats/{i}.png": png(0, i) for i in range(4)})
    scan = scan_folder(zips.safe_extract_zip(io.BytesIO(one), tmp_path / "one"))
    assert scan.classes == ["cats"]
    assert scan.errors() == ["Only one class found ('cats'): training needs at least 2 classes. Put the "
                             "images of each class in its own folder, e.g. cats/1.jpg and dogs/2.jpg."]
    assert scan_folder(zips.safe_extract_zip(io.BytesIO(make_zip(two_classes())), tmp_path / "two")).errors() == []


def test_empty_class_folders_are_ignored_and_reported(tmp_path):
    entries = two_classes() | {"only_text/readme.txt": b"no images here"}
    archive = io.BytesIO(make_zip(entries))
    with zipfile.ZipFile(archive, "a") as zf:
        zf.writestr(zipfile.ZipInfo("empty/"), b"")              # a directory entry only
    dest = zips.safe_extract_zip(archive, tmp_path / "dest")
    assert (dest / "empty").is_dir()
    for check in (True, False):                                  # the Data page and training agree
        scan = scan_folder(dest, check=check)
        assert scan.classes == ["cats", "dogs"]
        reasons = dict(scan.skipped)
        assert reasons["empty/"] == reasons["only_text/"] == "empty class folder: ignored (no image files)"


def test_damaged_and_encrypted_entries_are_left_out_with_reasons(tmp_path):
    data = bytearray(make_zip(two_classes() | {"cats/bad.png": png(0, 9, 32), "dogs/secret.png": png(1, 5)}))
    start = data.index(b"cats/bad.png") + len(b"cats/bad.png") + 10
    data[start:start + 20] = bytes(20)                           # corrupt the compressed bytes
    local = data.rindex(b"PK\x03\x04", 0, data.index(b"dogs/secret.png"))
    central = data.rindex(b"PK\x01\x02", 0, data.rindex(b"dogs/secret.png"))
    data[local + 6] |= 1                                         # "encrypted" in both headers
    data[central + 8] |= 1
    dest = zips.safe_extract_zip(io.BytesIO(bytes(data)), tmp_path / "dest")
    reasons = dict(scan_folder(dest).skipped)
    assert reasons["cats/bad.png"].startswith("damaged or unsupported entry")
    assert reasons["dogs/secret.png"] == "encrypted: not unpacked (zip the files again without a password)"
    assert not (dest / "cats" / "bad.png").exists() and not (dest / "dogs" / "secret.png").exists()


# ---------------------------------------------------------------- images

def test_unusable_images_are_skipped_with_clear_reasons(tmp_path, monkeypatch):
    root = tmp_path / "data"
    for label, cls in enumerate(["a", "b"]):
        (root / cls).mkdir(parents=True)
        for i in range(3):
            class_image(label, i).save(root / cls / f"ok{i}.png")
    (root / "a" / "zero.jpg").write_bytes(b"")
    (root / "a" / "text.jpg").write_text("I am text wearing a .jpg name")
    png_header(root / "b" / "bomb.png", 30_000, 30_000)         # 900 MP: Pillow's error level
    png_header(root / "b" / "big.png", 10_000, 10_000)          # 100 MP: Pillow only warns
    reasons = dict(scan_folder(root).skipped)
    assert reasons == {
        "a/zero.jpg": "empty file",
        "a/text.jpg": "unreadable image: the content is not a known image format",
        "b/bomb.png": f"too large: over {2 * Image.MAX_IMAGE_PIXELS:,} pixels (decompression bomb guard)",
        "b/big.png": f"too large: 10000×10000 is over {Image.MAX_IMAGE_PIXELS:,} pixels "
                     "(decompression bomb guard)",
    }
    # Training decodes without checking first: the same files fail there, never crash.
    items = [Item(p, 0) for p in ("b/bomb.png", "b/big.png", "a/text.jpg")]
    tensors, failures = imaging.decode_images(str(root), items, 32, workers=1)
    assert tensors == [None, None, None]
    assert "DecompressionBombError" in failures[0][1] and "too large: 10000×10000" in failures[1][1]

    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)       # the limit is Pillow's, and adjustable
    assert imaging.check_image(root / "a" / "ok0.png").startswith("too large: 40×40 is over 1,000 pixels")


def test_truncated_jpeg_passes_the_header_check_and_fails_cleanly_at_decode(tmp_path):
    root = tmp_path / "data"
    rng = np.random.default_rng(0)
    for cls in ["a", "b"]:
        (root / cls).mkdir(parents=True)
        Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(root / cls / "full.jpg")
    whole = (root / "a" / "full.jpg").read_bytes()
    (root / "a" / "cut.jpg").write_bytes(whole[: len(whole) // 2])
    scan = scan_folder(root)
    assert len(scan.items) == 3
    tensors, failures = imaging.decode_images(scan.root, scan.items, 32, workers=1)
    assert [path for path, _ in failures] == ["a/cut.jpg"]
    assert failures[0][1].startswith("could not decode (OSError: image file is truncated")
    assert sum(t is not None for t in tensors) == 2


def awkward_images(folder: Path) -> dict[str, tuple[tuple[int, int], tuple[int, int, int]]]:
    """Write one file per awkward kind; returns {file: ((width, height) as displayed, colour at
    the displayed top-left corner)}."""
    folder.mkdir(parents=True)
    expect = {}
    Image.new("CMYK", (40, 30), (0, 255, 255, 0)).save(folder / "cmyk.jpg", quality=95)
    expect["cmyk.jpg"] = ((40, 30), (255, 0, 0))
    Image.fromarray(np.full((30, 40), 200 * 256, np.uint16)).save(folder / "grey16.png")
    assert Image.open(folder / "grey16.png").mode.startswith("I")
    expect["grey16.png"] = ((40, 30), (200, 200, 200))
    pal = Image.new("P", (40, 30), 0)
    pal.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)
    pal.paste(1, (20, 0, 40, 30))
    pal.save(folder / "palette.png", transparency=0)
    expect["palette.png"] = ((40, 30), (255, 255, 255))         # transparent red -> white
    Image.new("RGBA", (40, 30), (10, 200, 30, 255)).save(folder / "rgba.png")
    expect["rgba.png"] = ((40, 30), (10, 200, 30))
    Image.new("L", (40, 30), 77).save(folder / "grey.png")
    expect["grey.png"] = ((40, 30), (77, 77, 77))
    frames = [Image.new("RGB", (40, 30), c) for c in ((255, 0, 0), (0, 0, 255))]
    frames[0].save(folder / "anim.gif", save_all=True, append_images=frames[1:], duration=100, loop=0)
    assert Image.open(folder / "anim.gif").n_frames == 2
    expect["anim.gif"] = ((40, 30), (255, 0, 0))               # the first frame
    Image.new("RGB", (1, 1), (0, 255, 0)).save(folder / "pixel.png")
    expect["pixel.png"] = ((1, 1), (0, 255, 0))
    # The big PNG takes the whole-factor reduce path: the rotation must survive it.
    for name, (w, h) in {"exif.jpg": (60, 40), "exif_big.png": (600, 400)}.items():
        img = Image.new("RGB", (w, h), (0, 0, 255))
        img.paste((255, 0, 0), (0, 0, w // 2, h))              # left half red
        exif = Image.Exif()
        exif[0x0112] = 6                                       # display rotated 90° clockwise
        img.save(folder / name, exif=exif.tobytes(), **({"quality": 95} if name.endswith("jpg") else {}))
        expect[name] = ((h, w), (255, 0, 0))                   # red ends up on top
    return expect


def test_awkward_images_decode_to_rgb_at_training_size(tmp_path):
    root = tmp_path / "data"
    expect = awkward_images(root / "odd")
    (root / "plain").mkdir()
    class_image(1).save(root / "plain" / "1.png")
    scan = scan_folder(root)
    assert scan.skipped == [] and len(scan.items) == len(expect) + 1
    size = 32
    tensors, failures = imaging.decode_images(scan.root, scan.items, size, workers=1)
    assert failures == []
    for item, tensor in zip(scan.items, tensors):
        if item.path.startswith("plain"):
            continue
        (w, h), colour = expect[Path(item.path).name]
        short = min(w, h)
        assert tensor.dtype == torch.uint8 and tensor.shape == (3, round(h * size / short), round(w * size / short)), item
        np.testing.assert_allclose(tensor[:, 1, 1].numpy(), colour, atol=6, err_msg=item.path)


@pytest.mark.slow
def test_huge_png_decodes_at_training_size_in_one_decode_of_memory(tmp_path):
    """10000×8000 RGB is 240 MB decoded; shrinking before any copy keeps the peak near that
    (converting and rotating first would copy it twice more)."""
    path = tmp_path / "huge.png"
    solid_png(path, 10_000, 8_000)
    probe = f"""
import sys
sys.path.insert(0, {str(REPO_ROOT)!r})
from core.data import images as imaging
def kb(field):
    return next(int(line.split()[1]) for line in open('/proc/self/status') if line.startswith(field))
before = kb('VmRSS:')
with open('/proc/self/clear_refs', 'w') as reset:
    reset.write('5')                                   # restart the peak (VmHWM) from here
img = imaging.open_rgb({str(path)!r}, 64)
print(img.size, img.getpixel((0, 0)), (kb('VmHWM:') - before) // 1024)
"""
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    text = out.stdout.strip()
    assert text.startswith("(80, 64) (30, 140, 200) "), text
    assert int(text.rsplit(" ", 1)[1]) < 450, f"peak memory {text.rsplit(' ', 1)[1]} MB: more than one decode"


# ---------------------------------------------------------------- labels

def test_classes_of_one_or_two_images_still_split_with_a_warning(tmp_path):
    root = tmp_path / "data"
    for label, (cls, n) in enumerate({"big": 12, "two": 2, "one": 1}.items()):
        (root / cls).mkdir(parents=True)
        for i in range(n):
            class_image(label, i).save(root / cls / f"{i}.png")
    scan = scan_folder(root)
    for seed in range(5):
        splits = splitting.split_items(scan, (0.7, 0.15, 0.15), seed=seed)
        train = {scan.classes[it.label] for it in splits["train"]}
        assert train == {"big", "two", "one"}                  # every class trains on something
        assert sum(len(v) for v in splits.values()) == 15
    notes = " ".join(scan.warnings())
    assert "Class 'one' has only 1 image(s)" in notes and "Class 'two' has only 2 image(s)" in notes


def test_heavy_imbalance_is_reported_with_a_pointer_to_class_weighting(tmp_path):
    scan = folders.DataScan(str(tmp_path), ["common", "rare"], [Item(f"c/{i}", 0) for i in range(60)]
                      + [Item(f"r/{i}", 1) for i in range(6)])
    assert scan.imbalance() == 10.0
    notes = [n for n in scan.warnings() if "imbalanced" in n]
    assert notes == ["The classes are imbalanced: 'common' has 10× the images of 'rare' (60 vs 6), so a "
                     "model can score well by favouring the big classes. Consider the class-weighted loss "
                     "option on the Train page, or add images to the small classes."]
    even = folders.DataScan(str(tmp_path), ["a", "b"], [Item(f"{i}", i % 2) for i in range(20)])
    assert even.imbalance() == 1.0 and even.warnings() == []
    # A class too small to split has its own warning and doesn't set the ratio.
    tiny = folders.DataScan(str(tmp_path), ["a", "b", "c"], [Item(f"{i}", i % 2) for i in range(20)] + [Item("c/0", 2)])
    assert tiny.imbalance() == 1.0 and [n[:20] for n in tiny.warnings()] == ["Class 'c' has only 1"]


def test_duplicate_files_across_splits_are_found_by_content(tmp_path, monkeypatch):
    root = tmp_path / "data"
    (root / "a").mkdir(parents=True)
    (root / "b").mkdir()
    files = {"a/1.png": png(0, 1), "a/2.png": png(0, 2), "a/3.png": png(0, 3), "b/1.png": png(1, 1)}
    for name, data in files.items():
        (root / name).write_bytes(data)
    shutil.copy(root / "a/1.png", root / "b/copy_of_a1.png")     # lands in test: leakage
    shutil.copy(root / "a/2.png", root / "a/copy_of_a2.png")     # same split: harmless
    shutil.copy(root / "a/3.png", root / "b/copy_of_a3.png")     # in val
    splits = {"train": [Item("a/1.png", 0), Item("a/2.png", 0), Item("a/copy_of_a2.png", 0), Item("a/3.png", 0)],
              "val": [Item("b/copy_of_a3.png", 1)], "test": [Item("b/copy_of_a1.png", 1), Item("b/1.png", 1)]}
    groups = splitting.duplicate_files(root, splits)
    assert sorted(groups) == [[("test", "b/copy_of_a1.png"), ("train", "a/1.png")],
                              [("train", "a/3.png"), ("val", "b/copy_of_a3.png")]]
    assert splitting.leaked_counts(groups) == {"val": 1, "test": 1}
    as_items = [Item(it.path, it.label, split) for split, items in splits.items() for it in items]
    assert splitting.duplicate_files(root, as_items) == groups

    hashed = []
    real = splitting._file_hash
    monkeypatch.setattr(splitting, "_file_hash", lambda path: hashed.append(path) or real(path))
    for i in range(50):
        (root / "a" / f"u{i}.png").write_bytes(b"x" * (i + 1))   # all sizes differ
    assert splitting.identical_files(root, [f"a/u{i}.png" for i in range(50)]) == [] and hashed == []


# ---------------------------------------------------------------- weights files

def save_state(model: torch.nn.Module, path: Path) -> None:
    safetensors.torch.save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))


def test_weights_for_another_class_count_name_the_mismatching_tensor(tmp_path):
    path = tmp_path / "five.safetensors"
    save_state(timm.create_model("test_resnet", num_classes=5), path)
    target = timm.create_model("test_resnet", num_classes=3)
    with pytest.raises(WeightsError) as err:
        backbones.load_weights_file(target, path)
    head = target.default_cfg["classifier"]
    width = target.get_classifier().in_features
    assert "These weights don't fit test_resnet: " in str(err.value)
    assert f"'{head}.weight' is (5, {width}) in the file but (3, {width}) in the model" in str(err.value)
    assert "another number of classes" in str(err.value)
    backbone = backbones.create_backbone("test_resnet", "file", weights_file=str(path))   # the app's path:
    assert backbone.num_classes == 0                                               # the head is new anyway


def test_weights_for_another_architecture_say_which_shapes_differ(tmp_path):
    path = tmp_path / "vit.safetensors"
    save_state(timm.create_model("test_vit", num_classes=0), path)
    with pytest.raises(WeightsError, match="don't fit test_resnet") as err:
        backbones.load_weights_file(backbones.create_backbone("test_resnet", "random"), path)
    assert "in the file" in str(err.value) and "another architecture" in str(err.value)


class TouchMarker:
    """Unpickling this would run a shell command that creates a marker file."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return os.system, (f"touch '{self.marker}'",)


def test_weights_pickle_that_runs_code_is_refused_unrun(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    torch.save({"state_dict": timm.create_model("test_resnet", num_classes=0).state_dict(),
                "extra": TouchMarker(marker)}, path)
    with pytest.raises(WeightsError) as err:
        backbones.create_backbone("test_resnet", "file", weights_file=str(path))
    assert "holds Python objects besides tensors, and loading them could run code" in str(err.value)
    assert "only .safetensors" in str(err.value)
    assert not marker.exists()


@pytest.mark.parametrize("kind", ["safetensors", "pth", "legacy_pth"])
def test_truncated_weights_file_is_reported_as_damaged(tmp_path, kind):
    model = timm.create_model("test_resnet", num_classes=0)
    path = tmp_path / f"w.{'safetensors' if kind == 'safetensors' else 'pth'}"
    if kind == "safetensors":
        save_state(model, path)
    else:
        torch.save(model.state_dict(), path, _use_new_zipfile_serialization=kind == "pth")
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(WeightsError) as err:
        backbones.create_backbone("test_resnet", "file", weights_file=str(path))
    assert str(err.value).startswith(f"Can't read weights file {path.name}: it is damaged, incomplete")


# ---------------------------------------------------------------- upload names

@pytest.mark.parametrize("name, stored", [
    ("../../evil.jpg", "evil.jpg"), ("/etc/evil.jpg", "etc/evil.jpg"), ("..\\..\\evil.jpg", "evil.jpg"),
    ("C:\\Windows\\evil.jpg", "C:/Windows/evil.jpg"), ("cats/./../1.jpg", "cats/1.jpg"),
    ("a\x00b.jpg", None), ("tab\there.jpg", None), ("../..", None), ("", None),
])
def test_upload_names_never_leave_the_upload_folder(tmp_path, name, stored):
    folder = tmp_path / "data" / "up"
    folder.mkdir(parents=True)
    before = listing(tmp_path)
    target = zips.save_upload_file(folder, name, b"data")
    if stored is None:
        assert target is None
    else:
        assert target == (folder / stored).resolve() and target.read_bytes() == b"data"
    assert all(p.startswith("data/up/") for p in new_paths(before, tmp_path))


# ---------------------------------------------------------------- the Data page

def test_data_page_states_the_upload_limit_next_to_each_uploader():
    at = opened(DATA_PAGE)
    limit = 2048                                                 # .streamlit/config.toml
    for source in ("zip", "folder", "images"):
        at.radio(key="data_source").set_value(source).run()
        assert_ok(at)
        captions = [c.value for c in at.caption]
        assert f"Upload limit: {limit} MB per file (server.maxUploadSize in .streamlit/config.toml)." \
            in captions, (source, captions)


def test_data_page_zip_with_hostile_entries_lists_what_was_left_out(tmp_path):
    link = zipfile.ZipInfo("pets/cats/link.png")
    link.external_attr = 0o120777 << 16
    entries = two_classes("pets/", n=3) | {"../evil.jpg": b"evil", link: "/etc/passwd",
                                           "__MACOSX/pets/._x": b"junk"}
    before = listing(tmp_path)
    at = opened(DATA_PAGE)
    at.radio(key="data_source").set_value("zip").run()
    at.file_uploader(key="zip_upload").upload("pets.zip", make_zip(entries), "application/zip").run()
    assert_ok(at)
    assert not at.error
    assert {m.label: m.value for m in at.metric}["Skipped files"] == "2"
    skipped = next(df.value for df in at.dataframe if list(df.value.columns) == ["file", "reason"])
    assert dict(zip(skipped["file"], skipped["reason"]))["../evil.jpg"] == OUTSIDE
    outside = new_paths(before, tmp_path)
    assert outside == set()
    mine = paths.datasets_dir() / "users" / at.session_state["lab"].owner
    assert [p.name for p in mine.iterdir()] == [Path(at.session_state["lab"].settings["data_root"]).name]


def test_data_page_refuses_a_zip_bomb(monkeypatch):
    monkeypatch.setattr(zips, "MAX_ZIP_BYTES", 1024**2)
    at = opened(DATA_PAGE)
    at.radio(key="data_source").set_value("zip").run()
    bomb = make_zip(two_classes() | {"cats/zeros.png": bytes(3 * 1024**2)})
    at.file_uploader(key="zip_upload").upload("bomb.zip", bomb, "application/zip").run()
    assert_ok(at)
    assert any("would unpack to more than 1.0 MB" in e.value for e in at.error)
    assert not any(p.is_file() for p in paths.datasets_dir().rglob("*"))


def open_folder(path: Path):
    at = opened(DATA_PAGE)
    at.radio(key="data_source").set_value("path").run()
    next(t for t in at.text_input if t.label == "Folder path on the server").input(str(path)).run()
    assert_ok(at)
    return at


def test_data_page_single_class_is_an_error(tmp_path):
    for i in range(4):
        (tmp_path / "set" / "cats").mkdir(parents=True, exist_ok=True)
        class_image(0, i).save(tmp_path / "set" / "cats" / f"{i}.png")
    at = open_folder(tmp_path / "set")
    assert any("training needs at least 2 classes" in e.value for e in at.error)


def test_data_page_warns_about_imbalance_and_leakage(tmp_path):
    root = tmp_path / "set"
    layout = {"train": {"common": 30, "rare": 3}, "val": {"common": 4, "rare": 2}, "test": {"common": 4, "rare": 2}}
    for offset, (split, per_class) in enumerate(layout.items()):
        for label, (cls, n) in enumerate(per_class.items()):
            (root / split / cls).mkdir(parents=True)
            for i in range(n):
                class_image(label, 100 * offset + i).save(root / split / cls / f"{i}.png")
    for i in range(3):                                           # three train images copied into test
        shutil.copy(root / "train" / "common" / f"{i}.png", root / "test" / "common" / f"copy{i}.png")
    at = open_folder(root)
    warnings = [w.value for w in at.warning]
    assert any("imbalanced" in w and "class-weighted loss" in w for w in warnings), warnings
    assert any(w.startswith("3 images appear in both train and test (identical files): test accuracy "
                            "will be optimistic (leakage).") for w in warnings), warnings
    assert not any("train and val" in w for w in warnings)


# ---------------------------------------------------------------- shared server (issue 14, first cases)

@pytest.mark.parametrize("size", [(1, 20000), (20000, 1), (3, 200)])
def test_extreme_aspect_ratio_is_refused_before_it_costs_memory(tmp_path, size):
    """Resized by its short side, a 1x20000 strip would become a 224x4,480,000 tensor."""
    from PIL import Image
    path = tmp_path / "strip.png"
    Image.new("RGB", size, (200, 10, 10)).save(path)
    assert "extreme shape" in imaging.check_image(path)
    with pytest.raises(DataError, match="extreme shape"):
        imaging.open_rgb(path, 224)


def test_run_folder_never_comes_from_the_arch_text(tmp_path):
    from core.config import RunConfig
    from core.serve.store import Run
    root = tmp_path / "runs"
    root.mkdir()
    from core.config import ConfigError
    with pytest.raises(ConfigError, match="timm has no model of that name"):
        Run.create(RunConfig(arch="../../../../elsewhere/x"), root=root)
    assert not (tmp_path / "elsewhere").exists() and list(root.iterdir()) == []
    run = Run.create(RunConfig(arch="hf-hub:org/some.model-v1"), root=root)     # a hub id: sanitised
    assert run.path.parent == root and "/" not in run.path.name and ":" not in run.path.name


@pytest.mark.parametrize("change, words", [
    (dict(image_size=100000), "image_size"), (dict(image_size="224"), "image_size"),
    (dict(std=[0.2, 0.0, 0.2]), "std"), (dict(mean=[0.5, float("nan"), 0.5]), "mean"),
    (dict(classes=[]), "classes"), (dict(classes="cats"), "classes")])
def test_exported_model_json_is_checked_before_use(change, words):
    """Issue 14: an uploaded model.json with image_size 100000 asked for 30 GB; std 0 crashed."""
    from core.models import predict
    meta = dict(arch="test_resnet", classes=["a", "b"], image_size=64, mean=[0.5] * 3, std=[0.25] * 3)
    assert predict.export_meta_problem(meta) == ""
    with pytest.raises(ValueError, match=words):
        predict.from_export("no-such-file.safetensors", dict(meta, **change))
