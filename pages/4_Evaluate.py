"""Evaluate: metrics, confusion matrix with drill-down, best/worst images per class,
misclassified images with top-3, curves, downloads and export of a run's best checkpoint."""
import streamlit as st

from pages import show_loading

LOADING = show_loading()      # the imports below take seconds on a server's first visit

import json
from pathlib import Path

import altair as alt
import pandas as pd

from core.results import evaluate as evaluation
from core.results.report import save_run_report
from core.serve.store import Run
from core.trust import export_check
from pages import common
from pages.common import maps
from pages.common.progress import progress_bar
from pages.common.teaching import explain

SPLITS = {"test": "Test", "val": "Validation"}
TABS = ["Confusion matrix", "Per class", "Best & worst", "Misclassified", "Curves", "Download & export",
        "Embedding map"]
MIME = {".json": "application/json", ".py": "text/x-python"}
EXPORTS = {"safetensors": ["model.safetensors", "model.json", "predict.py"],
           "onnx": ["model.onnx", "predict_onnx.py"]}


def main() -> None:
    LOADING.empty()
    common.setup("Evaluate")
    st.title("Evaluate")
    run = common.pick_run("Run", only_with_checkpoint=True, key="eval_run_pick")
    if run is None:
        st.info("No trained run yet: train one on the Train page (a run keeps its best epoch).")
        common.link("train", "Go to Train", ":material/model_training:")
        common.stop()
    split = st.radio("Split", list(SPLITS), horizontal=True, key="eval_split", format_func=SPLITS.get)
    frame, metrics = evaluation_of(run, split)
    headline(metrics, split)
    root, classes = evaluation.images_root(run), metrics["classes"]
    tabs = st.tabs(TABS)
    with tabs[0]:
        confusion_tab(metrics, frame, root)
    with tabs[1]:
        per_class_table(metrics)
    with tabs[2]:
        ranking_tab(frame, classes, root)
    with tabs[3]:
        misclassified_tab(frame, root)
    with tabs[4]:
        curves_tab(run)
    with tabs[5]:
        downloads_tab(run, split, frame, metrics)
    with tabs[6]:
        st.caption("Each dot is an image; dots close together are images the network finds alike. "
                   "Before fine-tuning, classes often overlap; after it, each class should form its own group.")
        maps.before_after_maps(run)
    common.finish()


def evaluation_of(run: Run, split: str) -> tuple[pd.DataFrame, dict]:
    """The split's stored predictions and metrics; computed (once, kept with the run) when missing
    or older than the checkpoint. Stops the page with the reason when they can't be."""
    stored = evaluation.stored_evaluation(run, split)
    if stored is not None:
        return stored
    try:
        with progress_bar(f"Predicting the {split} split once; the result is kept with the run…") as progress:
            metrics = evaluation.evaluate_run(run, split, progress=progress)
    except (ValueError, FileNotFoundError) as err:
        st.error(str(err))
        common.stop()
    return evaluation.load_predictions(run, split), metrics


def headline(metrics: dict, split: str) -> None:
    m = st.columns(5)
    m[0].metric("Accuracy", f"{metrics['accuracy']:.1%}")
    m[1].metric("mAP", f"{metrics['mAP']:.1%}", help="Mean average precision, one-vs-rest, macro over classes")
    m[2].metric("Macro precision", f"{metrics['macro_precision']:.1%}")
    m[3].metric("Macro recall", f"{metrics['macro_recall']:.1%}")
    m[4].metric("Macro F1", f"{metrics['macro_f1']:.1%}")
    st.caption(f"{metrics['n']} {split} images · best epoch's checkpoint")
    explain("validation")


def gallery(rows: pd.DataFrame, root: Path, caption, per_row: int = 8) -> None:
    """Square tiles in full rows; `caption(row)` may use markdown."""
    if rows.empty:
        st.caption("No images.")
        return
    common.image_grid([common.thumbnail(str(root / f)) for f in rows["file"]],
                      [caption(r) for r in rows.to_dict("records")], per_row)


# ---------------------------------------------------------------- the tabs

def confusion_tab(metrics: dict, frame: pd.DataFrame, root: Path) -> None:
    classes = metrics["classes"]
    normalise = st.toggle("Row-normalised (share of each true class)", key="cm_norm")
    chart = confusion_chart(evaluation.confusion_frame(metrics), classes, normalise)
    event = st.altair_chart(chart, width="stretch", height=max(300, 34 * len(classes)) + 120,
                            on_select="rerun", key="cm_chart")
    chosen = (event.selection.get("cell") or [None])[0] if event else None
    if chosen:      # a clicked cell sets the two selectboxes below
        common.set_widget("cm_true", chosen["true"])
        common.set_widget("cm_pred", chosen["predicted"])
    c1, c2 = st.columns(2)
    true = c1.selectbox("True class", classes, key="cm_true")
    pred = c2.selectbox("Predicted class", classes, key="cm_pred")
    hits = evaluation.cell(frame, true, pred)
    st.markdown(f"**{len(hits)} image(s)** labelled *{true}*, predicted *{pred}*")
    gallery(hits.head(60), root, lambda r: f"{r['confidence']:.0%}")


def confusion_chart(long: pd.DataFrame, classes: list[str], normalise: bool) -> alt.LayerChart:
    """A heat map with a number in each cell; a click selects the cell."""
    value = "share" if normalise else "count"
    pick = alt.selection_point(name="cell", fields=["true", "predicted"], on="click")
    base = alt.Chart(long, title="Confusion matrix (rows: true class) — click a cell").encode(
        x=alt.X("predicted:N", sort=classes), y=alt.Y("true:N", sort=classes))
    heat = base.mark_rect().encode(
        color=alt.Color(f"{value}:Q", scale=alt.Scale(scheme="blues")),
        opacity=alt.condition(pick, alt.value(1.0), alt.value(0.55)),
        tooltip=["true", "predicted", "count", alt.Tooltip("share:Q", format=".1%")]).add_params(pick)
    text = base.mark_text(fontSize=11).encode(
        text=alt.Text(f"{value}:Q", format=".0%" if normalise else "d"),
        color=alt.condition(alt.datum[value] > long[value].max() / 2, alt.value("white"), alt.value("black")))
    return heat + text


def per_class_table(metrics: dict) -> None:
    table = pd.DataFrame(metrics["per_class"]).rename(columns={"cls": "class"})
    st.dataframe(table, hide_index=True, width="stretch", column_config={
        c: st.column_config.NumberColumn(c, format="percent") for c in ("precision", "recall", "f1", "ap")})


def ranking_tab(frame: pd.DataFrame, classes: list[str], root: Path) -> None:
    cls = st.selectbox("Class", classes, key="rank_class")
    n = st.slider("Images per row", 5, 20, 10, key="rank_n")
    best, worst = evaluation.rank_class(frame, cls, n)
    st.markdown(f"**Most confidently *{cls}*** (probability of {cls})")
    gallery(best, root, lambda r: f"{r['p_' + cls]:.0%}", per_row=n)
    st.markdown(f"**Least confidently *{cls}***")
    gallery(worst, root, lambda r: f"{r['p_' + cls]:.0%}", per_row=n)


def misclassified_tab(frame: pd.DataFrame, root: Path) -> None:
    wrong = evaluation.misclassified(frame, 3)
    order = st.radio("Sort", ["most confident first", "least confident first"], horizontal=True, key="mis_sort")
    if order.startswith("least"):
        wrong = wrong.iloc[::-1]
    limit = st.slider("Show", 4, 100, 24, key="mis_n")
    st.markdown(f"**{len(wrong)} misclassified** of {len(frame)}")
    gallery(wrong.head(limit), root, misclassified_caption, per_row=6)


def misclassified_caption(row: dict) -> str:
    """The predicted class in bold, then the true class, then the other two of the top 3."""
    (top, p), *rest = row["top"]
    return (f"**{top} {p:.0%}** · true: {row['true']}"
            + "".join(f" · {c} {q:.0%}" for c, q in rest))


def curves_tab(run: Run) -> None:
    if epochs := run.epochs():
        common.show_curves(epochs)
        st.dataframe(common.epochs_table(epochs), hide_index=True, width="stretch",
                     column_config=common.epochs_column_config())
    with st.expander("Run configuration"):
        st.json(run.read_json("config.json", {}))
        st.caption(f"Stored in `{run.path}`")


# ---------------------------------------------------------------- downloads and export

def downloads_tab(run: Run, split: str, frame: pd.DataFrame, metrics: dict) -> None:
    c1, c2 = st.columns(2)
    c1.download_button("Predictions (CSV)", common.csv_text(frame).encode(),
                       f"{run.id}-{split}-predictions.csv", "text/csv")
    c2.download_button("Metrics (JSON)", json.dumps(metrics, indent=1).encode(),
                       f"{run.id}-{split}-metrics.json", "application/json")
    st.markdown("**Report**: everything above in one HTML file, images embedded.")
    common.report_button("report", f"{run.id}:{split}", lambda progress: save_run_report(run, split, progress=progress),
                         f"{run.id}-{split}-report.html",
                         "Opens offline in any browser (nothing is loaded from the internet); "
                         "print it to PDF from the browser.")
    st.markdown("**Export the model**: `model.safetensors` + `model.json` (loadable by "
                "`core.models.predict.from_export`, and by plain timm for a linear head) with a standalone "
                "`predict.py` that preprocesses images exactly as this app does. Each export is run on "
                "the run's test images right away and compared with the trained model.")
    export_panel(run, run.file("export"))


def export_panel(run: Run, export_dir: Path) -> None:
    if st.button("Prepare export", key="export"):
        write_and_check(run, "safetensors", export_dir)
    if not ((export_dir / "model.json").exists() and (export_dir / "model.safetensors").exists()):
        return
    offer(run, "safetensors", export_dir)
    if st.button("Also export ONNX", key="onnx"):
        write_and_check(run, "onnx", export_dir)
    if (export_dir / "model.onnx").exists():
        offer(run, "onnx", export_dir)


def write_and_check(run: Run, kind: str, export_dir: Path) -> None:
    try:
        with progress_bar("Writing…") as progress:
            common.run_heavy("export check", lambda checked: export_check.export_checked(
                run, kind, export_dir, progress=checked), progress)
    except RuntimeError as err:          # an architecture the ONNX exporter can't handle
        st.warning(str(err), icon=":material/warning:")


def offer(run: Run, kind: str, export_dir: Path) -> None:
    """The check's verdict, then the downloads; a flagged export only behind a checkbox."""
    check = export_check.load_checks(export_dir, run).get(kind)
    if check is None:                    # written by the CLI or before the checkpoint moved on
        with progress_bar("Checking the export…") as progress:
            check = common.run_heavy("export check", lambda checked: export_check.check_export(
                run, kind, export_dir / export_check.FILES[kind], progress=checked), progress)
        if check is None:                # the server is busy, or the time cap: said above
            return
    if check["ok"]:
        st.success(f"**{check['file']}** {export_check.check_line(check)}", icon=":material/verified:")
    else:
        st.warning(f"**{check['file']}** {export_check.check_line(check)}. Re-export it, or download it "
                   "knowing it does not behave like the trained model.", icon=":material/report:")
        if not st.checkbox("Download anyway", key=f"export_anyway_{kind}"):
            return
    for column, name in zip(st.columns(len(EXPORTS[kind])), EXPORTS[kind]):
        if (export_dir / name).exists():
            column.download_button(name, (export_dir / name).read_bytes(), name,
                                   MIME.get(Path(name).suffix, "application/octet-stream"))


main()
