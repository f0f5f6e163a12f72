"""Predict: classify dropped images with a trained run, an exported model, or a pretrained
backbone's original ImageNet head; batch-predict a folder or zip to CSV. With a run's model, each
image can go back into the run's data set (the model is right, or it is another class) as a new
version of it (core.data.feedback), and the run trains again on that version in one click."""
import streamlit as st

from pages import show_loading

LOADING = show_loading()      # the imports below take seconds on a server's first visit

import hashlib
import io
import json
import tempfile
from pathlib import Path

import altair as alt
import pandas as pd

from core.models import WeightsError
from core.data import DataError
from core.data import feedback
from core.data import folders
from core.data import images as imaging
from core.models import backbones
from core.models import predict
from core.progress import part
from pages import common
from pages.common.progress import progress_bar

SOURCES = {"run": "A trained run", "export": "An exported model (.safetensors + .json)",
           "imagenet": "A pretrained backbone (1000 ImageNet classes)"}
IMAGE_TYPES = sorted(e[1:] for e in imaging.IMAGE_EXTENSIONS)
RESULT_COLUMNS = ("file", "predicted", "confidence", "error")
REVIEW_PER_ROW = 4


def main() -> None:
    LOADING.empty()
    common.setup("Predict")
    st.title("Predict")
    source = st.radio("Model", list(SOURCES), format_func=SOURCES.get, horizontal=True, key="pred_source")
    run = common.pick_run("Run", only_with_checkpoint=True, key="pred_run_pick") if source == "run" else None
    try:
        predictor = pick_predictor(source, run)
    except (WeightsError, ValueError, KeyError, FileNotFoundError) as err:
        st.error(f"Can't load that model: {err}")
        predictor = None
    if predictor is None:
        common.stop()
    st.caption(f"{len(predictor.classes)} classes · {predictor.image_size} px"
               + (f" · trained on data {feedback.data_label(run)}" if run else ""))
    tab_images, tab_camera, tab_batch = st.tabs(["Images", "Camera", "Batch to CSV"])
    with tab_images:
        examples = images_tab(predictor, run)
    with tab_camera:
        examples += camera_tab(predictor, run)
    with tab_batch:
        examples += batch_tab(predictor, source, run)
    if run is not None:
        feedback_panel(run, examples)
    common.finish()


# ---------------------------------------------------------------- the model

@st.cache_resource(max_entries=3, show_spinner="Loading the model…")
def run_predictor(run_id: str, stamp: float) -> predict.Predictor:
    """Keyed by the checkpoint's time too, so a re-trained or resumed run loads its new weights."""
    return predict.from_run(common.get_run(run_id))


@st.cache_resource(max_entries=2, show_spinner="Loading the pretrained backbone…")
def imagenet_predictor(arch: str) -> predict.Predictor:
    return predict.imagenet(arch)


@st.cache_resource(max_entries=2, show_spinner="Loading the exported model…")
def export_predictor(weights: bytes, meta: bytes) -> predict.Predictor:
    with tempfile.NamedTemporaryFile(suffix=".safetensors") as f:
        f.write(weights)
        f.flush()
        return predict.from_export(f.name, json.loads(meta))


def pick_predictor(source: str, run) -> predict.Predictor | None:
    """The model `source` names (for "run", the picked `run`), once the user has chosen it (None
    until then)."""
    if source == "run":
        if run is None:
            st.info("No trained run yet: train one, or use a pretrained backbone.")
            return None
        return run_predictor(run.id, run.checkpoint.stat().st_mtime)
    if source == "export":
        c1, c2 = st.columns(2)
        weights = c1.file_uploader("model.safetensors", type=["safetensors"], key="exp_w")
        meta = c2.file_uploader("model.json", type=["json"], key="exp_j")
        return export_predictor(weights.getvalue(), meta.getvalue()) if weights and meta else None
    arch = st.selectbox("Backbone", list(backbones.CATALOG), key="pred_arch")
    if not predict.imagenet_available(arch):
        st.warning(f"No pretrained weights for {arch} are available offline. The bundled ones are "
                   f"{', '.join(backbones.BUNDLED)}.")
        return None
    return imagenet_predictor(arch)


# ---------------------------------------------------------------- the tabs

def show_predictions(predictor: predict.Predictor, images: list, names: list[str], k: int,
                     blobs: list[bytes] | None = None, run=None, key: str = "") -> list[feedback.Example]:
    """Each image beside a bar chart of its top-k classes; with a run, a verdict under each image
    (the judged images, as feedback Examples of their `blobs`)."""
    if not images:
        return []
    examples = []
    for i, (name, img, p) in enumerate(zip(names, images, predictor.probs(images))):
        left, right = st.columns([1, 3])
        left.image(img, caption=name, width=180)
        top = pd.DataFrame(predictor.top_k(p, k), columns=["class", "probability"])
        if run is not None:
            predicted = top["class"].iloc[0]
            label = common.verdict(predicted, predictor.classes, f"{key}_{i}_{name}", where=left)
            examples.append(feedback.Example(name, predicted, label, data=blobs[i]))
        right.altair_chart(alt.Chart(top).mark_bar().encode(
            x=alt.X("probability:Q", scale=alt.Scale(domain=[0, 1]), axis=alt.Axis(format="%")),
            y=alt.Y("class:N", sort=None, title=None),
            tooltip=["class", alt.Tooltip("probability:Q", format=".1%")]),
            width="stretch", height=40 + 28 * len(top))
    return examples


def images_tab(predictor: predict.Predictor, run) -> list[feedback.Example]:
    n = len(predictor.classes)
    k = st.slider("Top-k", 1, min(10, n), min(5, n), key="pred_k")
    files = st.file_uploader("Drop one or more images", type=IMAGE_TYPES, accept_multiple_files=True,
                             key="pred_files")
    images, names, blobs = [], [], []
    for f in files or []:
        try:
            images.append(imaging.open_rgb(io.BytesIO(f.getvalue())))
            names.append(f.name)
            blobs.append(f.getvalue())
        except Exception as err:  # noqa: BLE001 - any decoder error: say which file
            st.warning(f"{f.name}: not a readable image ({type(err).__name__}).")
    return show_predictions(predictor, images, names, k, blobs, run, "fb_img")


def camera_tab(predictor: predict.Predictor, run) -> list[feedback.Example]:
    st.caption("Hold an object up to the camera and take a snapshot; the browser asks for "
               "permission first. Nothing is stored unless you add the snapshot to the data set below.")
    if st.toggle("Use the camera", key="pred_cam_on"):
        shot = st.camera_input("Snapshot", key="pred_camera")
        if shot is not None:
            name = f"camera-{hashlib.sha256(shot.getvalue()).hexdigest()[:8]}"   # one name per picture
            return show_predictions(predictor, [imaging.open_rgb(io.BytesIO(shot.getvalue()))], [name],
                                    min(5, len(predictor.classes)), [shot.getvalue()], run, "fb_cam")
    return []


def batch_tab(predictor: predict.Predictor, source: str, run) -> list[feedback.Example]:
    folder = batch_folder()
    if folder is None:
        return []
    found = folders.image_files(folder)
    st.write(f"{len(found)} images found.")
    batch_key = (source, id(predictor), str(folder), len(found))     # a table shows only for what it was made of
    if found and st.button("Predict all", type="primary", key="pred_all"):
        with progress_bar("Predicting…") as progress:
            frame = predict.predict_folder(predictor, folder, found, progress=part(progress, 0, 1, "Predicting images"))
        common.lab().page["pred_frame"] = (batch_key, frame)
    stored_key, frame = common.lab().page.get("pred_frame", (None, None))
    if frame is None or stored_key != batch_key:
        return []
    st.dataframe(frame[[c for c in RESULT_COLUMNS if c in frame]], hide_index=True, width="stretch")
    st.download_button("Download CSV", common.csv_text(frame).encode(), "predictions.csv", "text/csv")
    return batch_review(frame, folder, predictor.classes) if run is not None else []


def batch_review(frame: pd.DataFrame, folder: Path, classes: list[str]) -> list[feedback.Example]:
    """The batch's predictions, least confident first, each with a verdict (the judged images)."""
    rows = frame[frame["predicted"].notna()] if "predicted" in frame else frame.iloc[0:0]
    if rows.empty:
        return []
    st.markdown("**Review**: mark predictions right or wrong to add the images to the data set "
                "(least confident first).")
    shown = st.slider("Images to review", 1, len(rows), min(12, len(rows)), key="fb_batch_n") if len(rows) > 1 else 1
    rows = rows.sort_values("confidence").head(shown).to_dict("records")
    examples = []
    for start in range(0, len(rows), REVIEW_PER_ROW):
        for col, row in zip(st.columns(REVIEW_PER_ROW), rows[start:start + REVIEW_PER_ROW]):
            col.image(common.thumbnail(str(folder / row["file"])), width="stretch")
            col.caption(f"{row['file']} · **{row['predicted']}** {row['confidence']:.0%}")
            label = common.verdict(row["predicted"], classes, f"fb_batch_{row['file']}", where=col)
            examples.append(feedback.Example(row["file"], row["predicted"], label, path=folder / row["file"]))
    return examples


def feedback_panel(run, examples: list[feedback.Example]) -> None:
    """The button that adds the judged images to a new version of the run's data set, and then
    "Train again on the new version"."""
    st.divider()
    st.subheader("Back into the data set")
    if problem := feedback.base_problem(run, common.user(), common.policy()):
        st.caption(problem)
        return
    chosen = feedback.judged(examples)
    st.caption("Mark a prediction right (✓) or give the true class (✗) under each image; skipped images stay "
               "out. They become training images of a new version of the data set; the run's own "
               "train/val/test split is kept, so the next run is tested on the same images.")
    name = feedback.base_name(run, common.user())
    common.save_version_button(run, f"Add {len(chosen)} image{'' if len(chosen) == 1 else 's'} to a new version of "
                               f"{name}", "pred_fb", examples, disabled=not chosen)


def batch_folder() -> Path | None:
    """A folder on the server, or an uploaded zip unpacked into the user's own folder."""
    path = st.text_input("Folder on the server", key="pred_folder", placeholder="/data/new_photos")
    archive = st.file_uploader("…or a zip of images", type=["zip"], key="pred_zip")
    try:
        if archive is not None:
            return common.save_zip(archive.getvalue(), "predict")
        return common.server_folder(path) if path else None
    except (DataError, common.access.AccessError) as err:
        st.error(str(err))
        return None


main()
