"""Widgets bound to the draft settings, and the charts and tables several pages draw."""
from __future__ import annotations

import altair as alt
import pandas as pd
import streamlit as st

from core.config import RANGES


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
