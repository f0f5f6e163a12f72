"""Finetune Lab: transfer learning of image classifiers on timm backbones, in the browser."""
import streamlit as st

from pages import common


def home():
    settings = common.setup("Home")
    st.title("🧪 Finetune Lab")
    st.markdown(
        "Fine-tune an ImageNet-pretrained network on your own labelled images, without code. "
        "Pick a data set and a backbone, choose how much of it to freeze, and train on the CPU "
        "or a GPU while you watch the curves. Then study the result: accuracy, confusion matrix "
        "and the runs you trained before.")
    runs = common.list_runs()
    finished = [r for r in runs if r.status().get("state") == "finished"]
    steps = [
        ("data", "1. Data", f"{settings.get('data_label', settings['data_root'])}", True),
        ("model", "2. Model", f"`{settings['arch']}`, {settings['freeze'].replace('_', '-')}", True),
        ("train", "3. Train", f"{len(runs)} run(s) so far", bool(runs)),
        ("evaluate", "4. Evaluate", f"{len(finished)} finished run(s)", bool(finished)),
    ]
    for page, label, detail, done in steps:
        left, right = st.columns([1, 4])
        common.link(page, label, "✅" if done else "⬜", where=left)
        right.markdown(detail)
    st.info("New here? The defaults work as they are: open **Train** and press *Start training*. "
            "The demo data and the MobileNetV2 backbone ship with the app, so it runs offline; "
            "head-only training takes about a minute on a laptop CPU.")
    if runs:
        st.subheader("Runs")
        st.dataframe(common.runs_frame(), hide_index=True, width="stretch", column_config={
            "best_val_acc": st.column_config.NumberColumn("best val acc", format="percent"),
            "test_acc": st.column_config.NumberColumn("test acc", format="percent")})
    st.caption(f"Runs and uploads are stored in `{common.data_dir_hint()}`.")


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
