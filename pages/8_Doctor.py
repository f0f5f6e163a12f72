"""Dataset doctor: likely label errors, duplicates, outliers and odd images in the current data
set, each with a one-click fix that goes into the data set's next version (core.data.versions;
the user's files are never changed)."""
import streamlit as st

from pages import show_loading

LOADING = show_loading()      # the imports below take seconds on a server's first visit

from pathlib import Path

import altair as alt
import pandas as pd

from core import paths
from core.data import feedback
from core.serve import access
from core.trust import doctor
from pages import common
from pages.common.teaching import explain

SHOWN = 24           # images a gallery shows at first, and more per "Show more"


def main() -> None:
    LOADING.empty()
    settings = common.setup("Doctor")
    intro()
    root = paths.data_root_path(settings["data_root"])
    data_set(settings, root)
    state = common.lab().page.setdefault("doctor", {})
    state.setdefault("fixes", doctor.Fixes())
    audit_controls(root, state)
    result: doctor.Audit | None = state.get("result")
    if result is None or state.get("root") != str(root):
        no_audit_yet(root)
        common.stop()
    findings(result, state)
    fix_section(settings, result, state)
    common.link("train", "Next: train on it", ":material/arrow_forward:")
    common.finish()


def intro() -> None:
    st.title("Dataset doctor")
    st.caption("One check of the current data set, from what the pretrained backbone sees in each image: "
               "labels that look wrong, copies, images unlike the rest. Fixes make the data set's next "
               "version; your own files are never changed.")
    explain("doctor")
    if message := common.lab().take("doctor"):
        st.success(message, icon=":material/check_circle:")


def data_set(settings: dict, root: Path) -> None:
    """Which data set is checked; stops where this user may not read it."""
    if problem := access.run_data_problem(common.user(), str(root), common.policy()):
        st.error(f"{problem} Pick another data set on the Data page.")
        common.stop()
    st.markdown(f"Data set: **{settings.get('data_label') or root.name}**")
    if fixed := feedback.doctors_version(root):
        st.info(f"This is version {fixed.ref}: {fixed.note}.", icon=":material/history:")
    elif origin := doctor.fixed_from(root):
        st.info(f"This is a fixed copy: {len(origin['excluded'])} image(s) left out and {len(origin['moved'])} "
                f"moved to another class; {origin['kept_together']} group(s) kept in one split.")


def start_audit(root: Path, state: dict) -> None:
    """The audit runs as a task in a worker process (core.serve.tasks), never in this page's thread."""
    who = common.user()
    try:
        task = common.MANAGER.submit_task("doctor", {"folder": str(root)}, owner=who.id, admin=who.admin)
    except ValueError as err:
        common.lab().note("doctor_error", str(err))
        return
    state.update(task=task.id, task_root=str(root))


def audit_controls(root: Path, state: dict) -> None:
    st.button("Audit this data set", type="primary", icon=":material/health_and_safety:", key="doctor_go",
              on_click=start_audit, args=(root, state), disabled=bool(state.get("task")))
    if error := common.lab().take("doctor_error"):
        st.error(error)
    if state.get("task"):
        audit_progress(state["task"], state)


@st.fragment(run_every=1)
def audit_progress(task_id: str, state: dict) -> None:
    from core.serve import tasks
    try:
        task = tasks.get_task(task_id)
    except FileNotFoundError:
        state.pop("task", None)
        return
    status = task.status()
    if status.active:
        left, right = st.columns([5, 1])
        left.progress(float(status.fraction or 0.0), text=status.message or "Waiting…")
        right.button("Stop", key="doctor_stop", icon=":material/stop_circle:", on_click=tasks.stop, args=(task_id,))
        return
    state.pop("task", None)
    if status.state == "finished" and (saved := doctor.saved(state.get("task_root", ""))):
        state.update(root=state["task_root"], result=doctor.Audit.from_json(saved), shown={},
                     fixes=doctor.Fixes())
    elif status.state != "finished":
        common.lab().note("doctor_error", f"The audit {status.state}: {status.message}")
    st.rerun(scope="app")


def no_audit_yet(root: Path) -> None:
    if last := doctor.saved(root):
        st.caption(f"Last audit of this folder: {len(last['findings'])} finding(s). Audit again to see them "
                   "with pictures and fix them.")
    st.caption("About a minute for 2,000 images on a 2-core laptop the first time; seconds afterwards "
               "(the embeddings are kept). It runs in its own process: you can use other pages meanwhile.")


# ---------------------------------------------------------------- the findings

def findings(result: doctor.Audit, state: dict) -> None:
    st.subheader("Verdict")
    for line in result.verdicts:
        (st.success if line.startswith("No problems") else st.warning)(line, icon=":material/stethoscope:")
    labels, odd = result.of("label"), doctor.findings_of(result, doctor.PROPERTY_ISSUES)
    tabs = st.tabs([f"Label errors ({len(labels)})", f"Duplicates ({len(result.groups)} groups)",
                    f"Outliers and odd images ({odd['path'].nunique()})", "Class balance", "Embedding map"])
    with tabs[0]:
        label_errors(result, labels, state)
    with tabs[1]:
        duplicates(result, state)
    with tabs[2]:
        odd_images(result, odd, state)
    with tabs[3]:
        class_balance(result.counts)
    with tabs[4]:
        from pages.common import maps
        flags = {p: i for p, i in zip(result.findings["path"], result.findings["issue"])}
        maps.dataset_map(result.root, result.items, result.classes, flags=flags)


def label_errors(result: doctor.Audit, labels: pd.DataFrame, state: dict) -> None:
    if labels.empty:
        st.success("No image looks like it belongs to another class.")
        return
    fixes: doctor.Fixes = state["fixes"]
    st.caption("Most suspicious first. *looks like* is the class the check predicts, with its confidence.")
    c1, c2 = st.columns(2)
    if c1.button(f"Move all {len(labels)} to the suggested class", key="move_all", icon=":material/done_all:"):
        fixes.move_all(dict(zip(labels["path"], labels["suggested"])))
    if c2.button(f"Exclude all {len(labels)}", key="exclude_all", icon=":material/block:"):
        fixes.exclude_all(labels["path"])
    gallery(labels, lambda r: f"{Path(r['path']).name}: labelled **{r['label']}**, looks like "
                              f"**{r['suggested']}** ({r['score']:.0%})", "label", result.root, state)


def duplicates(result: doctor.Audit, state: dict) -> None:
    if not result.groups:
        st.success("No copies or near-identical images.")
        return
    fixes: doctor.Fixes = state["fixes"]
    st.caption(f"{len(doctor.crossing_groups(result))} group(s) would be split across train, validation and "
               "test with the current split: the model would be tested on pictures it trained on.")
    fixes.together = st.toggle("Keep each group in one split (in the new version)", value=fixes.together,
                               key="together")
    for n, group in enumerate(result.groups[:30]):
        st.markdown(f"**Group {n + 1}** · {' and '.join(sorted(doctor.group_kinds(result, group)))} · splits: "
                    + ", ".join(f"{Path(p).name} → {result.split_of.get(p, '?')}" for p in group))
        rows = pd.DataFrame([{"path": p, "suggested": ""} for p in group])
        gallery(rows, lambda r: r["path"], f"dup{n}", result.root, state,
                per_row=min(8, max(4, len(group))))       # wraps: a 600-copy group is rows of 8


def odd_images(result: doctor.Audit, odd: pd.DataFrame, state: dict) -> None:
    if odd.empty:
        st.success("No outliers, and no image much darker, brighter, blurrier or smaller than the rest.")
        return
    for issue in doctor.PROPERTY_ISSUES:
        found = odd[odd["issue"] == issue]
        if len(found):
            st.markdown(f"**{doctor.ISSUES[issue].capitalize()}** ({len(found)})")
            gallery(found, lambda r: f"{Path(r['path']).name} · {r['label']} · {r['detail']}", issue,
                    result.root, state)


def class_balance(counts: dict[str, int]) -> None:
    frame = pd.DataFrame({"class": list(counts), "images": list(counts.values())})
    st.altair_chart(alt.Chart(frame, title="Images per class").mark_bar().encode(
        x="images:Q", y=alt.Y("class:N", sort="-x"), tooltip=["class", "images"]), width="stretch")


def gallery(rows: pd.DataFrame, caption, key: str, root: str, state: dict, per_row: int = 6) -> None:
    """Thumbnails with their fix buttons, SHOWN at first and more on request."""
    counts, fixes = state.setdefault("shown", {}), state["fixes"]
    shown = rows.head(counts.get(key, SHOWN))
    for start in range(0, len(shown), per_row):
        for col, (i, row) in zip(st.columns(per_row), shown.iloc[start:start + per_row].iterrows()):
            col.image(common.thumbnail(str(Path(root) / row["path"]), 128), width="stretch")
            col.caption(caption(row) + chosen(row["path"], fixes))
            fix_buttons(col, row, f"{key}_{i}", fixes)
    if len(rows) > len(shown):
        st.caption(f"{len(rows) - len(shown)} more.")
        if st.button("Show more", key=f"more_{key}"):
            counts[key] = len(shown) + SHOWN
            st.rerun()


def fix_buttons(col, row, key: str, fixes: doctor.Fixes) -> None:
    """Exclude / move toggles under one image; a second click takes the choice back."""
    path = row["path"]
    if col.button("Keep it" if path in fixes.exclude else "Exclude", key=f"x_{key}", icon=":material/block:",
                  width="stretch"):
        fixes.toggle_exclude(path)
        st.rerun()
    if row.get("suggested"):
        label = "Undo move" if path in fixes.move else f"Move to {row['suggested']}"
        if col.button(label, key=f"m_{key}", icon=":material/drive_file_move:", width="stretch"):
            fixes.toggle_move(path, row["suggested"])
            st.rerun()


def chosen(path: str, fixes: doctor.Fixes) -> str:
    """What the new version will do with this image, for its caption."""
    if path in fixes.exclude:
        return " · :red[**left out**]"
    if path in fixes.move:
        return f" · :green[**→ {fixes.move[path]}**]"
    return ""


# ---------------------------------------------------------------- the fixes, as a new version

def fix_section(settings: dict, result: doctor.Audit, state: dict) -> None:
    fixes: doctor.Fixes = state["fixes"]
    st.subheader("Fix")
    st.markdown(f"Chosen: **{len(fixes.exclude)}** to leave out, **{len(fixes.move)}** to move, "
                f"**{len(fixes.groups(result))}** group(s) to keep in one split.")
    if st.button("Save the fixes as a new version and use it", type="primary", icon=":material/save:",
                 key="write_fixed", disabled=not fixes.any(result)):
        new, first = save_fixes(result, fixes)
        settings["data_root"], settings["data_label"] = str(new.folder), f"Data set {new.ref}, fixed by the Doctor"
        state.clear()
        stored = f" (the audited folder was stored first, as {first.ref})" if first else ""
        common.lab().note("doctor", f"Now using the fixed version {new.ref}{stored}: {new.note}. Train again "
                                    "and compare with the earlier run on the Experiments page.")
        st.rerun()


def save_fixes(result: doctor.Audit, fixes: doctor.Fixes):
    """The data set's next version with the fixes (stored within the user's quota; hard links,
    so unchanged images cost nothing); stops the page with the reason where it can't."""
    with st.spinner("Storing the new version…"):
        try:
            return feedback.fix_as_version(result.root, common.user(), common.policy(), exclude=sorted(fixes.exclude),
                                           move=fixes.move, together=fixes.groups(result))
        except (ValueError, OSError) as err:      # FeedbackError, AccessError (quota), VersionError
            st.error(str(err))
            common.stop()


main()
