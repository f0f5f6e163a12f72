"""Finetune Lab: transfer learning of image classifiers on timm backbones, in the browser.
This file only builds the navigation; every page, Home included, lives in pages/."""
import streamlit as st

loading = st.empty()        # the first visit after a start imports PyTorch and timm: say so at once
loading.caption("⏳ Loading Finetune Lab (PyTorch, timm)…")
from pages import common  # noqa: E402 - after the message on purpose

loading.empty()
pages = [st.Page(common.PAGES[key], title=title, icon=icon, default=key == "home")
         for key, (title, icon) in common.NAV.items()]
st.navigation(pages, position="hidden").run()      # the sidebar's links are the app's own (common.nav_links)
