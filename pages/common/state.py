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


# ---------------------------------------------------------------- widget values
# Streamlit keeps a widget's value under its key while its page is shown. Pages reach those
# values only through these helpers, so every direct use of st.session_state sits in this file.

def bind(widget, field: str, label: str, settings: dict, **kwargs):
    """Draw `widget` showing settings[field] and store the user's choice back. Widget state is
    dropped when a page is left; the settings dict survives page switches."""
    key = f"w_{field}"
    if key not in st.session_state:
        st.session_state[key] = settings[field]
    value = widget(label, key=key, **kwargs)
    settings[field] = value
    return value


def widget_value(key: str, default=None):
    """The value the widget `key` holds now (default before it was drawn)."""
    return st.session_state.get(key, default)


def set_widget(key: str, value) -> None:
    """Show `value` in widget `key` at its next draw (before it is drawn in this run)."""
    st.session_state[key] = value


def init_widget(key: str, value):
    """Give widget `key` its first value (kept if the user already chose one); returns it."""
    return st.session_state.setdefault(key, value)


def forget(*keys: str, prefix: tuple[str, ...] = ()) -> None:
    """Drop widget values so those widgets redraw from the settings: the named keys and any key
    that starts with one of `prefix`."""
    for key in [k for k in st.session_state if k in keys or (prefix and str(k).startswith(prefix))]:
        del st.session_state[key]
