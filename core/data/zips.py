"""Unpacking uploads safely: zip bombs, path tricks, nested zips and odd names are refused with a reason."""
from __future__ import annotations

import contextlib
import errno
import hashlib
import io
import json
import lzma
import os
import secrets
import shutil
import unicodedata
import zipfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import IO

from core import paths
from core.data import DataError
from core.data.folders import ZIP_NOTES, class_folder_name, is_hidden

# Zip bomb guards, checked against the sizes the zip declares before anything is written and
# counted across a zip and the zips inside it. Module constants so tests and admins can change them.
MAX_ZIP_FILES = 200_000               # entries, files and folders alike
MAX_ZIP_BYTES = 8 * 1024**3           # unpacked; safe_extract_zip(max_bytes=...) sets another
MAX_ZIP_RATIO = 1000                  # unpacked / packed size of one entry; deflate tops out near 1030
ZIP_RATIO_FROM = 4 * 1024**2          # ...checked for entries over this, where a bomb starts to hurt
MAX_ZIP_DIRECTORY = 64 * 1024**2      # a zip's list of entries, which zipfile reads into memory whole


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


def save_upload_files(folder: Path, files: list[tuple[str, bytes]]) -> list[str]:
    """Store uploaded (relative name, bytes) files below `folder`; returns the names refused
    (see save_upload_file), so the page can list them."""
    return [name for name, data in files if save_upload_file(folder, name, data) is None]


def folder_upload_dir(files: list[tuple[str, int]], parent: Path) -> Path:
    """The folder below `parent` for a browser folder upload of (relative name, size) files: named
    by the names and sizes, so the page's reruns (which see the same upload) reuse it."""
    blob = b"".join(name.encode() + size.to_bytes(8, "little") for name, size in files)
    return upload_dir(blob, "folder", parent=parent)


def save_snapshot(folder: Path, class_name: str, data: bytes) -> tuple[str, int]:
    """Add one camera snapshot (JPEG bytes) to the class `class_name` below `folder`, numbered
    after the ones already there. Returns (the class folder's name, the snapshot's number)."""
    name = class_folder_name(class_name)
    count = len(list((folder / name).glob("*.jpg"))) if (folder / name).exists() else 0
    save_upload_file(folder / name, f"camera-{count + 1:04d}.jpg", data)
    return name, count + 1
