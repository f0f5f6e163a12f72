"""Inspect: what a network's layers do — feature maps, the first conv before/after its
nonlinearity, activation sparsity, first-layer filters and attribution maps."""
import streamlit as st

from pages import show_loading

loading = show_loading()      # the imports below take seconds on a server's first visit

import io
import random
from pathlib import Path

import altair as alt
import numpy as np
from torchvision.transforms import v2
import pandas as pd
import timm
import torch

from core.hooks import eval_mode
from core.models import backbones
from core.data import DataError
from core.data import folders
from core.data import images as imaging
from core.data import transforms
from core.results import inspection
from core import paths
from core.trust import sanity
from core.models.backbones import load_run_model, run_normalization
from pages import common
from pages.common.teaching import explain

loading.empty()

settings = common.setup("Inspect")
st.title("Inspect")


@st.cache_resource(max_entries=3, show_spinner="Loading the model…")
def load_model(kind: str, name: str, stamp: float = 0.0):
    """(model, class names, image size, mean, std) for a pretrained backbone or a run; `stamp`
    (the run's checkpoint time) is part of the key, so a run that trained on is reloaded."""
    if kind == "run":
        run = common.get_run(name)
        model = load_run_model(run)
        mean, std = run_normalization(run, model)
        return model, run.classes, run.config.image_size, mean, std
    model = backbones.create_backbone(name, "auto", num_classes=1000).eval()
    cfg = timm.data.resolve_model_data_config(model)
    info = timm.data.ImageNetInfo()
    return model, [info.index_to_description(i) for i in range(1000)], int(cfg["input_size"][-1]), cfg["mean"], cfg["std"]


@st.cache_data(show_spinner=False, max_entries=8)
def scan(root: str):
    return folders.scan_folder(root, check=False)


def pick_model(label: str, key: str):
    kinds = {"run": "A trained run", "pretrained": "Pretrained backbone"}
    trained = any(r.checkpoint.exists() for r in common.my_runs())      # the user's model first
    kind = st.radio(label, list(kinds), format_func=kinds.get, horizontal=True, key=f"{key}_kind",
                    index=0 if trained else 1)
    if kind == "run":
        run = common.pick_run("Run", only_with_checkpoint=True, key=f"{key}_run")
        if run is None:
            st.info("No trained run yet.")
            return None
        return kind, run.id, run.checkpoint.stat().st_mtime
    arch = st.selectbox("Backbone", list(backbones.CATALOG), key=f"{key}_arch",
                        index=list(backbones.CATALOG).index(settings["arch"]) if settings["arch"] in backbones.CATALOG else 0)
    if backbones.default_weights(arch) == "random":
        st.caption("No pretrained weights for this backbone are available here: it shows a random init.")
    return kind, arch


choice = pick_model("Model", "ins")
if choice is None:
    common.stop()
try:
    model, classes, size, mean, std = load_model(*choice)
except (backbones.WeightsError, FileNotFoundError, RuntimeError) as err:
    st.error(f"Can't load that model: {err}")
    common.stop()
transform = transforms.build_transform(size, mean, std)

root = Path(settings["data_root"])
root = root if root.is_absolute() else paths.REPO_ROOT / root
source = st.radio("Image", ["data", "upload"], horizontal=True, key="ins_img_src",
                  format_func={"data": "From the current data set", "upload": "Upload an image"}.get)
picture = None
if source == "upload":
    upload = st.file_uploader("Image", type=sorted(e[1:] for e in imaging.IMAGE_EXTENSIONS), key="ins_upload")
    if upload is not None:
        try:
            picture = imaging.open_rgb(io.BytesIO(upload.getvalue()))
        except Exception as err:  # noqa: BLE001 - any decoder error
            st.error(f"Not a readable image ({type(err).__name__}).")
else:
    try:
        data_scan = scan(str(root))
        c1, c2 = st.columns(2)
        cls = c1.selectbox("Class", data_scan.classes, key="ins_class")
        items = [it for it in data_scan.items if data_scan.classes[it.label] == cls]
        index = c2.number_input("Image number", 0, len(items) - 1, 0, key="ins_index")
        picture = imaging.open_rgb(Path(data_scan.root) / items[index].path)
    except DataError as err:
        st.error(str(err))
if picture is None:
    common.stop()

tensor = v2.functional.pil_to_tensor(picture)
x = transform(tensor)[None]
shown = transforms.build_transform(size, (0, 0, 0), (1, 1, 1))(tensor)   # same crop, unnormalised
image = (shown.permute(1, 2, 0).clamp(0, 1).numpy() * 255).astype(np.uint8)
with torch.inference_mode(), eval_mode(model):
    probs = model(x).softmax(-1)[0]
predicted = int(probs.argmax())
c1, c2 = st.columns([1, 3])
c1.image(image, caption=f"input, {size}×{size}", width=160)
c2.markdown(f"Predicted: **{classes[predicted]}** ({probs[predicted]:.0%})")

tabs = st.tabs(["Feature maps", "First conv", "Sparsity", "Filters", "Attributions"])

with tabs[0]:
    n = st.select_slider("Channels per stage", [4, 8, 16, 32, 64], 16, key="ins_nchan")
    for fmap in inspection.feature_maps(model, x):
        st.markdown(f"**{fmap.name}** · {fmap.shape[0]} channels × {fmap.shape[1]}×{fmap.shape[2]}")
        st.image(inspection.channel_grid(fmap.tensor, n, ncol=16), width="stretch")

with tabs[1]:
    conv, act, act_name = inspection.first_conv_outputs(model, x)
    name, _ = inspection.first_conv(model)
    n1 = st.select_slider("Channels", [8, 16, 32, 64], 16, key="ins_nconv")
    left, right = st.columns(2)
    left.markdown(f"**First convolution's output** (layer `{name}`), before the nonlinearity")
    left.image(inspection.channel_grid(conv, n1), width="stretch")
    if act is None:
        right.info("No separate activation follows the first conv before the first stage "
                   "(e.g. ConvNeXt's stem or a ViT patch embedding), so there is no 'after' view.")
    else:
        right.markdown(f"**After the nonlinearity** (layer `{act_name}`): negative values become 0 "
                       "(ReLU) or small, so many maps go dark")
        right.image(inspection.channel_grid(act, n1), width="stretch")

with tabs[2]:
    st.caption("Fraction of activation outputs that are non-zero (ReLU-like) or positive (smooth "
               "activations such as GELU/SiLU, labelled so), per stage, averaged over images of the "
               "current data set.")
    explain("sparsity")
    count = st.slider("Images", 10, 1000, 200, step=10, key="ins_sparse_n")
    compare = st.checkbox("Compare with a second model", key="ins_compare")
    other = pick_model("Second model", "ins2") if compare else None

    def measure(label, spec):
        net, _, sz, mu, sd = load_model(*spec)
        tf = transforms.build_transform(sz, mu, sd)
        data_scan = scan(str(root))
        picks = random.Random(0).sample(data_scan.items, min(count, len(data_scan.items)))
        bar = st.progress(0.0, text=f"{label}: decoding images…")
        images, _ = imaging.decode_images(data_scan.root, picks, sz)
        images = [img for img in images if img is not None]
        batches = (torch.stack([tf(img) for img in images[i:i + 16]]) for i in range(0, len(images), 16))
        rows = inspection.sparsity(net, batches, progress=lambda done: bar.progress(done / len(images),
                                                                             text=f"{label}: {done}/{len(images)} images"))
        bar.empty()
        return [dict(r, model=label) for r in rows]

    sparse_key = (choice, other, count, str(root))
    if st.button("Measure sparsity", type="primary", key="ins_measure"):
        try:
            rows = measure(" ".join(map(str, choice[:2])), choice)
            if other:
                rows += measure(" ".join(map(str, other[:2])), other)
            common.lab().page["sparsity_rows"] = (sparse_key, rows)
        except DataError as err:
            st.error(str(err))
    stored_key, rows = common.lab().page.get("sparsity_rows", (None, None))
    if rows and stored_key == sparse_key:
        frame = pd.DataFrame(rows)
        frame["label"] = frame["stage"] + " (" + frame["measure"] + ")"
        order = frame.sort_values("order")["label"].drop_duplicates().tolist()
        st.altair_chart(alt.Chart(frame).mark_bar().encode(
            x=alt.X("label:N", sort=order, title="stage (shallow → deep)"),
            xOffset="model:N", y=alt.Y("fraction:Q", scale=alt.Scale(domain=[0, 1]), title="fraction"),
            color=alt.Color("model:N"), tooltip=["model", "stage", "measure", alt.Tooltip("fraction:Q", format=".2f")]),
            width="stretch")
        st.dataframe(frame[["model", "stage", "measure", "fraction"]], hide_index=True)

with tabs[3]:
    name, conv_module = inspection.first_conv(model)
    st.markdown(f"**`{name}`**: {tuple(conv_module.weight.shape)} (each filter normalised to its own range)")
    st.image(inspection.filter_grid(model), width="stretch")

def show_attribution(col, method: str, result) -> None:
    if isinstance(result, str):
        col.info(f"{method}: {result}")
    else:
        col.image(result, caption=method, width="stretch")


VERDICT_ICONS = {"ok": ":green[:material/check_circle:]", "flagged": ":orange[:material/warning:]",
                 "unavailable": ":material/info:"}


def show_sanity(rows: list[dict], picture: np.ndarray) -> None:
    """Verdicts, a bar chart of the similarities and the randomised maps next to the real ones."""
    for verdict in sanity.verdicts(rows):
        st.markdown(f"{VERDICT_ICONS[verdict['status']]} {verdict['text']}")
    scored = pd.DataFrame([dict(method=r["method"], check=r["label"], similarity=r["spearman"])
                           for r in rows if r["spearman"] is not None and r["check"] != "original"])
    if not scored.empty:
        bars = alt.Chart(scored).mark_bar().encode(
            x=alt.X("method:N", title=None, axis=alt.Axis(labelAngle=0)),
            xOffset=alt.XOffset("check:N", sort=list(sanity.CHECKS.values())),
            y=alt.Y("similarity:Q", scale=alt.Scale(domain=[-1, 1]), title="similarity to the real map"),
            color=alt.Color("check:N", sort=list(sanity.CHECKS.values()), title="model"),
            tooltip=["method", "check", alt.Tooltip("similarity:Q", format=".2f")])
        limit = alt.Chart(pd.DataFrame({"y": [sanity.SIMILAR]})).mark_rule(strokeDash=[4, 4]).encode(y="y:Q")
        st.altair_chart((bars + limit).properties(height=220), width="stretch")
        st.caption(f"Spearman rank correlation of the absolute maps; above the dashed line ({sanity.SIMILAR}) "
                   "after randomising, a map did not really change.")
    for method in dict.fromkeys(r["method"] for r in rows):
        st.markdown(f"**{method}**")
        cols = st.columns(len(sanity.CHECKS))
        for col, row in zip(cols, [r for r in rows if r["method"] == method]):
            if row["map"] is None:
                col.caption(f"{row['label']}: {row['note']}")
                continue
            score = ("" if row["check"] == "original"
                     else f" · similarity {row['spearman']:.2f}, SSIM {row['ssim']:.2f}")
            col.image(sanity.heat_image(row["map"], picture), caption=row["label"] + score, width="stretch")


def show_class_averages(run) -> None:
    c1, c2 = st.columns(2)
    per_class = c1.select_slider("Test images per class (at most)", [10, 25, 50, 100, "all"], 25,
                                 key="ins_avg_n")
    aim = c2.radio("Explain", ["label", "predicted"], horizontal=True, key="ins_avg_target",
                   format_func={"label": "each image's true class", "predicted": "the predicted class"}.get)
    avg_key = (choice, per_class, aim)
    if st.button("Average Grad-CAM per class", icon=":material/grid_view:", key="ins_avg"):
        bar = st.progress(0.0, text="Decoding the test images…")
        images, labels = sanity.run_test_images(run, None if per_class == "all" else int(per_class),
                                           progress=lambda d, t: bar.progress(
                                               d / max(t, 1) / 2, text=f"Decoding test images ({d} of {t})"))
        try:
            heat = common.run_heavy("class-average Grad-CAM", lambda checked: sanity.class_average_gradcam(
                model, images, labels, transform, aim, progress=checked),
                lambda d, t: bar.progress(0.5 + d / max(t, 1) / 2, text=f"Grad-CAM ({d} of {t} images)"))
            if heat is not None:
                common.lab().page["class_cam"] = (avg_key, heat, sanity.class_mean_images(images, labels, size),
                                                  {c: labels.count(c) for c in heat})
        except ValueError as err:            # a transformer: no spatial map to average
            st.info(str(err), icon=":material/info:")
        bar.empty()
        if not images:
            st.warning("None of the run's test images can be read: was the data set moved or deleted?")
    stored = common.lab().page.get("class_cam")
    if stored and stored[0] == avg_key:
        _, heat, means, counts = stored
        common.image_grid([sanity.heat_image(heat[c], means[c]) for c in heat],
                          [f"**{classes[c]}** ({counts[c]} images)" for c in heat], per_row=5)
        st.caption("Each map is the average heat over a class's test images, on the class's average "
                   "picture. Heat on the borders or background of a class (not where the object is) "
                   "means the model may recognise the class by its background: a shortcut.")


with tabs[4]:
    target = st.selectbox("Target class", range(len(classes)), index=predicted,
                          format_func=lambda i: f"{classes[i]} ({probs[i]:.0%})", key="ins_target")
    attr_key = (choice, source, hash(image.tobytes()), int(target))
    methods = ("Grad-CAM", "Integrated Gradients", "Occlusion")     # the fast one first
    stored_key, maps = common.lab().page.get("attr", (None, None))
    if stored_key != attr_key:
        maps = None
    clicked = st.button("Compute attributions", type="primary", key="ins_attr")
    if clicked or maps:
        cols = st.columns(len(methods) + 1)
        cols[0].image(image, caption="input", width="stretch")
        slots = dict(zip(methods, cols[1:]))
    if clicked:
        maps = {}
        for method in methods:        # each map appears as soon as it is done
            with slots[method], st.spinner(f"{method}…"):
                maps.update(inspection.attributions(model, x, image, int(target), methods=(method,)))
            show_attribution(slots[method], method, maps[method])
        common.lab().page["attr"] = (attr_key, maps)
    elif maps:
        for method, result in maps.items():
            show_attribution(slots[method], method, result)

    st.markdown("#### Do these maps depend on the model?")
    explain("sanity")
    if st.button("Check these maps (sanity check)", icon=":material/fact_check:", key="ins_sanity"):
        bar = st.progress(0.0, text="Starting…")
        features = None
        if choice[0] == "run":            # the label test refits the head on the run's own images
            features = sanity.run_training_features(common.get_run(choice[1]), model, mean, std, progress=lambda d, t:
                                               bar.progress(d / max(t, 1), text="Computing training features "
                                                            f"for the shuffled-label head ({d} of {t} images)"))
        rows = common.run_heavy("sanity check", lambda checked: sanity.sanity_check(
            model, x, int(target), methods, train_features=features, progress=checked),
            lambda d, t, text: bar.progress(d / max(t, 1), text=text))
        bar.empty()
        if rows is not None:
            common.lab().page["sanity"] = (attr_key, rows)
    stored_key, rows = common.lab().page.get("sanity", (None, None))
    if rows and stored_key == attr_key:
        show_sanity(rows, image)

    st.markdown("#### Average Grad-CAM per class (test images)")
    if choice[0] != "run":
        st.info("Only for a trained run: a pretrained backbone has no test images here. Pick "
                "*A trained run* at the top.", icon=":material/info:")
    else:
        show_class_averages(common.get_run(choice[1]))

common.finish()
