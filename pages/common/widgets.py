"""Widgets bound to the draft settings, and the charts and tables several pages draw."""
from __future__ import annotations

import altair as alt
import pandas as pd
import streamlit as st

from core.config import RANGES


def limits(field: str) -> dict:
    """min_value/max_value of a number widget, from the ranges runs and presets are held to."""
    low, high = RANGES[field]
    return dict(min_value=low, max_value=high)


@st.cache_data(max_entries=4096, show_spinner=False)
def thumbnail(path: str, size: int = 96):
    """A square tile (centre crop), so grids line up; a file gone or broken is a grey tile."""
    from PIL import Image, ImageOps

    from core.data.images import open_rgb
    try:
        return ImageOps.fit(open_rgb(path, size), (size, size))
    except Exception:  # noqa: BLE001 - any unreadable file becomes the grey tile
        return Image.new("RGB", (size, size), (200, 200, 200))


def image_grid(images: list, captions: list[str], per_row: int) -> None:
    """Images in full rows of `per_row` equal columns, each with its whole caption under it
    (markdown: a page may put the predicted class in bold)."""
    for start in range(0, len(images), per_row):
        for col, image, caption in zip(st.columns(per_row), images[start:start + per_row],
                                       captions[start:start + per_row]):
            col.image(image, width="stretch")
            col.caption(caption)


# ---------------------------------------------------------------- runs

TRAIN_COLOUR, VAL_COLOUR = "#1f77b4", "#e6550d"     # blue and orange: apart on a projector too


def show_curves(epochs: list[dict]) -> None:
    """Loss and accuracy per epoch, train (blue) vs validation (orange), side by side; a dashed
    line where a new training phase (e.g. unfreezing) began, a star on the best epoch."""
    frame = pd.DataFrame(epochs)
    starts = []
    if "phase" in frame:
        changed = frame["phase"].ne(frame["phase"].shift()) & frame.index.to_series().gt(0)
        starts = (frame.loc[changed, "epoch"] - 0.5).tolist()
    best = best_epoch(frame)
    colour = alt.Color("series:N", title=None, scale=alt.Scale(domain=["train", "validation"],
                                                               range=[TRAIN_COLOUR, VAL_COLOUR]))
    for col, (metric, title) in zip(st.columns(2), (("loss", "Loss"), ("acc", "Accuracy"))):
        long = frame.melt("epoch", [f"train_{metric}", f"val_{metric}"], "series", "value")
        long["series"] = long["series"].map({f"train_{metric}": "train", f"val_{metric}": "validation"})
        chart = alt.Chart(long, title=title).mark_line(point=True, strokeWidth=3).encode(
            x=alt.X("epoch:Q", axis=alt.Axis(tickMinStep=1, format="d")), y=alt.Y("value:Q", title=title),
            color=colour, tooltip=["epoch", "series", alt.Tooltip("value:Q", format=".3f")])
        if best is not None:
            chart += alt.Chart(long[(long["epoch"] == best) & (long["series"] == "validation")]).mark_point(
                shape="diamond", size=220, filled=True, color=VAL_COLOUR).encode(x="epoch:Q", y="value:Q")
        if starts:
            chart += alt.Chart(pd.DataFrame({"epoch": starts})).mark_rule(strokeDash=[4, 4]).encode(x="epoch:Q")
        col.altair_chart(chart.properties(height=340), width="stretch")


def best_epoch(frame: pd.DataFrame):
    """The epoch whose checkpoint was kept: the last one marked best (each new best is marked)."""
    if "best" not in frame or not frame["best"].any():
        return None
    return int(frame.loc[frame["best"].astype(bool), "epoch"].iloc[-1])


def epochs_table(epochs: list[dict]) -> pd.DataFrame:
    """One row per epoch; "kept" ticks only the epoch whose checkpoint was kept."""
    frame = pd.DataFrame(epochs)
    if "best" in frame:
        frame["best"] = frame["epoch"] == best_epoch(frame)
    cols = ["epoch", "lr", "train_loss", "train_acc", "val_loss", "val_acc", "seconds", "best"]
    return frame[[c for c in cols if c in frame]]


def epochs_column_config():
    pct = dict(format="percent")
    return {"epoch": st.column_config.NumberColumn("epoch"),
            "lr": st.column_config.NumberColumn("learning rate", format="%.1e"),
            "train_loss": st.column_config.NumberColumn("train loss", format="%.3f"),
            "train_acc": st.column_config.NumberColumn("train accuracy", **pct),
            "val_loss": st.column_config.NumberColumn("validation loss", format="%.3f"),
            "val_acc": st.column_config.NumberColumn("validation accuracy", **pct),
            "seconds": st.column_config.NumberColumn("time (s)", format="%.1f"),
            "best": st.column_config.CheckboxColumn("kept (best)")}
