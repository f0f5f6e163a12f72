"""Data set versions: a data set the app manages is a chain of immutable versions, and every run
pins the exact files it trained on.

API (core, no UI):

    v1 = snapshot(folder, name, author, note="")   # a class folder in; re-snapshotting an existing
                                                   # name makes the next version (parent = latest)
    v2 = derive(v1, add=[(src_file, class_name)], relabel={rel_path: new_class},
                remove=[rel_path], note="", author="")   # a child; note defaults to the diff's summary,
                                                         # author to the parent's
    versions(name) -> [Version]      get(name, "v2") -> Version      names() -> [str]
    version_of(folder) -> Version | None          # the version a materialised folder belongs to
    v.folder          # the materialised class folder (made again if someone deleted it): train on it
    v.manifest_hash   # hash of the sorted (path, label, sha256) entries: equal files, equal hash
    v.files           # [{path, label, sha256, size}] (read-only: shared)   v.ref == "name/v2"
    v.groups          # [[path, ...]]: near copies the split keeps together (the Doctor's fixes)
    diff(a, b) -> Diff(added, removed, changed, relabelled); .summary() "+12 images, 3 moved to 'tulip'"
    manifest_of_folder(folder) -> [entries]   # any class folder (server folders too); hashes cached
    pin_for(root, splits, present) -> {"manifest", "version", "files": {rel_path: sha256}, "unused"}  # splits.json
    check_pin(root, pin) -> Diff     # what happened to a run's files since: added, removed, changed, relabelled
    usage(author) -> bytes           # what that author's versions brought into the store (quota)
    remove(version) -> bytes freed   # a version nothing derives from; then unnamed objects go

An entry is a dict {path: "class/file.png" (or "train/class/file.png" in a pre-split set), label:
class name, sha256, size}. Invalid names (a data set's, a class's, a relative path's: '..',
absolute, hidden, control characters, a class named like a split folder) raise VersionError,
a DataError (so a ValueError) whose message is one sentence.

Storage, in `paths.datasets_dir() / "versions"`: below the data directory so that hard links work
(one file system) and the admin's total cap and disk overview see it, and apart from `users/` so
an object several students' versions share is stored once:

    objects/<sha[:2]>/<sha>            one read-only copy per distinct content
    manifests/<name>/<id>.json         {format, id, name, parent, note, author, created, hash, files}
    sets/<name>/<id>/<class>/<file>    the materialised version: hard links to the objects (a
                                       copy only where a hard link is impossible), so every reader
                                       of class folders trains on a version unchanged
    hashes.sqlite                      sha256 by inode (size, mtime_ns checked): a second look is a stat
    .locks/<name>.lock                 one writer per data set at a time

Ids are v1, v2, ... in order of creation (under the lock); `hash` identifies the content. An
object stays while a manifest names it: a version is deleted (`remove`) only when no version
derives from it and (core.data.feedback.delete_version checks) no run trained on it, so a pinned
run can always find its files. Quotas count what an
author brought in (objects new in their versions relative to each version's parent), so a student
who derives from the teacher's 5 GB set pays for their own additions, not for the teacher's set.
Objects and manifests are made read-only; a process running as root can still write through a
link, which check_pin then reports as changed.
"""
from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import re
import shutil
import sqlite3
import stat
import threading
import time
import unicodedata
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from core import paths
from core.data import DataError
from core.data.folders import SAME_SPLIT_FILE, SPLIT_NAMES, is_hidden, scan_folder
from core.data.images import IMAGE_EXTENSIONS

NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
ID_RE = re.compile(r"v[1-9][0-9]{0,8}")
AUTHOR_RE = re.compile(r"[A-Za-z0-9_-]{1,40}")      # access.User's ids
CHUNK = 1 << 20
MAX_DEPTH = 8          # path parts below the root: class folders may hold sub-folders


class VersionError(DataError):
    """A version that doesn't exist, or a name, path or change that is refused."""


# ---------------------------------------------------------------- names and places

def store() -> Path:
    path = paths.datasets_dir() / "versions"
    path.mkdir(parents=True, exist_ok=True)
    return path


def object_path(sha: str) -> Path:
    return store() / "objects" / sha[:2] / sha


def check_name(name: str) -> str:
    if not isinstance(name, str) or not NAME_RE.fullmatch(name) or ".." in name:
        raise VersionError(f"Not a data set name: {name!r} (letters, digits, '.', '_' and '-', "
                           "starting with a letter or digit).")
    return name


def check_class(label: str) -> str:
    """A class folder's name (NFC, as the scan spells classes): one visible path part, and not a
    split folder's name (a class called 'train' would make the scan read the set as pre-split)."""
    if (not isinstance(label, str) or not 0 < len(label) <= 100 or is_hidden(label) or _odd(label)
            or "/" in label or label.lower() in SPLIT_NAMES):
        raise VersionError(f"Not a class name: {label!r}.")
    return unicodedata.normalize("NFC", label)


def check_rel(rel: str) -> str:
    """A file's path inside a data set: class/.../file.ext or split/class/.../file.ext, nothing
    that could leave the folder or hide in it."""
    parts = PurePosixPath(rel).parts if isinstance(rel, str) else ()
    ok = (isinstance(rel, str) and 0 < len(rel) <= 1024 and not rel.startswith("/") and not _odd(rel)
          and 2 <= len(parts) <= MAX_DEPTH and "/".join(parts) == rel
          and not any(p in (".", "..") or is_hidden(p) for p in parts)
          and PurePosixPath(rel).suffix.lower() in IMAGE_EXTENSIONS)
    try:
        ok = ok and bool(check_class(label_of(rel)))
    except VersionError:
        ok = False
    if not ok:
        raise VersionError(f"Not a file path inside a data set: {rel!r}.")
    return rel


def _odd(text: str) -> bool:
    """Backslashes (a separator elsewhere) and control characters have no place in a name."""
    return "\\" in text or any(ord(c) < 32 or ord(c) == 127 for c in text)


def label_of(rel: str) -> str:
    """The class of a relative path, as scan_folder reads it: the top folder, or the one below a
    split folder (train/, val/, test/ and their spellings)."""
    parts = PurePosixPath(rel).parts
    presplit = len(parts) >= 3 and parts[0].lower() in SPLIT_NAMES
    return unicodedata.normalize("NFC", parts[1] if presplit else parts[0])


def _class_index(rel: str) -> int:
    parts = PurePosixPath(rel).parts
    return 1 if len(parts) >= 3 and parts[0].lower() in SPLIT_NAMES else 0


# ---------------------------------------------------------------- versions

@dataclass(frozen=True, eq=False)
class Version:
    name: str
    id: str
    parent: str | None
    note: str
    author: str
    created: str
    hash: str
    files: list = field(repr=False)
    groups: list = field(default_factory=list, repr=False)   # paths kept in one split (near copies)

    @property
    def ref(self) -> str:
        return f"{self.name}/{self.id}"

    @property
    def manifest_hash(self) -> str:
        return self.hash

    @property
    def folder(self) -> Path:
        """The materialised class folder; made again (same links) if it went missing."""
        path = store() / "sets" / self.name / self.id
        if not path.is_dir():
            with _lock(self.name):
                if not path.is_dir():
                    _materialise(path, self.files, self.groups)
        return path

    def size(self) -> int:
        """Bytes of this version's distinct contents."""
        return sum({e["sha256"]: e["size"] for e in self.files}.values())

    def classes(self) -> list[str]:
        return sorted({e["label"] for e in self.files})


def names() -> list[str]:
    base = store() / "manifests"
    return sorted(p.name for p in base.iterdir() if p.is_dir() and NAME_RE.fullmatch(p.name)) if base.is_dir() else []


def versions(name: str) -> list[Version]:
    """Every version of a data set, oldest first ([] for an unknown name)."""
    folder = store() / "manifests" / check_name(name)
    ids = [p.stem for p in folder.glob("v*.json") if ID_RE.fullmatch(p.stem)] if folder.is_dir() else []
    return [get(name, i) for i in sorted(ids, key=lambda i: int(i[1:]))]


def get(name: str, id: str) -> Version:
    if not isinstance(id, str) or not ID_RE.fullmatch(id):
        raise VersionError(f"Not a version id: {id!r} (v1, v2, ...).")
    path = store() / "manifests" / check_name(name) / f"{id}.json"
    try:
        st = path.stat()
    except FileNotFoundError:
        raise VersionError(f"Data set {name!r} has no version {id}.") from None
    return _load(str(path), st.st_mtime_ns, st.st_size)


@functools.lru_cache(maxsize=64)      # manifests never change: the recent ones are parsed once
def _load(path: str, mtime_ns: int, size: int) -> Version:
    data = json.loads(Path(path).read_text(encoding="utf-8"))
    fields = ("name", "id", "parent", "note", "author", "created", "hash", "files")
    return Version(**{k: data[k] for k in fields}, groups=data.get("groups") or [])


def version_of(folder) -> Version | None:
    """The version whose materialised folder `folder` is, else None."""
    try:
        rel = Path(folder).resolve().relative_to((store() / "sets").resolve())
    except (ValueError, OSError):
        return None
    if len(rel.parts) != 2:
        return None
    with contextlib.suppress(VersionError):
        return get(*rel.parts)
    return None


def snapshot(folder, name: str, author: str, note: str = "") -> Version:
    """A data set's first version from a class folder (its image files are copied into the store);
    for a name that exists already, the next version, its parent the latest."""
    check_name(name)
    _check_author(author)
    scan = scan_folder(folder, check=False)
    sources = [(Path(scan.root) / item.path, check_rel(item.path), scan.classes[item.label])
               for item in scan.items]
    files = [dict(path=rel, label=label, **_import(src)) for src, rel, label in sources]
    groups = _kept_groups(scan.together, {f["path"]: f["path"] for f in files})
    with _lock(name):
        chain = versions(name)
        parent = chain[-1] if chain else None
        if not note:
            note = (diff(parent.files, files).summary() if parent else
                    f"first version: {_images(len(files))} in {len({f['label'] for f in files})} classes")
        return _commit(name, parent, files, note, author, groups)


def derive(version: Version, add=(), relabel=None, remove=(), note: str = "", author: str = "",
           together=()) -> Version:
    """A child of `version`: `remove` these paths, move `relabel`'s paths to other class folders,
    `add` these files (copied into the store) under unique names in their class folders, and keep
    each `together` group of paths (near copies) in one split, besides the parent's groups. Old
    files keep their paths. Callers check that the user may read the `add` files."""
    author = _check_author(author or version.author)
    files = {e["path"]: dict(e) for e in version.files}
    for rel in remove:
        files.pop(_known(files, rel))
    where = {rel: rel for rel in files}            # a parent's path -> its path in the child
    for rel, label in (relabel or {}).items():
        where[rel] = _move(files, _known(files, rel), check_class(label))
    sources = [(_checked_source(src), check_class(label)) for src, label in add]   # all, before any copy
    for src, label in sources:
        rel = _free_path(files, _add_folder(version.files, label), src.name)
        files[rel] = dict(path=rel, label=label, **_import(src))
    new = sorted(files.values(), key=lambda e: e["path"])
    groups = _kept_groups(list(version.groups) + [list(g) for g in together], where)
    change = diff(version.files, new)
    if not change and groups == version.groups:
        raise VersionError("These changes leave the data set as it is: nothing to save.")
    if not new:
        raise VersionError("A version needs at least one image.")
    with _lock(version.name):
        note = note or (change.summary() if change else f"{len(groups)} group(s) of near copies kept in one split")
        return _commit(version.name, version, new, note, author, groups)


def _kept_groups(groups, where: dict) -> list[list[str]]:
    """`groups` of paths with each path at `where` says (gone when absent), merged where they
    share a path, sorted; a group needs two files."""
    merged: list[set[str]] = []
    for group in groups:
        members = {where[p] for p in group if p in where}
        for other in [m for m in merged if m & members]:
            members |= other
            merged.remove(other)
        merged.append(members)
    return sorted(sorted(m) for m in merged if len(m) > 1)


def _known(files: dict, rel: str) -> str:
    if check_rel(rel) not in files:
        raise VersionError(f"No file {rel!r} in this version.")
    return rel


def _move(files: dict, rel: str, label: str) -> str:
    """Move a file to class `label`'s folder; its new path."""
    entry = files.pop(rel)
    if entry["label"] == label:
        files[rel] = entry
        return rel
    parts, i = PurePosixPath(rel).parts, _class_index(rel)
    new = _free_path(files, "/".join(parts[:i] + (label,) + parts[i + 1:-1]), parts[-1])
    files[new] = dict(entry, path=new, label=label)
    return new


def _add_folder(entries: list, label: str) -> str:
    """Where an added image goes: its class folder, inside train/ when the set is pre-split."""
    presplit = any(_class_index(e["path"]) for e in entries)
    return f"train/{label}" if presplit else label


def _free_path(files: dict, folder: str, filename: str) -> str:
    """folder/<safe stem><ext>, with -2, -3, ... until no file has that name (case ignored: the
    folder may be copied to a case-insensitive disk)."""
    name = unicodedata.normalize("NFC", filename)
    suffix = PurePosixPath(name).suffix.lower()
    stem = "".join(c if c.isalnum() or c in "-_" else "_" for c in PurePosixPath(name).stem)
    stem = stem.strip("_-")[:60] or "image"
    taken = {p.lower() for p in files}
    for n in range(1, len(files) + 2):
        rel = f"{folder}/{stem}{'' if n == 1 else f'-{n}'}{suffix}"
        if rel.lower() not in taken:
            return check_rel(rel)
    raise AssertionError("unreachable: more names tried than files")


def _checked_source(src) -> Path:
    """An added file: a regular file (not a link to something else) of an image type."""
    path = Path(src)
    try:
        regular = stat.S_ISREG(os.lstat(path).st_mode)
    except OSError:
        regular = False
    if not regular or path.suffix.lower() not in IMAGE_EXTENSIONS:
        raise VersionError(f"Can't add {path.name!r}: not an image file.")
    return path


def _check_author(author: str) -> str:
    if not isinstance(author, str) or not AUTHOR_RE.fullmatch(author):
        raise VersionError(f"Not a user id: {author!r}.")
    return author


def _images(n: int) -> str:
    return f"{n} image{'' if n == 1 else 's'}"


# ---------------------------------------------------------------- writing (under the name's lock)

@contextlib.contextmanager
def _lock(name: str):
    with paths.locked(store() / ".locks" / f"{check_name(name)}.lock"):
        yield


def _commit(name: str, parent: Version | None, files: list, note: str, author: str, groups=()) -> Version:
    """The next id, its folder, then its manifest: the manifest's rename is what makes the
    version exist, so a crash leaves no half version (a stale folder is replaced next time)."""
    chain = versions(name)
    vid = f"v{int(chain[-1].id[1:]) + 1 if chain else 1}"
    files = sorted(files, key=lambda e: e["path"])
    manifest = dict(format=1, id=vid, name=name, parent=parent.id if parent else None, note=note[:500],
                    author=author, created=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                    hash=entries_hash(files), files=files, **({"groups": list(groups)} if groups else {}))
    _materialise(store() / "sets" / name / vid, files, groups)
    path = store() / "manifests" / name / f"{vid}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    paths.atomic_write_text(path, json.dumps(manifest, indent=1))
    with contextlib.suppress(OSError):
        os.chmod(path, 0o444)
    return get(name, vid)


def _materialise(final: Path, files: list, groups=()) -> None:
    """Class folders of hard links to the objects, built aside and renamed into place; the
    groups in the folder's SAME_SPLIT_FILE, which the split reads."""
    tmp = final.with_name(f".{final.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    known = []
    try:
        for entry in files:
            dest = tmp / check_rel(entry["path"])
            dest.parent.mkdir(parents=True, exist_ok=True)
            _link(object_path(entry["sha256"]), dest)
            known.append((str(final / entry["path"]), entry["sha256"]))
        if groups:
            (tmp / SAME_SPLIT_FILE).write_text(json.dumps(list(groups), indent=1), encoding="utf-8")
        shutil.rmtree(final, ignore_errors=True)      # a crash's leftover: no manifest names it
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _HashCache.remember(known)       # their hashes are known: pinning a run on them reads nothing


def _link(source: Path, dest: Path) -> None:
    try:
        os.link(source, dest)
    except OSError:        # another file system, no hard links there, or too many links to one file
        shutil.copyfile(source, dest)
        os.chmod(dest, 0o444)


def _import(src: Path) -> dict:
    """Copy a file into the object store (hashing as it copies); {sha256, size}. An object that
    is there already is kept (os.link never replaces), so its links stay one inode."""
    objects = store() / "objects"
    objects.mkdir(exist_ok=True)
    tmp = objects / f".in.{os.getpid()}.{threading.get_ident()}.tmp"
    digest, size = hashlib.sha256(), 0
    with paths.removed_on_error(tmp):
        with open(src, "rb") as fin, open(tmp, "wb") as fout:
            while block := fin.read(CHUNK):
                digest.update(block)
                fout.write(block)
                size += len(block)
        sha = digest.hexdigest()
        final = object_path(sha)
        if not final.exists():
            final.parent.mkdir(exist_ok=True)
            os.chmod(tmp, 0o444)
            _keep_first(tmp, final)
        tmp.unlink(missing_ok=True)
    return dict(sha256=sha, size=size)


def _keep_first(tmp: Path, final: Path) -> None:
    """Put `tmp` at `final` unless another process got there first (same content either way)."""
    try:
        os.link(tmp, final)
    except FileExistsError:
        pass
    except OSError:            # no hard links on this file system: a rename does it
        os.replace(tmp, final)


# ---------------------------------------------------------------- deleting

ORPHAN_AGE_S = 600       # an object younger than this may belong to a version being written


def remove(version: Version) -> int:
    """Delete a version no other version derives from (callers check that no run uses it): its
    manifest, its folder, then every stored object no manifest names any more. Returns the bytes
    freed. Delete the newest first to take back a whole chain."""
    with _lock(version.name):
        chain = versions(version.name)
        if any(v.parent == version.id for v in chain):
            raise VersionError(f"{version.ref} has later versions made from it: delete those first.")
        path = store() / "manifests" / version.name / f"{version.id}.json"
        if not path.exists():
            raise VersionError(f"{version.ref} is already deleted.")
        shutil.rmtree(store() / "sets" / version.name / version.id, ignore_errors=True)
        path.unlink()
    return collect_garbage()


def collect_garbage(min_age_s: float = ORPHAN_AGE_S) -> int:
    """Remove stored objects that no manifest names and no folder links to (older than
    `min_age_s`: a version being written has imported objects before its manifest exists)."""
    named = {e["sha256"] for name in names() for v in versions(name) for e in v.files}
    freed, now = 0, time.time()
    for path in (store() / "objects").glob("??/*"):
        with contextlib.suppress(OSError):
            st = path.stat()
            if path.name not in named and st.st_nlink == 1 and now - st.st_mtime > min_age_s:
                path.unlink()
                freed += st.st_size
    return freed


# ---------------------------------------------------------------- comparing

@dataclass
class Diff:
    added: list = field(default_factory=list)         # entries only in b
    removed: list = field(default_factory=list)       # entries only in a
    changed: list = field(default_factory=list)       # (a entry, b entry): same path, other content
    relabelled: list = field(default_factory=list)    # (a entry, b entry): same content, other class

    def __bool__(self) -> bool:
        return bool(self.added or self.removed or self.changed or self.relabelled)

    def summary(self) -> str:
        """One line: "+12 images, 2 removed, 1 changed, 3 moved to 'tulip'"."""
        parts = [f"+{_images(len(self.added))}"] if self.added else []
        parts += [f"{len(self.removed)} removed"] if self.removed else []
        parts += [f"{len(self.changed)} changed"] if self.changed else []
        moved = Counter(b["label"] for _, b in self.relabelled)
        parts += [f"{n} moved to '{label}'" for label, n in sorted(moved.items(), key=lambda x: (-x[1], x[0]))]
        return ", ".join(parts) or "no changes"

    def lines(self, few: int = 3, quote: str = "`") -> list[str]:
        """A line per kind of change, with a count and the first `few` names."""
        def names(rows) -> str:
            shown = ", ".join(f"{quote}{p}{quote}" for p in rows[:few])
            return shown + (f" and {len(rows) - few} more" if len(rows) > few else "")
        kinds = (("added", [e["path"] for e in self.added]),
                 ("removed", [e["path"] for e in self.removed]),
                 ("changed content", [b["path"] for _, b in self.changed]),
                 ("relabelled", [f"{a['path']} → {b['label']}" for a, b in self.relabelled]))
        return [f"{_images(len(rows))} {what}: {names(rows)}" for what, rows in kinds if rows]

    def to_dict(self) -> dict:
        return dict(summary=self.summary(), added=self.added, removed=self.removed,
                    changed=[list(p) for p in self.changed], relabelled=[list(p) for p in self.relabelled])


def diff(a, b) -> Diff:
    """What turns entries `a` into entries `b` (Versions are taken for their files). A path in both
    with other content is changed; a file gone from one class folder whose content turns up in
    another class's is relabelled; the rest is removed or added (a rename inside a class is both)."""
    a_map = {e["path"]: e for e in getattr(a, "files", a)}
    b_map = {e["path"]: e for e in getattr(b, "files", b)}
    out = Diff()
    for path in sorted(a_map.keys() & b_map.keys()):
        old, new = a_map[path], b_map[path]
        if old["sha256"] != new["sha256"]:
            out.changed.append((old, new))
        elif old["label"] != new["label"]:
            out.relabelled.append((old, new))
    arrivals = defaultdict(list)
    for path in sorted(b_map.keys() - a_map.keys()):
        arrivals[b_map[path]["sha256"]].append(b_map[path])
    matched = set()
    for path in sorted(a_map.keys() - b_map.keys()):
        old = a_map[path]
        new = next((e for e in arrivals[old["sha256"]] if e["label"] != old["label"] and e["path"] not in matched), None)
        if new:
            matched.add(new["path"])
            out.relabelled.append((old, new))
        else:
            out.removed.append(old)
    out.added = [b_map[p] for p in sorted(b_map.keys() - a_map.keys()) if p not in matched]
    return out


def entries_hash(entries) -> str:
    """The identity of a list of files: sha256 of its sorted (path, label, sha256) triples."""
    rows = sorted([e["path"], e["label"], e["sha256"]] for e in entries)
    return hashlib.sha256(json.dumps(rows, separators=(",", ":")).encode()).hexdigest()


# ---------------------------------------------------------------- folders the app doesn't own

def manifest_of_folder(folder) -> list[dict]:
    """Entries for every image file of a class folder, relative to the root the scan finds (the
    root a run's splits.json names); hashes come from the cache when a file is unchanged."""
    scan = scan_folder(folder, check=False)
    labels = {item.path: scan.classes[item.label] for item in scan.items}
    found = hash_files(scan.root, sorted(labels))
    return [dict(path=rel, label=labels[rel], sha256=sha, size=size) for rel, (sha, size) in found.items()]


def hash_files(root, rels) -> dict[str, tuple[str, int]]:
    """{rel: (sha256, size)} of the files below `root`; a file that can't be read is left out."""
    root, out = Path(root), {}
    with _HashCache() as cache:
        for rel in rels:
            parts = PurePosixPath(rel).parts
            if not parts or rel.startswith("/") or ".." in parts:    # a tampered pin reads nothing outside
                continue
            with contextlib.suppress(OSError):
                out[rel] = cache.sha(root / rel)
    return out


class _HashCache:
    """sha256 by file (device, inode), checked against size and mtime_ns, in SQLite, shared by the
    app's processes. Keyed by inode, not path: the ten versions' hard links to one object are one
    row. Without a usable database (a read-only data directory) every file is simply hashed."""

    def __init__(self):
        self.db, self.new = None, []

    def __enter__(self):
        with contextlib.suppress(sqlite3.Error, OSError):
            self.db = sqlite3.connect(store() / "hashes.sqlite", timeout=30)
            self.db.execute("CREATE TABLE IF NOT EXISTS inodes (dev INTEGER, ino INTEGER, size INTEGER, "
                            "mtime_ns INTEGER, sha256 BLOB, PRIMARY KEY (dev, ino)) WITHOUT ROWID")
        return self

    def sha(self, path: Path) -> tuple[str, int]:
        st = os.stat(path)
        if not stat.S_ISREG(st.st_mode):
            raise OSError(f"not a file: {path}")
        row = self._row(st.st_dev, st.st_ino)
        if row and tuple(row[:2]) == (st.st_size, st.st_mtime_ns):
            return bytes(row[2]).hex(), st.st_size
        sha = file_sha256(path)
        self.new.append(_row_of(st, sha))
        return sha, st.st_size

    def _row(self, dev: int, ino: int):
        if self.db is None:
            return None
        with contextlib.suppress(sqlite3.Error):
            return self.db.execute("SELECT size, mtime_ns, sha256 FROM inodes WHERE dev = ? AND ino = ?",
                                   (dev, ino)).fetchone()
        return None

    def __exit__(self, *exc):
        if self.db is not None:
            with contextlib.suppress(sqlite3.Error):
                with self.db:
                    self.db.executemany("INSERT OR REPLACE INTO inodes VALUES (?, ?, ?, ?, ?)", self.new)
            self.db.close()

    @classmethod
    def remember(cls, known: list[tuple[str, str]]) -> None:
        """Record the hashes of files whose content is known (a version's links)."""
        with cls() as cache:
            for path, sha in known:
                with contextlib.suppress(OSError):
                    cache.new.append(_row_of(os.stat(path), sha))


def _row_of(st: os.stat_result, sha: str) -> tuple:
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, bytes.fromhex(sha))


def file_sha256(path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(CHUNK):
            digest.update(block)
    return digest.hexdigest()


# ---------------------------------------------------------------- pins

def pin_for(root, splits, present=None) -> dict:
    """What a run trained on: {"manifest": entries_hash of its files, "version": "name/id" when
    `root` is a version's folder else None, "files": {rel_path: sha256}, "unused": [rel_path]}.
    `splits` is {split: [Item or (rel_path, label)]}; other keys (splits.json's "root") are
    ignored. `present` (every image path there, used or not) lets check_pin tell files added
    since from files the run left out (max_per_class)."""
    rels = sorted({_rel(item) for items in splits.values() if isinstance(items, list) for item in items})
    files = {rel: sha for rel, (sha, _) in hash_files(root, rels).items()}
    found = version_of(root)
    pin = dict(manifest=entries_hash(_pinned(files)), version=found.ref if found else None, files=files)
    if present is not None:
        pin["unused"] = sorted(set(present) - set(files))
    return pin


def check_pin(root, pin: dict) -> Diff:
    """How the pinned files differ from the files now below `root`: a missing file is removed,
    other content is changed, the same content in another class folder is relabelled, an image
    that wasn't there at training time is added (a pin without "unused" predates that record:
    added stays empty)."""
    files, root = pin.get("files") or {}, Path(root)
    knows_all = "unused" in pin
    now = _entries(root, files)
    if (knows_all or len(now) < len(files)) and root.is_dir():    # new files, or one went elsewhere
        seen = set(files) | set(pin.get("unused") or ())
        now.update(_entries(root, [rel for rel in _image_rels(root) if rel not in seen]))
    out = diff(_pinned(files), list(now.values()))
    if not knows_all:
        out.added = []
    return out


def _entries(root: Path, rels) -> dict[str, dict]:
    return {rel: dict(path=rel, label=label_of(rel), sha256=sha, size=size)
            for rel, (sha, size) in hash_files(root, rels).items()}


def _pinned(files: dict) -> list[dict]:
    return [dict(path=rel, label=label_of(rel), sha256=sha, size=None) for rel, sha in sorted(files.items())]


def _rel(item) -> str:
    return item.path if hasattr(item, "path") else item[0]


def _image_rels(root: Path) -> list[str]:
    from core.data.folders import image_files
    return [p.relative_to(root).as_posix() for p in image_files(root) if len(p.relative_to(root).parts) >= 2]


# ---------------------------------------------------------------- quota

def usage(author: str) -> int:
    """Bytes of the distinct objects `author`'s versions brought in: in one of their versions and
    not in that version's parent (what they snapshotted or added, not what they derived from)."""
    sizes = {}
    for name in names():
        chain = {v.id: v for v in versions(name)}
        for v in chain.values():
            if v.author != author:
                continue
            inherited = {e["sha256"] for e in chain[v.parent].files} if v.parent in chain else set()
            sizes.update({e["sha256"]: e["size"] for e in v.files if e["sha256"] not in inherited})
    return sum(sizes.values())
