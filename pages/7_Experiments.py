"""Experiments: vary one or two settings of the current configuration, queue every combination,
and compare the runs in a results table and overlaid curves."""

import streamlit as st

from pages import show_loading

loading = show_loading()      # the imports below take seconds on a server's first visit

import altair as alt
import pandas as pd

from core.models import backbones
from core.train import sweeps
from core.data.transforms import PRESETS
from core.results.report import save_sweep_report
from core.config import CHOICES, FREEZE_MODES, setting_problems
from core.serve.store import ACTIVE_STATES
from pages import common

loading.empty()

settings = common.setup("Experiments")
st.title("Experiments")
st.caption(f"Base configuration: the current choices — data **{settings.get('data_label')}**, model "
           f"**`{settings['arch']}`** ({settings['freeze']}), {settings['optimizer']} lr {settings['lr']:g}, "
           f"{settings['epochs']} epochs. Change them on the Data, Model and Train pages.")


def numbers(text: str, cast):
    try:
        return [cast(v) for v in text.replace(";", ",").split(",") if v.strip()]
    except ValueError:
        st.error(f"Not a list of numbers: {text}")
        return []


def axis_values(axis: str, key: str) -> list:
    if axis == "lr":
        return numbers(st.text_input("Learning rates", "0.01, 0.001, 0.0001", key=key), float)
    if axis == "batch_size":
        return st.multiselect("Batch sizes", [8, 16, 32, 64, 128], [16, 32], key=key)
    if axis == "max_per_class":
        return numbers(st.text_input("Images per class (0 = all)", "5, 20, 0", key=key), int)
    options = {"optimizer": list(CHOICES["optimizer"]),
               "freeze": list(FREEZE_MODES), "augment": list(PRESETS),
               "init": ["pretrained", "random"],
               "model": list(backbones.CATALOG) + list(sweeps.BASELINES)}[axis]
    defaults = {"optimizer": ["sgd", "adam"], "freeze": ["head", "full"], "augment": ["none", "photos"],
                "init": ["pretrained", "random"], "model": [settings["arch"], "logreg"]}[axis]
    labels = {**FREEZE_MODES, **sweeps.BASELINES}
    return st.multiselect(sweeps.AXES[axis], options, [d for d in defaults if d in options], key=key,
                          format_func=lambda v: labels.get(v, v))


c1, c2 = st.columns(2)
with c1:
    axis1 = st.selectbox("Vary", list(sweeps.AXES), format_func=sweeps.AXES.get, key="axis1")
    values1 = axis_values(axis1, f"values1_{axis1}")
with c2:
    second = [a for a in sweeps.AXES if a != axis1]
    axis2 = st.selectbox("…and (optional)", [None] + second, key="axis2",
                         format_func=lambda a: "nothing else" if a is None else sweeps.AXES[a],
                         index=1 + second.index("optimizer") if axis1 == "lr" else 0)
    values2 = axis_values(axis2, f"values2_{axis2}") if axis2 else []

axes = {axis1: values1, **({axis2: values2} if axis2 else {})}
count = 1
for values in axes.values():
    count *= len(values)
st.metric("Runs in this sweep", count)
problems = sorted({problem for cfg in (sweeps.expand(common.run_config(settings), axes) if count else [])
                   for problem in setting_problems(cfg.to_dict())})
for problem in problems:
    st.error(f"Can't queue this sweep: {problem}")


def queue_sweep():
    try:
        runs = common.queue_sweep(sweeps.expand(common.run_config(settings), axes))
    except ValueError as err:      # the student's queue cap, a data folder they may not read
        common.lab().note("sweep_error", str(err))
        return
    common.lab().page["sweep_id"] = st.session_state["sweep_pick"] = runs[0].config.sweep
    common.lab().current_run = runs[-1].id


st.button(f"▶️ Queue {count} runs", type="primary", on_click=queue_sweep, key="queue_sweep",
          disabled=count == 0 or bool(problems))
if error := common.lab().take("sweep_error"):
    st.error(error)
if note := common.lab().take("run_note"):
    st.info(note)
st.caption("Runs train one after another in the background; you can leave this page.")
common.command_line(common.run_config(settings), axes)

st.divider()
groups = sweeps.sweeps(common.my_runs())
options = list(groups) + ["all"]
default = common.lab().page.get("sweep_id")
if st.session_state.get("sweep_pick") not in options:
    st.session_state["sweep_pick"] = default if default in options else options[0]
chosen = st.selectbox("Results of", options, key="sweep_pick",
                      format_func=lambda s: "all runs" if s == "all" else f"sweep {s} ({len(groups[s])} runs)")
runs = common.my_runs() if chosen == "all" else groups.get(chosen, [])


@st.fragment(run_every=2 if any(r.status().get("state") in ACTIVE_STATES for r in runs) else None)
def results(runs):
    states = [r.status().get("state") for r in runs]
    done = sum(s not in ACTIVE_STATES for s in states)
    active = done < len(runs)
    if active:
        current = next((r for r, s in zip(runs, states) if s in ("running", "preparing")), None)
        st.progress(done / max(len(runs), 1), text=f"{done} of {len(runs)} runs done"
                    + (f" · now: {current.config.name or current.id} — {current.status().get('message', '')}"
                       if current else ""))
    frame = sweeps.results(runs)
    if frame.empty:
        st.info("No runs yet.")
        return
    pct = dict(format="percent")
    st.dataframe(frame, hide_index=True, width="stretch", column_config={
        "best_val_acc": st.column_config.NumberColumn("best val acc", **pct),
        "test_acc": st.column_config.NumberColumn("test acc", **pct),
        "s_per_epoch": st.column_config.NumberColumn("s/epoch", format="%.2f"),
        "lr": st.column_config.NumberColumn("lr", format="%.0e")})
    st.download_button("Results (CSV)", common.csv_text(frame).encode(), "results.csv", "text/csv",
                       key="results_csv")
    if common.lab().page.get("sweep_was_active") and not active:
        common.lab().page["sweep_was_active"] = False
        st.rerun(scope="app")
    common.lab().page["sweep_was_active"] = active


results(runs)

st.subheader("Compare curves")
names = {r.id: r.config.name or r.id for r in runs}
picked = st.multiselect("Runs", list(names), list(names)[:8], format_func=names.get,
                        key=f"overlay_runs_{chosen}_{len(names)}")     # fresh defaults per sweep
metric = st.selectbox("Metric", ["val_acc", "val_loss", "train_acc", "train_loss"], key="overlay_metric")
rows = [dict(e, run=names[r.id]) for r in runs if r.id in picked for e in r.epochs()]
if rows:
    frame = pd.DataFrame(rows)
    st.altair_chart(alt.Chart(frame).mark_line(point=True).encode(
        x=alt.X("epoch:Q", axis=alt.Axis(tickMinStep=1, format="d")), y=alt.Y(f"{metric}:Q", title=metric),
        color=alt.Color("run:N", title=None), tooltip=["run", "epoch", metric]), width="stretch")

st.subheader("Report")
common.report_button("sweep_report", f"sweep:{chosen}", lambda _progress: save_sweep_report(chosen, runs),
                     f"sweep-{chosen}-report.html",
                     "The results table, the curves and each run's metrics in one HTML file: opens "
                     "offline in any browser and prints to PDF.", disabled=not runs)

common.finish()
