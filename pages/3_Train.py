"""Train: optimiser settings, start/stop, and the live view of a run."""
import streamlit as st

from core import data as D
from core.backbones import native_input_size
from core.device import describe, pick_device
from core.runs import ACTIVE_STATES, MANAGER
from core.training import uses_feature_cache
from pages import common

settings = common.setup("Train")
st.title("🏋️ Train")
device = pick_device()
if "image_size_default" not in st.session_state:     # smaller images on CPU keep demos quick
    st.session_state["image_size_default"] = True
    settings["image_size"] = 128 if device.type == "cpu" else 224

st.caption(f"Data: **{settings.get('data_label')}** · Model: **`{settings['arch']}`**, "
           f"{settings['freeze'].replace('_', '-')} · Device: **{describe(device)}**")

with st.expander("Training settings", expanded=not st.session_state.get("run_id")):
    c = st.columns(4)
    opt = common.bind(c[0].selectbox, "optimizer", "Optimizer", settings,
                      options=["sgd", "adam", "adamw", "rmsprop"],
                      format_func={"sgd": "SGD + momentum", "adam": "Adam", "adamw": "AdamW",
                                   "rmsprop": "RMSprop"}.get)
    common.bind(c[1].number_input, "lr", "Learning rate", settings, min_value=1e-6, max_value=10.0,
                format="%.5f", step=1e-4)
    common.bind(c[2].number_input, "weight_decay", "Weight decay", settings, min_value=0.0,
                max_value=1.0, format="%.5f", step=1e-4)
    if opt in ("sgd", "rmsprop"):
        common.bind(c[3].number_input, "momentum", "Momentum", settings, min_value=0.0,
                    max_value=0.999, step=0.05)
    c = st.columns(4)
    common.bind(c[0].number_input, "epochs", "Epochs", settings, min_value=1, max_value=500)
    common.bind(c[1].select_slider, "batch_size", "Batch size", settings,
                options=[4, 8, 16, 32, 64, 128, 256])
    common.bind(c[2].select_slider, "image_size", "Image size (px)", settings,
                options=[64, 96, 128, 160, 192, 224, 256, 288, 320, 384])
    common.bind(c[3].number_input, "seed", "Seed", settings, min_value=0, max_value=10**6)
    c = st.columns(4)
    sched = common.bind(c[0].selectbox, "scheduler", "LR schedule", settings,
                        options=["none", "step", "cosine"],
                        format_func={"none": "Constant", "step": "StepLR", "cosine": "Cosine"}.get)
    if sched == "step":
        common.bind(c[1].number_input, "step_size", "Step every (epochs)", settings, min_value=1, max_value=100)
        common.bind(c[2].number_input, "gamma", "Multiply LR by", settings, min_value=0.01,
                    max_value=1.0, step=0.05)

    st.markdown("**Augmentation** (training images only)")
    augment = dict(settings["augment"])
    c = st.columns(5)
    augment["hflip"] = c[0].checkbox(D.AUGMENTATIONS["hflip"], bool(augment.get("hflip")), key="aug_hflip")
    augment["vflip"] = c[1].checkbox(D.AUGMENTATIONS["vflip"], bool(augment.get("vflip")), key="aug_vflip")
    for col, name, lo, hi, default in ((c[2], "rotation", 1.0, 180.0, 30.0),
                                       (c[3], "random_resized_crop", 0.05, 0.95, 0.5),
                                       (c[4], "color_jitter", 0.05, 0.9, 0.2)):
        on = col.checkbox(D.AUGMENTATIONS[name], bool(augment.get(name)), key=f"aug_{name}")
        augment[name] = col.slider(name, lo, hi, float(augment.get(name) or default), key=f"aug_v_{name}",
                                   label_visibility="collapsed") if on else 0
    settings["augment"] = {k: v for k, v in augment.items() if v}

native = native_input_size(settings["arch"])
if native and native != settings["image_size"]:
    st.caption(f"`{settings['arch']}` only accepts {native}×{native} images (fixed position "
               f"embeddings), so it will train at {native} px.")
cfg = common.run_config(settings)
if cfg.freeze == "head":
    if uses_feature_cache(cfg):
        st.caption("⚡ Backbone frozen and no augmentation: features are computed once and cached, "
                   "so each epoch trains only the head (a fraction of a second).")
    else:
        st.caption("Augmentation is on, so the feature cache is off: every epoch runs the frozen "
                   "backbone on new augmented images (slower).")


def start():
    run = MANAGER.submit(common.run_config(settings))
    st.session_state["run_id"] = run.id
    st.session_state["run_pick"] = run.id


problem = None
if settings["weights"] == "file" and not settings.get("weights_file") and settings["freeze"] != "scratch":
    problem = "Upload the weights file on the Model page first."
st.button("▶️ Start training", type="primary", on_click=start, disabled=problem is not None)
if problem:
    st.warning(problem)

st.divider()
run = common.pick_run("Show run")
if run is None:
    st.info("No runs yet. Press *Start training*.")
    st.stop()


@st.fragment(run_every=1 if run.status().get("state") in ACTIVE_STATES else None)
def live(run):
    status = run.status()
    state = status.get("state", "?")
    active = state in ACTIVE_STATES
    head, stop_col = st.columns([5, 1])
    icon = {"finished": "✅", "failed": "❌", "stopped": "⏹️", "interrupted": "⚠️"}.get(state, "⏳")
    head.markdown(f"{icon} **{state}** — {status.get('message', '')}")
    if active:
        stop_col.button("⏹️ Stop", on_click=common.stop_run, args=(run.id,), key="stop")
    if state == "finished" and status.get("test_acc") is not None:
        m = st.columns(4)
        m[0].metric("Test accuracy (best epoch)", f"{status['test_acc']:.1%}")
        m[1].metric("Best epoch", status.get("best_epoch", "–"))
        m[2].metric("Best val accuracy", f"{status.get('best_val_acc', float('nan')):.1%}")
        common.link("evaluate", "See the confusion matrix", "📊", where=m[3])
    steps, step = status.get("steps") or 0, status.get("step") or 0
    if active and steps:
        epoch, epochs = status.get("epoch") or 0, status.get("epochs") or 0
        overall = ((max(epoch - 1, 0) + step / steps) / epochs) if epochs and status.get("phase") in ("train", "val") else step / steps
        st.progress(min(1.0, overall), text=status.get("message", ""))
    if status.get("device"):
        st.caption(f"{status['device']}" + (" · feature cache on" if status.get("feature_cache") else ""))
    epochs = run.epochs()
    if epochs:
        common.show_curves(epochs)
        st.dataframe(common.epochs_table(epochs), hide_index=True, width="stretch",
                     column_config=common.epochs_column_config())
    if st.session_state.get("live_was_active") and not active:
        st.session_state["live_was_active"] = False
        st.rerun(scope="app")      # stop polling and redraw the page in its final state
    st.session_state["live_was_active"] = active


live(run)
