"""Evaluate: accuracy and confusion matrix of a run's best checkpoint."""
import altair as alt
import pandas as pd
import streamlit as st

from core.evaluate import evaluate_run
from pages import common

common.setup("Evaluate")
st.title("📊 Evaluate")

run = common.pick_run("Run", only_with_checkpoint=True, key="eval_run_pick")
if run is None:
    st.info("No trained run yet: train one on the Train page (a run keeps its best epoch).")
    st.page_link(common.PAGES["train"], label="Go to Train", icon="🏋️")
    st.stop()

split = st.radio("Split", ["test", "val"], horizontal=True, key="eval_split",
                 format_func={"test": "Test", "val": "Validation"}.get)
metrics = run.read_json(f"{split}_metrics.json")
if metrics is None:
    st.info(f"This run has no {split} evaluation yet.")
    if st.button(f"Evaluate on the {split} split", type="primary"):
        bar = st.progress(0.0, text="Decoding images…")
        try:
            metrics = evaluate_run(run, split, progress=lambda d, t: bar.progress(d / t, text=f"Decoding images {d}/{t}"))
        except (ValueError, FileNotFoundError) as err:
            st.error(str(err))
            st.stop()
        bar.empty()
    else:
        st.stop()

classes = metrics["classes"]
c1, c2, c3 = st.columns(3)
c1.metric(f"{split.title()} accuracy", f"{metrics['accuracy']:.1%}")
c2.metric("Images", metrics["n"])
c3.metric("Classes", len(classes))

normalise = st.toggle("Row-normalised (share of each true class)", key="cm_norm")
matrix = pd.DataFrame(metrics["confusion"], index=classes, columns=classes)
long = matrix.rename_axis("true").reset_index().melt("true", var_name="predicted", value_name="count")
long["share"] = long["count"] / long.groupby("true")["count"].transform("sum").clip(lower=1)
value = "share" if normalise else "count"
base = alt.Chart(long, title="Confusion matrix (rows: true class)").encode(
    x=alt.X("predicted:N", sort=classes, title="predicted"),
    y=alt.Y("true:N", sort=classes, title="true"))
heat = base.mark_rect().encode(color=alt.Color(f"{value}:Q", scale=alt.Scale(scheme="blues")),
                               tooltip=["true", "predicted", "count", alt.Tooltip("share:Q", format=".1%")])
text = base.mark_text(fontSize=11).encode(
    text=alt.Text(f"{value}:Q", format=".0%" if normalise else "d"),
    color=alt.condition(alt.datum[value] > long[value].max() / 2, alt.value("white"), alt.value("black")))
st.altair_chart(heat + text, width="stretch", height=max(300, 34 * len(classes)) + 120)

epochs = run.epochs()
if epochs:
    st.subheader("Training curves")
    common.show_curves(epochs)
    st.dataframe(common.epochs_table(epochs), hide_index=True, width="stretch",
                 column_config=common.epochs_column_config())
with st.expander("Run configuration"):
    st.json(run.read_json("config.json", {}))
    st.caption(f"Stored in `{run.path}`")
