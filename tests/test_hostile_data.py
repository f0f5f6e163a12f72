"""A hostile student on a shared lab server (issue 14): zips and images built to crash the data
layer, fill the disk or the memory, or quietly give a wrong data set. Each case must end in one
sentence (a DataError, or a note scan_folder lists as skipped), write nothing outside the
destination and stay bounded. Every fixture is generated here, offline."""
from __future__ import annotations

import io
import time
import unicodedata
import warnings
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFile

from conftest import class_image
from core.data import folders
from core.data import images as imaging
from core.data import zips
from core import paths
from core.data import DataError
from core.data.folders import Item, scan_folder

CAFE = "caf\u00e9"                                   # composed (NFC), as Windows and Linux write it
CAFE_NFD = unicodedata.normalize("NFD", CAFE)        # decomposed, as macOS writes it


def png(label: int = 0, index: int = 0) -> bytes:
    buf = io.BytesIO()
    class_image(label, index, 16).save(buf, "PNG")
    return buf.getvalue()


def make_zip(entries, method=zipfile.ZIP_DEFLATED) -> bytes:
    """[(name or ZipInfo, bytes)] -> zip bytes; a list, so one name can appear twice."""
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)            # "Duplicate name: ..."
        with zipfile.ZipFile(buf, "w", method) as archive:
            for name, data in entries:
                archive.writestr(name, data)
    return buf.getvalue()


def two_classes(n: int = 2) -> list:
    return [(f"{cls}/{i}.png", png(label, i)) for label, cls in enumerate(["cats", "dogs"]) for i in range(n)]


def listing(folder: Path) -> set[str]:
    """What is below folder, less lab_home: the lab's own background queue ticks there (it
    follows FINETUNE_LAB_HOME into every test) and is no part of what the data layer writes."""
    return {name for p in folder.rglob("*") if not (name := str(p.relative_to(folder))).startswith("lab_home")}


def unpack(tmp_path: Path, entries, **kwargs) -> tuple[Path, dict[str, str]]:
    """Extract below tmp_path/dest; returns the folder and {skipped entry: reason}. Checks that
    nothing appeared anywhere else below tmp_path."""
    before = listing(tmp_path)
    dest = zips.safe_extract_zip(io.BytesIO(make_zip(entries)), tmp_path / "dest", **kwargs)
    # lab_home is the app's data folder, where a neighbouring test's background work may write
    assert all(p.startswith("dest") for p in listing(tmp_path) - before)
    return dest, dict(folders._zip_notes(dest))


def refused(tmp_path: Path, monkeypatch, data: bytes, match: str, **kwargs) -> str:
    """The zip must be refused whole with a DataError, before anything is written."""
    written = []
    before = listing(tmp_path)
    with monkeypatch.context() as patch, pytest.raises(DataError, match=match) as err:
        patch.setattr(zips, "_write", lambda *args: written.append(args))
        zips.safe_extract_zip(io.BytesIO(data), tmp_path / "dest", **kwargs)
    assert written == [] and listing(tmp_path) == before
    assert "refused before unpacking, as a likely zip bomb." in str(err.value)
    return str(err.value)


# ---------------------------------------------------------------- 1. names too long for the disk

def test_zip_entry_with_a_name_part_over_255_bytes_is_left_out_with_a_note(tmp_path):
    long_file = "cats/" + "a" * 300 + ".png"
    long_folder = "b" * 256 + "/1.png"
    deep = "/".join(["c" * 250] * 20) + "/1.png"          # each part fits, the whole path doesn't
    dest, notes = unpack(tmp_path, two_classes() + [(long_file, png()), (long_folder, png()), (deep, png())])
    too_long = "name too long: a part of it is over 255 bytes; not unpacked"
    assert notes[long_file] == notes[long_folder] == too_long
    assert notes[deep] == "name too long: its path is over 4,096 bytes; not unpacked"
    scan = scan_folder(dest)
    assert scan.classes == ["cats", "dogs"] and len(scan.items) == 4
    assert dict(scan.skipped)[long_file].startswith("name too long: ")


def test_uploaded_file_with_a_name_too_long_is_refused(tmp_path):
    assert zips.save_upload_file(tmp_path, "cats/" + "é" * 200 + ".png", b"x") is None    # 400 bytes in UTF-8
    assert listing(tmp_path) == set()


# ---------------------------------------------------------------- 2. one name twice

def test_zip_with_the_same_name_twice_keeps_the_first_and_notes_the_second(tmp_path):
    first, second = png(0, 1), png(1, 2)
    entries = two_classes() + [("cats/x.png", first), ("cats/x.png", second), ("cats/./x.png", second),
                               (f"{CAFE}/1.png", first), (f"{CAFE_NFD}/1.png", second)]
    dest, notes = unpack(tmp_path, entries)
    assert (dest / "cats" / "x.png").read_bytes() == first
    assert (dest / CAFE / "1.png").read_bytes() == first
    duplicate = "duplicate name: an earlier entry of the zip has it; not unpacked"
    assert notes == {"cats/x.png": duplicate, "cats/./x.png": duplicate, f"{CAFE}/1.png": duplicate}
    scan = scan_folder(dest)
    assert sorted(scan.skipped) == sorted((name, duplicate) for name in notes)
    assert scan.classes == [CAFE, "cats", "dogs"] and scan.counts()["cats"] == 3


# ---------------------------------------------------------------- 3. a file and a folder of one name

@pytest.mark.parametrize("file_first", [True, False])
def test_zip_file_named_like_a_class_folder_loses_to_the_folder(tmp_path, file_first):
    clash = [("cats", b"a plain file"), ("dogs/", b"")]
    entries = clash + two_classes() if file_first else two_classes() + clash
    entries.append(("dogs", b"another plain file"))
    dest, notes = unpack(tmp_path, entries)
    reason = "a folder of the zip has the same name: the file is not unpacked"
    assert notes == {"cats": reason, "dogs": reason}
    scan = scan_folder(dest)
    assert scan.classes == ["cats", "dogs"] and len(scan.items) == 4
    assert ("cats", reason) in scan.skipped


# ---------------------------------------------------------------- 4. one class name in two spellings

def test_zip_class_names_in_nfc_and_nfd_unpack_into_one_class(tmp_path):
    entries = [(f"{CAFE}/1.png", png(0, 1)), (f"{CAFE_NFD}/2.png", png(0, 2)), ("dogs/1.png", png(1))]
    dest, notes = unpack(tmp_path, entries)
    assert notes == {}
    assert sorted(p.name for p in dest.iterdir()) == [CAFE, "dogs"]
    scan = scan_folder(dest)
    assert scan.classes == [CAFE, "dogs"] and scan.counts() == {CAFE: 2, "dogs": 1}


def test_scan_folder_merges_class_folders_whose_names_differ_only_in_normalisation(tmp_path):
    root = tmp_path / "data"
    for name, label in ((CAFE, 0), (CAFE_NFD, 0), ("dogs", 1)):
        (root / name).mkdir(parents=True)
        class_image(label, len(name)).save(root / name / f"{len(name)}.png")
    assert len(list(root.iterdir())) == 3                      # two look-alike folders on disk
    for check in (True, False):
        scan = scan_folder(root, check=check)
        assert scan.classes == [CAFE, "dogs"] and scan.counts() == {CAFE: 2, "dogs": 1}
        folders = sorted(Path(it.path).parent.name for it in scan.items if it.label == 0)
        assert folders == sorted([CAFE, CAFE_NFD])


def test_uploaded_file_names_are_stored_in_nfc(tmp_path):
    target = zips.save_upload_file(tmp_path, f"{CAFE_NFD}/1.png", b"x")
    assert target == (tmp_path / CAFE / "1.png").resolve() and target.read_bytes() == b"x"
    assert zips.upload_dir(b"x", f"{CAFE_NFD}.zip").name == zips.upload_dir(b"x", f"{CAFE}.zip").name


# ---------------------------------------------------------------- 5. float images

@pytest.mark.parametrize("scale, expect", [
    (1.0, 255),            # 0..1 data: scaled by 255
    (255.0, 255),          # 0..255 data: as it is
    (4095.0, 255),         # 12-bit data as float: stretched from its min to its max
    (-1.0, 0),             # negative data: stretched too
])
def test_float_tiff_comes_out_like_its_content(tmp_path, scale, expect):
    ramp = np.tile(np.linspace(0, 1, 64, dtype=np.float32), (16, 1)) * scale    # dark left, bright right
    path = tmp_path / "float.tif"
    Image.fromarray(ramp).save(path)
    assert Image.open(path).mode == "F" and imaging.check_image(path) is None
    arr = np.asarray(imaging.open_rgb(path)).astype(int)
    assert arr.shape == (16, 64, 3) and (arr[..., 0] == arr[..., 2]).all()
    assert abs(arr[0, -1, 0] - expect) <= 1 and abs(arr[0, 0, 0] - (255 - expect)) <= 1
    assert np.ptp(arr) >= 250                                   # the whole ramp, not all black
    small = np.asarray(imaging.open_rgb(path, 8)).astype(int)         # the shrinking path agrees
    assert small.shape == (8, 32, 3) and np.ptp(small) >= 200


def test_float_image_with_nan_and_inf_is_not_a_crash():
    arr = np.array([[0.0, 0.5, np.nan], [np.inf, -np.inf, 0.25]], np.float32)
    out = np.asarray(imaging.to_rgb(Image.fromarray(arr)))[..., 0]
    np.testing.assert_array_equal(out, [[0, 128, 0], [255, 0, 64]])
    flat = np.asarray(imaging.to_rgb(Image.fromarray(np.full((2, 2), 7e5, np.float32))))
    assert flat.shape == (2, 2, 3)
    every_nan = np.asarray(imaging.to_rgb(Image.fromarray(np.full((2, 2), np.nan, np.float32))))
    assert (every_nan == 0).all()


def test_sixteen_and_thirty_two_bit_integer_images_still_convert(tmp_path):
    Image.fromarray(np.full((20, 30), 200 * 256, np.uint16)).save(tmp_path / "grey16.png")
    Image.fromarray(np.full((20, 30), 100 * 256, np.int32)).save(tmp_path / "grey32.tif")
    assert Image.open(tmp_path / "grey32.tif").mode == "I"
    assert tuple(imaging.open_rgb(tmp_path / "grey16.png").getpixel((0, 0))) == (200, 200, 200)
    assert tuple(imaging.open_rgb(tmp_path / "grey32.tif").getpixel((0, 0))) == (100, 100, 100)


# ---------------------------------------------------------------- 6. packed too tightly

@pytest.mark.parametrize("method", [zipfile.ZIP_BZIP2, zipfile.ZIP_LZMA])
def test_zip_entry_packed_over_the_ratio_limit_refuses_the_whole_zip(tmp_path, monkeypatch, method):
    bomb = make_zip(two_classes() + [("cats/zeros.png", bytes(20 * 1024**2))], method)
    assert len(bomb) < 20_000
    message = refused(tmp_path, monkeypatch, bomb, "The zip holds 'cats/zeros.png', packed over 1,000 times")
    assert "unpacking to 20.0 MB" in message


def test_zip_entry_packed_tightly_but_small_is_unpacked(tmp_path):
    dest, notes = unpack(tmp_path, two_classes() + [("cats/blank.bmp", bytes(2 * 1024**2))])
    assert notes == {} and (dest / "cats" / "blank.bmp").stat().st_size == 2 * 1024**2


def test_zip_directory_is_checked_before_zipfile_reads_it(tmp_path, monkeypatch):
    """zipfile builds an object per entry before anything can count them: a zip listing millions
    of entries would fill the memory first. The count and size it declares are checked first."""
    monkeypatch.setattr(zipfile.ZipFile, "_RealGetContents", lambda self: pytest.fail("directory read"))
    monkeypatch.setattr(zips, "MAX_ZIP_FILES", 3)
    refused(tmp_path, monkeypatch, make_zip(two_classes()), "The zip holds more than 3 files and folders")
    monkeypatch.setattr(zips, "MAX_ZIP_FILES", 1000)
    monkeypatch.setattr(zips, "MAX_ZIP_DIRECTORY", 100)
    refused(tmp_path, monkeypatch, make_zip(two_classes()), r"The zip has a list of entries over 0\.1 kB")


# ---------------------------------------------------------------- 7. zips inside the zip

def test_nested_zip_over_the_byte_limit_is_refused_before_anything_is_written(tmp_path, monkeypatch):
    rng = np.random.default_rng(0)
    inner = make_zip([(f"{i}.png", rng.bytes(400_000)) for i in range(3)], zipfile.ZIP_STORED)
    outer = make_zip(two_classes() + [("more.zip", inner)])
    refused(tmp_path, monkeypatch, outer, r"The zip inside the zip would unpack to more than 2\.0 MB",
            max_bytes=2 * 1024**2)
    # Under the limit the same zip unpacks, and the inner zip itself is never written to disk.
    dest = zips.safe_extract_zip(io.BytesIO(outer), tmp_path / "ok", max_bytes=4 * 1024**2)
    assert sorted(p.name for p in (dest / "more").iterdir()) == ["0.png", "1.png", "2.png"]
    assert not (dest / "more.zip").exists()


def test_nested_zip_with_a_tightly_packed_entry_refuses_the_whole_zip(tmp_path, monkeypatch):
    inner = make_zip([("zeros.png", bytes(20 * 1024**2))], zipfile.ZIP_BZIP2)
    outer = make_zip(two_classes() + [("cats.zip", inner)], zipfile.ZIP_STORED)
    refused(tmp_path, monkeypatch, outer, "The zip inside the zip holds 'zeros.png', packed over 1,000 times")


def test_nested_zip_entries_follow_the_same_name_rules(tmp_path):
    inner = make_zip([("0.png", png(0, 9)), ("9.png", png(0, 9)), ("a" * 300 + ".png", png()),
                      ("../../escape.png", png()), ("deeper.zip", b"PK")])
    zips = [("cats.zip", inner), ("cats.zip", inner), ("dogs.zip", b"junk")]
    dest, notes = unpack(tmp_path, two_classes() + zips)
    assert (dest / "cats" / "0.png").read_bytes() == png(0, 0)             # the outer entry came first
    assert (dest / "cats" / "9.png").is_file()
    assert notes == {
        "cats.zip/0.png": "duplicate name: an earlier entry of the zip has it; not unpacked",
        "cats.zip/" + "a" * 300 + ".png": "name too long: a part of it is over 255 bytes; not unpacked",
        "cats.zip/../../escape.png": "path leads outside the upload folder: not unpacked",
        "cats.zip/deeper.zip": "zip inside a zip inside a zip: not unpacked (only one level of nesting is)",
        "cats.zip": "duplicate name: an earlier entry of the zip has it; not unpacked",
        "dogs.zip": "not a valid zip archive: left out",
    }
    assert not (tmp_path / "escape.png").exists() and not (dest / "escape.png").exists()


# ---------------------------------------------------------------- 8. the byte limit as a parameter

def test_byte_limit_is_a_parameter_and_the_refusal_states_it(tmp_path, monkeypatch, lab_home):
    data = make_zip(two_classes() + [("cats/big.png", np.random.default_rng(1).bytes(3 * 1024**2))])
    refused(tmp_path, monkeypatch, data, r"The zip would unpack to more than 1\.0 MB", max_bytes=1024**2)
    with monkeypatch.context() as patch:
        patch.setattr(zips, "MAX_ZIP_BYTES", 2 * 1024**2)                        # a quota can't lift it
        refused(tmp_path, monkeypatch, data, r"more than 2\.0 MB", max_bytes=100 * 1024**2)

    mine = tmp_path / "users" / "ann"
    folder = zips.save_upload_zip(data, "set.zip", folder=mine, max_bytes=10 * 1024**2)
    assert folder.parent == mine and folder == zips.upload_dir(data, "set.zip", parent=mine)
    assert scan_folder(folder).classes == ["cats", "dogs"]
    with pytest.raises(DataError, match=r"more than 1\.0 MB"):
        zips.save_upload_zip(data, "set.zip", folder=tmp_path / "users" / "bob", max_bytes=1024**2)
    assert not (tmp_path / "users" / "bob").exists()
    default = zips.save_upload_zip(data, "set.zip")                               # today's place and limit
    assert default.parent == paths.datasets_dir()


# ---------------------------------------------------------------- 9. images that cost memory

def strip_files(folder: Path) -> dict[str, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    files = {"strip.png": folder / "strip.png", "long.jpg": folder / "long.jpg"}
    Image.new("RGB", (1, 20_000), (200, 10, 10)).save(files["strip.png"])
    Image.new("L", (65_000, 1), 128).save(files["long.jpg"])
    assert files["strip.png"].stat().st_size < 1000                          # tiny on disk
    return files


def test_extreme_images_are_refused_from_their_header_everywhere(tmp_path, monkeypatch):
    files = strip_files(tmp_path)
    loads = []
    monkeypatch.setattr(ImageFile.ImageFile, "load",
                        lambda self: loads.append(self) or pytest.fail("decoded"))
    start = time.perf_counter()
    reasons = {name: imaging.check_image(path) for name, path in files.items()}
    assert reasons["strip.png"] == "extreme shape: 1×20000 is more than 20:1; crop it to the object first"
    assert reasons["long.jpg"] == "too large: 65000×1 has a side over 30,000 px"
    for name, path in files.items():
        with pytest.raises(DataError, match=reasons[name]):
            imaging.open_rgb(path, 224)
    tensors, failures = imaging.decode_images(str(tmp_path), [Item(name, 0) for name in files], 224, workers=1)
    assert tensors == [None, None]
    assert [(path, reason) for path, reason in failures] == [
        (name, f"could not decode (DataError: {reasons[name]})") for name in files]
    assert loads == [] and time.perf_counter() - start < 5


def test_image_with_a_side_over_the_limit_is_refused(tmp_path, monkeypatch):
    img = tmp_path / "wide.png"
    Image.new("L", (400, 30), 0).save(img)
    assert imaging.check_image(img) is None
    monkeypatch.setattr(imaging, "MAX_SIDE", 300)                                     # a module constant
    assert imaging.check_image(img) == "too large: 400×30 has a side over 300 px"
