"""Experiments: vary one or two settings of the current configuration, queue every combination,
and compare the runs in a results table and overlaid curves."""

import streamlit as st

from pages import show_loading

LOADING = show_loading()      # the imports below take seconds on a server's first visit; main() clears it

import altair as alt

from core.config import RunConfig
from core.data import feedback
from core.results.report import save_sweep_report
from core.serve.status import RunStatus, State
from core.serve.store import Run
from core.training import sweeps
from pages import common

NUMBER_LABELS = {"lr": "Learning rates", "max_per_class": "Images per class (0 = all)"}
LIST_LABELS = {"batch_size": "Batch sizes"}          # the other axes are named as in sweeps.AXES
CURVE_METRICS = ["val_acc", "val_loss", "train_acc", "train_loss"]
SHOWN_CURVES = 8                                      # runs overlaid until the user picks others
REPORT_NOTE = ("The results table, the curves and each run's metrics in one HTML file: opens "
               "offline in any browser and prints to PDF.")


def main() -> None:
    LOADING.empty()
    settings = common.setup("Experiments")
    st.title("Experiments")
    st.caption(base_caption(settings))
    sweep_panel(common.run_config(settings), pick_axes(settings["arch"]))
    st.divider()
    chosen, runs = pick_results()
    live = any(run.status().active for run in runs)
    st.fragment(run_every=2 if live else None)(show_results)(runs)     # ticks only while runs train
    compare_curves(runs, chosen)
    st.subheader("Report")
    common.report_button("sweep_report", f"sweep:{chosen}", lambda _progress: save_sweep_report(chosen, runs),
                         f"sweep-{chosen}-report.html", REPORT_NOTE, disabled=not runs)
    common.finish()


def base_caption(settings: dict) -> str:
    return (f"Base configuration: the current choices — data **{settings.get('data_label')}**, model "
            f"**`{settings['arch']}`** ({settings['freeze']}), {settings['optimizer']} lr {settings['lr']:g}, "
            f"{settings['epochs']} epochs. Change them on the Data, Model and Train pages.")


# ---------------------------------------------------------------- the sweep

def pick_axes(arch: str) -> dict[str, list]:
    """One or two settings to vary, with their values ({axis: values})."""
    c1, c2 = st.columns(2)
    with c1:
        axis1 = st.selectbox("Vary", list(sweeps.AXES), format_func=sweeps.AXES.get, key="axis1")
        values1 = axis_values(axis1, f"values1_{axis1}", arch)
    with c2:
        second = [a for a in sweeps.AXES if a != axis1]
        axis2 = st.selectbox("…and (optional)", [None] + second, key="axis2",
                             format_func=lambda a: "nothing else" if a is None else sweeps.AXES[a],
                             index=1 + second.index("optimizer") if axis1 == "lr" else 0)
        values2 = axis_values(axis2, f"values2_{axis2}", arch) if axis2 else []
    return {axis1: values1, **({axis2: values2} if axis2 else {})}


def axis_values(axis: str, key: str, arch: str) -> list:
    defaults = sweeps.axis_defaults(axis, arch)
    if axis in sweeps.NUMBER_AXES:
        text = st.text_input(NUMBER_LABELS[axis], ", ".join(map(str, defaults)), key=key)
        return numbers(text, sweeps.NUMBER_AXES[axis])
    return st.multiselect(LIST_LABELS.get(axis, sweeps.AXES[axis]), sweeps.axis_options(axis), defaults,
                          key=key, format_func=sweeps.value_label)


def numbers(text: str, cast) -> list:
    try:
        return sweeps.parse_numbers(text, cast)
    except ValueError:
        st.error(f"Not a list of numbers: {text}")
        return []


def sweep_panel(base: RunConfig, axes: dict[str, list]) -> None:
    """How many runs, what stops them, and the button that queues them."""
    count = sweeps.run_count(axes)
    st.metric("Runs in this sweep", count)
    problems = sweeps.problems(base, axes)
    for problem in problems:
        st.error(f"Can't queue this sweep: {problem}")
    st.button(f"▶️ Queue {count} runs", type="primary", on_click=queue_sweep, args=(base, axes), key="queue_sweep",
              disabled=count == 0 or bool(problems))
    if error := common.lab().take("sweep_error"):
        st.error(error)
    if note := common.lab().take("run_note"):
        st.info(note)
    st.caption("Runs train one after another in the background; you can leave this page.")
    common.command_line(base, axes)


def queue_sweep(base: RunConfig, axes: dict[str, list]) -> None:
    try:
        runs = common.queue_sweep(sweeps.expand(base, axes))
    except ValueError as err:      # the student's queue cap, a data folder they may not read
        common.lab().note("sweep_error", str(err))
        return
    sweep = runs[0].config.sweep
    common.lab().page["sweep_id"] = sweep
    common.set_widget("sweep_pick", sweep)           # the results below show the new sweep
    common.lab().current_run = runs[-1].id


# ---------------------------------------------------------------- the results

def pick_results() -> tuple[str, list[Run]]:
    """(a sweep id or "all", its runs)."""
    groups = sweeps.sweeps(common.my_runs())
    options = list(groups) + ["all"]
    if common.widget_value("sweep_pick") not in options:      # first visit, or that sweep was deleted
        remembered = common.lab().page.get("sweep_id")
        common.set_widget("sweep_pick", remembered if remembered in options else options[0])
    chosen = st.selectbox("Results of", options, key="sweep_pick",
                          format_func=lambda s: "all runs" if s == "all" else f"sweep {s} ({len(groups[s])} runs)")
    return chosen, common.my_runs() if chosen == "all" else groups.get(chosen, [])


def show_results(runs: list[Run]) -> None:
    """The results table (with its progress while runs train); one full rerun when the last ends."""
    statuses = [run.status() for run in runs]
    done = sum(not status.active for status in statuses)
    active = done < len(runs)
    if active:
        show_progress(runs, statuses, done)
    frame = sweeps.results(runs)
    if frame.empty:
        st.info("No runs yet.")
        return
    frame.insert(1, "data", [feedback.data_label(run) for run in runs])      # the pin: version or files
    if note := feedback.data_versions_note(runs):
        st.warning(note, icon=":material/difference:")
    show_table(frame)
    if common.lab().page.get("sweep_was_active") and not active:
        common.lab().page["sweep_was_active"] = False
        st.rerun(scope="app")
    common.lab().page["sweep_was_active"] = active


def show_progress(runs: list[Run], statuses: list[RunStatus], done: int) -> None:
    current = next((run for run, status in zip(runs, statuses)
                    if status.state in (State.RUNNING, State.PREPARING)), None)
    now = f" · now: {current.config.name or current.id} — {current.status().message}" if current else ""
    st.progress(done / max(len(runs), 1), text=f"{done} of {len(runs)} runs done" + now)


def show_table(frame) -> None:
    pct = dict(format="percent")
    st.dataframe(frame, hide_index=True, width="stretch", column_config={
        "best_val_acc": st.column_config.NumberColumn("best val acc", **pct),
        "test_acc": st.column_config.NumberColumn("test acc", **pct),
        "s_per_epoch": st.column_config.NumberColumn("s/epoch", format="%.2f"),
        "lr": st.column_config.NumberColumn("lr", format="%.0e"),
        "data": st.column_config.TextColumn("data", help="The data set version the run trained on (from its "
                                            "pin), or the first digits of its files' hash for a folder that "
                                            "is not a stored version")})
    st.download_button("Results (CSV)", common.csv_text(frame).encode(), "results.csv", "text/csv",
                       key="results_csv")


def compare_curves(runs: list[Run], chosen: str) -> None:
    st.subheader("Compare curves")
    names = {run.id: run.config.name or run.id for run in runs}
    picked = st.multiselect("Runs", list(names), list(names)[:SHOWN_CURVES], format_func=names.get,
                            key=f"overlay_runs_{chosen}_{len(names)}")     # fresh defaults per sweep
    metric = st.selectbox("Metric", CURVE_METRICS, key="overlay_metric")
    frame = sweeps.curves(runs, picked)
    if not frame.empty:
        st.altair_chart(alt.Chart(frame).mark_line(point=True).encode(
            x=alt.X("epoch:Q", axis=alt.Axis(tickMinStep=1, format="d")), y=alt.Y(f"{metric}:Q", title=metric),
            color=alt.Color("run:N", title=None), tooltip=["run", "epoch", metric]), width="stretch")


main()
