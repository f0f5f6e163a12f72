"""Model: backbone, where its weights come from, how deep to freeze, and the new head."""
import streamlit as st

from pages import show_loading

loading = show_loading()      # the imports below take seconds on a server's first visit

import copy
import hashlib

import pandas as pd
import timm
import torch

from core.models import backbones
from core.serve import access
from core.config import depth_lr
from core.config import FREEZE_MODES, RunConfig
from core.paths import resolve_data_root
from pages import common
from pages.common.teaching import explain

loading.empty()

settings = common.setup("Model")
st.title("Model")

OTHER = "Other timm model…"


@st.cache_data(ttl=30, show_spinner="Checking where weights are available…")
def sources(arch: str) -> list[backbones.WeightSource]:
    return backbones.weight_sources(arch)


@st.cache_resource(max_entries=4, show_spinner="Reading the architecture…")
def skeleton(arch: str, head: str, hidden: int, classes: int = 10) -> backbones.FineTuneModel:
    """Parameters on the meta device: shapes without memory, so even VGG is instant."""
    with torch.device("meta"):
        backbone = timm.create_model(arch, pretrained=False, num_classes=0)
        return backbones.FineTuneModel(backbone, backbones.make_head(backbone.num_features, classes, head, hidden))


@st.cache_data(ttl=60, show_spinner=False)
def class_count(root: str) -> int:
    """How many classes the chosen data set has (the new head's size); 10 if it can't be read."""
    from core.data import DataError, folders
    try:
        return len(folders.scan_folder(root, check=False).classes)
    except (DataError, OSError):
        return 10


def learning_rate_for_depth(settings: dict, mode: str, n_blocks: int) -> None:
    """Adam/AdamW's learning rate follows the freezing depth (1e-3 for a head, down to 3e-4 when
    every layer trains), unless the user chose a rate themselves; the page says so."""
    if settings["optimizer"] not in ("adam", "adamw") or common.lab().page.get("lr_from_preset"):
        return       # SGD wants other rates; a preset's rate (a seed report's) is kept as given
    share = {"head": 0.0, "top_k": settings["top_k"] / max(n_blocks, 1), "full": 1.0, "scratch": 0.0}[mode]
    suggested = float(f"{depth_lr(share):.1e}")
    page = common.lab().page
    if settings["lr"] in (page.get("lr_by_depth"), RunConfig().lr) and settings["lr"] != suggested:
        settings["lr"] = suggested
        st.session_state.pop("w_lr", None)
    page["lr_by_depth"] = suggested
    if settings["lr"] == suggested:
        st.caption(f"Learning rate set to {suggested:.1e} for this depth: the more layers train, the "
                   "smaller the rate, so the pretrained features aren't wrecked. Change it on Train "
                   "(or let *Suggest a learning rate* measure one).")


choices = list(backbones.CATALOG) + [OTHER]
current = settings["arch"]
pick = st.selectbox("Backbone", choices, index=choices.index(current) if current in backbones.CATALOG else len(choices) - 1,
                    format_func=lambda a: a if a == OTHER else f"{a} — {backbones.CATALOG[a]}", key="arch_pick")
arch = pick
if pick == OTHER:
    arch = st.text_input("timm model name", value=current if current not in backbones.CATALOG else "",
                         placeholder="e.g. regnety_008, efficientvit_b0, deit_tiny_patch16_224").strip()
    if not arch:
        common.stop()
    if not timm.is_model(arch):
        close = timm.list_models(f"*{arch}*")[:10]
        st.error(f"timm has no model called '{arch}'." + (f" Close matches: {', '.join(close)}" if close else ""))
        common.stop()
if arch != settings["arch"]:
    settings.update(arch=arch, weights="auto", weights_file=None, top_k=1)
    st.session_state.pop("w_top_k", None)

st.subheader("Pretrained weights")
available = sources(arch)
st.dataframe(pd.DataFrame([dict(source=s.label, available="yes" if s.available else "no", detail=s.detail)
                           for s in available]), hide_index=True, width="stretch")
usable = [s.kind for s in available if s.available]
labels = {s.kind: s.label for s in available}
if settings["weights"] not in usable:
    settings["weights"] = backbones.default_weights(arch)
if settings["freeze"] == "scratch":
    st.caption("Training from scratch ignores pretrained weights.")
else:
    settings["weights"] = st.radio("Use", usable, index=usable.index(settings["weights"]),
                                   format_func=labels.get, horizontal=True, key="weights_pick")
if settings["weights"] == "file" and settings["freeze"] != "scratch":
    upload = st.file_uploader("Weights file (.safetensors, or .pth with plain tensors)",
                              type=["safetensors", "pth", "pt", "bin"], key="weights_upload")
    if upload is not None:
        suffix = ".safetensors" if upload.name.endswith(".safetensors") else ".pth"
        # named by content, never by a setting: the arch may come from a preset
        target = access.weights_dir(common.user()) / f"{hashlib.sha256(upload.getvalue()).hexdigest()[:16]}{suffix}"
        try:
            if upload.size > access.upload_allowance(common.user(), common.policy()):
                raise access.AccessError("This file is larger than what is left of your upload quota: "
                                         "delete old uploads on the Data page first.")
            target.write_bytes(upload.getvalue())
            with st.spinner("Checking the file against the architecture…"):
                backbones.create_backbone(arch, "file", str(target))
            settings["weights_file"] = str(target)
            st.success(f"{upload.name} fits {arch}.")
        except (backbones.WeightsError, access.AccessError) as err:
            settings["weights_file"] = None
            target.unlink(missing_ok=True)
            st.error(str(err))
    if not settings["weights_file"]:
        st.warning("Upload a weights file, or pick another source.")

st.subheader("What to train")
model = skeleton(arch, settings["head"], settings["hidden"])
n_blocks = len(backbones.block_groups(model.backbone))
mode = common.bind(st.radio, "freeze", "Freeze", settings, options=list(FREEZE_MODES),
                   format_func=FREEZE_MODES.get, horizontal=True)
if mode == "top_k":
    settings["top_k"] = min(settings["top_k"], n_blocks)
    common.bind(st.slider, "top_k", f"Unfreeze the top k of {n_blocks} blocks", settings,
                min_value=1, max_value=n_blocks)
st.caption({"head": "Only the new head learns; the backbone's features are computed once and "
                    "cached, so epochs take a fraction of a second.",
            "top_k": "The top blocks adapt to your images; lower blocks keep their generic features.",
            "full": "Every layer adapts. Slowest, and needs more data to avoid over-fitting.",
            "scratch": "Random weights: shows what pretraining is worth."}[mode])
learning_rate_for_depth(settings, mode, n_blocks)
explain("freezing")

head = common.bind(st.radio, "head", "Head", settings, options=["linear", "mlp"],
                   format_func={"linear": "Linear", "mlp": "MLP (hidden layer + dropout)"}.get,
                   horizontal=True)
cols = st.columns(2)
if head == "mlp":
    common.bind(cols[0].number_input, "hidden", "Hidden units", settings, **common.limits("hidden"), step=8)
common.bind(cols[1].slider, "dropout", "Dropout", settings, **common.limits("dropout"), step=0.05)

classes = class_count(str(resolve_data_root(settings["data_root"])))
model = copy.deepcopy(skeleton(arch, head, settings["hidden"], classes))   # the cached one is shared by every session
backbones.apply_freeze(model, mode, settings["top_k"])
rows = pd.DataFrame(backbones.parameter_table(model))
total, trainable = rows["params"].sum(), rows["trainable"].sum()
m1, m2, m3 = st.columns(3)
m1.metric("Parameters", f"{total / 1e6:.2f} M")
m2.metric("Trainable", f"{trainable / 1e6:.3f} M", f"{trainable / total:.1%} of all", delta_color="off")
m3.metric("Blocks", n_blocks, help="The backbone's stages as timm groups them for freezing: "
          "the stem, then each stage from generic (edges) to specific (object parts).")
st.dataframe(rows, hide_index=True, width="stretch",
             column_config={"params": st.column_config.NumberColumn("parameters", format="%d"),
                            "trainable": st.column_config.ProgressColumn(
                                "trainable", format="%d", min_value=0, max_value=int(rows["params"].max()))})
common.link("train", "Next: train", ":material/arrow_forward:")

common.finish()
