"""Panels several pages share: the run picker and its actions, presets, the command line and
the report button."""
from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import streamlit as st

from core.serve import access
from core.config import RunConfig
from core.serve.store import Run, delete_run, get_run
from core.serve.worker import MANAGER
from pages.common.progress import progress_bar
from pages.common import state
from pages.common.ownership import (can_manage, mine, my_runs, open_run, owner_name, policy, session_owner,
                                    student_limits, user)
from pages.common.state import init_widget, lab, set_widget, widget_value


def pick_run(label: str = "Run", only_with_checkpoint: bool = False, key: str = "run_pick"):
    """A run selector showing the session's current run (the one last started, resumed or picked
    on any page); picking another makes that one current everywhere. Students see their own
    runs; the admin sees everyone's with "Only my runs" on by default."""
    runs = my_runs()
    if only_with_checkpoint:
        runs = [r for r in runs if r.checkpoint.exists()]
    who = user()
    admin = who.admin
    mine_only = admin and init_widget(f"{key}_mine", True)
    if mine_only:
        runs = [r for r in runs if mine(r, who)]
    if not runs:
        if admin:
            st.toggle("Only my runs", key=f"{key}_mine")
        return None
    ids = [r.id for r in runs]
    own = {r.id for r in runs if mine(r, who)}
    labels = {r.id: ("★ " if r.id in own and admin else "") + r.label()
              + ("" if r.id in own or not admin else f" · {owner_name(r)}") for r in runs}
    current = lab().current_run
    set_widget(key, current if current in ids else ids[0])
    if current and current not in ids:
        st.caption(f"Your current run {current} isn't listed here"
                   + (" (no checkpoint yet)" if only_with_checkpoint else "") + f"; showing {ids[0]}.")
    where = st
    if admin:
        where, toggle = st.columns([5, 1], vertical_alignment="bottom")
        toggle.toggle("Only my runs", key=f"{key}_mine")
    chosen = where.selectbox(label, ids, format_func=labels.get, key=key, on_change=_follow, args=(key,),
                             help="★ marks the runs this browser started." if admin else None)
    return get_run(chosen)

def _follow(key: str) -> None:
    """The run picked on one page becomes the current run of every page."""
    lab().current_run = widget_value(key)

def run_actions(run: Run, active: bool) -> None:
    """Stop (while it trains), Resume (stopped or interrupted) and Delete, for runs this user
    may manage: their own, or any for the admin."""
    if not can_manage(run):
        return
    if run.owner != session_owner():
        st.caption("Started by another user (or from the command line); as the teacher you may manage it.")
    cols = st.columns(3)
    if active and MANAGER.stopping(run.id):
        cols[0].caption(":material/hourglass_top: Stopping after this batch…")
        return
    if active:
        cols[0].button("Stop", icon=":material/stop_circle:", on_click=stop_run, args=(run.id,), key="stop")
        return
    if run.resumable():
        cols[0].button("Resume", icon=":material/play_arrow:", on_click=resume_run, args=(run.id,), key="resume",
                       help="Go on from the last finished epoch, with its optimiser state.")
    with cols[1].popover("Delete", icon=":material/delete:"):
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
    who = user()
    for run in my_runs()[:limit]:
        cfg, status = run.config, run.status()
        rows.append(dict(run=run.id, owner=owner_name(run) if not mine(run, who) else "me", model=cfg.arch, freeze=cfg.freeze, epochs=cfg.epochs,
                         state=status.get("state"), best_epoch=status.get("best_epoch"),
                         best_val_acc=status.get("best_val_acc"), test_acc=status.get("test_acc")))
    return pd.DataFrame(rows)

def queue_place(run_id: str) -> str | None:
    """Where a waiting run stands in the shared queue, in words."""
    where = MANAGER.place(run_id)
    if where is None:
        return None
    ahead, eta = where
    minutes = max(1, round(eta / 60))
    return (f"{ahead} run(s) ahead of it in the lab's queue (runs of different users take turns); "
            f"it should start in about {minutes} min (a rough estimate from this server's past runs).")

def run_heavy(what: str, job, progress=None):
    """`job(progress)` while holding one of the server's page task slots, within the teacher's
    minute cap for students; `progress(done, total, message)` is checked against the cap on every call.
    None (and a warning on the page) when the server is busy or the cap was reached."""
    from core.serve import gate
    rules, who = policy(), user()
    try:
        with gate.slot(what, rules.max_tasks, None if who.admin else rules.task_minutes * 60.0) as check:
            def checked(*args):
                check()
                if progress:
                    progress(*args)
            return job(checked)
    except (gate.Busy, gate.TimeUp) as err:
        st.warning(str(err), icon=":material/hourglass_top:")
        return None

def join_sheet(codes: list[tuple[str, str, str]]) -> pd.DataFrame:
    return pd.DataFrame(codes, columns=["account", "name", "join code"])

def csv_text(frame: pd.DataFrame) -> str:
    """CSV whose cells can't run as spreadsheet formulas (a name starting with = + - @)."""
    from core.tables import to_csv
    return to_csv(frame)

def queue_panel() -> None:
    """The lab's queue: what trains where, and what waits in which order. Students see their own
    runs by name and others' only as a count of places."""
    view, who = MANAGER.overview(), user()
    rows = []
    for job in view["running"]:
        rows.append(dict(state="training", run=_queue_name(job, who), where=f"slot {job.slot} · {job.device} · {job.host}"))
    for place, job in enumerate(view["waiting"], 1):
        rows.append(dict(state=f"waiting #{place}", run=_queue_name(job, who), where=""))
    if not rows:
        return
    st.subheader("The lab's queue")
    st.caption(f"{len(view['running'])} of {len(view['slots'])} slot(s) training; runs of different "
               "users take turns.")
    st.dataframe(pd.DataFrame(rows), hide_index=True, width="stretch")

def _queue_name(job, who) -> str:
    if job.owner == who.id:
        return f"{job.run_id} · me"
    if who.admin:
        return f"{job.run_id} · " + {"": "library", "cli": "command line"}.get(job.owner, f"student {job.owner}")
    return "another user's run"

def stop_run(run_id: str) -> None:
    try:
        if can_manage(open_run(run_id)):
            MANAGER.stop(run_id)
            st.toast("Stopping after this batch…", icon=":material/stop_circle:")
    except FileNotFoundError:
        pass

def command_line(cfg: RunConfig, axes: dict | None = None) -> None:
    """The exact command (and its config file) that runs the current settings without the browser."""
    with st.expander(":material/terminal: Run from the command line"):
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
    from core.serve import presets
    with st.expander(":material/inventory_2: Presets: load or save a set of settings"):
        st.caption("A preset is a small JSON file of settings. A teacher saves one and hands it out; "
                   "every student who loads it starts from the same configuration.")
        load, save = st.columns(2)
        with load:
            who = user()
            choices = dict(presets.list_presets(None if who.admin else who.id))
            label = st.selectbox("Preset", list(choices), index=None, placeholder="Pick a preset",
                                 key="preset_pick")
            upload = st.file_uploader("…or upload a preset file", type=["json"], key="preset_upload")
            if upload and label:
                st.caption("The uploaded file is the one loaded; remove it to load the picked preset.")
            source = upload.name if upload else label
            if st.button(f"Load {source}" if source else "Load preset", disabled=not source, key="preset_load"):
                try:
                    blob = upload.getvalue() if upload else choices[label].read_bytes()
                    use_preset(settings, presets.parse_preset(blob))
                except presets.PresetError as err:
                    st.error(str(err))
            if note := lab().take("preset_note"):
                st.success(note)
        with save:
            name = st.text_input("Name", key="preset_name", placeholder="Lab 3: head-only vs full")
            description = st.text_area("Description (optional)", key="preset_description", height=68)
            with_data = st.checkbox("Include the data set and split", key="preset_with_data")
            replace = st.checkbox("Replace a saved preset of that name", key="preset_replace")
            preset = presets.make_preset(settings, name, description, with_data)
            if st.button("Save on this server", key="preset_save", disabled=not name.strip()):
                save_preset(preset, replace)
            if note := lab().take("preset_saved"):
                st.success(note)
            st.download_button("Download preset", json.dumps(preset, indent=1), f"{presets.slug(name)}.json",
                               "application/json", key="preset_download", disabled=not name.strip())

def save_preset(preset: dict, replace: bool) -> None:
    """The teacher's presets are listed for everyone; a student's only for that student."""
    from core.serve import presets
    who = user()
    try:
        path = presets.save_preset(preset, presets.user_dir(None if who.admin else who.id), replace=replace)
    except presets.PresetError as err:
        st.error(str(err))
        return
    where = "for every user" if who.admin else "for you only"
    lab().note("preset_saved", f"Saved: {path.name} (listed under Preset, {where})")
    st.rerun()         # the list of presets, drawn above, must show it

def use_preset(settings: dict, preset: dict) -> None:
    """Replace the settings the preset holds, and forget widget state so widgets redraw with them."""
    from core.serve import presets
    settings.update(presets.apply_preset(settings, preset))
    if "data_root" in preset["settings"]:
        settings["data_label"] = f"From preset: {settings['data_root']}"
    state.reset(settings)      # widgets redraw with the preset's values
    lab().page["lr_from_preset"] = "lr" in preset["settings"]
    lab().note("preset_note", f"Loaded “{preset['name']}”: {len(preset['settings'])} settings. "
               + preset["description"])
    st.rerun()

def report_button(key: str, subject: str, build, filename: str, caption: str, disabled: bool = False) -> None:
    """Build an HTML report of `subject` (a run and split, a sweep) on click (`build(progress)`
    returns its path; progress(done, total, message) names each section as it starts), then offer it
    for download."""
    stored = f"report_path:{subject}"
    if st.button("Build HTML report", key=f"build_{key}", disabled=disabled):
        with progress_bar("Writing the report…") as progress:
            lab().page[stored] = str(build(progress))
    path = Path(lab().page.get(stored, ""))
    if stored in lab().page and path.exists():
        st.download_button("report.html", path.read_bytes(), filename, "text/html", key=f"{key}_download")
        st.caption(caption)
