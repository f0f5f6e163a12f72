"""Who may do what on a shared lab server.

Two roles. In *local mode* (`FINETUNE_LAB_LOCAL=1`, what `./lab.sh` starts: one person on their
own computer) that person is the admin. On a class server, everyone signs in (core.serve.accounts:
class accounts, the teacher token, or an OpenID provider through `st.login`): the *admin* (the
teacher) is whoever signs in with the long teacher token (`FINETUNE_LAB_ADMIN_TOKEN`,
`admin_token` in Streamlit's secrets, or the one `python -m core token` keeps in the data
directory), a class account made a teacher, or a provider's user whose e-mail is on the teacher
list (`FINETUNE_LAB_TEACHER_EMAILS`). Nobody is anything because of the address they connect from.
Everyone else is a *student*: they see and manage only their own runs, uploads and presets, open
server folders only below the allowed roots, and stay within the admin's quotas and caps (the
`Policy`, kept in `policy.json` in the data directory and edited on the Home page).

A user's id is the account's name (or a hash of a provider's subject): it names folders, so it
is checked to be one before it is used in a path. It is not a secret.
"""
from __future__ import annotations

import hmac
import json
import os
import re
import shutil
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from core import paths

TOKEN_ENV = "FINETUNE_LAB_ADMIN_TOKEN"
LOCAL_ENV = "FINETUNE_LAB_LOCAL"
TEACHERS_ENV = "FINETUNE_LAB_TEACHER_EMAILS"
MB = 1024 ** 2


class AccessError(ValueError):
    """Something this user may not do, with the reason in one sentence."""


@dataclass(frozen=True)
class User:
    id: str
    admin: bool = False

    def __post_init__(self):
        if not re.fullmatch(r"[A-Za-z0-9_-]{1,40}", self.id):
            raise ValueError(f"Not a user id: {self.id!r}")


CLI = User("cli", admin=True)      # whoever runs `python -m core` owns the server's files anyway


@dataclass
class Policy:
    """What students may do; the admin may do everything. Sizes in MB, 0 = no cap."""
    server_folders: bool = True       # students may open folders below the allowed roots
    roots: list = field(default_factory=list)   # extra folders below which students may read data
    max_queued: int = 10              # a student's runs waiting in the queue at once (a sweep counts each)
    max_epochs: int = 0               # a student run's epochs are capped to this
    max_minutes: int = 0              # a student run is stopped after this many minutes
    upload_mb: int = 2048             # one upload, unpacked
    user_mb: int = 8192               # all of one student's uploads
    total_mb: int = 65536             # everything in the data directory; uploads stop beyond it
    keep_days: int = 30               # "Clean up" deletes uploads not touched for this long
    max_tasks: int = 2                # page tasks (Doctor audits, LR finder) running at once, each in its own process
    task_minutes: int = 10            # a page task is stopped after this many minutes
    cache_mb: int = 4096              # the lab's cache of shared folders' embeddings and audits, trimmed oldest-first
    slots: int = 0                    # runs training at once on a CPU-only machine (0 = automatic)
    runs_per_gpu: int = 1             # runs sharing one GPU (small runs leave a GPU half idle)
    ray_address: str = ""             # a Ray cluster's dashboard address: runs go there as Ray jobs


LIMITS = {"max_queued": (1, 100), "max_epochs": (0, 500), "max_minutes": (0, 7 * 24 * 60),
          "upload_mb": (1, 10 ** 6), "user_mb": (1, 10 ** 7), "total_mb": (0, 10 ** 8),
          "keep_days": (1, 3650), "slots": (0, 64), "runs_per_gpu": (1, 16), "cache_mb": (16, 10 ** 7), "max_tasks": (1, 32),
          "task_minutes": (1, 24 * 60)}


def policy_path() -> Path:
    return paths.home() / "policy.json"


def load_policy() -> Policy:
    """The admin's saved policy; a missing or damaged file gives the defaults (safe ones)."""
    try:
        data = json.loads(policy_path().read_text(encoding="utf-8"))
        return checked_policy(data)
    except (OSError, ValueError, TypeError):
        return Policy()


def checked_policy(data: dict) -> Policy:
    policy = Policy()
    for f in fields(Policy):
        if f.name not in data:
            continue
        value = data[f.name]
        if f.name == "server_folders":
            policy.server_folders = bool(value)
        elif f.name == "roots":
            policy.roots = [str(r) for r in value if str(r).strip()][:50]
        elif f.name == "ray_address":
            policy.ray_address = ray_address(value)
        else:
            low, high = LIMITS[f.name]
            if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
                raise ValueError(f"{f.name} must be a whole number from {low} to {high}.")
            setattr(policy, f.name, value)
    return policy


def ray_address(value) -> str:
    """A Ray dashboard address (http://host:8265) or nothing; anything else is refused."""
    text = str(value or "").strip()
    if text and not re.fullmatch(r"https?://[A-Za-z0-9.\-\[\]:]+(:\d{1,5})?/?", text):
        raise ValueError("The Ray address must look like http://head-machine:8265 (the dashboard).")
    return text.rstrip("/")


def save_policy(policy: Policy) -> None:
    paths.atomic_write_text(policy_path(), json.dumps(asdict(checked_policy(asdict(policy))), indent=1))


# ---------------------------------------------------------------- roles

def configured_token(secret: str | None = None) -> str:
    """The admin token: the environment variable, else Streamlit's secret, else the token file
    `python -m core token` wrote in the data directory. A short one is no token at all."""
    token = (os.environ.get(TOKEN_ENV, "") or (secret or "") or _token_file()).strip()
    from core.serve.accounts import token_problem
    return "" if token_problem(token) else token


def _token_file() -> str:
    try:
        return (paths.home() / "accounts" / "teacher-token").read_text().strip()
    except OSError:
        return ""


def make_token_file() -> str:
    """The data directory's teacher token, made (random, 0600) the first time."""
    from core.serve.accounts import new_token
    return paths.private_once(paths.home() / "accounts" / "teacher-token", new_token)


def local_mode() -> bool:
    """One person on their own computer: they are the admin, nobody signs in. Explicit only:
    never guessed from the address the server listens on (a proxy may be in front)."""
    return os.environ.get(LOCAL_ENV, "").strip().lower() in ("1", "true", "yes", "on")


def teacher_emails() -> set[str]:
    return {e.strip().lower() for e in os.environ.get(TEACHERS_ENV, "").split(",") if e.strip()}


def token_matches(given: str, token: str) -> bool:
    return bool(token) and hmac.compare_digest(given.encode(), token.encode())


def role_note(token: str, address: str | None = None) -> str:
    if local_mode():
        return ("Local mode (FINETUNE_LAB_LOCAL=1): you are this computer's only user and its admin. "
                "To serve a class, start it with `./lab.sh serve`: everyone then signs in.")
    return ("You are signed in as the teacher: you see and manage every run, upload and preset; "
            "students sign in with their class accounts (or the school's sign-in) and see only their own.")


# ---------------------------------------------------------------- runs

def can_see(user: User, run) -> bool:
    return user.admin or run.owner == user.id


can_manage = can_see     # students manage exactly what they see: their own runs


def visible(user: User, runs: list) -> list:
    return [r for r in runs if can_see(user, r)]


def check_manage(user: User, run) -> None:
    if not can_manage(user, run):
        raise AccessError("This run belongs to someone else: only its owner or the teacher can change it.")


def capped(cfg, user: User, policy: Policy):
    """A student's run within the admin's caps; returns (config, sentence or ""). A time budget
    never outlasts the minute cap, and its plan keeps to the epoch cap."""
    if user.admin:
        return cfg, ""
    notes = []
    if policy.max_epochs and cfg.epochs > policy.max_epochs:
        notes.append(f"Epochs capped at {policy.max_epochs} by the teacher (you asked for {cfg.epochs}).")
        cfg.epochs = policy.max_epochs
        cfg.phase1_epochs = min(cfg.phase1_epochs, cfg.epochs)
    if policy.max_epochs and cfg.time_budget_s:
        cfg.max_epochs = policy.max_epochs
        notes.append(f"The time budget's plan keeps to the teacher's cap of {policy.max_epochs} epochs.")
    if policy.max_minutes and cfg.time_budget_s > policy.max_minutes * 60:
        notes.append(f"Time budget cut to the teacher's limit of {policy.max_minutes} minutes "
                     f"(you asked for {cfg.time_budget_s / 60:g}).")
        cfg.time_budget_s = policy.max_minutes * 60
    return cfg, " ".join(notes)


def time_limit_s(user: User, policy: Policy) -> float | None:
    return None if user.admin or not policy.max_minutes else policy.max_minutes * 60.0


# ---------------------------------------------------------------- server folders

def roots(policy: Policy) -> list[Path]:
    """Folders below which students may read data: the shared sets, the shipped demo, and the
    admin's extra roots."""
    extra = [Path(r).expanduser() for r in policy.roots]
    return [paths.shared_dir(), paths.DEMO_DATA.parent] + [r.resolve() for r in extra if r.is_absolute()]


def uploads_dir(user: User) -> Path:
    """Where one user's uploads go; nobody else's pages read it."""
    path = paths.datasets_dir() / "users" / user.id
    path.mkdir(parents=True, exist_ok=True)
    return path


def weights_dir(user: User) -> Path:
    """Where one user's uploaded weight files go (counted in their quota)."""
    path = paths.weights_dir() / "users" / user.id
    path.mkdir(parents=True, exist_ok=True)
    return path


def data_folder(user: User, typed: str | os.PathLike, policy: Policy) -> Path:
    """A folder a browser user named, resolved (symlinks included), if this user may read it."""
    raw = str(typed).strip()
    if not raw:
        raise AccessError("Type a folder path.")
    path = Path(raw).expanduser()
    if not path.is_absolute():
        path = paths.REPO_ROOT / path        # presets store the demo relative to the app
    path = path.resolve()
    problem = data_problem(user, path, policy)
    if problem:
        raise AccessError(problem)
    if not path.is_dir():
        raise AccessError(f"No folder at {raw}.")
    return path


def data_problem(user: User, path: Path, policy: Policy) -> str | None:
    """Why this user may not read data at `path` (resolved), or None."""
    if user.admin:
        return None
    own = uploads_dir(user)
    if path.is_relative_to(own) or path.is_relative_to(paths.DEMO_DATA.parent) or own_version(user, path):
        return None
    allowed = roots(policy)
    if not policy.server_folders:
        return "The teacher has turned off server folders for students: upload your images instead."
    if any(path.is_relative_to(root) for root in allowed):
        return None
    shown = ", ".join(str(r) for r in allowed)
    return f"Students may open folders only below: {shown}."


def own_version(user: User, path: Path) -> bool:
    """A data set version (or a folder inside one) of a data set this user made a version of:
    a student's versions are theirs, like their uploads."""
    from core.data import versions
    store = (versions.store() / "sets").resolve()
    if not path.is_relative_to(store):
        return False
    rel = path.relative_to(store).parts
    version = versions.version_of(store.joinpath(*rel[:2])) if len(rel) >= 2 else None
    return version is not None and any(v.author == user.id for v in versions.versions(version.name))


def run_data_problem(user: User, data_root: str, policy: Policy) -> str | None:
    """Why this user may not train on (or look at) the data a config names, or None."""
    path = Path(paths.resolve_data_root(data_root)).expanduser()
    if not path.is_absolute():
        path = paths.REPO_ROOT / path
    return data_problem(user, path.resolve(), policy)


def image_files_only(skipped: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """Skipped-file rows a student may see: images that couldn't be used, not the names of the
    folder's other files (a server folder may hold anything)."""
    return [(name, why) for name, why in skipped if not why.startswith("not an image type")]


# ---------------------------------------------------------------- disk

def folder_bytes(*folders: Path) -> int:
    """Bytes below the folders, a file with several hard links counted once (a data set version's
    folder is links to the version store's objects: ten versions cost about one copy)."""
    total, seen = 0, set()
    for path in folders:
        for root, _, files in os.walk(path):
            for name in files:
                try:
                    st = os.lstat(os.path.join(root, name))
                except OSError:
                    continue
                if st.st_nlink > 1:
                    if (st.st_dev, st.st_ino) in seen:
                        continue
                    seen.add((st.st_dev, st.st_ino))
                total += st.st_size
    return total


def user_bytes(user: User) -> int:
    """What counts toward a student's quota: their uploads, their weight files, and what their
    data set versions brought into the version store (core.data.versions.usage)."""
    from core.data import versions
    return folder_bytes(uploads_dir(user)) + folder_bytes(weights_dir(user)) + versions.usage(user.id)


def upload_allowance(user: User, policy: Policy) -> int:
    """Bytes this user's next upload may unpack to: the per-upload cap, what is left of their
    quota, and what is left below the data directory's total cap. Raises when that is nothing."""
    left_total = (policy.total_mb * MB - folder_bytes(paths.home())) if policy.total_mb else 1 << 62
    if left_total <= 0:
        raise AccessError(f"The lab's data directory is full (cap {policy.total_mb:,} MB): ask the "
                          "teacher to free space.")
    if user.admin:
        return left_total
    left_user = policy.user_mb * MB - user_bytes(user)
    if left_user <= 0:
        raise AccessError(f"Your uploads (and data set versions) use your whole quota of {policy.user_mb:,} MB: "
                          "delete old uploads (Data page, My uploads) first.")
    return min(policy.upload_mb * MB, left_user, left_total)


def check_room(user: User, policy: Policy, nbytes: int) -> None:
    """Refuse (AccessError) an upload of `nbytes` bigger than what is left of this user's
    allowance (upload_allowance), with both sizes in the sentence."""
    allowed = upload_allowance(user, policy)
    if nbytes > allowed:
        raise AccessError(f"These files take {nbytes / MB:,.0f} MB; you have "
                          f"{allowed / MB:,.0f} MB left. Delete old uploads (My uploads below).")


def save_files(user: User, policy: Policy, folder: Path, files: list[tuple[str, bytes]]) -> list[str]:
    """Store uploaded (relative name, bytes) files below `folder` if they fit this user's
    allowance (else AccessError, nothing written). Returns the names refused as unsafe."""
    from core.data import zips
    check_room(user, policy, sum(len(data) for _, data in files))
    return zips.save_upload_files(folder, files)


def my_uploads(user: User) -> list[tuple[str, int, float]]:
    """(name, bytes, last modified) of a user's uploads, newest first."""
    out = []
    for path in uploads_dir(user).iterdir():
        if path.is_dir() and not path.name.startswith("."):
            out.append((path.name, folder_bytes(path), path.stat().st_mtime))
    return sorted(out, key=lambda row: -row[2])


def delete_upload(user: User, name: str) -> None:
    path = uploads_dir(user) / Path(name).name
    if not path.is_dir() or path.parent != uploads_dir(user):
        raise AccessError(f"No upload called {name}.")
    shutil.rmtree(path)


def clean_up(older_than_days: float, user: User | None = None) -> int:
    """Delete uploads not modified for `older_than_days` (one user's, or everyone's); returns
    how many."""
    base = paths.datasets_dir() / "users"
    owners = [uploads_dir(user)] if user else [p for p in base.glob("*") if p.is_dir()]
    cutoff, removed = time.time() - older_than_days * 86400, 0
    for owner in owners:
        for path in owner.iterdir():
            if path.is_dir() and path.stat().st_mtime < cutoff:
                shutil.rmtree(path, ignore_errors=True)
                removed += 1
    return removed


def trim_lab_cache() -> int:
    """Keep the lab's cache (what is derived from shared folders) under the teacher's cap."""
    return paths.trim_lab_cache(load_policy().cache_mb * MB)


def disk_usage() -> dict:
    """The admin's overview: bytes per part of the data directory, and the disk's free space."""
    home = paths.home()
    parts = {p.name: folder_bytes(p) for p in home.iterdir() if p.is_dir()}
    return dict(parts=parts, total=sum(parts.values()), free=shutil.disk_usage(home).free)
