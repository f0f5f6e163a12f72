"""Close the loop: from judged predictions back to training data, as a new data set version, and
what a run's pin says about the data it saw.

    examples = [Example("tulip.jpg", predicted="rose", label="tulip", data=b"..."),   # corrected
                Example("p1.png", predicted="rose", label="rose", path=Path(".../p1.png"))]  # accepted
    saved = save_feedback(run, user, policy, examples)                      # the Predict page
    saved = save_feedback(run, user, policy, relabel={"test/rose/x.png": "tulip"})   # Evaluate
    cfg = train_again_config(run, saved.version)     # the run's settings on the new version

The new version is a child of the run's data set version (core.data.versions). A run on a folder
that is not a stored version yet gets one first: `snapshot` of that folder, named after it
(`data_set_name`; a student may snapshot what they may train on: it counts toward their quota).
The Doctor's fixes are a version the same way (`fix_as_version`).

Splits. `core.data.splits.split_items` shuffles each class with one seeded generator, so a single
added image reshuffles every class after it: old test images would land in train, and the new run's
test score would no longer compare with the old one's. So a version made here holds the old run's
assignment as folders: every old file sits in `train/`, `val/` or `test/` as the run used it, and
new images go to `train/`. A pre-split folder keeps its splits (split_items), so the new run
tests on the old run's test images plus nothing new. When the run's version already has that
layout, `versions.derive` makes the child (added files land in `train/<class>/`, a relabelled file
stays in its split); otherwise (a plain class folder, or a pre-split one whose val/test the run
carved out of train) the child is laid out afresh from hard links and stored with
`versions.snapshot` (the data set's next version). `Saved.moved` lists old images the new
version would still put in another split; it is empty but for classes that had no val or test
images in the old run (split_items carves one out of train once such a class is big enough), and
few-shot runs (`max_per_class`) draw their training images from the grown train folder.

Provenance for the pages: `data_label(run)` ("flowers/v3", or "files 1a2b3c4d5e6f" for a folder
that is not a stored version), `data_check(run)` (check_pin: what changed since training, and a
stored version holding exactly the pinned files; Diff.lines() says it), and for students
`may_read`: which versions a student may see (access.own_version's rule, by which they may
train on those folders).
"""
from __future__ import annotations

import contextlib
import functools
import os
import re
import shutil
import stat
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from core import paths
from core.config import RunConfig
from core.data import DataError, folders, versions
from core.data import splits as splitting
from core.data.images import IMAGE_EXTENSIONS
from core.serve import access
from core.serve.store import Run, list_runs

SPLITS = folders.SPLITS
UPLOAD_HASH = re.compile(r"-([0-9a-f]{16})$")      # zips.upload_dir's suffix, shortened in names
IMAGE_FORMATS = {"JPEG": ".jpg", "PNG": ".png", "WEBP": ".webp", "BMP": ".bmp", "GIF": ".gif", "TIFF": ".tif"}


class FeedbackError(DataError):
    """Feedback that can't become a version, with the reason in one sentence."""


# ---------------------------------------------------------------- what the user judged

@dataclass(frozen=True)
class Example:
    """One predicted image and the user's verdict: `label` None skips it, the predicted class
    accepts the prediction, another of the run's classes corrects it. The image is a file on the
    server (`path`: a batch folder's) or bytes (`data`: a dropped image, a camera snapshot)."""
    name: str
    predicted: str
    label: str | None = None
    path: Path | None = field(default=None, repr=False)
    data: bytes | None = field(default=None, repr=False)

    @property
    def verdict(self) -> str:
        """"skip", "accept" or "correct"."""
        return "skip" if not self.label else "accept" if self.label == self.predicted else "correct"


@dataclass
class Saved:
    """What save_feedback made."""
    version: versions.Version        # the new version
    base: versions.Version           # the version it was made from (the run's data)
    snapshotted: bool                # base was made just now from the run's folder
    accepted: int                    # images added with the class the model predicted
    corrected: int                   # images added with another class
    relabelled: int                  # existing images moved to another class
    duplicates: list[str]            # judged images left out: their content is in the data set already
    restructured: bool               # laid out afresh as train/val/test folders (versions.snapshot)
    moved: list[str]                 # old images the new version puts in another split than the run did

    def summary(self) -> str:
        """One line for the page: "flowers/v3: +3 images to train (2 confirmed, 1 corrected)"."""
        parts = []
        if self.accepted or self.corrected:
            parts.append(f"+{_images(self.accepted + self.corrected)} to train ({self.accepted} confirmed, "
                         f"{self.corrected} corrected)")
        if self.relabelled:
            parts.append(f"{_images(self.relabelled)} moved to another class")
        if self.duplicates:
            parts.append(f"{_images(len(self.duplicates))} left out (already in the data set)")
        return f"{self.version.ref}: " + ", ".join(parts)


def judged(examples) -> list[Example]:
    """The examples the user accepted or corrected (skipped ones left out)."""
    return [e for e in examples if e.verdict != "skip"]


# ---------------------------------------------------------------- the run's data

def run_root(run: Run) -> Path:
    """The folder the run's split files are relative to (splits.json's root)."""
    return Path(run.read_json("splits.json", {}).get("root", "."))


def run_splits(run: Run) -> dict[str, str]:
    """{relative path: split} of every file the run used."""
    data = run.read_json("splits.json", {}) or {}
    return {path: split for split in SPLITS for path, _ in data.get(split, [])}


def data_set_name(folder, user: access.User) -> str:
    """The name a folder's first version gets: the folder's name (an upload's content hash
    shortened to 8 digits), after the student's id for a student, so that two students' "flowers"
    are two data sets."""
    stem = UPLOAD_HASH.sub(lambda m: "-" + m[1][:8], Path(folder).name)
    if not user.admin:
        stem = f"{user.id}.{stem}"
    name = re.sub(r"\.{2,}", ".", re.sub(r"[^A-Za-z0-9_.-]+", "_", stem))
    name = name.lstrip("._-")[:64].rstrip(".")
    return name or "data"


def base_name(run: Run, user: access.User) -> str:
    """The data set a new version of this run's data belongs to (for the page's button)."""
    found = versions.version_of(run_root(run))
    return found.name if found else data_set_name(run_root(run), user)


def base_problem(run: Run, user: access.User, policy: access.Policy | None = None) -> str | None:
    """Why this user can't make a version of this run's data, or None."""
    root = run_root(run)
    if versions.version_of(root) is None and (not root.is_dir() or not run.read_json("splits.json")):
        return f"The data set this run trained on is gone ({root}): there is nothing to add to."
    return folder_problem(root, user, policy)


def folder_problem(root, user: access.User, policy: access.Policy | None = None) -> str | None:
    """Why this user can't make a version of the data set at `root`, or None. A student may store
    any folder they may train on (their uploads, the demo, the teacher's shared folders) as a data
    set of their own; what it brings into the store counts toward their quota."""
    root = Path(root)
    found = versions.version_of(root)
    if found is not None:
        return None if may_read(user, found) else "This data set version belongs to someone else."
    if not root.is_dir():
        return f"There is no data set at {root}."
    return access.run_data_problem(user, str(root), policy or access.load_policy())


def base_version(run: Run, user: access.User, policy: access.Policy) -> tuple[versions.Version, bool]:
    """The stored version the run trained on, or one made now (snapshot) from its folder; and
    whether it was made now. A folder whose files equal one of its data set's versions reuses it."""
    if problem := base_problem(run, user, policy):
        raise FeedbackError(problem)
    return _stored_or_snapshot(run_root(run), user, policy, note=f"the folder run {run.id} trained on")


def folder_version(root, user: access.User, policy: access.Policy, note: str = "") -> tuple[versions.Version, bool]:
    """The stored version of the data set at `root` (a version's folder, or a folder whose files
    equal a version of the data set it is stored as), else a snapshot made now within the user's
    quota; and whether it was made now."""
    if problem := folder_problem(root, user, policy):
        raise FeedbackError(problem)
    return _stored_or_snapshot(root, user, policy, note)


def _stored_or_snapshot(root, user: access.User, policy: access.Policy, note: str) -> tuple[versions.Version, bool]:
    found, entries = _stored_base(root, user)
    if found is not None:
        return found, False
    _check_room(user, policy, _bytes(entries))
    return _snapshot(root, user, note), True


def _stored_base(root, user: access.User) -> tuple[versions.Version | None, list[dict]]:
    """(the stored version of the data at `root` or None, the entries of its files); callers
    have checked folder_problem."""
    if found := versions.version_of(root):
        return found, found.files
    entries = versions.manifest_of_folder(root)
    digest = versions.entries_hash(entries)
    reused = next((v for v in reversed(versions.versions(data_set_name(root, user))) if v.hash == digest), None)
    return reused, entries


def _snapshot(root, user: access.User, note: str = "") -> versions.Version:
    return versions.snapshot(root, data_set_name(root, user), user.id, note=note)


def fix_as_version(root, user: access.User, policy: access.Policy, exclude=(), move: dict | None = None,
                   together=()) -> tuple[versions.Version, versions.Version | None]:
    """The Doctor's fixes as the next version of the data set at `root`: `exclude`d paths left
    out, `move` = {path: class} relabelled, `together` groups kept in one split (paths relative to
    `root`). The folder is stored first when it isn't yet (within the quota). Returns the new
    version and, when made now, that first version."""
    base, made = folder_version(root, user, policy, note="the folder the Doctor audited")
    new = versions.derive(base, relabel=dict(move or {}), remove=list(exclude), together=together,
                          note=_doctor_note(exclude, move or {}, together), author=user.id)
    return new, base if made else None


DOCTOR_NOTE = "the Doctor's fixes: "


def _doctor_note(exclude, move: dict, together) -> str:
    parts = [f"{len(exclude)} left out"] if exclude else []
    parts += [f"{n} moved to '{label}'" for label, n in sorted(Counter(move.values()).items())]
    parts += [f"{len(together)} group(s) of near copies kept in one split"] if together else []
    return DOCTOR_NOTE + (", ".join(parts) or "none")


def doctors_version(root) -> versions.Version | None:
    """The version whose folder `root` is, when the Doctor's fixes made it (for the pages and
    the report: what was changed, and from which version)."""
    found = versions.version_of(root)
    return found if found is not None and found.note.startswith(DOCTOR_NOTE) else None


def _bytes(entries) -> int:
    return sum({e["sha256"]: e["size"] for e in entries}.values())


# ---------------------------------------------------------------- saving feedback

def save_feedback(run: Run, user: access.User, policy: access.Policy, examples=(), relabel: dict | None = None,
                  note: str = "") -> Saved:
    """A new version of the run's data set: the accepted and corrected `examples` added to train,
    `relabel` ({path relative to the run's data root: class}) applied in place, the run's
    train/val/test assignment kept (see the module's notes). Checks the classes (the run's), the
    user's right to the data and their quota; raises FeedbackError or access.AccessError with a
    sentence."""
    chosen, relabel = judged(examples), dict(relabel or {})
    classes = set(run.classes)
    for label in [e.label for e in chosen] + list(relabel.values()):
        if label not in classes:
            raise FeedbackError(f"{label!r} is not one of this run's classes.")
    if not chosen and not relabel:
        raise FeedbackError("Nothing to add: accept or correct at least one prediction first.")
    scratch = paths.datasets_dir() / ".feedback"
    scratch.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=scratch) as tmp:
        sources = _sources(chosen, Path(tmp))
        if problem := base_problem(run, user, policy):
            raise FeedbackError(problem)
        base, entries = _stored_base(run_root(run), user)
        relabel = _relabels(entries, relabel)
        adds, duplicates = _fresh(entries, sources)
        if not adds and not relabel:
            raise FeedbackError(f"Nothing new: the {_images(len(duplicates))} judged are in the data set "
                                "already, with the same content.")
        added = _bytes(dict(sha256=sha, size=size) for _, _, sha, size in adds)
        _check_room(user, policy, added + (0 if base else _bytes(entries)))     # snapshot and additions at once
        snapshotted = base is None
        base = base or _snapshot(run_root(run), user, note=f"the folder run {run.id} trained on")
        assignment = _assignment(base, run_splits(run))
        note = note or _note(run, adds, relabel)
        pairs = [(src, example.label) for (src, example, _, _) in adds]
        if _keeps_layout(base, assignment):
            new = versions.derive(base, add=pairs, relabel=relabel, note=note, author=user.id)
            path_map = {e["path"]: e["path"] for e in base.files}
            path_map.update({a["path"]: b["path"] for a, b in versions.diff(base, new).relabelled})
            restructured = False
        else:
            new, path_map = _restructured(base, assignment, pairs, relabel, note, user, Path(tmp))
            restructured = True
    verdicts = Counter(example.verdict for _, example, _, _ in adds)
    return Saved(version=new, base=base, snapshotted=snapshotted, accepted=verdicts["accept"],
                 corrected=verdicts["correct"], relabelled=len(relabel), duplicates=duplicates,
                 restructured=restructured, moved=moved_images(run, new, path_map))


def train_again_config(run: Run, version: versions.Version) -> RunConfig:
    """The run's settings on `version`'s folder: a run of its own (no sweep), named after both."""
    cfg = RunConfig.from_dict(run.config.to_dict())
    cfg.data_root = str(version.folder)
    cfg.sweep, cfg.tags = "", {}
    cfg.name = f"{run.config.name or run.config.arch} · {version.ref}"[:120]
    return cfg


def moved_images(run: Run, version: versions.Version, path_map: dict[str, str]) -> list[str]:
    """Old images (the run's paths) that a run with the same settings on `version` would put in
    another split than `run` did; `path_map` maps the run's paths to the version's."""
    cfg = run.config
    scan = folders.scan_folder(version.folder, check=False)
    now = {it.path: split for split, items in
           splitting.split_items(scan, cfg.split, cfg.split_seed, cfg.max_per_class).items() for it in items}
    return sorted(old for old, split in run_splits(run).items()
                  if path_map.get(old) in now and now[path_map[old]] != split)


def _sources(chosen: list[Example], tmp: Path) -> list[tuple[Path, Example]]:
    """A file per judged example: its own path, or its bytes written below `tmp` under its name
    (an image type's extension added when the name has none)."""
    out = []
    for i, example in enumerate(chosen):
        if example.data is None:
            if example.path is None or not _regular_image(Path(example.path)):
                raise FeedbackError(f"Can't add {example.name}: not an image file (a link is not followed).")
            out.append((Path(example.path), example))
            continue
        name = Path(example.name).name or "image"
        if Path(name).suffix.lower() not in IMAGE_EXTENSIONS:
            name = Path(name).stem + _image_suffix(example.data, example.name)
        target = tmp / str(i) / name
        target.parent.mkdir(parents=True)
        target.write_bytes(example.data)
        out.append((target, example))
    return out


def _regular_image(path: Path) -> bool:
    """A regular file of an image type, not a link (it could lead to a file the user may not read)."""
    try:
        return stat.S_ISREG(os.lstat(path).st_mode) and path.suffix.lower() in IMAGE_EXTENSIONS
    except OSError:
        return False


def _image_suffix(data: bytes, name: str) -> str:
    import io

    from PIL import Image, UnidentifiedImageError
    try:
        with Image.open(io.BytesIO(data)) as img:
            suffix = IMAGE_FORMATS.get(img.format or "")
    except (UnidentifiedImageError, OSError, ValueError):
        suffix = None
    if suffix is None:
        raise FeedbackError(f"{name}: not an image file.")
    return suffix


def _fresh(entries: list[dict], sources) -> tuple[list[tuple], list[str]]:
    """(src, example, sha256, size) of the sources whose content is new to the data set's
    `entries` (and to each other), and the names of the others."""
    known = {e["sha256"] for e in entries}
    fresh, duplicates = [], []
    for src, example in sources:
        try:
            sha, size = versions.file_sha256(src), src.stat().st_size
        except OSError as err:
            raise FeedbackError(f"Can't read {example.name}: {err.strerror or err}.") from None
        if sha in known:
            duplicates.append(example.name)
        else:
            known.add(sha)
            fresh.append((src, example, sha, size))
    return fresh, duplicates


def _relabels(entries: list[dict], relabel: dict) -> dict[str, str]:
    """The relabels that change something, each path checked to be one of the data set's files."""
    labels = {e["path"]: e["label"] for e in entries}
    out = {}
    for rel, label in relabel.items():
        if versions.check_rel(rel) not in labels:
            raise FeedbackError(f"{rel} is not in the data set (was it removed since the run?).")
        if labels[rel] != versions.check_class(label):
            out[rel] = label
    return out


def _note(run: Run, adds, relabel: dict) -> str:
    verdicts = Counter(example.verdict for _, example, _, _ in adds)
    parts = [f"+{_images(len(adds))} to train ({verdicts['accept']} confirmed, {verdicts['correct']} corrected)"] \
        if adds else []
    moved = Counter(relabel.values())
    parts += [f"{n} moved to '{label}'" for label, n in sorted(moved.items())]
    return f"feedback on run {run.id}: " + ", ".join(parts)


def _check_room(user: access.User, policy: access.Policy, nbytes: int) -> None:
    """The student's quota (and the lab's total cap) for `nbytes` brought into the store."""
    if nbytes > 0:
        access.check_room(user, policy, nbytes)


# ---------------------------------------------------------------- keeping the run's splits

def _split_folder(rel: str) -> str | None:
    """The split a path's top folder names (train/, valid/, ...), or None for a class folder."""
    parts = PurePosixPath(rel).parts
    return folders.SPLIT_NAMES.get(parts[0].lower()) if len(parts) >= 3 else None


def _assignment(base: versions.Version, used: dict[str, str]) -> dict[str, str]:
    """{base path: split}: the run's split for the files it used; for the others the split their
    folder names, else train."""
    return {e["path"]: used.get(e["path"]) or _split_folder(e["path"]) or "train" for e in base.files}


def _keeps_layout(base: versions.Version, assignment: dict[str, str]) -> bool:
    """Whether base's folders already hold the assignment: every file inside the folder of its
    split, so derive's children (added files go to train/) keep it."""
    return all(_split_folder(rel) == split for rel, split in assignment.items())


def _restructured(base: versions.Version, assignment: dict[str, str], adds, relabel: dict, note: str,
                  user: access.User, tmp: Path) -> tuple[versions.Version, dict[str, str]]:
    """The data set's next version laid out as train/val/test/<class>/ folders: base's files by
    `assignment` (hard links, so nothing is copied), relabelled ones in their new class, the added
    files in train. Returns it and {base path: its path}."""
    stage = tmp / "layout"
    taken: set[str] = set()
    path_map = {}
    for entry in base.files:
        rel = entry["path"]
        parts = PurePosixPath(rel).parts
        tail = parts[2:] if _split_folder(rel) else parts[1:]
        new = _free(taken, "/".join((assignment[rel], relabel.get(rel, entry["label"]), *tail[:-1])), tail[-1])
        _place(base.folder / rel, stage / new)
        path_map[rel] = new
    for src, label in adds:
        _place(Path(src), stage / _free(taken, f"train/{label}", Path(src).name))
    return versions.snapshot(stage, base.name, user.id, note=note + f" (the run's train/val/test kept as folders, from {base.id})"), path_map


def _free(taken: set[str], folder: str, filename: str) -> str:
    """folder/<safe name>, with -2, -3, ... until it is unique (case ignored)."""
    suffix = PurePosixPath(filename).suffix.lower()
    stem = "".join(c if c.isalnum() or c in "-_" else "_" for c in PurePosixPath(filename).stem).strip("_-")[:60]
    for n in range(1, len(taken) + 2):
        rel = f"{folder}/{stem or 'image'}{'' if n == 1 else f'-{n}'}{suffix}"
        if rel.lower() not in taken:
            taken.add(rel.lower())
            return rel
    raise AssertionError("unreachable: more names tried than files")


def _place(src: Path, dest: Path) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(src, dest)
    except OSError:           # another disk: a copy
        shutil.copyfile(src, dest)


def _images(n: int) -> str:
    return f"{n} image{'' if n == 1 else 's'}"


# ---------------------------------------------------------------- who may read a version

def may_read(user: access.User, version: versions.Version) -> bool:
    """The teacher reads every version; a student the versions of data sets they made a version
    of (access.own_version's rule, which lets them train on those folders)."""
    return user.admin or any(v.author == user.id for v in versions.versions(version.name))


def readable_names(user: access.User) -> list[str]:
    """The data sets this user may read (and list on the Data page)."""
    return [name for name in versions.names() if user.admin
            or any(v.author == user.id for v in versions.versions(name))]


# ---------------------------------------------------------------- deleting a version

def runs_on(version: versions.Version) -> list[Run]:
    """The runs that trained (or wait to train) on `version`: its folder as their data, or it as
    their pin."""
    folder = (versions.store() / "sets" / version.name / version.id).resolve()
    found = []
    for run in list_runs():
        root = Path(paths.resolve_data_root(run.config.data_root)).expanduser()
        if root.resolve() == folder or (pin_of(run) or {}).get("version") == version.ref:
            found.append(run)
    return found


def delete_version(user: access.User, version: versions.Version) -> int:
    """Delete a version of one's own (the teacher: any) that no run uses and nothing derives from;
    the bytes freed (what it alone held). FeedbackError with a sentence otherwise."""
    if not (user.admin or version.author == user.id):
        raise FeedbackError(f"{version.ref} was made by someone else: only they or the teacher can delete it.")
    if used := runs_on(version):
        mine = [r.id for r in used if user.admin or r.owner == user.id][:3]      # others' run ids stay theirs
        named = f" ({', '.join(mine)})" if mine else ""
        raise FeedbackError(f"{len(used)} run(s) trained on {version.ref}{named}: delete those runs first, so "
                            "that no run loses the files it was pinned to.")
    return versions.remove(version)


# ---------------------------------------------------------------- what a run's pin says

@dataclass
class DataCheck:
    """A run's data now: `change` is check_pin's Diff (None for a run without a pin); `pinned` a
    stored version whose files are exactly the pinned ones (its folder never changes), if any."""
    root: Path
    label: str
    change: versions.Diff | None = None
    pinned: versions.Version | None = None
    n_files: int = 0                 # files the run used

    @property
    def changed(self) -> bool:
        return bool(self.change)

    @property
    def gone(self) -> bool:
        """Every pinned file is missing: the folder was moved or deleted."""
        return bool(self.change) and not self.change.changed and not self.change.relabelled \
            and len(self.change.removed) == self.n_files


def pin_of(run: Run) -> dict | None:
    return (run.read_json("splits.json", {}) or {}).get("pin")


def data_check(run: Run) -> DataCheck:
    """check_pin on the run's data root, and the stored version holding its pinned files."""
    root, pin = run_root(run), pin_of(run)
    if not pin:
        return DataCheck(root, data_label(run))
    change = versions.check_pin(root, pin)
    return DataCheck(root, data_label(run), change, pinned_version(pin) if change else None,
                     n_files=len(pin.get("files") or {}))


def pinned_version(pin: dict) -> versions.Version | None:
    """The stored version whose files are exactly the pinned ones: the pin's own version, or any
    data set's version with the pin's manifest hash (a folder stored after the run)."""
    with contextlib.suppress(versions.VersionError, ValueError):
        if pin.get("version"):
            found = versions.get(*pin["version"].split("/", 1))
            if found.hash == pin.get("manifest"):
                return found
    for name in versions.names():
        with contextlib.suppress(versions.VersionError):
            for v in versions.versions(name):
                if v.hash == pin.get("manifest"):
                    return v
    return None


def data_label(run: Run) -> str:
    """Which data a run trained on: its version ("flowers/v3"), "files <12 hex>" for a folder that
    is not a stored version, "not recorded" for a run from before pins."""
    return _label(*_pin_head(str(run.file("splits.json"))))


def _label(version: str | None, manifest: str | None) -> str:
    if version:
        return version
    return f"files {manifest[:12]}" if manifest else "not recorded"


def _pin_head(path: str) -> tuple[str | None, str | None]:
    try:
        st = os.stat(path)
    except OSError:
        return None, None
    return _pin_head_cached(path, st.st_mtime_ns, st.st_size)


@functools.lru_cache(maxsize=512)        # splits.json can be large; the table reads it every tick
def _pin_head_cached(path: str, mtime_ns: int, size: int) -> tuple[str | None, str | None]:
    import json
    try:
        pin = (json.loads(Path(path).read_text(encoding="utf-8")) or {}).get("pin") or {}
    except (OSError, ValueError, AttributeError):
        return None, None
    return pin.get("version"), pin.get("manifest")


def data_versions_note(runs: list[Run]) -> str | None:
    """A sentence when the runs did not all train on the same files (by their pins' manifests),
    naming each data version and its number of runs; None when they did (or nothing is pinned)."""
    heads = [_pin_head(str(run.file("splits.json"))) for run in runs]
    pinned = [(v, m) for v, m in heads if m]
    if len({m for _, m in pinned}) < 2:
        return None
    counts = Counter(_label(v, m) for v, m in pinned)
    shown = ", ".join(f"{label} ({n} run{'' if n == 1 else 's'})" for label, n in counts.most_common())
    return (f"These runs trained on different data: {shown}. A difference in their scores may come from "
            "the data, not only from the settings.")
