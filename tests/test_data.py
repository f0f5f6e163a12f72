"""core.data: scanning folders, splits, safe zip extraction, decoding and transforms."""
from __future__ import annotations

import io
import struct
import zipfile
import zlib
from collections import Counter
from pathlib import Path

import numpy as np
from torchvision.transforms import v2
import pytest
import torch
from PIL import Image

from conftest import class_image
from core.data import folders
from core.data import images as imaging
from core.data import transforms
from core.data import zips
from core.data import DataError
from core.data.folders import Item, scan_folder
from core.data.splits import split_items


def per_class(items, n_classes):
    counts = Counter(it.label for it in items)
    return [counts.get(i, 0) for i in range(n_classes)]


# ---------------------------------------------------------------- scan_folder

def test_scan_class_folders(image_folder):
    root = image_folder(classes=["dog", "cat", "bird"], per_class=4, fmt="mixed")
    scan = scan_folder(root)
    assert scan.classes == ["bird", "cat", "dog"]          # sorted, so labels are stable
    assert scan.presplit is False and scan.skipped == []
    assert scan.counts() == {"bird": 4, "cat": 4, "dog": 4}
    assert Path(scan.root) == root.resolve()
    for item in scan.items:
        assert not Path(item.path).is_absolute()
        assert Path(item.path).parts[0] == scan.classes[item.label]
        assert item.split is None
        assert (Path(scan.root) / item.path).is_file()
    assert scan.warnings() == []


@pytest.mark.parametrize("names", [("train", "val", "test"), ("train", "valid", "test"),
                                   ("Training", "Validation", "Testing")])
def test_scan_presplit_folders(image_folder, names):
    root = image_folder(classes=2, splits={names[0]: 4, names[1]: 2, names[2]: 3})
    scan = scan_folder(root)
    assert scan.presplit is True
    assert scan.classes == ["class_a", "class_b"]
    assert Counter(it.split for it in scan.items) == {"train": 8, "val": 4, "test": 6}
    assert scan.counts() == {"class_a": 9, "class_b": 9}


def test_scan_descends_wrapper_folder(image_folder):
    root = image_folder(classes=3, per_class=2, wrapper="my_dataset")
    (root / ".DS_Store").write_bytes(b"junk")
    (root / "__MACOSX" / "my_dataset").mkdir(parents=True)
    scan = scan_folder(root)
    assert Path(scan.root) == (root / "my_dataset").resolve()
    assert scan.classes == ["class_a", "class_b", "class_c"]
    assert len(scan.items) == 6


def test_scan_descends_wrapper_around_presplit(image_folder):
    root = image_folder(classes=2, splits={"train": 3, "valid": 1}, wrapper="export")
    scan = scan_folder(root)
    assert scan.presplit and Path(scan.root).name == "export"
    assert Counter(it.split for it in scan.items) == {"train": 6, "val": 2}


def test_scan_ignores_hidden_files_and_macosx(image_folder):
    root = image_folder(classes=2, per_class=3)
    # macOS zip debris, hidden files and folders at every level
    (root / "__MACOSX" / "class_a").mkdir(parents=True)
    class_image(0).save(root / "__MACOSX" / "class_a" / "._img_000.png")
    (root / "class_a" / ".DS_Store").write_bytes(b"\x00\x01junk")
    (root / "class_a" / "._img_000.png").write_bytes(b"AppleDouble")
    (root / ".hidden_class").mkdir()
    class_image(1).save(root / ".hidden_class" / "x.png")
    (root / "class_b" / ".thumbs").mkdir()
    class_image(1).save(root / "class_b" / ".thumbs" / "t.png")
    (root / ".git").mkdir()
    (root / ".git" / "config").write_text("[core]")
    scan = scan_folder(root)
    assert scan.classes == ["class_a", "class_b"]
    assert len(scan.items) == 6
    assert scan.skipped == []


def test_scan_ignores_hidden_files_next_to_class_folders(image_folder):
    """macOS leaves AppleDouble files ("._name") next to copied files, and .DS_Store everywhere."""
    root = image_folder(classes=2, per_class=3)
    (root / ".DS_Store").write_bytes(b"\x00\x01junk")
    (root / "._cover.png").write_bytes(b"AppleDouble")
    (root / ".preview.jpg").write_bytes(b"hidden")
    scan = scan_folder(root)
    assert len(scan.items) == 6
    assert scan.skipped == []


def test_scan_lists_unusable_files_with_reasons(image_folder):
    root = image_folder(classes=2, per_class=3)
    (root / "class_a" / "notes.txt").write_text("not an image")
    (root / "class_a" / "empty.jpg").write_bytes(b"")
    (root / "class_b" / "fake.jpg").write_text("I am text wearing a .jpg name")
    (root / "class_b" / "noext").write_bytes(b"\x00" * 10)
    (root / "README.md").write_text("# my data set")     # may be listed or not; never an item
    class_image(0).save(root / "stray.png")
    scan = scan_folder(root)
    assert len(scan.items) == 6
    reasons = dict(scan.skipped)
    assert set(reasons) - {"README.md"} == {"class_a/notes.txt", "class_a/empty.jpg", "class_b/fake.jpg",
                                            "class_b/noext", "stray.png"}
    assert "not an image type" in reasons["class_a/notes.txt"] and ".txt" in reasons["class_a/notes.txt"]
    assert "no extension" in reasons["class_b/noext"]
    assert reasons["class_a/empty.jpg"] == "empty file"
    assert "unreadable image" in reasons["class_b/fake.jpg"]
    assert "not inside a class folder" in reasons["stray.png"]
    assert not any(it.path.endswith(("notes.txt", "empty.jpg", "fake.jpg")) for it in scan.items)


def test_scan_nested_images_belong_to_top_class_folder(image_folder):
    root = image_folder(classes=2, per_class=2)
    (root / "class_a" / "batch2").mkdir()
    class_image(0, 7).save(root / "class_a" / "batch2" / "more.png")
    scan = scan_folder(root)
    nested = [it for it in scan.items if it.path.endswith("more.png")]
    assert len(nested) == 1 and scan.classes[nested[0].label] == "class_a"


def test_scan_without_class_folders_raises_clear_error(tmp_path):
    flat = tmp_path / "flat"
    flat.mkdir()
    for i in range(3):
        class_image(0, i).save(flat / f"{i}.png")
    with pytest.raises(DataError, match="No class folders found") as err:
        scan_folder(flat)
    assert "own folder" in str(err.value)           # tells the user how to fix it

    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match="No class folders found"):
        scan_folder(empty)


def test_scan_missing_folder_and_no_readable_images(tmp_path):
    with pytest.raises(DataError, match="Folder not found"):
        scan_folder(tmp_path / "nope")
    root = tmp_path / "junk"
    for cls in ("a", "b"):
        (root / cls).mkdir(parents=True)
        (root / cls / "x.txt").write_text("text")
    with pytest.raises(DataError, match="no readable images"):
        scan_folder(root)


def test_scan_warns_about_tiny_classes(image_folder):
    scan = scan_folder(image_folder(per_class={"big": 6, "two": 2, "one": 1}, classes=["big", "two", "one"]))
    notes = " ".join(scan.warnings())
    assert "'two'" in notes and "'one'" in notes and "'big'" not in notes


# ---------------------------------------------------------------- split_items

def test_split_70_15_15_stratified(image_folder):
    scan = scan_folder(image_folder(classes=3, per_class=20), check=False)
    splits = split_items(scan, (0.7, 0.15, 0.15), seed=0)
    assert per_class(splits["train"], 3) == [14, 14, 14]
    assert per_class(splits["val"], 3) == [3, 3, 3]
    assert per_class(splits["test"], 3) == [3, 3, 3]
    paths = [it.path for s in folders.SPLITS for it in splits[s]]
    assert len(paths) == len(set(paths)) == 60             # disjoint and complete
    assert set(paths) == {it.path for it in scan.items}


def test_split_is_seeded_and_reproducible(image_folder):
    scan = scan_folder(image_folder(classes=3, per_class=20), check=False)

    def as_paths(s):
        return {k: [it.path for it in v] for k, v in s.items()}
    first = as_paths(split_items(scan, seed=7))
    assert first == as_paths(split_items(scan, seed=7))
    assert first != as_paths(split_items(scan, seed=8))


@pytest.mark.parametrize("n", [3, 4, 5, 7, 10])
def test_split_every_class_in_every_split_from_three_images(image_folder, n):
    scan = scan_folder(image_folder(classes=3, per_class=n), check=False)
    for seed in range(3):
        splits = split_items(scan, seed=seed)
        for name in folders.SPLITS:
            assert all(c >= 1 for c in per_class(splits[name], 3)), (name, seed)
        assert sum(len(v) for v in splits.values()) == 3 * n


def test_split_tiny_classes_do_not_fail(image_folder):
    scan = scan_folder(image_folder(classes=["big", "one", "two"], per_class={"big": 10, "one": 1, "two": 2}),
                       check=False)
    splits = split_items(scan, seed=0)
    one, two = scan.classes.index("one"), scan.classes.index("two")
    assert sum(len(v) for v in splits.values()) == 13
    assert per_class(splits["train"], 3)[one] == 1          # a single image trains
    assert per_class(splits["train"], 3)[two] >= 1
    assert per_class(splits["val"], 3)[two] + per_class(splits["test"], 3)[two] <= 1


def test_split_max_per_class_caps_only_train(image_folder):
    scan = scan_folder(image_folder(classes=3, per_class=20), check=False)
    full = split_items(scan, seed=0)
    capped = split_items(scan, seed=0, max_per_class=5)
    assert per_class(capped["train"], 3) == [5, 5, 5]
    for name in ("val", "test"):
        assert [it.path for it in capped[name]] == [it.path for it in full[name]]
    assert {it.path for it in capped["train"]} <= {it.path for it in full["train"]}


def test_split_keeps_presplit_folders(image_folder):
    scan = scan_folder(image_folder(classes=2, splits={"train": 6, "valid": 2, "test": 3}), check=False)
    splits = split_items(scan, seed=0)
    for name in folders.SPLITS:
        assert all(it.split == name for it in splits[name])
    assert per_class(splits["train"], 2) == [6, 6]
    assert per_class(splits["val"], 2) == [2, 2]
    assert per_class(splits["test"], 2) == [3, 3]


def test_split_carves_missing_presplit_val_from_train(image_folder):
    scan = scan_folder(image_folder(classes=2, splits={"train": 10, "test": 3}), check=False)
    splits = split_items(scan, seed=0)
    assert all(it.split == "test" for it in splits["test"]) and per_class(splits["test"], 2) == [3, 3]
    assert all(it.split == "train" for it in splits["val"]) and all(c >= 1 for c in per_class(splits["val"], 2))
    assert len(splits["train"]) + len(splits["val"]) == 20


# ---------------------------------------------------------------- safe_extract_zip

def png_bytes(label=0) -> bytes:
    buf = io.BytesIO()
    class_image(label, size=16).save(buf, "PNG")
    return buf.getvalue()


def test_safe_extract_zip_refuses_traversal_and_absolute_paths(tmp_path):
    outside_abs = tmp_path / "abs_evil.jpg"
    zpath = tmp_path / "upload.zip"
    with zipfile.ZipFile(zpath, "w") as zf:
        zf.writestr("pets/cat/1.png", png_bytes(0))
        zf.writestr("pets/dog/1.png", png_bytes(1))
        zf.writestr("__MACOSX/pets/cat/._1.png", b"apple double")
        zf.writestr("../evil.jpg", b"evil")
        zf.writestr("pets/../../evil2.jpg", b"evil")
        zf.writestr("..\\evil3.jpg", b"evil")
        zf.writestr(str(outside_abs), b"evil")             # "/tmp/.../abs_evil.jpg"
        link = zipfile.ZipInfo("pets/cat/link.png")
        link.external_attr = (0o120777 << 16)               # a symlink entry
        zf.writestr(link, "/etc/passwd")
    dest = tmp_path / "out" / "dest"
    assert zips.safe_extract_zip(zpath, dest) == dest.resolve()
    assert (dest / "pets" / "cat" / "1.png").is_file()
    assert not (tmp_path / "out" / "evil.jpg").exists()
    assert not (tmp_path / "evil2.jpg").exists() and not (tmp_path / "out" / "evil2.jpg").exists()
    assert not (tmp_path / "out" / "evil3.jpg").exists()
    assert not outside_abs.exists()
    assert not (dest / "pets" / "cat" / "link.png").exists()
    for path in (tmp_path / "out").rglob("*"):
        assert path.resolve().is_relative_to(dest.resolve())
        assert not path.is_symlink()
    scan = scan_folder(dest)                               # wrapper "pets" and __MACOSX handled
    assert scan.classes == ["cat", "dog"] and len(scan.items) == 2


def test_safe_extract_zip_bad_zip_is_data_error(tmp_path):
    bad = tmp_path / "bad.zip"
    bad.write_bytes(b"this is not a zip archive at all")
    with pytest.raises(DataError, match="not a valid zip"):
        zips.safe_extract_zip(bad, tmp_path / "dest")


def test_save_upload_zip_lands_in_lab_home(lab_home):
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("a/1.png", png_bytes(0))
        zf.writestr("b/1.png", png_bytes(1))
    folder = zips.save_upload_zip(buf.getvalue(), "my data.zip")
    assert folder.resolve().is_relative_to(lab_home.resolve())
    assert scan_folder(folder).classes == ["a", "b"]
    assert zips.save_upload_zip(buf.getvalue(), "my data.zip") == folder     # same content, same folder


def test_save_upload_file_keeps_paths_inside(tmp_path):
    folder = tmp_path / "up"
    folder.mkdir()
    target = zips.save_upload_file(folder, "../../cat/../1.png", b"x")
    assert target is not None and target.resolve().is_relative_to(folder.resolve())
    assert zips.save_upload_file(folder, "../..", b"x") is None


# ---------------------------------------------------------------- open_rgb

def write_png16(path: Path, arr: np.ndarray) -> None:
    """A 16-bit RGB PNG written by hand (Pillow can't write one)."""
    h, w, _ = arr.shape
    raw = b"".join(b"\x00" + arr[y].astype(">u2").tobytes() for y in range(h))

    def chunk(kind, body):
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0))
                     + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))


def make_special(kind: str, folder: Path) -> tuple[Path, tuple[int, int, int] | None]:
    """An image of an awkward kind, and the RGB colour open_rgb should give its top-left pixel."""
    path = folder / f"{kind}.{'jpg' if 'jpeg' in kind else 'png'}"
    if kind == "rgba":
        Image.new("RGBA", (30, 20), (255, 0, 0, 0)).save(path)            # transparent -> white
        return path, (255, 255, 255)
    if kind == "rgba_opaque":
        Image.new("RGBA", (30, 20), (10, 200, 30, 255)).save(path)
        return path, (10, 200, 30)
    if kind == "la":
        Image.new("LA", (30, 20), (0, 0)).save(path)
        return path, (255, 255, 255)
    if kind == "palette_transparent":
        img = Image.new("P", (30, 20), 0)
        img.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)
        img.paste(1, (15, 0, 30, 20))
        img.save(path, transparency=0)                                   # index 0 (red) is transparent
        return path, (255, 255, 255)
    if kind == "grey":
        Image.new("L", (30, 20), 77).save(path)
        return path, (77, 77, 77)
    if kind == "grey16":
        arr = np.full((20, 30), 200 * 256, dtype=np.uint16)
        Image.fromarray(arr).save(path)                                  # opens as I;16
        return path, (200, 200, 200)
    if kind == "rgb16":
        arr = np.zeros((20, 30, 3), np.uint16)
        arr[..., 0], arr[..., 2] = 65535, 30000
        write_png16(path, arr)
        return path, (255, 0, 117)
    if kind == "cmyk_jpeg":
        Image.new("CMYK", (30, 20), (0, 255, 255, 0)).save(path, quality=95)   # red in CMYK
        return path, (255, 0, 0)
    raise AssertionError(kind)


@pytest.mark.parametrize("kind", ["rgba", "rgba_opaque", "la", "palette_transparent", "grey", "grey16",
                                  "rgb16", "cmyk_jpeg"])
@pytest.mark.parametrize("size", [None, 16])
def test_open_rgb_converts_awkward_modes(tmp_path, kind, size):
    path, colour = make_special(kind, tmp_path)
    img = imaging.open_rgb(path, size)
    assert img.mode == "RGB"
    assert img.size == ((30, 20) if size is None else (24, 16))
    np.testing.assert_allclose(np.asarray(img)[0, 0], colour, atol=3)


def test_open_rgb_palette_keeps_opaque_colours(tmp_path):
    path, _ = make_special("palette_transparent", tmp_path)
    arr = np.asarray(imaging.open_rgb(path))
    assert tuple(arr[10, 5]) == (255, 255, 255) and tuple(arr[10, 25]) == (0, 0, 255)


@pytest.mark.parametrize("size", [None, 32])
def test_open_rgb_honours_exif_orientation(tmp_path, size):
    img = Image.new("RGB", (60, 40), (0, 0, 255))
    img.paste((255, 0, 0), (0, 0, 30, 40))                 # left half red
    exif = Image.Exif()
    exif[0x0112] = 6                                      # "rotate 90° clockwise to display"
    path = tmp_path / "rotated.jpg"
    img.save(path, exif=exif.tobytes(), quality=95)
    assert Image.open(path).size == (60, 40)
    out = imaging.open_rgb(path, size)
    assert out.mode == "RGB"
    assert out.size == ((40, 60) if size is None else (32, 48))     # width and height swapped
    arr = np.asarray(out).astype(int)
    assert arr[2, out.size[0] // 2, 0] > 200 and arr[-3, out.size[0] // 2, 2] > 200   # red on top now


def test_open_rgb_downscales_large_jpeg_to_short_side(tmp_path):
    path = tmp_path / "big.jpg"
    class_image(1, size=(400, 300)).save(path, quality=90)
    out = imaging.open_rgb(path, 32)
    assert out.size[1] == 32 and abs(out.size[0] - 43) <= 1


# ---------------------------------------------------------------- decode_images

def test_decode_images_records_truncated_jpeg(tmp_path):
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (120, 120, 3), dtype=np.uint8)).save(tmp_path / "full.jpg", quality=95)
    data = (tmp_path / "full.jpg").read_bytes()
    (tmp_path / "cut.jpg").write_bytes(data[: len(data) // 2])
    class_image(0).save(tmp_path / "ok.png")
    items = [Item("full.jpg", 0), Item("cut.jpg", 1), Item("ok.png", 0), Item("missing.png", 1)]
    calls = []
    tensors, failures = imaging.decode_images(str(tmp_path), items, 24, workers=2,
                                        progress=lambda done, total, _m: calls.append((done, total)))
    assert len(tensors) == 4
    assert tensors[1] is None and tensors[3] is None
    for t in (tensors[0], tensors[2]):
        assert t.dtype == torch.uint8 and t.shape[0] == 3 and min(t.shape[1:]) == 24
    assert [path for path, _ in failures] == ["cut.jpg", "missing.png"]
    assert all(reason.startswith("could not decode") for _, reason in failures)
    assert "truncated" in failures[0][1]
    assert calls[-1] == (4, 4)


# ---------------------------------------------------------------- build_transform

@pytest.mark.parametrize("augment", [None, {}, {"hflip": True}, {"vflip": True, "rotation": 20},
                                     {"random_resized_crop": 0.5}, {"color_jitter": 0.3},
                                     {"hflip": True, "rotation": 0, "color_jitter": 0}])
def test_build_transform_shape_and_dtype(augment):
    tf = transforms.build_transform(32, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225), augment)
    img = v2.functional.pil_to_tensor(class_image(2, size=(50, 40)))
    out = tf(img)
    assert out.shape == (3, 32, 32) and out.dtype == torch.float32
    assert torch.isfinite(out).all()


def test_build_transform_eval_is_deterministic_and_normalised():
    tf = transforms.build_transform(16, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    img = torch.full((3, 20, 30), 255, dtype=torch.uint8)
    out = tf(img)
    assert torch.equal(out, tf(img))
    assert torch.allclose(out, torch.ones_like(out))              # (1 - 0.5) / 0.5
