"""Train page panels for fast fine-tuning: time budget and plan, caches, precision, the
learning-rate test. They read widgets and call core; nothing is computed here."""
from __future__ import annotations

import altair as alt
import pandas as pd
import streamlit as st

from core.training import choose
from core import config
from core.training import budget
from core.config import RunConfig
from core.serve.status import State
from pages import common


@st.cache_data(show_spinner="Measuring this model on a few of your images to plan…", max_entries=16, ttl=600)
def _preview(config: dict) -> dict:
    out = budget.preview(RunConfig.from_dict(config))
    out["phases"] = budget.describe_plan(out["phases"])
    out["counts"] = vars(out["counts"])
    return out


PREVIEW_FIELDS = ("data_root", "split", "split_seed", "max_per_class", "arch", "weights", "weights_file",
                  "freeze", "top_k", "head", "hidden", "dropout", "image_size", "augment", "aug_views",
                  "time_budget_s", "cache_features", "device")


def speed_panel(settings: dict) -> None:
    """Time budget, augmented views to cache, and what the run will cache and plan."""
    st.markdown(":material/bolt: **Speed on this machine**")
    c = st.columns([1, 1, 2])
    common.init_widget("w_budget_min", settings.get("time_budget_s", 0) / 60)
    minutes = c[0].number_input("Train for (minutes, 0 = no limit)", *config.BUDGET_MINUTES, step=1.0,
                                key="w_budget_min",
                                help="The app measures this model on your images, then plans: the head "
                                     "on cached features first, then as deep a fine-tune as fits, at a "
                                     "learning rate suited to its depth. The best checkpoint is kept.")
    settings["time_budget_s"] = config.budget_seconds(minutes)
    common.bind(c[1].number_input, "aug_views", "Augmented views to cache", settings, **common.limits("aug_views"),
                help="With augmentation on, the frozen layers normally run on every image every epoch. "
                     "Instead, compute K augmented versions of each training image once, and each epoch "
                     "train on one of them: augmentation and speed together. 0 = augment live.")
    cfg = RunConfig.from_dict(settings).to_dict()
    try:     # only what changes the cache or the plan: typing a learning rate must not re-measure
        preview = _preview({k: cfg[k] for k in PREVIEW_FIELDS})
    except Exception as err:  # noqa: BLE001 - e.g. no data set yet: the panel just says so
        c[2].caption(f"Can't preview the cache or plan yet: {err}")
        return
    c[2].caption(preview["cache"])
    if not settings["time_budget_s"]:
        c[2].caption("For the most accuracy in a few minutes on a laptop, load the preset *Best accuracy "
                     "in 5 minutes* (*Presets* above), or set *Train for*.")
    if settings["time_budget_s"] and settings["freeze"] == "scratch":
        st.caption("From scratch, the budget only stops training in time: nothing pretrained to plan around.")
    elif settings["time_budget_s"]:
        st.caption("With a time budget the plan chooses how deep to fine-tune and the learning rate of "
                   "each phase; the freeze setting on the Model page and the learning rate here are not used.")
    if preview["phases"]:
        st.markdown(f"**Plan for {settings['time_budget_s'] / 60:g} minutes** (measured now; the run "
                    "measures again when it starts)")
        st.table(_plan_frame(preview["phases"]))
        st.caption(" ".join(preview["notes"]))


def _plan_frame(rows: list[dict]) -> pd.DataFrame:
    """The plan as a small plain table (readable on a projector): learning rates as 1e-4."""
    frame = pd.DataFrame(rows).rename(columns={"lr": "learning rate", "estimate": "time (estimate)"})
    frame["learning rate"] = [f"{v:.1e}" if v else "config" for v in frame["learning rate"]]
    return frame.set_index("phase")


def lr_panel(settings: dict) -> None:
    """The learning-rate range test: a chart and a suggestion, applied only on a click."""
    cfg = RunConfig.from_dict(settings)
    key = (cfg.data_root, cfg.arch, cfg.freeze, cfg.top_k, cfg.image_size, cfg.optimizer, cfg.weights)
    st.button("Suggest a learning rate", icon=":material/show_chart:", key="lr_test_go",
              on_click=_start_lr_test, args=(cfg, key), disabled=bool(common.lab().page.get("lr_task")),
              help="Trains a copy of the model for a few dozen small steps while the learning rate "
                   "grows from 1e-6 to 1, and watches the loss. Runs in its own process.")
    if task := common.lab().page.get("lr_task"):
        _lr_progress(task)
    found = common.lab().page.get("lr_test")
    if not found or found[0] != key:
        st.caption("Different freeze depths need different rates: run the test after choosing the depth.")
        return
    result = found[1]
    if "error" in result:
        st.error(f"The learning-rate test failed: {result['error']}")
        return
    frame = pd.DataFrame({"learning rate": result["lrs"], "loss (smoothed)": result["losses"]})
    chart = alt.Chart(frame).mark_line().encode(
        x=alt.X("learning rate:Q", scale=alt.Scale(type="log"), axis=alt.Axis(format=".0e")),
        y=alt.Y("loss (smoothed):Q", scale=alt.Scale(zero=False)))
    if result["suggestion"]:
        chart += alt.Chart(pd.DataFrame({"learning rate": [result["suggestion"]]})).mark_rule(
            color="#d62728", strokeDash=[4, 4]).encode(x="learning rate:Q")
    st.altair_chart(chart.properties(height=200, title=f"Loss while training {result['trains']}"),
                    width="stretch")
    st.caption(result["sentence"])
    if result["suggestion"]:
        st.button(f"Use {result['suggestion']:g}", key="lr_use", on_click=_use_lr,
                  args=(settings, result["suggestion"]))


def _start_lr_test(cfg: RunConfig, key: tuple) -> None:
    """The range test is a task in a worker process (core.serve.tasks), not work for this page's thread."""
    from core.serve import access
    who = common.user()
    problem = access.run_data_problem(who, cfg.data_root, common.policy())
    try:
        if problem:
            raise ValueError(problem)
        task = common.MANAGER.submit_task("lr", {"config": cfg.to_dict()}, owner=who.id, admin=who.admin)
    except ValueError as err:
        common.lab().page["lr_test"] = (key, dict(error=str(err)))
        return
    common.lab().page["lr_task"] = (task.id, key)


@st.fragment(run_every=1)
def _lr_progress(task_and_key: tuple) -> None:
    from core.serve import tasks
    task_id, key = task_and_key
    try:
        task = tasks.get_task(task_id)
    except FileNotFoundError:
        common.lab().page.pop("lr_task", None)
        return
    status = task.status()
    if status.active:
        st.progress(float(status.fraction or 0.0), text=status.message or "Waiting…")
        st.button("Stop", key="lr_stop", icon=":material/stop_circle:", on_click=tasks.stop, args=(task_id,))
        return
    common.lab().page.pop("lr_task", None)
    result = task.read_json("result.json") if status.state == State.FINISHED else None
    common.lab().page["lr_test"] = (key, result or dict(error=status.message or str(status.state)))
    st.rerun(scope="app")


def _use_lr(settings: dict, lr: float) -> None:
    settings["lr"] = lr
    common.set_widget("w_lr", lr)


def run_speed_info(run) -> None:
    """What a run used: its plan, caches and precision (from the run folder)."""
    status = run.status()
    parts = []
    if status.precision:
        parts.append("precision " + ", ".join(f"{k}: {v}" for k, v in status.precision.items()))
    if status.cache:
        cache = status.cache
        parts.append(f"cached {cache['what']} ({cache['views']} view(s), {cache['mb']:g} MB in {cache['where']})")
    elif status.get("feature_cache"):
        parts.append("backbone features cached")
    if status.get("cache_off"):
        parts.append(f"no cache: {status['cache_off']}")
    if parts:
        st.caption(" · ".join(parts))
    probe_table(run.read_json("probe.json"))
    plan = run.read_json("plan.json")
    if plan:
        with st.expander(f":material/timer: Plan for a {plan['budget_s'] / 60:g}-minute budget", expanded=False):
            st.table(_plan_frame(budget.describe_plan(budget.phases_from(plan["phases"]))))
            st.caption(" ".join(plan.get("notes", [])))


def probe_table(probed: dict | None) -> None:
    """The backbones and sizes the budget probed, and why it chose the one that trained."""
    if not probed or not probed.get("probes"):
        return
    chosen = probed.get("chosen") or {}
    with st.expander(":material/science: Backbones probed on your data", expanded=False):
        st.dataframe(pd.DataFrame([choose.table_row(p, chosen) for p in probed["probes"]]),
                     hide_index=True, width="stretch")
        st.caption(" ".join(probed.get("notes", [])))
