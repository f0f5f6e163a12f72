"""Evaluate: metrics, confusion matrix with drill-down, best/worst images per class,
misclassified images with top-3, curves, downloads and export of a run's best checkpoint.

A run's pin (splits.json) records the files it trained on: when they changed since, the page says
what changed before any metric, and scores the run on the pinned files or, when asked, on the
current ones (kept apart as `<split>-current`), never on changed files unasked. A mislabelled
image in the misclassified gallery moves to its class in a new data set version."""
import streamlit as st

from pages import show_loading

LOADING = show_loading()      # the imports below take seconds on a server's first visit

import json
from pathlib import Path

import altair as alt
import pandas as pd

from core.data import feedback
from core.results import evaluate as evaluation
from core.results.report import save_run_report
from core.serve.store import Run
from core.trust import export_check
from pages import common
from pages.common import data_versions, maps
from pages.common.progress import progress_bar
from pages.common.teaching import explain

SPLITS = {"test": "Test", "val": "Validation"}
TABS = ["Confusion matrix", "Per class", "Best & worst", "Misclassified", "Curves", "Download & export",
        "Embedding map"]
MIME = {".json": "application/json", ".py": "text/x-python"}
EXPORTS = {"safetensors": ["model.safetensors", "model.json", "predict.py"],
           "onnx": ["model.onnx", "predict_onnx.py"]}
DATA_CHOICES = {"pinned": "Evaluate on the pinned version", "current": "Evaluate on the current files"}


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
    check = data_versions.checked(run)
    on = data_choice(check)
    frame, metrics = evaluation_of(run, split, check, on)
    headline(metrics, split, check, on)
    root = check.pinned.folder if on == "pinned" and check.pinned else evaluation.images_root(run)
    classes = metrics["classes"]
    tabs = st.tabs(TABS)
    with tabs[0]:
        confusion_tab(metrics, frame, root)
    with tabs[1]:
        per_class_table(metrics)
    with tabs[2]:
        ranking_tab(frame, classes, root)
    with tabs[3]:
        misclassified_tab(frame, root, run, split)
    with tabs[4]:
        curves_tab(run)
    with tabs[5]:
        downloads_tab(run, split, frame, metrics)
    with tabs[6]:
        st.caption("Each dot is an image; dots close together are images the network finds alike. "
                   "Before fine-tuning, classes often overlap; after it, each class should form its own group.")
        maps.before_after_maps(run)
    common.finish()


def data_choice(check: feedback.DataCheck) -> str | None:
    """When the files changed since training: what changed, then which files to score ("pinned"
    or "current"). None when nothing changed (or the run predates pins)."""
    if not check.changed:
        return None
    if check.gone:
        st.error(f"None of the {check.n_files} files this run trained on are at `{check.root}` any more: was "
                 "the data set moved or deleted?")
    else:
        st.warning(f"**The data set changed since this run trained** (`{check.root}`):\n\n"
                   + "\n".join(f"- {line}" for line in check.change.lines()),
                   icon=":material/difference:")
    on = st.radio("Score the run on", list(DATA_CHOICES), format_func=DATA_CHOICES.get, horizontal=True,
                  key="eval_data")
    if on == "pinned":
        st.caption(f"The files it trained on are stored as data set version **{check.pinned.ref}**, whose "
                   "folder never changes." if check.pinned else
                   "No stored version holds the files it trained on: the scores kept from training are shown; "
                   "a split without them can only be scored on the current files.")
    else:
        st.caption("The run is scored on the files as they are now; these scores are kept apart from the ones "
                   "on the files it trained on.")
    return on


def evaluation_of(run: Run, split: str, check: feedback.DataCheck, on: str | None) -> tuple[pd.DataFrame, dict]:
    """The split's stored predictions and metrics; computed (once, kept with the run) when missing
    or older than the checkpoint, on the files `on` names when they changed since training. Stops
    the page with the reason when they can't be."""
    name = f"{split}-current" if on == "current" else split
    stored = evaluation.stored_evaluation(run, name)
    if stored is not None and (on != "current" or stored[1].get("data", {}).get("change") == check.change.summary()):
        return stored
    root, data = None, None
    if on == "pinned":
        if check.pinned is None:
            st.info(f"The {split} split was never scored on the files this run trained on, and they are not "
                    "stored: choose *Evaluate on the current files*.")
            common.stop()
        root, data = check.pinned.folder, dict(files="pinned", version=check.pinned.ref)
    elif on == "current":
        root, data = check.root, dict(files="current", change=check.change.summary())
    try:
        with progress_bar(f"Predicting the {split} split once; the result is kept with the run…") as progress:
            metrics = evaluation.evaluate_run(run, split, progress=progress, root=root, store_as=name, data=data)
    except (ValueError, FileNotFoundError) as err:
        st.error(str(err))
        common.stop()
    return evaluation.load_predictions(run, name), metrics


def headline(metrics: dict, split: str, check: feedback.DataCheck, on: str | None) -> None:
    m = st.columns(5)
    m[0].metric("Accuracy", f"{metrics['accuracy']:.1%}")
    m[1].metric("mAP", f"{metrics['mAP']:.1%}", help="Mean average precision, one-vs-rest, macro over classes")
    m[2].metric("Macro precision", f"{metrics['macro_precision']:.1%}")
    m[3].metric("Macro recall", f"{metrics['macro_recall']:.1%}")
    m[4].metric("Macro F1", f"{metrics['macro_f1']:.1%}")
    data = {"current": "the current files", "pinned": "the files it trained on"}.get(on, f"data {check.label}")
    st.caption(f"{metrics['n']} {split} images · best epoch's checkpoint · {data}")
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


def misclassified_tab(frame: pd.DataFrame, root: Path, run: Run, split: str) -> None:
    wrong = evaluation.misclassified(frame, 3)
    order = st.radio("Sort", ["most confident first", "least confident first"], horizontal=True, key="mis_sort")
    if order.startswith("least"):
        wrong = wrong.iloc[::-1]
    limit = st.slider("Show", 4, 100, 24, key="mis_n")
    st.markdown(f"**{len(wrong)} misclassified** of {len(frame)}")
    gallery(wrong.head(limit), root, misclassified_caption, per_row=6)
    mislabelled(run, wrong.head(limit), split)


def mislabelled(run: Run, wrong: pd.DataFrame, split: str) -> None:
    """A wrong prediction that is right (the label is wrong): a new data set version with the
    image moved to its class (it stays in its split)."""
    if wrong.empty:
        return
    with st.expander(f"Is one of these {split} images mislabelled? Fix its label in a new data set version"):
        if problem := feedback.base_problem(run, common.user(), common.policy()):
            st.caption(problem)
            return
        rows = {r["file"]: r for r in wrong.to_dict("records")}
        file = st.selectbox("Image", list(rows), key="fix_file",
                            format_func=lambda f: f"{f} (labelled {rows[f]['true']}, predicted {rows[f]['predicted']})")
        others = [c for c in run.classes if c != rows[file]["true"]]
        target = st.selectbox("Its class", others, key=f"fix_to_{file}",
                              index=others.index(rows[file]["predicted"]) if rows[file]["predicted"] in others else 0)
        common.save_version_button(run, f"This {split} image is mislabelled → move it to {target}", "eval_fb",
                                   relabel={file: target})


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
