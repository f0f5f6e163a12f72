"""The one object a browser session keeps between reruns and pages: `lab()`.

Widgets keep their own values under their keys while their page is shown (Streamlit drops them
when the page is left); everything else the UI remembers lives here, so there is one place to
read it and one `reset()`.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import streamlit as st

KEY = "lab"


@dataclass
class Lab:
    settings: dict                       # the draft run configuration (RunConfig fields) + data_label
    owner: str = ""                      # the signed-in user's id, for display (identity is user())
    current_run: str | None = None       # the run every page shows: the one last started or picked
    quick_demo: str | None = None        # the Quick demo run Home is following
    image_size_chosen: bool = False      # Train set its device-dependent image size once
    large_text: bool = False             # the projector switch in the sidebar
    notes: dict = field(default_factory=dict)     # one-shot messages for the next render
    page: dict = field(default_factory=dict)      # what a page keeps between its reruns

    def note(self, key: str, text: str) -> None:
        self.notes[key] = text

    def take(self, key: str) -> str | None:
        """A one-shot message, gone once shown."""
        return self.notes.pop(key, None)


def lab() -> Lab:
    if KEY not in st.session_state:
        from pages.common import default_settings
        st.session_state[KEY] = Lab(settings=default_settings())
    return st.session_state[KEY]


def reset(settings: dict) -> None:
    """Start over with `settings`: keep who this browser is, forget the rest, and drop widget
    values so every widget redraws from the new settings."""
    old = lab()
    st.session_state[KEY] = Lab(settings=settings, owner=old.owner,
                                current_run=old.current_run, image_size_chosen=True,
                                large_text=old.large_text)
    forget_widgets()


def forget_widgets() -> None:
    for key in [k for k in st.session_state if k != KEY]:
        del st.session_state[key]
