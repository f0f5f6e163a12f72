"""Dataset doctor: likely label errors, duplicates, outliers and odd images in the current data
set, each with a one-click fix that goes into a new copy (the user's files are never changed)."""
import streamlit as st

from pages import show_loading

loading = show_loading()      # the imports below take seconds on a server's first visit

from pathlib import Path

import altair as alt
import pandas as pd

from core import paths
from core.serve import access
from core.trust import doctor
from pages import common
from pages.common.teaching import explain

loading.empty()

settings = common.setup("Doctor")
st.title("Dataset doctor")
st.caption("One check of the current data set, from what the pretrained backbone sees in each image: "
           "labels that look wrong, copies, images unlike the rest. Fixes are written to a new copy; "
           "your own files are never changed.")
explain("doctor")
if message := common.lab().take("doctor"):
    st.success(message, icon=":material/check_circle:")

root = Path(settings["data_root"])
root = root if root.is_absolute() else paths.REPO_ROOT / root
if problem := access.run_data_problem(common.user(), str(root), common.policy()):
    st.error(f"{problem} Pick another data set on the Data page.")
    common.stop()
st.markdown(f"Data set: **{settings.get('data_label') or root.name}**")
if origin := doctor.fixed_from(root):
    st.info(f"This is a fixed copy: {len(origin['excluded'])} image(s) left out and {len(origin['moved'])} "
            f"moved to another class; {origin['kept_together']} group(s) kept in one split.")

state = common.lab().page.setdefault("doctor", {})
fixes = state.setdefault("fixes", {"exclude": set(), "move": {}, "together": False})


def start_audit() -> None:
    """The audit runs as a task in a worker process (core.serve.tasks), never in this page's thread."""
    who = common.user()
    try:
        task = common.MANAGER.submit_task("doctor", {"folder": str(root)}, owner=who.id, admin=who.admin)
    except ValueError as err:
        common.lab().note("doctor_error", str(err))
        return
    state.update(task=task.id, task_root=str(root))


@st.fragment(run_every=1)
def audit_progress(task_id: str) -> None:
    from core.serve import tasks
    try:
        task = tasks.get_task(task_id)
    except FileNotFoundError:
        state.pop("task", None)
        return
    status = task.status()
    if status.get("state") in common.ACTIVE_STATES:
        left, right = st.columns([5, 1])
        left.progress(float(status.get("fraction") or 0.0), text=status.get("message", "Waiting…"))
        right.button("Stop", key="doctor_stop", icon=":material/stop_circle:", on_click=tasks.stop, args=(task_id,))
        return
    state.pop("task", None)
    if status.get("state") == "finished" and (saved := doctor.saved(state.get("task_root", ""))):
        state.update(root=state["task_root"], result=doctor.Audit.from_json(saved), shown={})
        fixes.update(exclude=set(), move={}, together=False)
    elif status.get("state") != "finished":
        common.lab().note("doctor_error", f"The audit {status.get('state')}: {status.get('message', '')}")
    st.rerun(scope="app")


st.button("Audit this data set", type="primary", icon=":material/health_and_safety:", key="doctor_go",
          on_click=start_audit, disabled=bool(state.get("task")))
if error := common.lab().take("doctor_error"):
    st.error(error)
if state.get("task"):
    audit_progress(state["task"])
result: doctor.Audit | None = state.get("result")
if result is None or state.get("root") != str(root):
    if last := doctor.saved(root):
        st.caption(f"Last audit of this folder: {len(last['findings'])} finding(s). Audit again to see them "
                   "with pictures and fix them.")
    st.caption("About a minute for 2,000 images on a 2-core laptop the first time; seconds afterwards "
               "(the embeddings are kept). It runs in its own process: you can use other pages meanwhile.")
    common.stop()

st.subheader("Verdict")
for line in result.verdicts:
    (st.success if line.startswith("No problems") else st.warning)(line, icon=":material/stethoscope:")

def image(rel: str) -> str:
    return str(Path(result.root) / rel)



def fix_buttons(col, row, key: str) -> None:
    """Exclude / move toggles under one image; a second click takes the choice back."""
    path = row["path"]
    excluded, moved = path in fixes["exclude"], fixes["move"].get(path)
    if col.button("Keep it" if excluded else "Exclude", key=f"x_{key}", icon=":material/block:", width="stretch"):
        fixes["exclude"].symmetric_difference_update({path})
        fixes["move"].pop(path, None)
        st.rerun()
    if row.get("suggested"):
        label = "Undo move" if moved else f"Move to {row['suggested']}"
        if col.button(label, key=f"m_{key}", icon=":material/drive_file_move:", width="stretch"):
            if moved:
                fixes["move"].pop(path)
            else:
                fixes["move"][path] = row["suggested"]
                fixes["exclude"].discard(path)
            st.rerun()


def chosen(path: str) -> str:
    if path in fixes["exclude"]:
        return " · :red[**left out**]"
    if path in fixes["move"]:
        return f" · :green[**→ {fixes['move'][path]}**]"
    return ""


def gallery(rows: pd.DataFrame, caption, key: str, per_row: int = 6) -> None:
    counts = state.setdefault("shown", {})
    shown = rows.head(counts.get(key, 24))
    for start in range(0, len(shown), per_row):
        for col, (i, row) in zip(st.columns(per_row), shown.iloc[start:start + per_row].iterrows()):
            col.image(common.thumbnail(image(row["path"]), 128), width="stretch")
            col.caption(caption(row) + chosen(row["path"]))
            fix_buttons(col, row, f"{key}_{i}")
    if len(rows) > len(shown):
        st.caption(f"{len(rows) - len(shown)} more.")
        if st.button("Show more", key=f"more_{key}"):
            counts[key] = len(shown) + 24
            st.rerun()


labels, props = result.of("label"), result.findings[result.findings["issue"].isin(
    ["outlier", "dark", "bright", "blurry", "tiny", "aspect"])]
dups = result.findings[result.findings["issue"].isin(["exact duplicate", "near duplicate"])]
tabs = st.tabs([f"Label errors ({len(labels)})", f"Duplicates ({len(result.groups)} groups)",
                f"Outliers and odd images ({props['path'].nunique()})", "Class balance", "Embedding map"])

with tabs[0]:
    if labels.empty:
        st.success("No image looks like it belongs to another class.")
    else:
        st.caption("Most suspicious first. *looks like* is the class the check predicts, with its confidence.")
        c1, c2 = st.columns(2)
        if c1.button(f"Move all {len(labels)} to the suggested class", key="move_all", icon=":material/done_all:"):
            fixes["move"].update(dict(zip(labels["path"], labels["suggested"])))
            fixes["exclude"].difference_update(labels["path"])
        if c2.button(f"Exclude all {len(labels)}", key="exclude_all", icon=":material/block:"):
            fixes["exclude"].update(labels["path"])
            for path in labels["path"]:
                fixes["move"].pop(path, None)
        gallery(labels, lambda r: f"{Path(r['path']).name}: labelled **{r['label']}**, looks like "
                                  f"**{r['suggested']}** ({r['score']:.0%})", "label")

with tabs[1]:
    if not result.groups:
        st.success("No copies or near-identical images.")
    else:
        crossing = [g for g in result.groups if len({result.split_of.get(p) for p in g}) > 1]
        st.caption(f"{len(crossing)} group(s) would be split across train, validation and test with the "
                   "current split: the model would be tested on pictures it trained on.")
        fixes["together"] = st.toggle("Keep each group in one split (in the fixed copy)", value=fixes["together"],
                                      key="together")
        for n, group in enumerate(result.groups[:30]):
            kinds = set(dups[dups["path"].isin(group)]["issue"])
            st.markdown(f"**Group {n + 1}** · {' and '.join(sorted(kinds))} · splits: "
                        + ", ".join(f"{Path(p).name} → {result.split_of.get(p, '?')}" for p in group))
            rows = pd.DataFrame([{"path": p, "suggested": ""} for p in group])
            gallery(rows, lambda r: r["path"], f"dup{n}", per_row=min(8, max(4, len(group))))   # wraps: a 600-copy group is rows of 8

with tabs[2]:
    if props.empty:
        st.success("No outliers, and no image much darker, brighter, blurrier or smaller than the rest.")
    else:
        for issue in ("outlier", "dark", "bright", "blurry", "tiny", "aspect"):
            found = props[props["issue"] == issue]
            if len(found):
                st.markdown(f"**{doctor.ISSUES[issue].capitalize()}** ({len(found)})")
                gallery(found, lambda r: f"{Path(r['path']).name} · {r['label']} · {r['detail']}", issue)

with tabs[3]:
    counts = pd.DataFrame({"class": list(result.counts), "images": list(result.counts.values())})
    st.altair_chart(alt.Chart(counts, title="Images per class").mark_bar().encode(
        x="images:Q", y=alt.Y("class:N", sort="-x"), tooltip=["class", "images"]), width="stretch")

with tabs[4]:
    from pages.common import maps
    flags = {p: i for p, i in zip(result.findings["path"], result.findings["issue"])}
    maps.dataset_map(result.root, result.items, result.classes, flags=flags)

# ---------------------------------------------------------------- the fixed copy
st.subheader("Fix")
n_ex, n_mv = len(fixes["exclude"]), len(fixes["move"])
groups = result.groups if fixes["together"] else []
st.markdown(f"Chosen: **{n_ex}** to leave out, **{n_mv}** to move, **{len(groups)}** group(s) to keep in one split.")
if st.button("Save a fixed copy and use it", type="primary", icon=":material/save:", key="write_fixed",
             disabled=not (n_ex or n_mv or groups)):
    try:        # a copy counts against the user's upload quota like an upload (hard links too)
        room = access.upload_allowance(common.user(), common.policy())
    except access.AccessError as err:
        st.error(str(err))
        common.stop()
    kept = [it.path for it in result.items if it.path not in fixes["exclude"]]
    needed = sum((Path(result.root) / p).stat().st_size for p in kept if (Path(result.root) / p).exists())
    if needed > room:
        st.error(f"The fixed copy needs {needed / 2**20:,.0f} MB; your allowance has {room / 2**20:,.0f} MB left. "
                 "Delete old uploads on the Data page first.")
        common.stop()
    base = access.uploads_dir(common.user())
    name = f"{Path(result.root).name}-fixed"
    dest = base / name
    n = 2
    while dest.exists():
        dest, n = base / f"{name}-{n}", n + 1
    with st.spinner("Writing the fixed copy (hard links where possible)…"):
        try:
            written = doctor.write_fixed_copy(result, dest, exclude=fixes["exclude"], move=fixes["move"],
                                              together=groups)
        except OSError as err:
            st.error(f"Could not write the copy: {err}")
            common.stop()
    settings["data_root"], settings["data_label"] = str(written), f"Fixed copy: {written.name}"
    state.clear()
    common.lab().note("doctor", f"Now using the fixed copy {written.name}. Train again and compare with the earlier run.")
    st.rerun()
common.link("train", "Next: train on it", ":material/arrow_forward:")

common.finish()
