"""Inspect: what a network's layers do — feature maps, the first conv before/after its
nonlinearity, activation sparsity, first-layer filters and attribution maps."""
import streamlit as st

from pages import show_loading

LOADING = show_loading()      # the imports below take seconds on a server's first visit; main() clears it

import io
from pathlib import Path

import altair as alt
import numpy as np
import pandas as pd
import torch

from core.models import WeightsError
from core import paths
from core.data import DataError
from core.data import folders
from core.data import images as imaging
from core.models import backbones
from core.progress import Progress, part
from core.results import inspection
from core.results.inspection import Inspected, ModelChoice
from core.trust import sanity
from pages import common
from pages.common import data_versions
from pages.common.progress import progress_bar
from pages.common.teaching import explain

MODEL_KINDS = {"run": "A trained run", "pretrained": "Pretrained backbone"}
IMAGE_SOURCES = {"data": "From the current data set", "upload": "Upload an image"}
TABS = ["Feature maps", "First conv", "Sparsity", "Filters", "Attributions"]
# how many channels a grid may show, doubling (written as powers: the page-rule test reads a literal
# list of these numbers as a restated batch-size list)
STAGE_CHANNELS = [2 ** k for k in range(2, 7)]       # 4 … 64
CONV_CHANNELS = [2 ** k for k in range(3, 7)]        # 8 … 64
TEST_IMAGES_PER_CLASS = [10, 25, 50, 100, "all"]
CAM_TARGETS = {"label": "each image's true class", "predicted": "the predicted class"}
METHODS = ("Grad-CAM", "Integrated Gradients", "Occlusion")     # the fast one first
VERDICT_ICONS = {"ok": ":green[:material/check_circle:]", "flagged": ":orange[:material/warning:]",
                 "unavailable": ":material/info:"}


def main() -> None:
    LOADING.empty()
    settings = common.setup("Inspect")
    st.title("Inspect")
    choice = pick_model("Model", "ins", settings["arch"])
    if choice is None:
        common.stop()
    if choice.kind == "run":
        data_versions.changed_warning(common.get_run(choice.name))
    inspected = load_or_stop(choice)
    root = paths.resolve_data_root(settings["data_root"])
    source, picture = pick_picture(root)
    x, image = inspection.model_input(picture, inspected)
    probs = inspection.class_probabilities(inspected.model, x)
    show_prediction(image, inspected, probs)
    tabs = st.tabs(TABS)
    with tabs[0]:
        show_feature_maps(inspected.model, x)
    with tabs[1]:
        show_first_conv(inspected.model, x)
    with tabs[2]:
        show_sparsity(choice, root, settings["arch"])
    with tabs[3]:
        show_filters(inspected.model)
    with tabs[4]:
        show_explanations(choice, inspected, x, image, probs, source)
    common.finish()


# ---------------------------------------------------------------- the model and the picture

@st.cache_resource(max_entries=3, show_spinner="Loading the model…")
def load_model(kind: str, name: str, stamp: float = 0.0) -> Inspected:
    """A pretrained backbone or a run's model; `stamp` (the run's checkpoint time) is part of the
    key, so a run that trained on is reloaded."""
    return inspection.load_inspected(kind, name)


@st.cache_data(show_spinner=False, max_entries=8)
def scan(root: str) -> folders.DataScan:
    return folders.scan_folder(root, check=False)


def load_or_stop(choice: ModelChoice) -> Inspected:
    try:
        return load_model(*choice)
    except (WeightsError, FileNotFoundError, RuntimeError) as err:
        st.error(f"Can't load that model: {err}")
        common.stop()


def pick_model(label: str, key: str, arch: str) -> ModelChoice | None:
    """A trained run (offered first once the user has one) or a pretrained backbone."""
    trained = any(r.checkpoint.exists() for r in common.my_runs())
    kind = st.radio(label, list(MODEL_KINDS), format_func=MODEL_KINDS.get, horizontal=True, key=f"{key}_kind",
                    index=0 if trained else 1)
    return pick_trained(key) if kind == "run" else pick_backbone(key, arch)


def pick_trained(key: str) -> ModelChoice | None:
    run = common.pick_run("Run", only_with_checkpoint=True, key=f"{key}_run")
    if run is None:
        st.info("No trained run yet.")
        return None
    return ModelChoice("run", run.id, run.checkpoint.stat().st_mtime)


def pick_backbone(key: str, arch: str) -> ModelChoice:
    """A backbone of the catalogue, the current settings' one first."""
    archs = list(backbones.CATALOG)
    name = st.selectbox("Backbone", archs, key=f"{key}_arch", index=archs.index(arch) if arch in archs else 0)
    if backbones.default_weights(name) == "random":
        st.caption("No pretrained weights for this backbone are available here: it shows a random init.")
    return ModelChoice("pretrained", name)


def pick_picture(root: str):
    """(where the picture came from, the picture); stops the page while there is none."""
    source = st.radio("Image", list(IMAGE_SOURCES), horizontal=True, key="ins_img_src",
                      format_func=IMAGE_SOURCES.get)
    picture = uploaded_picture() if source == "upload" else data_picture(root)
    if picture is None:
        common.stop()
    return source, picture


def uploaded_picture():
    upload = st.file_uploader("Image", type=sorted(e[1:] for e in imaging.IMAGE_EXTENSIONS), key="ins_upload")
    if upload is None:
        return None
    try:
        return imaging.open_rgb(io.BytesIO(upload.getvalue()))
    except Exception as err:  # noqa: BLE001 - any decoder error
        st.error(f"Not a readable image ({type(err).__name__}).")
        return None


def data_picture(root: str):
    try:
        data_scan = scan(root)
        c1, c2 = st.columns(2)
        cls = c1.selectbox("Class", data_scan.classes, key="ins_class")
        items = inspection.class_items(data_scan, cls)
        index = c2.number_input("Image number", 0, len(items) - 1, 0, key="ins_index")
        return imaging.open_rgb(Path(data_scan.root) / items[index].path)
    except DataError as err:
        st.error(str(err))
        return None


def show_prediction(image: np.ndarray, inspected: Inspected, probs: torch.Tensor) -> None:
    predicted = int(probs.argmax())
    c1, c2 = st.columns([1, 3])
    c1.image(image, caption=f"input, {inspected.size}×{inspected.size}", width=160)
    c2.markdown(f"Predicted: **{inspected.classes[predicted]}** ({probs[predicted]:.0%})")


# ---------------------------------------------------------------- feature maps, first conv, filters

def show_feature_maps(model: torch.nn.Module, x: torch.Tensor) -> None:
    n = st.select_slider("Channels per stage", STAGE_CHANNELS, 16, key="ins_nchan")
    for fmap in inspection.feature_maps(model, x):
        st.markdown(f"**{fmap.name}** · {fmap.shape[0]} channels × {fmap.shape[1]}×{fmap.shape[2]}")
        st.image(inspection.channel_grid(fmap.tensor, n, ncol=16), width="stretch")


def show_first_conv(model: torch.nn.Module, x: torch.Tensor) -> None:
    conv, act, act_name = inspection.first_conv_outputs(model, x)
    name, _ = inspection.first_conv(model)
    n = st.select_slider("Channels", CONV_CHANNELS, 16, key="ins_nconv")
    left, right = st.columns(2)
    left.markdown(f"**First convolution's output** (layer `{name}`), before the nonlinearity")
    left.image(inspection.channel_grid(conv, n), width="stretch")
    if act is None:
        right.info("No separate activation follows the first conv before the first stage "
                   "(e.g. ConvNeXt's stem or a ViT patch embedding), so there is no 'after' view.")
    else:
        right.markdown(f"**After the nonlinearity** (layer `{act_name}`): negative values become 0 "
                       "(ReLU) or small, so many maps go dark")
        right.image(inspection.channel_grid(act, n), width="stretch")


def show_filters(model: torch.nn.Module) -> None:
    name, conv_module = inspection.first_conv(model)
    st.markdown(f"**`{name}`**: {tuple(conv_module.weight.shape)} (each filter normalised to its own range)")
    st.image(inspection.filter_grid(model), width="stretch")


# ---------------------------------------------------------------- sparsity

def show_sparsity(choice: ModelChoice, root: str, arch: str) -> None:
    st.caption("Fraction of activation outputs that are non-zero (ReLU-like) or positive (smooth "
               "activations such as GELU/SiLU, labelled so), per stage, averaged over images of the "
               "current data set.")
    explain("sparsity")
    count = st.slider("Images", 10, 1000, 200, step=10, key="ins_sparse_n")
    compare = st.checkbox("Compare with a second model", key="ins_compare")
    other = pick_model("Second model", "ins2", arch) if compare else None
    sparse_key = (choice, other, count, root)
    if st.button("Measure sparsity", type="primary", key="ins_measure"):
        measure_models([c for c in (choice, other) if c], count, root, sparse_key)
    stored_key, rows = common.lab().page.get("sparsity_rows", (None, None))
    if rows and stored_key == sparse_key:
        show_sparsity_chart(rows)


def measure_models(choices: list[ModelChoice], count: int, root: str, key: tuple) -> None:
    """Measure each model on the same sample and keep the rows for the chart."""
    try:
        rows = []
        for choice in choices:
            data_scan = scan(root)
            with progress_bar(f"{choice.label}: decoding images…") as progress:
                rows += inspection.measure_sparsity(load_model(*choice), data_scan.root, data_scan.items, count,
                                                    choice.label, labelled(progress, choice.label))
        common.lab().page["sparsity_rows"] = (key, rows)
    except DataError as err:
        st.error(str(err))


def labelled(progress: Progress, label: str) -> Progress:
    """The bar names the model it measures: two models are measured one after the other."""
    def report(done: int, total: int, message: str = "") -> None:
        progress(done, total, f"{label}: {message}")
    return report


def show_sparsity_chart(rows: list[dict]) -> None:
    frame, order = inspection.sparsity_table(rows)
    st.altair_chart(alt.Chart(frame).mark_bar().encode(
        x=alt.X("label:N", sort=order, title="stage (shallow → deep)"),
        xOffset="model:N", y=alt.Y("fraction:Q", scale=alt.Scale(domain=[0, 1]), title="fraction"),
        color=alt.Color("model:N"), tooltip=["model", "stage", "measure", alt.Tooltip("fraction:Q", format=".2f")]),
        width="stretch")
    st.dataframe(frame[["model", "stage", "measure", "fraction"]], hide_index=True)


# ---------------------------------------------------------------- attributions and their checks

def show_explanations(choice: ModelChoice, inspected: Inspected, x: torch.Tensor, image: np.ndarray,
                      probs: torch.Tensor, source: str) -> None:
    """Attribution maps for one target class, their sanity check, and class-average Grad-CAM."""
    target = int(st.selectbox("Target class", range(len(inspected.classes)), index=int(probs.argmax()),
                              format_func=lambda i: f"{inspected.classes[i]} ({probs[i]:.0%})", key="ins_target"))
    attr_key = (choice, source, hash(image.tobytes()), target)
    show_attributions(inspected.model, x, image, target, attr_key)
    st.markdown("#### Do these maps depend on the model?")
    explain("sanity")
    if st.button("Check these maps (sanity check)", icon=":material/fact_check:", key="ins_sanity"):
        rows = check_maps(choice, inspected, x, target)
        if rows is not None:
            common.lab().page["sanity"] = (attr_key, rows)
    stored_key, rows = common.lab().page.get("sanity", (None, None))
    if rows and stored_key == attr_key:
        show_sanity(rows, image)
    st.markdown("#### Average Grad-CAM per class (test images)")
    if choice.kind != "run":
        st.info("Only for a trained run: a pretrained backbone has no test images here. Pick "
                "*A trained run* at the top.", icon=":material/info:")
    else:
        show_class_averages(common.get_run(choice.name), choice, inspected)


def show_attributions(model: torch.nn.Module, x: torch.Tensor, image: np.ndarray, target: int,
                      key: tuple) -> None:
    """The maps kept for this picture and target, or computed on click."""
    stored_key, maps = common.lab().page.get("attr", (None, None))
    maps = maps if stored_key == key else None
    clicked = st.button("Compute attributions", type="primary", key="ins_attr")
    if not (clicked or maps):
        return
    cols = st.columns(len(METHODS) + 1)
    cols[0].image(image, caption="input", width="stretch")
    slots = dict(zip(METHODS, cols[1:]))
    if clicked:
        common.lab().page["attr"] = (key, compute_attributions(model, x, image, target, slots))
        return
    for method, result in maps.items():
        show_attribution(slots[method], method, result)


def compute_attributions(model: torch.nn.Module, x: torch.Tensor, image: np.ndarray, target: int,
                         slots: dict) -> dict:
    maps = {}
    for method, slot in slots.items():        # each map appears as soon as it is done
        with slot, st.spinner(f"{method}…"):
            maps.update(inspection.attributions(model, x, image, target, methods=(method,)))
        show_attribution(slot, method, maps[method])
    return maps


def show_attribution(col, method: str, result) -> None:
    if isinstance(result, str):
        col.info(f"{method}: {result}")
    else:
        col.image(result, caption=method, width="stretch")


def check_maps(choice: ModelChoice, inspected: Inspected, x: torch.Tensor, target: int) -> list[dict] | None:
    """The sanity check's rows (None when the server is busy or the time cap was reached)."""
    with progress_bar("Starting…") as progress:
        features = None
        if choice.kind == "run":            # the label test refits the head on the run's own images
            features = sanity.run_training_features(
                common.get_run(choice.name), inspected.model, inspected.mean, inspected.std,
                progress=part(progress, 0, 1, "Computing training features for the shuffled-label head"))
        return common.run_heavy("sanity check", lambda checked: sanity.sanity_check(
            inspected.model, x, target, METHODS, train_features=features, progress=checked), progress)


def show_sanity(rows: list[dict], picture: np.ndarray) -> None:
    """Verdicts, a bar chart of the similarities and the randomised maps next to the real ones."""
    for verdict in sanity.verdicts(rows):
        st.markdown(f"{VERDICT_ICONS[verdict['status']]} {verdict['text']}")
    scored = pd.DataFrame([dict(method=r["method"], check=r["label"], similarity=r["spearman"])
                           for r in rows if r["spearman"] is not None and r["check"] != "original"])
    if not scored.empty:
        show_similarities(scored)
    for method in dict.fromkeys(r["method"] for r in rows):
        st.markdown(f"**{method}**")
        for col, row in zip(st.columns(len(sanity.CHECKS)), [r for r in rows if r["method"] == method]):
            if row["map"] is None:
                col.caption(f"{row['label']}: {row['note']}")
                continue
            score = ("" if row["check"] == "original"
                     else f" · similarity {row['spearman']:.2f}, SSIM {row['ssim']:.2f}")
            col.image(sanity.heat_image(row["map"], picture), caption=row["label"] + score, width="stretch")


def show_similarities(scored: pd.DataFrame) -> None:
    checks = list(sanity.CHECKS.values())
    bars = alt.Chart(scored).mark_bar().encode(
        x=alt.X("method:N", title=None, axis=alt.Axis(labelAngle=0)),
        xOffset=alt.XOffset("check:N", sort=checks),
        y=alt.Y("similarity:Q", scale=alt.Scale(domain=[-1, 1]), title="similarity to the real map"),
        color=alt.Color("check:N", sort=checks, title="model"),
        tooltip=["method", "check", alt.Tooltip("similarity:Q", format=".2f")])
    limit = alt.Chart(pd.DataFrame({"y": [sanity.SIMILAR]})).mark_rule(strokeDash=[4, 4]).encode(y="y:Q")
    st.altair_chart((bars + limit).properties(height=220), width="stretch")
    st.caption(f"Spearman rank correlation of the absolute maps; above the dashed line ({sanity.SIMILAR}) "
               "after randomising, a map did not really change.")


# ---------------------------------------------------------------- average Grad-CAM per class

def show_class_averages(run, choice: ModelChoice, inspected: Inspected) -> None:
    c1, c2 = st.columns(2)
    per_class = c1.select_slider("Test images per class (at most)", TEST_IMAGES_PER_CLASS, 25, key="ins_avg_n")
    aim = c2.radio("Explain", list(CAM_TARGETS), horizontal=True, key="ins_avg_target", format_func=CAM_TARGETS.get)
    avg_key = (choice, per_class, aim)
    if st.button("Average Grad-CAM per class", icon=":material/grid_view:", key="ins_avg"):
        average_maps(run, inspected, None if per_class == "all" else int(per_class), aim, avg_key)
    stored = common.lab().page.get("class_cam")
    if stored and stored[0] == avg_key:
        _, heat, means, counts = stored
        common.image_grid([sanity.heat_image(heat[c], means[c]) for c in heat],
                          [f"**{inspected.classes[c]}** ({counts[c]} images)" for c in heat], per_row=5)
        st.caption("Each map is the average heat over a class's test images, on the class's average "
                   "picture. Heat on the borders or background of a class (not where the object is) "
                   "means the model may recognise the class by its background: a shortcut.")


def average_maps(run, inspected: Inspected, per_class: int | None, aim: str, key: tuple) -> None:
    """Decode the run's test images, average Grad-CAM per class, keep the maps under `key`."""
    with progress_bar("Decoding the test images…") as progress:
        images, labels = sanity.run_test_images(run, per_class, progress=part(progress, 0, 0.5, "Decoding test images"))
        try:
            heat = common.run_heavy("class-average Grad-CAM", lambda checked: sanity.class_average_gradcam(
                inspected.model, images, labels, inspected.transform(), aim, progress=checked),
                part(progress, 0.5, 1, "Grad-CAM"))
            if heat is not None:
                common.lab().page["class_cam"] = (key, heat, sanity.class_mean_images(images, labels, inspected.size),
                                                  {c: labels.count(c) for c in heat})
        except ValueError as err:            # a transformer: no spatial map to average
            st.info(str(err), icon=":material/info:")
    if not images:
        st.warning("None of the run's test images can be read: was the data set moved or deleted?")


main()
