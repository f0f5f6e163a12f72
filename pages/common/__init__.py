"""UI helpers shared by every page. Pages call `setup()` first, so each works when opened
directly by a deep link on a fresh server, before the entry file has run `st.navigation`."""
from __future__ import annotations

import hashlib
import json
import secrets
import threading
from pathlib import Path

import altair as alt
import pandas as pd
import streamlit as st

from core import access, paths
from core.config import RANGES, RunConfig, validate_config
from core.store import ACTIVE_STATES, Run, delete_run, get_run, list_runs
from core.worker import MANAGER
from pages.common import state
from pages.common.state import lab

PAGES = {
    "home": "pages/0_Home.py",
    "data": "pages/1_Data.py",
    "model": "pages/2_Model.py",
    "train": "pages/3_Train.py",
    "evaluate": "pages/4_Evaluate.py",
    "predict": "pages/5_Predict.py",
    "inspect": "pages/6_Inspect.py",
    "experiments": "pages/7_Experiments.py",
}


def link(page: str, label: str, icon: str | None = None, where=st) -> None:
    """st.page_link that degrades to plain text when the page isn't registered: a page file run
    as the main script itself (as AppTest does) knows no other pages."""
    try:
        where.page_link(PAGES[page], label=label, icon=icon)
    except st.errors.StreamlitPageNotFoundError:
        where.markdown(f"{icon or ''} {label} (see the sidebar)")


def setup(title: str) -> dict:
    """Page config, session defaults and the sidebar. Returns the session's settings (the draft
    run configuration). A page ends with `finish()` (or `stop()`), which redraws the sidebar's
    summary with the choices the page just made."""
    try:
        st.set_page_config(page_title=f"{title} · Finetune Lab", page_icon="🧪", layout="wide")
    except st.errors.StreamlitAPIException:
        pass     # already set by the entry file in this run
    if problem := paths.write_problem():
        st.error(problem)
        st.stop()
    settings = lab().settings
    for key, value in default_settings().items():     # settings added since this session began
        settings.setdefault(key, value)
    with st.sidebar:
        sign_in()
        _page.summary = st.empty()
    finish()
    return settings


_page = threading.local()      # this script run's sidebar slot (each session reruns in its own thread)


def finish() -> None:
    """(Re)draw the sidebar summary, once the page has applied this run's choices."""
    slot = getattr(_page, "summary", None)
    if slot is not None:
        with slot.container():
            sidebar_summary(lab().settings)


def stop():
    """st.stop(), after bringing the sidebar summary up to date."""
    finish()
    st.stop()


def default_settings() -> dict:
    cfg = RunConfig(data_root=str(paths.DEMO_DATA.relative_to(paths.REPO_ROOT)))
    settings = cfg.to_dict()
    settings["data_label"] = "Built-in demo: Fashion-MNIST (10 classes × 100 photos)"
    return settings


def run_config(settings: dict) -> RunConfig:
    return RunConfig.from_dict(settings)


def sidebar_summary(settings: dict) -> None:
    st.caption("**Current choices**")
    st.caption(f"Data: {settings.get('data_label', settings['data_root'])}")
    st.caption(f"Model: `{settings['arch']}` · {settings['freeze'].replace('_', '-')}"
               + (f" {settings['top_k']}" if settings["freeze"] == "top_k" else ""))
    active = [r for r in my_runs()[:200] if r.status().get("state") in ACTIVE_STATES]
    running = [r for r in active if r.status().get("state") != "queued"]
    if running:
        now = running[0].config.name or running[0].id
        st.caption(f"Training: {now} · {len(active) - len(running)} more queued — see Train or Experiments")
    elif active:
        st.caption(f"{len(active)} run(s) waiting in the lab's queue — see Train")


# ---------------------------------------------------------------- settings widgets

def bind(widget, field: str, label: str, settings: dict, **kwargs):
    """Draw `widget` showing settings[field] and store the user's choice back. Widget state is
    dropped when a page is left; the settings dict survives page switches."""
    key = f"w_{field}"
    if key not in st.session_state:
        st.session_state[key] = settings[field]
    value = widget(label, key=key, **kwargs)
    settings[field] = value
    return value


def limits(field: str) -> dict:
    """min_value/max_value of a number widget, from the ranges runs and presets are held to."""
    low, high = RANGES[field]
    return dict(min_value=low, max_value=high)


@st.cache_data(max_entries=4096, show_spinner=False)
def thumbnail(path: str, size: int = 96):
    from core.data import open_rgb
    try:
        return open_rgb(path, size)
    except Exception:  # noqa: BLE001 - a file gone or broken shows as a grey tile
        from PIL import Image
        return Image.new("RGB", (size, size), (200, 200, 200))


# ---------------------------------------------------------------- runs

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
        st.caption("🔑 Signed in as teacher (admin)")
        if st.button("Sign out", key="admin_sign_out"):
            lab().admin_key = ""
            _TEACHERS.pop(session_owner(), None)
            st.rerun()
        return
    with st.expander("🔑 Teacher sign-in"):
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


def mine(run: Run) -> bool:
    """This browser's run; for the teacher also the runs started from the command line (or by
    the library), which belong to whoever runs the server."""
    return run.owner == session_owner() or (run.owner in ("", "cli") and user().admin)


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


def pick_run(label: str = "Run", only_with_checkpoint: bool = False, key: str = "run_pick"):
    """A run selector showing the session's current run (the one last started, resumed or picked
    on any page); picking another makes that one current everywhere. Students see their own
    runs; the admin sees everyone's with "Only my runs" on by default."""
    runs = my_runs()
    if only_with_checkpoint:
        runs = [r for r in runs if r.checkpoint.exists()]
    admin = user().admin
    mine_only = admin and st.session_state.setdefault(f"{key}_mine", True)
    if mine_only:
        runs = [r for r in runs if mine(r)]
    if not runs:
        if admin:
            st.toggle("Only my runs", key=f"{key}_mine")
        return None
    ids = [r.id for r in runs]
    labels = {r.id: ("👤 " if mine(r) and admin else "") + r.label() + ("" if mine(r) or not admin else f" · {owner_name(r)}")
              for r in runs}
    current = lab().current_run
    st.session_state[key] = current if current in ids else ids[0]
    if current and current not in ids:
        st.caption(f"Your current run {current} isn't listed here"
                   + (" (no checkpoint yet)" if only_with_checkpoint else "") + f"; showing {ids[0]}.")
    where = st
    if admin:
        where, toggle = st.columns([5, 1], vertical_alignment="bottom")
        toggle.toggle("Only my runs", key=f"{key}_mine")
    chosen = where.selectbox(label, ids, format_func=labels.get, key=key, on_change=_follow, args=(key,),
                             help="👤 marks the runs this browser started." if admin else None)
    return get_run(chosen)


def _follow(key: str) -> None:
    """The run picked on one page becomes the current run of every page."""
    lab().current_run = st.session_state[key]


def run_actions(run: Run, active: bool) -> None:
    """Stop (while it trains), Resume (stopped or interrupted) and Delete, for runs this user
    may manage: their own, or any for the admin."""
    if not can_manage(run):
        return
    if run.owner != session_owner():
        st.caption("Started by another user (or from the command line); as the teacher you may manage it.")
    cols = st.columns(3)
    if active:
        cols[0].button("⏹️ Stop", on_click=stop_run, args=(run.id,), key="stop")
        return
    if run.resumable():
        cols[0].button("⏯️ Resume", on_click=resume_run, args=(run.id,), key="resume",
                       help="Go on from the last finished epoch, with its optimiser state.")
    with cols[1].popover("🗑️ Delete"):
        st.caption("Deletes the run folder: checkpoint, metrics and curves.")
        st.button("Delete for good", on_click=remove_run, args=(run.id,), key="delete", type="primary")


def resume_run(run_id: str) -> None:
    try:
        run = open_run(run_id)
        access.check_manage(user(), run)
        limits = student_limits()
        MANAGER.check_room(run.owner, limits.get("max_queued"))
        MANAGER.resume(run, owner=run.owner, limit_s=limits.get("limit_s"))
    except (ValueError, FileNotFoundError, access.AccessError) as err:
        lab().note("run_error", str(err))


def remove_run(run_id: str) -> None:
    try:
        run = open_run(run_id)
        access.check_manage(user(), run)
        delete_run(run)
        lab().current_run = None
    except (ValueError, FileNotFoundError, access.AccessError) as err:
        lab().note("run_error", str(err))


def runs_frame(limit: int = 50) -> pd.DataFrame:
    """One row per run, newest first: the overview after a restart."""
    rows = []
    for run in my_runs()[:limit]:
        cfg, status = run.config, run.status()
        rows.append(dict(run=run.id, owner=owner_name(run) if not mine(run) else "me", model=cfg.arch, freeze=cfg.freeze, epochs=cfg.epochs,
                         state=status.get("state"), best_epoch=status.get("best_epoch"),
                         best_val_acc=status.get("best_val_acc"), test_acc=status.get("test_acc")))
    return pd.DataFrame(rows)


def show_curves(epochs: list[dict]) -> None:
    """Loss and accuracy per epoch, train vs val, side by side; a dashed line marks the epoch
    where a new training phase (e.g. unfreezing) began."""
    frame = pd.DataFrame(epochs)
    starts = []
    if "phase" in frame:
        changed = frame["phase"].ne(frame["phase"].shift()) & frame.index.to_series().gt(0)
        starts = (frame.loc[changed, "epoch"] - 0.5).tolist()
    for col, (metric, title) in zip(st.columns(2), (("loss", "Loss"), ("acc", "Accuracy"))):
        long = frame.melt("epoch", [f"train_{metric}", f"val_{metric}"], "series", "value")
        long["series"] = long["series"].str.replace(f"_{metric}", "")
        chart = alt.Chart(long, title=title).mark_line(point=True).encode(
            x=alt.X("epoch:Q", axis=alt.Axis(tickMinStep=1, format="d")), y=alt.Y("value:Q", title=title),
            color=alt.Color("series:N", title=None), tooltip=["epoch", "series", "value"])
        if starts:
            chart += alt.Chart(pd.DataFrame({"epoch": starts})).mark_rule(strokeDash=[4, 4]).encode(x="epoch:Q")
        col.altair_chart(chart.properties(height=240), width="stretch")


def epochs_table(epochs: list[dict]) -> pd.DataFrame:
    frame = pd.DataFrame(epochs)
    cols = ["epoch", "lr", "train_loss", "train_acc", "val_loss", "val_acc", "seconds", "best"]
    return frame[[c for c in cols if c in frame]]


def epochs_column_config():
    pct = dict(format="percent")
    return {"train_acc": st.column_config.NumberColumn("train acc", **pct),
            "val_acc": st.column_config.NumberColumn("val acc", **pct),
            "lr": st.column_config.NumberColumn("LR", format="%.1e"),
            "seconds": st.column_config.NumberColumn("s", format="%.2f"),
            "best": st.column_config.CheckboxColumn("best")}


def queue_place(run_id: str) -> str | None:
    """Where a waiting run stands in the shared queue, in words."""
    where = MANAGER.place(run_id)
    if where is None:
        return None
    ahead, eta = where
    minutes = max(1, round(eta / 60))
    return (f"{ahead} run(s) ahead of it in the lab's queue (runs of different users take turns); "
            f"it should start in about {minutes} min (a rough estimate from this server's past runs).")


def stop_run(run_id: str) -> None:
    try:
        if can_manage(open_run(run_id)):
            MANAGER.stop(run_id)
    except FileNotFoundError:
        pass


def data_dir_hint() -> str:
    return str(paths.home())


def command_line(cfg: RunConfig, axes: dict | None = None) -> None:
    """The exact command (and its config file) that runs the current settings without the browser."""
    with st.expander("💻 Run from the command line"):
        st.download_button("Download config.json", json.dumps(cfg.to_dict(), indent=1), "config.json",
                           "application/json", key="cli_config")
        grid = "".join(f" --grid {axis}={','.join(map(str, values))}" for axis, values in (axes or {}).items())
        verb = "sweep" if axes else "train"
        st.code(f"python -m core {verb} config.json{grid}", language="bash")
        st.caption("Run it in the app's folder (with its virtual environment active). The run appears "
                   "in this app's lists as it trains. On a machine with several GPUs:")
        st.code("torchrun --nproc_per_node=4 -m core train config.json", language="bash")


def presets_panel(settings: dict) -> None:
    """Load a shipped, saved or uploaded preset; save the current settings as one."""
    from core import presets as P
    with st.expander("📦 Presets: load or save a set of settings"):
        st.caption("A preset is a small JSON file of settings. A teacher saves one and hands it out; "
                   "every student who loads it starts from the same configuration.")
        load, save = st.columns(2)
        with load:
            who = user()
            choices = dict(P.list_presets(None if who.admin else who.id))
            label = st.selectbox("Preset", list(choices), index=None, placeholder="Pick a preset",
                                 key="preset_pick")
            upload = st.file_uploader("…or upload a preset file", type=["json"], key="preset_upload")
            if upload and label:
                st.caption("The uploaded file is the one loaded; remove it to load the picked preset.")
            source = upload.name if upload else label
            if st.button(f"Load {source}" if source else "Load preset", disabled=not source, key="preset_load"):
                try:
                    blob = upload.getvalue() if upload else choices[label].read_bytes()
                    use_preset(settings, P.parse_preset(blob))
                except P.PresetError as err:
                    st.error(str(err))
            if note := lab().take("preset_note"):
                st.success(note)
        with save:
            name = st.text_input("Name", key="preset_name", placeholder="Lab 3: head-only vs full")
            description = st.text_area("Description (optional)", key="preset_description", height=68)
            with_data = st.checkbox("Include the data set and split", key="preset_with_data")
            replace = st.checkbox("Replace a saved preset of that name", key="preset_replace")
            preset = P.make_preset(settings, name, description, with_data)
            if st.button("Save on this server", key="preset_save", disabled=not name.strip()):
                save_preset(preset, replace)
            if note := lab().take("preset_saved"):
                st.success(note)
            st.download_button("Download preset", json.dumps(preset, indent=1), f"{P.slug(name)}.json",
                               "application/json", key="preset_download", disabled=not name.strip())


def save_preset(preset: dict, replace: bool) -> None:
    """The teacher's presets are listed for everyone; a student's only for that student."""
    from core import presets as P
    who = user()
    try:
        path = P.save_preset(preset, P.user_dir(None if who.admin else who.id), replace=replace)
    except P.PresetError as err:
        st.error(str(err))
        return
    where = "for every user" if who.admin else "for you only"
    lab().note("preset_saved", f"Saved: {path.name} (listed under Preset, {where})")
    st.rerun()         # the list of presets, drawn above, must show it


def use_preset(settings: dict, preset: dict) -> None:
    """Replace the settings the preset holds, and forget widget state so widgets redraw with them."""
    from core import presets as P
    settings.update(P.apply_preset(settings, preset))
    if "data_root" in preset["settings"]:
        settings["data_label"] = f"From preset: {settings['data_root']}"
    state.reset(settings)      # widgets redraw with the preset's values
    lab().note("preset_note", f"Loaded “{preset['name']}”: {len(preset['settings'])} settings. "
               + preset["description"])
    st.rerun()


def report_button(key: str, subject: str, build, filename: str, caption: str, disabled: bool = False) -> None:
    """Build an HTML report of `subject` (a run and split, a sweep) on click (`build()` returns its
    path), then offer it for download."""
    stored = f"report_path:{subject}"
    if st.button("Build HTML report", key=f"build_{key}", disabled=disabled):
        with st.spinner("Writing the report…"):
            lab().page[stored] = str(build())
    path = Path(lab().page.get(stored, ""))
    if stored in lab().page and path.exists():
        st.download_button("report.html", path.read_bytes(), filename, "text/html", key=f"{key}_download")
        st.caption(caption)
