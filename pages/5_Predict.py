"""Predict: classify dropped images with a trained run, an exported model, or a pretrained
backbone's original ImageNet head; batch-predict a folder or zip to CSV."""
import streamlit as st

from pages import show_loading

loading = show_loading()      # the imports below take seconds on a server's first visit

import io
import tempfile
from pathlib import Path

import altair as alt
import pandas as pd

from core.models import backbones
from core.data import DataError
from core.data import folders
from core.data import images as imaging
from core.models import predict
from pages import common

loading.empty()

common.setup("Predict")
st.title("Predict")


@st.cache_resource(max_entries=3, show_spinner="Loading the model…")
def run_predictor(run_id: str, stamp: float) -> predict.Predictor:
    """Keyed by the checkpoint's time too, so a re-trained or resumed run loads its new weights."""
    return predict.from_run(common.get_run(run_id))


@st.cache_resource(max_entries=2, show_spinner="Loading the pretrained backbone…")
def imagenet_predictor(arch: str) -> predict.Predictor:
    return predict.imagenet(arch)


@st.cache_resource(max_entries=2, show_spinner="Loading the exported model…")
def export_predictor(weights: bytes, meta: bytes) -> predict.Predictor:
    import json
    with tempfile.NamedTemporaryFile(suffix=".safetensors") as f:
        f.write(weights)
        f.flush()
        return predict.from_export(f.name, json.loads(meta))


SOURCES = {"run": "A trained run", "export": "An exported model (.safetensors + .json)",
           "imagenet": "A pretrained backbone (1000 ImageNet classes)"}
source = st.radio("Model", list(SOURCES), format_func=SOURCES.get, horizontal=True, key="pred_source")
predictor = None
try:
    if source == "run":
        run = common.pick_run("Run", only_with_checkpoint=True, key="pred_run_pick")
        if run is None:
            st.info("No trained run yet: train one, or use a pretrained backbone.")
        else:
            predictor = run_predictor(run.id, run.checkpoint.stat().st_mtime)
    elif source == "export":
        c1, c2 = st.columns(2)
        w = c1.file_uploader("model.safetensors", type=["safetensors"], key="exp_w")
        j = c2.file_uploader("model.json", type=["json"], key="exp_j")
        if w and j:
            predictor = export_predictor(w.getvalue(), j.getvalue())
    else:
        arch = st.selectbox("Backbone", list(backbones.CATALOG), key="pred_arch")
        available = [s for s in backbones.weight_sources(arch) if s.available and s.kind in ("bundled", "hub-cache", "hub")]
        if not available:
            st.warning(f"No pretrained weights for {arch} are available offline. The bundled ones are "
                       "mobilenetv2_100 and tf_efficientnet_lite0/1/2.")
        else:
            predictor = imagenet_predictor(arch)
except (backbones.WeightsError, ValueError, KeyError, FileNotFoundError) as err:
    st.error(f"Can't load that model: {err}")

if predictor is None:
    common.stop()
st.caption(f"{len(predictor.classes)} classes · {predictor.image_size} px")

def show_predictions(images, names, k):
    if not images:
        return
    for name, img, p in zip(names, images, predictor.probs(images)):
        left, right = st.columns([1, 3])
        left.image(img, caption=name, width=180)
        top = pd.DataFrame(predictor.top_k(p, k), columns=["class", "probability"])
        right.altair_chart(alt.Chart(top).mark_bar().encode(
            x=alt.X("probability:Q", scale=alt.Scale(domain=[0, 1]), axis=alt.Axis(format="%")),
            y=alt.Y("class:N", sort=None, title=None),
            tooltip=["class", alt.Tooltip("probability:Q", format=".1%")]),
            width="stretch", height=40 + 28 * len(top))


tab_images, tab_camera, tab_batch = st.tabs(["Images", "Camera", "Batch to CSV"])
with tab_images:
    k = st.slider("Top-k", 1, min(10, len(predictor.classes)), min(5, len(predictor.classes)), key="pred_k")
    files = st.file_uploader("Drop one or more images", type=sorted(e[1:] for e in imaging.IMAGE_EXTENSIONS),
                             accept_multiple_files=True, key="pred_files")
    images, names = [], []
    for f in files or []:
        try:
            images.append(imaging.open_rgb(io.BytesIO(f.getvalue())))
            names.append(f.name)
        except Exception as err:  # noqa: BLE001 - any decoder error: say which file
            st.warning(f"{f.name}: not a readable image ({type(err).__name__}).")
    show_predictions(images, names, k)

with tab_camera:
    st.caption("Hold an object up to the camera and take a snapshot; the browser asks for "
               "permission first. Nothing is stored.")
    if st.toggle("Use the camera", key="pred_cam_on"):
        shot = st.camera_input("Snapshot", key="pred_camera")
        if shot is not None:
            show_predictions([imaging.open_rgb(io.BytesIO(shot.getvalue()))], ["camera snapshot"],
                             min(5, len(predictor.classes)))

with tab_batch:
    path = st.text_input("Folder on the server", key="pred_folder", placeholder="/data/new_photos")
    archive = st.file_uploader("…or a zip of images", type=["zip"], key="pred_zip")
    folder = None
    if archive is not None:
        try:
            folder = common.save_zip(archive.getvalue(), "predict")
        except (DataError, common.access.AccessError) as err:
            st.error(str(err))
    elif path:
        try:
            folder = common.server_folder(path)
        except common.access.AccessError as err:
            st.error(str(err))
    if folder is not None:
        found = sorted(p for p in folder.rglob("*") if p.suffix.lower() in imaging.IMAGE_EXTENSIONS
                       and not any(folders.is_hidden(part) for part in p.relative_to(folder).parts))
        st.write(f"{len(found)} images found.")
        batch_key = (source, id(predictor), str(folder), len(found))
        if found and st.button("Predict all", type="primary", key="pred_all"):
            bar = st.progress(0.0)
            frame = predict.predict_files(predictor, found, progress=lambda d, t: bar.progress(d / t, text=f"{d}/{t} images"))
            frame["file"] = [str(Path(f).relative_to(folder)) for f in frame["file"]]
            common.lab().page["pred_frame"] = (batch_key, frame)
        stored_key, frame = common.lab().page.get("pred_frame", (None, None))
        if frame is not None and stored_key == batch_key:
            st.dataframe(frame[[c for c in ("file", "predicted", "confidence", "error") if c in frame]],
                         hide_index=True, width="stretch")
            st.download_button("Download CSV", common.csv_text(frame).encode(), "predictions.csv", "text/csv")

common.finish()
