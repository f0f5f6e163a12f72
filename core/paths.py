"""Where Finetune Lab keeps its files: one data directory, configurable with FINETUNE_LAB_HOME."""
from __future__ import annotations

import contextlib
import os
import threading
from pathlib import Path

try:
    import fcntl
except ImportError:
    fcntl = None

REPO_ROOT = Path(__file__).resolve().parents[1]
ASSETS = REPO_ROOT / "assets"
DEMO_DATA = ASSETS / "demo" / "fashion_mnist"


def home() -> Path:
    """The app's data directory; everything the app writes stays below it."""
    path = Path(os.environ.get("FINETUNE_LAB_HOME", REPO_ROOT / "lab_data")).expanduser().resolve()
    path.mkdir(parents=True, exist_ok=True)
    return path


def runs_dir() -> Path:
    return _sub("runs")


def datasets_dir() -> Path:
    return _sub("datasets")


def shared_dir() -> Path:
    """Data sets every user of the server may read: downloads, and what the admin copies here."""
    path = datasets_dir() / "shared"
    path.mkdir(parents=True, exist_ok=True)
    return path


def write_problem() -> str | None:
    """One sentence when the data directory can't be written (read-only, no permission, full)."""
    try:
        probe = home() / f".write-probe-{os.getpid()}-{threading.get_ident()}"
        probe.write_bytes(b"ok")
        probe.unlink()
        return None
    except OSError as err:
        where = os.environ.get("FINETUNE_LAB_HOME", str(REPO_ROOT / "lab_data"))
        why = "it is full" if err.errno in (28, 122) else "it is read-only or not yours"
        return (f"The app can't write to its data directory {where} ({why}). Point "
                "FINETUNE_LAB_HOME at a writable folder and restart the app.")


CACHE_DIR = ".lab-cache"      # hidden: data scans skip it


def cache_dir(root: str | os.PathLike, kind: str) -> Path:
    """Where what the app derives from a data folder (embeddings, audits) is kept: inside the
    upload when the folder is a user's upload, so it counts in that user's quota and goes with
    the upload; else in the lab's cache, which is trimmed oldest-first (`trim_lab_cache`)."""
    folder = Path(root).resolve()
    users = (datasets_dir() / "users").resolve()
    try:
        rel = folder.relative_to(users)
    except ValueError:
        rel = None
    if rel is not None and len(rel.parts) >= 2:
        return users / rel.parts[0] / rel.parts[1] / CACHE_DIR / kind
    return _sub("cache") / kind


def trim_lab_cache(cap_bytes: int) -> int:
    """Delete the lab cache's least recently used files until it holds at most `cap_bytes`;
    returns how many went."""
    files = []
    for path in _sub("cache").rglob("*"):
        try:
            if path.is_file():
                stat = path.stat()
                files.append((max(stat.st_atime, stat.st_mtime), stat.st_size, path))
        except OSError:
            pass
    total, removed = sum(size for _, size, _ in files), 0
    for _, size, path in sorted(files, key=lambda f: f[0]):
        if total <= cap_bytes:
            break
        with contextlib.suppress(OSError):
            path.unlink()
            total -= size
            removed += 1
    return removed


@contextlib.contextmanager
def locked(path: Path):
    """An exclusive OS lock on `path` for the block (freed if its holder dies): the queue and the
    accounts file change only under one. Windows has no flock: one server per data directory."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle = open(path, "a+")
    try:
        if fcntl:
            fcntl.flock(handle, fcntl.LOCK_EX)
        yield
    finally:
        handle.close()


def private_once(path: Path, make) -> str:
    """The text of a secret file readable only by its owner (0600), written with `make()` the
    first time; when two processes race, the first one's text wins."""
    with contextlib.suppress(OSError):
        if text := path.read_text().strip():
            return text
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with open(fd, "w") as f:
            f.write(make())
    except FileExistsError:
        pass
    return path.read_text().strip()


def weights_dir() -> Path:
    return _sub("weights")


def _sub(name: str) -> Path:
    path = home() / name
    path.mkdir(parents=True, exist_ok=True)
    return path


def atomic_write_text(path: Path, text: str) -> None:
    """Write via a temp file and rename, so readers never see half a file."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    with removed_on_error(tmp):
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)


@contextlib.contextmanager
def removed_on_error(tmp: Path):
    """A temp file a failed write (say, a full disk) leaves half-written is deleted."""
    try:
        yield
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def resolve_data_root(root: str) -> str:
    """Configs may store the demo set relative to the repo, so presets travel between machines."""
    return str(REPO_ROOT / root) if root.startswith("assets/") else root


def data_root_path(root: str) -> Path:
    """The folder a setting's data_root names, as the pages show it and access checks it:
    resolve_data_root's, and any other relative path taken below the app's folder."""
    path = Path(resolve_data_root(root))
    return path if path.is_absolute() else REPO_ROOT / path
