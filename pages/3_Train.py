"""Train: optimiser settings, start/stop, and the live view of a run."""
import streamlit as st

from pages import show_loading

loading = show_loading()      # the imports below take seconds on a server's first visit

import random

import pandas as pd
import timm  # the package first: two sessions entering timm's import cycle at different modules
#              (timm.data here, timm via core elsewhere) got a half-initialised module

from core.data import DataError
from core.data import folders
from core.data import images as imaging
from core.data import transforms
from core.models.backbones import native_input_size
from core.device import describe, pick_device
from core.config import CHOICES, WIDGET_CHOICES
from core.serve.store import ACTIVE_STATES
from core.paths import resolve_data_root
from core.train.caches import uses_feature_cache
from pages import common
from pages.common.speed import lr_panel, run_speed_info, speed_panel
from pages.common.teaching import explain

loading.empty()

settings = common.setup("Train")
st.title("Train")
device = pick_device()
if not common.lab().image_size_chosen:     # smaller images on CPU keep demos quick
    common.lab().image_size_chosen = True
    settings["image_size"] = 128 if device.type == "cpu" else 224

st.caption(f"Data: **{settings.get('data_label')}** · Model: **`{settings['arch']}`**, "
           f"{settings['freeze'].replace('_', '-')} · Device: **{describe(device)}**")

@st.cache_data(show_spinner="Computing the data set's mean and std…", max_entries=8)
def data_stats(root: str, size: int):
    scan = folders.scan_folder(root, check=False)
    images, _ = imaging.decode_images(scan.root, scan.items, size)
    return transforms.dataset_stats(img for img in images if img is not None)


def stats_panel(settings):
    root = str(resolve_data_root(settings["data_root"]))
    mean, std = data_stats(root, settings["image_size"])
    st.dataframe(pd.DataFrame({"this data set mean": mean, "std": std, "ImageNet mean": timm.data.IMAGENET_DEFAULT_MEAN,
                               "ImageNet std": timm.data.IMAGENET_DEFAULT_STD}, index=["R", "G", "B"]), width="content")


@st.cache_data(show_spinner=False, max_entries=16, ttl=60)
def class_counts(root: str) -> list[int]:
    try:
        scan = folders.scan_folder(root, check=False)
    except DataError:
        return []
    return [sum(it.label == i for it in scan.items) for i in range(len(scan.classes))]


def class_weight_option(settings):
    counts = [n for n in class_counts(str(resolve_data_root(settings["data_root"]))) if n]
    ratio = max(counts) / min(counts) if counts else 1.0
    help_text = ("Each class's loss is weighted by 1 / (its share of the training images), so a rare "
                 "class counts as much as a common one. Helps when classes are very unequal.")
    common.bind(st.checkbox, "class_weights", "Class-weighted loss", settings, help=help_text)
    if ratio >= 3 and not settings["class_weights"]:
        st.caption(f":material/balance: The largest class has {ratio:.0f}× the images of the smallest: consider the "
                   "class-weighted loss, and judge the result by per-class recall, not accuracy alone.")


def augmentation_menu(settings):
    st.markdown("**Augmentation** (training images only)")
    explain("augmentation", inside_expander=True)
    preset = st.selectbox("Start from a preset", ["(keep current)"] + list(transforms.PRESETS), key="aug_preset")
    if preset != "(keep current)" and common.lab().page.get("aug_applied") != preset:
        settings["augment"] = dict(transforms.PRESETS[preset])
        common.lab().page["aug_applied"] = preset
        for key in [k for k in st.session_state if str(k).startswith(("aug_v_", "aug_on_"))]:
            del st.session_state[key]
    augment = dict(settings["augment"])
    cols = st.columns(4)
    for i, (name, label) in enumerate(transforms.AUGMENTATIONS.items()):
        col = cols[i % 4]
        on = col.checkbox(label, bool(augment.get(name)), key=f"aug_on_{name}")
        if name in ("hflip", "vflip"):
            augment[name] = on
        elif name == "auto":
            augment[name] = col.radio("auto", ["trivialaugment", "randaugment"], key="aug_v_auto",
                                      index=1 if augment.get("auto") == "randaugment" else 0,
                                      label_visibility="collapsed", horizontal=True) if on else 0
        else:
            lo, hi, default = transforms.AUGMENT_RANGES[name]
            augment[name] = col.slider(name, lo, hi, float(augment.get(name) or default), key=f"aug_v_{name}",
                                       label_visibility="collapsed") if on else 0
    settings["augment"] = {k: v for k, v in augment.items() if v}
    if settings["augment"] and st.toggle("Preview 16 augmented versions", key="aug_preview"):
        preview(settings)


def preview(settings):
    root = resolve_data_root(settings["data_root"])
    try:
        scan = folders.scan_folder(root, check=False)
    except DataError as err:
        st.error(str(err))
        return
    seed = common.lab().page.setdefault("aug_seed", 0)
    if st.button("Re-roll", icon=":material/casino:", key="aug_reroll"):
        common.lab().page["aug_seed"] = seed = seed + 1
    picks = random.Random(seed).sample(scan.items, min(4, len(scan.items)))
    images, _ = imaging.decode_images(scan.root, picks, settings["image_size"])
    st.image(transforms.preview_augmentations(images, settings["image_size"], settings["augment"], seed), width=96)


common.presets_panel(settings)
speed_panel(settings)
with st.expander("Training settings", expanded=not common.lab().current_run):
    c = st.columns(4)
    opt = common.bind(c[0].selectbox, "optimizer", "Optimizer", settings,
                      options=CHOICES["optimizer"],
                      format_func={"sgd": "SGD + momentum", "adam": "Adam", "adamw": "AdamW",
                                   "rmsprop": "RMSprop"}.get)
    common.bind(c[1].number_input, "lr", "Learning rate", settings, **common.limits("lr"),
                format="%.5f", step=1e-4)
    common.bind(c[2].number_input, "weight_decay", "Weight decay", settings,
                **common.limits("weight_decay"), format="%.5f", step=1e-4)
    explain("learning_rate", inside_expander=True)
    lr_panel(settings)
    if opt in ("sgd", "rmsprop"):
        common.bind(c[3].number_input, "momentum", "Momentum", settings,
                    **common.limits("momentum"), step=0.05)
    c = st.columns(4)
    common.bind(c[0].number_input, "epochs", "Epochs", settings, **common.limits("epochs"))
    common.bind(c[1].select_slider, "batch_size", "Batch size", settings,
                options=WIDGET_CHOICES["batch_size"])
    common.bind(c[2].select_slider, "image_size", "Image size (px)", settings,
                options=WIDGET_CHOICES["image_size"])
    common.bind(c[3].number_input, "seed", "Seed", settings, **common.limits("seed"))
    c = st.columns(4)
    sched = common.bind(c[0].selectbox, "scheduler", "LR schedule", settings,
                        options=CHOICES["scheduler"],
                        format_func={"none": "Constant", "step": "StepLR", "cosine": "Cosine (+ warm-up)",
                                     "onecycle": "One-cycle"}.get)
    if sched == "step":
        common.bind(c[1].number_input, "step_size", "Step every (epochs)", settings,
                    **common.limits("step_size"))
        common.bind(c[2].number_input, "gamma", "Multiply LR by", settings,
                    **common.limits("gamma"), step=0.05)
    if sched == "cosine":
        common.bind(c[1].number_input, "warmup_epochs", "Warm-up epochs", settings,
                    **common.limits("warmup_epochs"))
    common.bind(c[3].number_input, "label_smoothing", "Label smoothing", settings,
                **common.limits("label_smoothing"), step=0.05)
    c = st.columns(4)
    common.bind(c[0].number_input, "patience", "Early stopping patience (0 = off)", settings,
                **common.limits("patience"))
    common.bind(c[1].selectbox, "normalize", "Normalisation", settings, options=["backbone", "dataset"],
                format_func={"backbone": "Backbone's mean/std", "dataset": "This data set's mean/std"}.get)
    if settings["freeze"] not in ("head", "scratch"):
        common.bind(c[2].number_input, "phase1_epochs", "Two-phase: head-only epochs first", settings,
                    **common.limits("phase1_epochs"))
        common.bind(c[3].number_input, "backbone_lr_mult", "Backbone LR × (when it trains)", settings,
                    **common.limits("backbone_lr_mult"), step=0.05, format="%.3f")
    class_weight_option(settings)
    if settings["normalize"] == "dataset":
        stats_panel(settings)
    augmentation_menu(settings)

native = native_input_size(settings["arch"])
if native and native != settings["image_size"]:
    st.caption(f"`{settings['arch']}` only accepts {native}×{native} images (fixed position "
               f"embeddings), so it will train at {native} px.")
cfg = common.run_config(settings)
if cfg.phase1_epochs and cfg.freeze not in ("head", "scratch"):
    st.caption(f"Two-phase: {cfg.phase1_epochs} head-only epoch(s), then {cfg.epochs - cfg.phase1_epochs} "
               f"with {cfg.freeze.replace('_', '-')} at backbone LR × {cfg.backbone_lr_mult:g}; the "
               "curves mark the switch.")
if cfg.freeze == "head":
    if uses_feature_cache(cfg):
        st.caption(":material/bolt: Backbone frozen: its features are computed once (per augmented view) and cached, "
                   "so each epoch trains only the head (a fraction of a second).")
    else:
        st.caption("Augmentation runs live, so the feature cache is off: every epoch runs the frozen "
                   "backbone on new augmented images (slower). Set *Augmented views to cache* to keep both.")


def start():
    try:
        run = common.submit(common.run_config(settings))
    except ValueError as err:     # a full queue, a data folder this user may not read
        common.lab().note("start_error", str(err))
        return
    common.lab().current_run = run.id


problem = None
if settings["weights"] == "file" and not settings.get("weights_file") and settings["freeze"] != "scratch":
    problem = "Upload the weights file on the Model page first."
st.button("▶️ Start training", type="primary", on_click=start, disabled=problem is not None)
if problem:
    st.warning(problem)
if error := common.lab().take("start_error"):
    st.error(error)
if note := common.lab().take("run_note"):
    st.info(note)
common.command_line(cfg)

st.divider()
run = common.pick_run("Show run")
if run is None:
    st.info("No runs yet. Press *Start training*.")
    common.stop()


def live(run):
    status = run.status()
    state = status.get("state", "?")
    active = state in ACTIVE_STATES
    head, actions = st.columns([3, 2])
    icon = {"finished": ":material/check_circle:", "failed": ":material/error:", "stopped": ":material/stop_circle:",
            "interrupted": ":material/warning:"}.get(state, ":material/hourglass_top:")
    head.markdown(f"{icon} **{state}** — {status.get('message', '')}")
    if state == "queued" and (place := common.queue_place(run.id)):
        head.caption(place)
    elif active and status.get("where"):
        head.caption(f":material/dns: Training in its own process on {status['where']}")
    with actions:
        common.run_actions(run, active)
    if error := common.lab().take("run_error"):
        st.error(error)
    if state == "finished" and status.get("test_acc") is not None:
        m = st.columns(4)
        m[0].metric("Test accuracy (best epoch)", f"{status['test_acc']:.1%}")
        m[1].metric("Best epoch", status.get("best_epoch", "–"))
        m[2].metric("Best val accuracy", f"{status.get('best_val_acc', float('nan')):.1%}")
        common.link("evaluate", "See the confusion matrix", ":material/analytics:", where=m[3])
    steps, step = status.get("steps") or 0, status.get("step") or 0
    if active and steps:
        epoch, epochs = status.get("epoch") or 0, status.get("epochs") or 0
        overall = ((max(epoch - 1, 0) + step / steps) / epochs) if epochs and status.get("phase") in ("train", "val") else step / steps
        st.progress(min(1.0, overall), text=status.get("message", ""))
    if status.get("device"):
        st.caption(status["device"])
    run_speed_info(run)
    epochs = run.epochs()
    if epochs:
        common.show_curves(epochs)
        st.dataframe(common.epochs_table(epochs), hide_index=True, width="stretch",
                     column_config=common.epochs_column_config())
    if common.lab().page.get("live_was_active") and not active:
        common.lab().page["live_was_active"] = False
        st.rerun(scope="app")      # stop polling and redraw the page in its final state
    common.lab().page["live_was_active"] = active



# Two fragments, not one whose run_every changes: a fragment first drawn without polling did not
# start polling when a rerun gave it run_every (after Resume the page said "queued" while the run
# trained). An ended run is not polled at all: a fragment rerunning while the user moved a slider
# elsewhere on the page swallowed that change (the run then trained with the old value).
@st.fragment(run_every=1)
def live_polling(run):
    live(run)


@st.fragment
def live_still(run):
    live(run)
    if run.status().get("state") in ACTIVE_STATES:
        st.rerun(scope="app")      # Resume (a button inside this fragment) reruns only the fragment


(live_polling if run.status().get("state") in ACTIVE_STATES else live_still)(run)

common.finish()
