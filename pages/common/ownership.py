"""Who this browser is, what it may do (core.serve.access), and the page-side wrappers that hold a
user to it: their runs, their uploads, the teacher's caps when queueing."""
from __future__ import annotations

from pathlib import Path

import streamlit as st

from core.serve import access, accounts
from core.config import RunConfig, validate_config
from core.serve.store import Run, get_run, list_runs
from core.serve.worker import MANAGER
from pages.common.state import lab


def session_owner() -> str:
    """Who this browser session is signed in as (see `user`)."""
    return user().id

def admin_token() -> str:
    try:
        secret = str(st.secrets.get("admin_token", ""))
    except (FileNotFoundError, KeyError, st.errors.StreamlitSecretNotFoundError):
        secret = ""
    return access.configured_token(secret)

ANONYMOUS = access.User("anonymous")
LOCAL = access.User("local", admin=True)

def user() -> access.User:
    """This session's identity and role, only ever from the signed, HttpOnly sign-in cookie that
    the server set (our sign-in form, or st.login's provider), or local mode. Claims that don't
    check out (a forged or stale cookie, a deleted account, a changed teacher token) are nobody."""
    if access.local_mode():
        return LOCAL
    info = _claims()
    if not info.get("is_logged_in"):
        return ANONYMOUS
    if "lab_account" in info or "lab_teacher" in info:
        found = accounts.claims_user(info, admin_token())
        return access.User(found[0], admin=found[1]) if found else ANONYMOUS
    email = str(info.get("email", "")).lower()
    return access.User(accounts.provider_user_id(info), admin=bool(email) and email in access.teacher_emails())

def _claims() -> dict:
    try:
        return dict(st.user.to_dict())
    except Exception:  # noqa: BLE001 - no user info in this context: nobody
        return {}

def display_name() -> str:
    info, who = _claims(), user()
    return str(info.get("name") or info.get("email") or who.id)

def sign_in() -> None:
    """Who is signed in, and Sign out; or where to sign in."""
    who = user()
    if access.local_mode():
        st.caption(":material/computer: Local mode: you are this computer's only user")
        return
    if who is ANONYMOUS:
        st.link_button("Sign in", "/lab/sign-in", icon=":material/login:")
        return
    role = "teacher" if who.admin else "student"
    name = display_name()
    st.caption(f":material/account_circle: Signed in as {name} (" + ("" if name.lower() == who.id else f"{who.id}, ")
               + f"{role})")
    if st.button("Sign out", key="sign_out", icon=":material/logout:"):
        st.logout()

def policy() -> access.Policy:
    return access.load_policy()

def my_runs() -> list[Run]:
    """The runs this user may see: their own, or every run for the admin."""
    return access.visible(user(), list_runs())

def mine(run: Run, who: access.User | None = None) -> bool:
    """This browser's run; for the teacher also the runs started from the command line (or by
    the library), which belong to whoever runs the server. Pass `who` when asking for many runs."""
    who = who or user()
    return run.owner == who.id or (run.owner in ("", "cli") and who.admin)

def can_manage(run: Run) -> bool:
    return access.can_manage(user(), run)

def owner_name(run: Run) -> str:
    """Who started a run, as the teacher sees it."""
    return {"": "library", "cli": "command line"}.get(run.owner, f"student {run.owner}")

def open_run(run_id: str) -> Run:
    """A run this user may see, by id; another user's run reads as missing."""
    run = get_run(run_id)
    if not access.can_see(user(), run):
        raise FileNotFoundError(f"No run called {run_id}")
    return run

def student_limits() -> dict:
    """submit()/resume() keywords holding a student to the admin's queue and time caps."""
    who, rules = user(), policy()
    if who.admin:
        return {}
    return dict(max_queued=rules.max_queued, limit_s=access.time_limit_s(who, rules))

def submit(cfg: RunConfig) -> Run:
    """Queue a run for this user, within the admin's caps (a sentence saying so when capped).
    Raises ValueError (or access.AccessError) with a sentence when it can't be queued."""
    who, rules = user(), policy()
    cfg = validate_config(cfg.to_dict())          # one typed check, as for presets and the CLI
    if problem := access.run_data_problem(who, cfg.data_root, rules):
        raise access.AccessError(problem)
    cfg, note = access.capped(cfg, who, rules)
    run = MANAGER.submit(cfg, owner=who.id, **student_limits())
    if note:
        lab().note("run_note", note)
    return run

def queue_sweep(configs: list[RunConfig]) -> list[Run]:
    """Queue a sweep's runs for this user, all within the admin's caps or none."""
    from core.training import sweeps
    who, rules = user(), policy()
    if configs and (problem := access.run_data_problem(who, configs[0].data_root, rules)):
        raise access.AccessError(problem)
    notes = [access.capped(cfg, who, rules)[1] for cfg in configs]
    runs = sweeps.queue(configs, owner=who.id, **student_limits())
    if any(notes):
        lab().note("run_note", next(n for n in notes if n))
    return runs

def server_folder(typed: str) -> Path:
    """A folder typed in a page, if this user may read it (raises access.AccessError)."""
    return access.data_folder(user(), typed, policy())

def save_zip(data: bytes, name: str) -> Path:
    """Unpack an uploaded zip into this user's upload folder, within their disk allowance."""
    from core.data import zips
    who = user()
    if (done := zips.upload_dir(data, name, parent=access.uploads_dir(who))).exists():
        return done        # the page reruns while the uploader holds the file: already unpacked
    allowed = min(access.upload_allowance(who, policy()), zips.MAX_ZIP_BYTES)
    return zips.save_upload_zip(data, name, folder=access.uploads_dir(who), max_bytes=allowed)
