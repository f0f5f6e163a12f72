"""Train: optimiser settings, start/stop, and the live view of a run."""
import streamlit as st

from pages import show_loading

LOADING = show_loading()      # the imports below take seconds on a server's first visit

import pandas as pd
import timm  # the package first: two sessions entering timm's import cycle at different
#              modules (timm.data here, timm via core elsewhere) got a half-initialised module

from core.training import choose
from core import config
from core.data import DataError
from core.data import folders
from core.data import transforms
from core.device import describe, pick_device
from core.models.backbones import native_input_size
from core.paths import resolve_data_root
from core.serve.status import State, overall_fraction
from core.training.caches import uses_feature_cache
from pages import common
from pages.common.speed import lr_panel, run_speed_info, speed_panel
from pages.common.teaching import explain

KEEP_PRESET = "(keep current)"
STATE_ICONS = {State.FINISHED: ":material/check_circle:", State.FAILED: ":material/error:",
               State.STOPPED: ":material/stop_circle:", State.INTERRUPTED: ":material/warning:"}


def main() -> None:
    LOADING.empty()
    settings = common.setup("Train")
    st.title("Train")
    device = pick_device()
    if not common.lab().image_size_chosen:     # once per session: later the user's choice stands
        common.lab().image_size_chosen = True
        settings["image_size"] = config.default_image_size(device.type)
    st.caption(f"Data: **{settings.get('data_label')}** · Model: **`{settings['arch']}`**, "
               f"{settings['freeze'].replace('_', '-')} · Device: **{describe(device)}**")
    common.presets_panel(settings)
    speed_panel(settings)
    with st.expander("Training settings", expanded=not common.lab().current_run):
        training_settings(settings)
    cfg = common.run_config(settings)
    plan_notes(cfg)
    start_panel(settings, cfg)
    st.divider()
    run = common.pick_run("Show run")
    if run is None:
        st.info("No runs yet. Press *Start training*.")
        common.stop()
    (live_polling if run.status().active else live_still)(run)
    common.finish()


# ---------------------------------------------------------------- settings

def training_settings(settings: dict) -> None:
    optimizer_row(settings)
    explain("learning_rate", inside_expander=True)
    lr_panel(settings)
    length_row(settings)
    schedule_row(settings)
    phases_row(settings)
    class_weight_option(settings)
    if settings["normalize"] == "dataset":
        stats_panel(settings)
    augmentation_menu(settings)


def optimizer_row(settings: dict) -> None:
    c = st.columns(4)
    common.bind(c[0].selectbox, "optimizer", "Optimizer", settings, options=config.options("optimizer"),
                format_func=config.OPTIMIZER_LABELS.get)
    common.bind(c[1].number_input, "lr", "Learning rate", settings, **common.limits("lr"),
                format="%.5f", step=1e-4)
    common.bind(c[2].number_input, "weight_decay", "Weight decay", settings,
                **common.limits("weight_decay"), format="%.5f", step=1e-4)
    if config.uses_momentum(settings["optimizer"]):
        common.bind(c[3].number_input, "momentum", "Momentum", settings,
                    **common.limits("momentum"), step=0.05)


def length_row(settings: dict) -> None:
    c = st.columns(4)
    common.bind(c[0].number_input, "epochs", "Epochs", settings, **common.limits("epochs"))
    common.bind(c[1].select_slider, "batch_size", "Batch size", settings, options=config.options("batch_size"))
    common.bind(c[2].select_slider, "image_size", "Image size (px)", settings,
                options=config.options("image_size"))
    common.bind(c[3].number_input, "seed", "Seed", settings, **common.limits("seed"))


def schedule_row(settings: dict) -> None:
    c = st.columns(4)
    scheduler = common.bind(c[0].selectbox, "scheduler", "LR schedule", settings,
                            options=config.options("scheduler"), format_func=config.SCHEDULER_LABELS.get)
    if scheduler == "step":
        common.bind(c[1].number_input, "step_size", "Step every (epochs)", settings,
                    **common.limits("step_size"))
        common.bind(c[2].number_input, "gamma", "Multiply LR by", settings, **common.limits("gamma"), step=0.05)
    if scheduler == "cosine":
        common.bind(c[1].number_input, "warmup_epochs", "Warm-up epochs", settings,
                    **common.limits("warmup_epochs"))
    common.bind(c[3].number_input, "label_smoothing", "Label smoothing", settings,
                **common.limits("label_smoothing"), step=0.05)


def phases_row(settings: dict) -> None:
    c = st.columns(4)
    common.bind(c[0].number_input, "patience", "Early stopping patience (0 = off)", settings,
                **common.limits("patience"))
    common.bind(c[1].selectbox, "normalize", "Normalisation", settings, options=config.options("normalize"),
                format_func=config.NORMALIZE_LABELS.get)
    if config.two_phase_applies(settings["freeze"]):
        common.bind(c[2].number_input, "phase1_epochs", "Two-phase: head-only epochs first", settings,
                    **common.limits("phase1_epochs"))
        common.bind(c[3].number_input, "backbone_lr_mult", "Backbone LR × (when it trains)", settings,
                    **common.limits("backbone_lr_mult"), step=0.05, format="%.3f")


@st.cache_data(show_spinner=False, max_entries=16, ttl=60)
def imbalance(root: str) -> float:
    """Largest class over smallest (1.0 when the folder is no data set yet)."""
    try:
        return folders.scan_folder(root, check=False).imbalance()
    except DataError:
        return 1.0


def class_weight_option(settings: dict) -> None:
    help_text = ("Each class's loss is weighted by 1 / (its share of the training images), so a rare "
                 "class counts as much as a common one. Helps when classes are very unequal.")
    common.bind(st.checkbox, "class_weights", "Class-weighted loss", settings, help=help_text)
    ratio = imbalance(str(resolve_data_root(settings["data_root"])))
    if folders.is_imbalanced(ratio) and not settings["class_weights"]:
        st.caption(f":material/balance: The largest class has {ratio:.0f}× the images of the smallest: consider the "
                   "class-weighted loss, and judge the result by per-class recall, not accuracy alone.")


@st.cache_data(show_spinner="Computing the data set's mean and std…", max_entries=8)
def data_stats(root: str, size: int) -> tuple[list[float], list[float]]:
    return transforms.folder_stats(root, size)


def stats_panel(settings: dict) -> None:
    mean, std = data_stats(str(resolve_data_root(settings["data_root"])), settings["image_size"])
    st.dataframe(pd.DataFrame({"this data set mean": mean, "std": std, "ImageNet mean": timm.data.IMAGENET_DEFAULT_MEAN,
                               "ImageNet std": timm.data.IMAGENET_DEFAULT_STD}, index=["R", "G", "B"]), width="content")


# ---------------------------------------------------------------- augmentation

def augmentation_menu(settings: dict) -> None:
    st.markdown("**Augmentation** (training images only)")
    explain("augmentation", inside_expander=True)
    preset = st.selectbox("Start from a preset", [KEEP_PRESET] + list(transforms.PRESETS), key="aug_preset")
    if preset != KEEP_PRESET and common.lab().page.get("aug_applied") != preset:
        settings["augment"] = dict(transforms.PRESETS[preset])
        common.lab().page["aug_applied"] = preset
        common.forget(prefix=("aug_v_", "aug_on_"))     # the boxes and sliders redraw from the preset
    cols = st.columns(4)
    chosen = {name: augmentation_widget(cols[i % 4], name, label, settings["augment"].get(name))
              for i, (name, label) in enumerate(transforms.AUGMENTATIONS.items())}
    settings["augment"] = {k: v for k, v in chosen.items() if v}
    if settings["augment"] and st.toggle("Preview 16 augmented versions", key="aug_preview"):
        preview(settings)


def augmentation_widget(col, name: str, label: str, current):
    """One augmentation: a checkbox, then its strength (a slider) or its kind (auto); 0 when off."""
    on = col.checkbox(label, bool(current), key=f"aug_on_{name}")
    if name == "auto":
        index = transforms.AUTO_AUGMENTS.index(current) if current in transforms.AUTO_AUGMENTS else 0
        return col.radio("auto", transforms.AUTO_AUGMENTS, key="aug_v_auto", index=index,
                         label_visibility="collapsed", horizontal=True) if on else 0
    if name not in transforms.AUGMENT_RANGES:       # flips: on or off
        return on
    lo, hi, default = transforms.AUGMENT_RANGES[name]
    return col.slider(name, lo, hi, float(current or default), key=f"aug_v_{name}",
                      label_visibility="collapsed") if on else 0


def preview(settings: dict) -> None:
    seed = common.lab().page.setdefault("aug_seed", 0)
    if st.button("Re-roll", icon=":material/casino:", key="aug_reroll"):
        common.lab().page["aug_seed"] = seed = seed + 1
    try:
        images = transforms.folder_preview(resolve_data_root(settings["data_root"]), settings["image_size"],
                                           settings["augment"], seed)
    except DataError as err:
        st.error(str(err))
        return
    st.image(images, width=96)


# ---------------------------------------------------------------- before the start

def plan_notes(cfg: config.RunConfig) -> None:
    """What the run will do differently from the settings as typed: size, phases, caching."""
    if cfg.pick_backbone and cfg.time_budget_s:
        st.caption(":material/science: The budget first probes the backbones whose weights are here, at "
                   f"{' and '.join(map(str, choose.sizes_for(pick_device().type)))} px, on a sample of your "
                   "training images, and trains the best that fits (pin one on the Model page).")
    native = native_input_size(cfg.arch)
    if native and native != cfg.image_size:
        st.caption(f"`{cfg.arch}` only accepts {native}×{native} images (fixed position "
                   f"embeddings), so it will train at {native} px.")
    if cfg.phase1_epochs and config.two_phase_applies(cfg.freeze):
        st.caption(f"Two-phase: {cfg.phase1_epochs} head-only epoch(s), then {cfg.epochs - cfg.phase1_epochs} "
                   f"with {cfg.freeze.replace('_', '-')} at backbone LR × {cfg.backbone_lr_mult:g}; the "
                   "curves mark the switch.")
    if cfg.freeze != "head":
        return
    if uses_feature_cache(cfg):
        st.caption(":material/bolt: Backbone frozen: its features are computed once (per augmented view) and cached, "
                   "so each epoch trains only the head (a fraction of a second).")
    else:
        st.caption("Augmentation runs live, so the feature cache is off: every epoch runs the frozen "
                   "backbone on new augmented images (slower). Set *Augmented views to cache* to keep both.")


def start_panel(settings: dict, cfg: config.RunConfig) -> None:
    problem = "Upload the weights file on the Model page first." if config.weights_problems(settings) else None
    st.button("▶️ Start training", type="primary", on_click=start, args=(settings,), disabled=problem is not None)
    if problem:
        st.warning(problem)
    if error := common.lab().take("start_error"):
        st.error(error)
    if note := common.lab().take("run_note"):
        st.info(note)
    common.command_line(cfg)


def start(settings: dict) -> None:
    try:
        run = common.submit(common.run_config(settings))
    except ValueError as err:     # a full queue, a data folder this user may not read
        common.lab().note("start_error", str(err))
        return
    common.lab().current_run = run.id


# ---------------------------------------------------------------- the live view of a run

def live(run) -> None:
    status = run.status()
    run_header(run, status)
    if status.state == State.FINISHED and status.test_acc is not None:
        result_metrics(status)
    fraction = overall_fraction(status)
    if status.active and fraction is not None:
        st.progress(fraction, text=status.message)
    if status.device:
        st.caption(status.device)
    run_speed_info(run)
    if epochs := run.epochs():
        common.show_curves(epochs)
        st.dataframe(common.epochs_table(epochs), hide_index=True, width="stretch",
                     column_config=common.epochs_column_config())
    if common.lab().page.get("live_was_active") and not status.active:
        common.lab().page["live_was_active"] = False
        st.rerun(scope="app")      # stop polling and redraw the page in its final state
    common.lab().page["live_was_active"] = status.active


def run_header(run, status) -> None:
    """The state and its message, where the run trains or waits, and its buttons."""
    head, actions = st.columns([3, 2])
    icon = STATE_ICONS.get(status.state, ":material/hourglass_top:")
    head.markdown(f"{icon} **{status.state or '?'}** — {status.message}")
    if status.state == State.QUEUED and (place := common.queue_place(run.id)):
        head.caption(place)
    elif status.active and status.where:
        head.caption(f":material/dns: Training in its own process on {status.where}")
    with actions:
        common.run_actions(run, status.active)
    if error := common.lab().take("run_error"):
        st.error(error)


def result_metrics(status) -> None:
    m = st.columns(4)
    m[0].metric("Test accuracy (best epoch)", f"{status.test_acc:.1%}")
    m[1].metric("Best epoch", status.best_epoch if status.best_epoch is not None else "–")
    best_val = status.best_val_acc if status.best_val_acc is not None else float("nan")
    m[2].metric("Best val accuracy", f"{best_val:.1%}")
    common.link("evaluate", "See the confusion matrix", ":material/analytics:", where=m[3])


# Two fragments, not one whose run_every changes: a fragment first drawn without polling did not
# start polling when a rerun gave it run_every (after Resume the page said "queued" while the run
# trained). An ended run is not polled at all: a fragment rerunning while the user moved a slider
# elsewhere on the page swallowed that change (the run then trained with the old value).
@st.fragment(run_every=1)
def live_polling(run) -> None:
    live(run)


@st.fragment
def live_still(run) -> None:
    live(run)
    if run.status().active:
        st.rerun(scope="app")      # Resume (a button inside this fragment) reruns only the fragment


main()
