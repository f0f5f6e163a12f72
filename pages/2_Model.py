"""Model: backbone, where its weights come from, how deep to freeze, and the new head."""
import streamlit as st

from pages import show_loading

LOADING = show_loading()      # the imports below take seconds on a server's first visit

import copy

import pandas as pd
import timm
import torch

from core.models import WeightsError
from core import config
from core.data import folders
from core.models import backbones
from core.serve import access
from core.paths import data_root_path
from pages import common
from pages.common.teaching import explain

OTHER = "Other timm model…"
FREEZE_NOTES = {"head": "Only the new head learns; the backbone's features are computed once and "
                        "cached, so epochs take a fraction of a second.",
                "top_k": "The top blocks adapt to your images; lower blocks keep their generic features.",
                "full": "Every layer adapts. Slowest, and needs more data to avoid over-fitting.",
                "scratch": "Random weights: shows what pretraining is worth."}


def main() -> None:
    LOADING.empty()
    settings = common.setup("Model")
    st.title("Model")
    arch = choose_backbone(settings)
    weights_section(settings, arch)
    st.subheader("What to train")
    n_blocks = len(backbones.block_groups(skeleton(arch, settings["head"], settings["hidden"]).backbone))
    mode = depth_section(settings, n_blocks)
    learning_rate_for_depth(settings, n_blocks)
    explain("freezing")
    head_section(settings)
    parameter_summary(arch, settings, mode, n_blocks)
    common.link("train", "Next: train", ":material/arrow_forward:")
    common.finish()


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
    return folders.class_count(root)


# ---------------------------------------------------------------- backbone and weights

def choose_backbone(settings: dict) -> str:
    """The backbone picked from the catalog or typed; a new one resets what belonged to the old."""
    choices = list(backbones.CATALOG) + [OTHER]
    current = settings["arch"]
    pick = st.selectbox("Backbone", choices,
                        index=choices.index(current) if current in backbones.CATALOG else len(choices) - 1,
                        format_func=lambda a: a if a == OTHER else f"{a} — {backbones.CATALOG[a]}", key="arch_pick")
    arch = pick if pick != OTHER else typed_backbone(current)
    if arch != settings["arch"]:
        settings.update(config.with_backbone(settings, arch))
        common.forget("w_top_k", "w_pick_backbone")
    budget_picks(settings)
    return arch


def budget_picks(settings: dict) -> None:
    """With a time budget, the run may probe the backbones on the data and choose; off pins the
    backbone above."""
    if not settings.get("time_budget_s"):
        return
    common.bind(st.toggle, "pick_backbone", "Let the time budget pick the backbone and image size", settings,
                help="Before training, the run probes every backbone whose weights are here, at two image "
                     "sizes, on a sample of your training images (a cross-validated linear probe), and "
                     "trains the most accurate one that still leaves fine-tuning its epochs. The Train "
                     "page shows the probe table. Off: the backbone above trains.")


def typed_backbone(current: str) -> str:
    """Any timm model by name; stops the page until it is one."""
    arch = st.text_input("timm model name", value=current if current not in backbones.CATALOG else "",
                         placeholder="e.g. regnety_008, efficientvit_b0, deit_tiny_patch16_224").strip()
    if not arch:
        common.stop()
    if problem := backbones.unknown_arch_problem(arch):
        st.error(problem)
        common.stop()
    return arch


def weights_section(settings: dict, arch: str) -> None:
    st.subheader("Pretrained weights")
    available = sources(arch)
    st.dataframe(pd.DataFrame([dict(source=s.label, available="yes" if s.available else "no", detail=s.detail)
                               for s in available]), hide_index=True, width="stretch")
    usable = [s.kind for s in available if s.available]
    labels = {s.kind: s.label for s in available}
    settings["weights"] = backbones.chosen_weights(settings["weights"], available)
    if settings["freeze"] == "scratch":
        st.caption("Training from scratch ignores pretrained weights.")
        return
    settings["weights"] = st.radio("Use", usable, index=usable.index(settings["weights"]),
                                   format_func=labels.get, horizontal=True, key="weights_pick")
    if settings["weights"] == "file":
        weights_upload(settings, arch)
    if config.weights_problems(settings):
        st.warning("Upload a weights file, or pick another source.")


def weights_upload(settings: dict, arch: str) -> None:
    """A weights file for `arch`, kept in this user's folder once it fits the architecture."""
    upload = st.file_uploader("Weights file (.safetensors, or .pth with plain tensors)",
                              type=[s.lstrip(".") for s in backbones.WEIGHTS_SUFFIXES], key="weights_upload")
    if upload is None:
        return
    who = common.user()
    try:
        with st.spinner("Checking the file against the architecture…"):
            target = backbones.save_uploaded_weights(upload.getvalue(), upload.name, arch, access.weights_dir(who),
                                                     access.upload_allowance(who, common.policy()))
        settings["weights_file"] = str(target)
        st.success(f"{upload.name} fits {arch}.")
    except (WeightsError, access.AccessError) as err:
        settings["weights_file"] = None
        st.error(str(err))


# ---------------------------------------------------------------- depth, learning rate, head

def depth_section(settings: dict, n_blocks: int) -> str:
    """How deep training reaches; returns the freeze mode."""
    mode = common.bind(st.radio, "freeze", "Freeze", settings, options=config.options("freeze"),
                       format_func=config.FREEZE_MODES.get, horizontal=True)
    if mode == "top_k":
        settings.update(config.clamp_top_k(settings, n_blocks))
        common.bind(st.slider, "top_k", f"Unfreeze the top k of {n_blocks} blocks", settings,
                    min_value=common.limits("top_k")["min_value"], max_value=n_blocks)
    st.caption(FREEZE_NOTES[mode])
    return mode


def learning_rate_for_depth(settings: dict, n_blocks: int) -> None:
    """Adam/AdamW's learning rate follows the freezing depth (config.follow_depth), unless the
    user chose a rate themselves; the page says so. A preset's rate (a seed report's) is kept."""
    page = common.lab().page
    if page.get("lr_from_preset"):
        return
    followed, suggested = config.follow_depth(settings, n_blocks, page.get("lr_by_depth"))
    if suggested is None:
        return       # SGD and RMSprop want other rates
    if followed["lr"] != settings["lr"]:
        settings["lr"] = followed["lr"]
        common.forget("w_lr")
    page["lr_by_depth"] = suggested
    if settings["lr"] == suggested:
        st.caption(f"Learning rate set to {suggested:.1e} for this depth: the more layers train, the "
                   "smaller the rate, so the pretrained features aren't wrecked. Change it on Train "
                   "(or let *Suggest a learning rate* measure one).")


def head_section(settings: dict) -> None:
    head = common.bind(st.radio, "head", "Head", settings, options=config.options("head"),
                       format_func=config.HEAD_KINDS.get, horizontal=True)
    cols = st.columns(2)
    if head == "mlp":
        common.bind(cols[0].number_input, "hidden", "Hidden units", settings, **common.limits("hidden"), step=8)
    common.bind(cols[1].slider, "dropout", "Dropout", settings, **common.limits("dropout"), step=0.05)


# ---------------------------------------------------------------- what trains

def parameter_summary(arch: str, settings: dict, mode: str, n_blocks: int) -> None:
    """Parameters in all and trainable, per block, for the chosen depth and the data set's classes."""
    classes = class_count(str(data_root_path(settings["data_root"])))
    model = copy.deepcopy(skeleton(arch, settings["head"], settings["hidden"], classes))   # the cached one is shared
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


main()
