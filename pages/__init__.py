"""The app's pages. This file holds only the navigation table: the entry file reads it before
it imports PyTorch, so a first visit (even by a deep link) gets the navigation, and with it a
visible loading message, at once. Streamlit's pages/ discovery skips __init__.py."""

PAGES = {
    "home": "pages/0_Home.py",
    "data": "pages/1_Data.py",
    "doctor": "pages/8_Doctor.py",
    "model": "pages/2_Model.py",
    "train": "pages/3_Train.py",
    "evaluate": "pages/4_Evaluate.py",
    "predict": "pages/5_Predict.py",
    "inspect": "pages/6_Inspect.py",
    "experiments": "pages/7_Experiments.py",
}
# (title, icon) per page: the navigation the entry file builds and the sidebar's own links
# Material icons: they render on machines without an emoji font (a projector laptop often has none).
NAV = {"home": ("Home", ":material/home:"), "data": ("Data", ":material/photo_library:"),
       "doctor": ("Doctor", ":material/health_and_safety:"),
       "model": ("Model", ":material/neurology:"), "train": ("Train", ":material/model_training:"),
       "evaluate": ("Evaluate", ":material/analytics:"), "predict": ("Predict", ":material/online_prediction:"),
       "inspect": ("Inspect", ":material/biotech:"), "experiments": ("Experiments", ":material/science:")}


def show_loading():
    """A line at the top of the page while PyTorch and timm load; returns its slot, which the
    page empties once its imports are done. Pages call it before their heavy imports: the first
    visit after a server start takes seconds there, and a page opened first by a deep link runs
    as its own script (Streamlit's pages/ mode) without the entry file's message."""
    import streamlit as st
    slot = st.empty()
    slot.caption(":material/hourglass_top: Loading Finetune Lab (PyTorch, timm)…")
    return slot
