"""Finetune Lab: transfer learning of image classifiers on timm backbones, in the browser.
This file only builds the navigation; every page, Home included, lives in pages/."""
import streamlit as st

from pages import common

pages = [
    st.Page(common.PAGES["home"], title="Home", icon="🏠", default=True),
    st.Page(common.PAGES["data"], title="Data", icon="🖼️"),
    st.Page(common.PAGES["model"], title="Model", icon="🧠"),
    st.Page(common.PAGES["train"], title="Train", icon="🏋️"),
    st.Page(common.PAGES["evaluate"], title="Evaluate", icon="📊"),
    st.Page(common.PAGES["predict"], title="Predict", icon="🔮"),
    st.Page(common.PAGES["inspect"], title="Inspect", icon="🔬"),
    st.Page(common.PAGES["experiments"], title="Experiments", icon="🧪"),
]
st.navigation(pages).run()
