"""Embedding maps in the page: an Altair scatter of core.trust.embedding_map's frames (hover shows the
image, a box drag or a click selects images, shown below the chart), the before/after pair of a
trained run, and the map of a plain data set."""
from __future__ import annotations

import hashlib
from pathlib import Path

import altair as alt
import numpy as np
import pandas as pd
import streamlit as st

from core.trust import embedding_map
from core.models import WeightsError
from core.data import DataError
from core.progress import Cancelled
from core.trust.embeddings import DEFAULT_ARCH, DEFAULT_SIZE
from pages.common.panels import run_heavy
from pages.common.progress import progress_bar
from pages.common.state import lab
from pages.common.widgets import image_grid, thumbnail

METHOD_LABELS = {"umap": "UMAP", "pca": "PCA (fast)"}
SHOWN = 24            # selected images shown under a map at most
FAILURES = (ValueError, FileNotFoundError, OSError, DataError, WeightsError, Cancelled)


def _method_choice(key: str) -> str:
    return st.radio("Projection", list(METHOD_LABELS), format_func=METHOD_LABELS.get, horizontal=True, key=key,
                    help="UMAP keeps neighbourhoods (clearer clusters; the first map after a server "
                         "start compiles for a few seconds more). PCA is a plain linear projection: instant.")


def _colour(classes: list[str]) -> alt.Color:
    """The same colour for a class in every map of the page."""
    scheme = "tableau10" if len(classes) <= 10 else "tableau20"
    return alt.Color("class:N", scale=alt.Scale(domain=list(classes), scheme=scheme),
                     legend=alt.Legend(title=None, orient="bottom", columns=5, symbolLimit=40)
                     if len(classes) <= 40 else None)


def map_chart(frame: pd.DataFrame, title: str, classes: list[str] | None = None, height: int = 420) -> alt.LayerChart:
    """The scatter: colour = class, crosses = misclassified, rings = flagged; hovering shows the
    thumbnail (vega-tooltip draws a data URL in a field titled "image"), class, prediction, path."""
    shown = frame.dropna(subset=["x", "y"]).copy()
    classes = classes or sorted(shown["class"].unique())
    shown["mark"] = np.where(shown["misclassified"], "misclassified", "other images")
    tooltip = [alt.Tooltip("thumb:N", title="image"), alt.Tooltip("class:N")]
    tooltip += [alt.Tooltip("predicted:N")] if (shown["predicted"] != "").any() else []
    tooltip += [alt.Tooltip("stage:N")] if "stage" in shown else []
    tooltip += [alt.Tooltip("flag:N")] if (shown["flag"] != "").any() else []
    tooltip += [alt.Tooltip("path:N")]
    brush = alt.selection_interval(name="brush", encodings=["x", "y"])
    pick = alt.selection_point(name="pick", fields=["path"], on="click")
    xy = dict(x=alt.X("x:Q", axis=None, scale=alt.Scale(zero=False)),
              y=alt.Y("y:Q", axis=None, scale=alt.Scale(zero=False)))
    shapes = alt.Scale(domain=["other images", "misclassified"], range=["circle", "cross"])
    points = alt.Chart(shown, title=title).mark_point(filled=True).encode(
        **xy, color=_colour(classes), tooltip=tooltip,
        shape=alt.Shape("mark:N", scale=shapes,
                        legend=alt.Legend(title=None, orient="top") if shown["misclassified"].any() else None),
        size=alt.condition("datum.mark == 'misclassified'", alt.value(110), alt.value(40)),
        opacity=alt.condition(brush & pick, alt.value(0.85), alt.value(0.2)),
    ).add_params(brush, pick)
    flagged = shown[shown["flag"] != ""]
    chart = points
    if len(flagged):
        chart = points + alt.Chart(flagged).mark_point(filled=False, size=200, color="black", strokeWidth=1.5).encode(
            **xy, tooltip=tooltip)
    return chart.properties(height=height)


def selected_rows(frame: pd.DataFrame, selection: dict | None) -> pd.DataFrame:
    """The rows inside the dragged box ("brush": x and y ranges) and/or clicked ("pick": paths)."""
    selection = selection or {}
    rows = frame.dropna(subset=["x", "y"])
    brush, pick = selection.get("brush") or {}, selection.get("pick") or []
    if not brush and not pick:
        return rows.iloc[:0]
    if brush.get("x") and brush.get("y"):
        (x0, x1), (y0, y1) = sorted(brush["x"]), sorted(brush["y"])
        rows = rows[rows["x"].between(x0, x1) & rows["y"].between(y0, y1)]
    paths = {p.get("path") for p in pick if isinstance(p, dict)} - {None}
    if paths:
        rows = rows[rows["path"].isin(paths)]
    return rows


def _caption(row: dict) -> str:
    text = row["class"]
    if row["misclassified"]:
        text = f"**{row['predicted']}** · true: {row['class']}"
    elif row["predicted"]:
        text += " · predicted correctly"
    if row["flag"]:
        text += f" · :material/flag: {row['flag']}"
    return f"{text}  \n`{row['path']}`"


def embedding_map_chart(frame: pd.DataFrame, title: str, key: str, classes: list[str] | None = None,
                        per_row: int = 4) -> pd.DataFrame:
    """Draw the map; the images selected on it (a dragged box or a click) appear below it as a
    grid with their class, prediction and path. Returns the selected rows."""
    root = Path(frame.attrs.get("root", "."))
    event = st.altair_chart(map_chart(frame, title, classes), width="stretch", key=key,
                            on_select="rerun", selection_mode=["brush", "pick"])
    rows = selected_rows(frame, event.selection if event else None)
    if (frame["flag"] != "").any():
        st.caption("Ringed points: images a check flagged (hover for the reason).")
    unreadable = int(frame["x"].isna().sum())
    if unreadable:
        st.caption(f"{unreadable} unreadable image(s) left out.")
    if rows.empty:
        st.caption("Drag a box over points, or click one, to see those images here.")
        return rows
    st.markdown(f"**{len(rows)} selected**" + (f" (the first {SHOWN} shown)" if len(rows) > SHOWN else ""))
    head = rows.head(SHOWN)
    image_grid([thumbnail(str(root / p)) for p in head["path"]], [_caption(r) for r in head.to_dict("records")],
               per_row)
    return rows


def before_after_maps(run) -> None:
    """The run's images as the pretrained backbone saw them and as the fine-tuned model sees
    them, side by side; computed on request and kept for this session (per run and method)."""
    method = _method_choice("map_method")
    store = lab().page.setdefault("embedding_maps", {})
    ident = f"{run.id}:{method}:{run.checkpoint.stat().st_mtime if run.checkpoint.exists() else 0}"
    if st.button("Compute the maps" if ident not in store else "Compute again", key="map_compute",
                 icon=":material/scatter_plot:",
                 help=f"Embeds up to {embedding_map.MAX_IMAGES:,} of the run's images twice (pretrained and fine-tuned), "
                      "then projects them to 2-D."):
        try:
            with progress_bar() as progress:
                frames = run_heavy("embedding map", lambda checked: embedding_map.run_map_frames(
                    run, method, progress=checked), progress)
        except FAILURES as err:
            st.error(f"No map: {err}")
            return
        if frames is None:
            return
        for old in [k for k in store if not k.startswith(f"{run.id}:")]:   # one run's maps are enough memory
            del store[old]
        store[ident] = frames
        embedding_map.save_run_maps(run, frames)          # for the run's HTML report
    if ident not in store:
        st.caption("Press *Compute the maps*: a few seconds for a small data set, about a minute for 2,000 images.")
        return
    for col, frame, name in zip(st.columns(2), store[ident], ("before", "after")):
        with col:
            used = embedding_map.METHODS.get(frame.attrs.get("method"), "")
            st.caption(frame.attrs.get("note", "") + (f" ({used})" if used else ""))
            embedding_map_chart(frame, frame.attrs.get("title", name), key=f"map_{name}", classes=run.classes)


def dataset_map(root, items, classes: list[str], flags=None, key: str = "dataset_map",
                arch: str = DEFAULT_ARCH, size: int = DEFAULT_SIZE) -> None:
    """The map of a plain data set through the pretrained backbone (no training needed); `flags`
    ({path: reason} or paths) rings the images a check flagged."""
    method = _method_choice(f"{key}_method")
    paths = "\n".join(getattr(it, "path", str(it)) for it in items)
    ident = hashlib.sha1(f"{root}|{arch}|{size}|{method}|{paths}".encode()).hexdigest()
    store = lab().page.setdefault("dataset_maps", {})
    if st.button("Compute the map", key=f"{key}_compute", icon=":material/scatter_plot:"):
        try:
            with progress_bar() as progress:
                frame = run_heavy("embedding map", lambda checked: embedding_map.dataset_frame(
                    str(root), items, classes, method, arch=arch, size=size, progress=checked), progress)
        except FAILURES as err:
            st.error(f"No map: {err}")
            return
        if frame is None:
            return
        store.clear()                 # only the latest map: a frame holds thousands of thumbnails
        store[ident] = frame
    if ident not in store:
        st.caption("Press *Compute the map* to see which images the pretrained network finds alike.")
        return
    frame = store[ident]
    if flags is not None and not isinstance(flags, dict):
        flags = {p: "flagged" for p in flags}
    frame["flag"] = [str((flags or {}).get(p, "") or "") for p in frame["path"]]     # flags may change; points don't
    embedding_map_chart(frame, "How the pretrained backbone sees the data set", key=f"{key}_chart",
                        classes=classes, per_row=6)
