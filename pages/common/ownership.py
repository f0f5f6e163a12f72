"""Who this browser is, what it may do (core.access), and the page-side wrappers that hold a
user to it: their runs, their uploads, the teacher's caps when queueing."""
from __future__ import annotations

import hashlib
import secrets
from pathlib import Path

import streamlit as st

from core import access
from core.config import RunConfig, validate_config
from core.store import Run, get_run, list_runs
from core.worker import MANAGER
from pages.common.state import lab


def session_owner() -> str:
    """Who this browser is: a stable anonymous id from its cookie (else this session's)."""
    state = lab()
    if not state.owner:
        state.owner = browser_id(st.context.cookies.get(XSRF_COOKIE, "")) or secrets.token_hex(4)
    return state.owner

XSRF_COOKIE = "_streamlit_xsrf"

def browser_id(cookie: str) -> str | None:
    """A stable, anonymous id of one browser. Streamlit's XSRF cookie holds a random token that
    the browser keeps across reloads, closed tabs and server restarts (until it quits); each
    response re-masks it ("2|mask|masked token|time"), so unmask it, then hash it, since the owner
    is stored in status.json."""
    parts = cookie.strip("\"'").split("|")
    if len(parts) != 4 or parts[0] != "2":
        return None
    try:
        mask, masked = bytes.fromhex(parts[1]), bytes.fromhex(parts[2])
    except ValueError:
        return None
    if not mask or len(masked) < 8:
        return None
    token = bytes(b ^ mask[i % len(mask)] for i, b in enumerate(masked))
    return hashlib.sha256(token).hexdigest()[:8]

def admin_token() -> str:
    try:
        secret = str(st.secrets.get("admin_token", ""))
    except (FileNotFoundError, KeyError, st.errors.StreamlitSecretNotFoundError):
        secret = ""
    return access.configured_token(secret)

def user() -> access.User:
    """This browser's identity and role (see core.access)."""
    token = admin_token()
    if token:
        key = _token_key(token)
        admin = lab().admin_key == key or _TEACHERS.get(session_owner()) == key
    else:
        admin = access.local_only(st.get_option("server.address"))
    return access.User(session_owner(), admin=admin)

# Browsers signed in as the teacher, by their cookie id (this server process only), so a reload
# or a new tab of the teacher's browser stays signed in; a changed token signs everyone out.
_TEACHERS: dict[str, str] = {}

def _token_key(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()

def sign_in() -> None:
    """The teacher's sign-in, shown only where a token is set (a form, so typing the token and
    clicking once is enough)."""
    token = admin_token()
    if not token:
        return
    if user().admin:
        st.caption(":material/key: Signed in as teacher (admin)")
        if st.button("Sign out", key="admin_sign_out"):
            lab().admin_key = ""
            _TEACHERS.pop(session_owner(), None)
            st.rerun()
        return
    with st.expander(":material/key: Teacher sign-in"):
        with st.form("admin_sign_in_form", border=False):
            given = st.text_input("Teacher token", type="password", key="admin_token_input")
            if st.form_submit_button("Sign in", key="admin_sign_in"):
                if access.token_matches(given, token):
                    lab().admin_key = _TEACHERS[session_owner()] = _token_key(token)
                    st.rerun()
                st.error("That is not the teacher token.")

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
    from core import sweeps
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
    from core import data as D
    who = user()
    if (done := D.upload_dir(data, name, parent=access.uploads_dir(who))).exists():
        return done        # the page reruns while the uploader holds the file: already unpacked
    allowed = min(access.upload_allowance(who, policy()), D.MAX_ZIP_BYTES)
    return D.save_upload_zip(data, name, folder=access.uploads_dir(who), max_bytes=allowed)
