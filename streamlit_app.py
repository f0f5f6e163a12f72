"""Finetune Lab: transfer learning of image classifiers on timm backbones, in the browser."""
import streamlit as st

from pages import common


def home():
    settings = common.setup("Home")
    st.title("🧪 Finetune Lab")
    st.markdown(
        "Finetune Lab teaches a network that already knows ImageNet's 1000 classes to recognise "
        "**your** classes, from a folder or zip of labelled images, without writing code. "
        "You choose the backbone, how much of it to freeze and how to train, and watch it learn "
        "on the CPU or a GPU. Then you study what it learned: accuracy, confusion matrix, its best "
        "and worst images, feature maps and attributions, and a one-click report to hand in.")
    if st.session_state.pop("quick_demo_done", False):
        st.switch_page(common.PAGES["evaluate"])
    quick_demo(settings)
    checklist(settings)
    common.presets_panel(settings)
    runs = common.list_runs()
    if runs:
        st.subheader("Runs")
        st.dataframe(common.runs_frame(), hide_index=True, width="stretch", column_config={
            "best_val_acc": st.column_config.NumberColumn("best val acc", format="percent"),
            "test_acc": st.column_config.NumberColumn("test acc", format="percent")})
    st.caption(f"Runs and uploads are stored in `{common.data_dir_hint()}`.")


def checklist(settings):
    """Where the session is in the flow, with a link to each step."""
    runs = common.list_runs()
    mine = [r for r in runs if common.mine(r)]
    finished = [r for r in mine if r.status().get("state") == "finished"]
    demo = settings["data_root"] == common.default_settings()["data_root"]
    steps = [
        ("data", "1. Data", settings.get("data_label", settings["data_root"])
         + (" (the built-in default; drop your own images on the Data page)" if demo else ""), True),
        ("model", "2. Model", f"`{settings['arch']}`, {settings['freeze'].replace('_', '-')}", True),
        ("train", "3. Train", f"{len(mine)} run(s) started in this session", bool(mine)),
        ("evaluate", "4. Evaluate", f"{len(finished)} finished", bool(finished)),
        ("inspect", "5. Inspect", "feature maps, filters, sparsity, attributions", bool(finished)),
    ]
    st.subheader("Your progress")
    for page, label, detail, done in steps:
        left, right = st.columns([1, 4])
        common.link(page, label, "✅" if done else "⬜", where=left)
        right.markdown(detail)


def start_quick_demo():
    """The embedded default, end to end: demo data, bundled MobileNetV2, head-only training on
    cached features. The session's settings go back to those defaults."""
    settings = common.default_settings()
    st.session_state["settings"] = settings
    for key in [k for k in st.session_state if str(k).startswith(("w_", "aug_"))]:
        del st.session_state[key]
    cfg = common.run_config(dict(settings, name="Quick demo"))
    run = common.MANAGER.submit(cfg, owner=common.session_owner())
    st.session_state["run_id"] = st.session_state["quick_demo"] = run.id


def quick_demo(settings):
    box = st.container(border=True)
    box.markdown("**New here?** One click trains the built-in example: 1,000 Fashion-MNIST images, the "
                 "MobileNetV2 that ships with the app, only its last layer trained. It takes about a "
                 "minute on a laptop CPU and opens the results when done.")
    box.button("▶️ Quick demo", type="primary", on_click=start_quick_demo, key="quick_demo_button")
    if error := st.session_state.pop("quick_demo_error", None):
        box.error(error)
    run_id = st.session_state.get("quick_demo")
    if run_id:
        with box:
            quick_demo_progress(run_id)


@st.fragment(run_every=1)
def quick_demo_progress(run_id: str):
    try:
        run = common.get_run(run_id)
    except FileNotFoundError:
        st.session_state.pop("quick_demo", None)
        return
    status = run.status()
    state = status.get("state")
    if state in common.ACTIVE_STATES:
        steps = status.get("steps") or 0
        st.progress(min(1.0, (status.get("step") or 0) / steps) if steps else 0.0,
                    text=status.get("message", "Starting…"))
        return
    st.session_state.pop("quick_demo", None)
    if state == "finished":
        st.success(f"Done: test accuracy {status.get('test_acc', float('nan')):.1%}. Opening the results…")
        st.session_state["quick_demo_done"] = True
    else:
        st.session_state["quick_demo_error"] = f"The demo run {state}: {status.get('message', '')}"
    st.rerun(scope="app")


pages = [
    st.Page(home, title="Home", icon="🏠", default=True),
    st.Page(common.PAGES["data"], title="Data", icon="🖼️"),
    st.Page(common.PAGES["model"], title="Model", icon="🧠"),
    st.Page(common.PAGES["train"], title="Train", icon="🏋️"),
    st.Page(common.PAGES["evaluate"], title="Evaluate", icon="📊"),
    st.Page(common.PAGES["predict"], title="Predict", icon="🔮"),
    st.Page(common.PAGES["inspect"], title="Inspect", icon="🔬"),
    st.Page(common.PAGES["experiments"], title="Experiments", icon="🧪"),
]
st.navigation(pages).run()
