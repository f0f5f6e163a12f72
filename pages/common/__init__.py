"""UI helpers shared by every page. Pages call `setup()` first, so each works when opened
directly by a deep link on a fresh server, before the entry file has run `st.navigation`."""
from __future__ import annotations

import threading

import streamlit as st

from core import paths
from core.serve import access  # noqa: F401 - pages use common.access
from core.config import RunConfig
from core.serve.store import ACTIVE_STATES, get_run, list_runs  # noqa: F401 - pages use them as common.X
from core.serve.worker import MANAGER  # noqa: F401
from pages.common import state  # noqa: F401
from pages.common.state import bind, forget, init_widget, lab, set_widget, widget_value  # noqa: F401 - pages call common.bind etc.
from pages.common.ownership import *  # noqa: F401,F403 - the pages call these as common.X
from pages.common.ownership import ANONYMOUS, my_runs, sign_in, user
from pages.common.panels import *  # noqa: F401,F403
from pages.common.data_versions import save_version_button, saved_panel, verdict  # noqa: F401
from pages.common.widgets import *  # noqa: F401,F403

from pages import NAV, PAGES  # noqa: E402,F401 - the table lives where the entry file can read it cheaply


def large_text() -> None:
    """A switch for teaching with a projector: everything a quarter larger (Streamlit sizes in
    rem, so the root font size scales the whole page)."""
    lab_state = lab()
    init_widget("w_large_text", lab_state.large_text)
    lab_state.large_text = st.toggle("Large text (projector)", key="w_large_text")
    if lab_state.large_text:
        st.html("<style>html { font-size: 20px; }</style>")


def nav_links() -> None:
    """The app's own page links in the sidebar. Streamlit's automatic list is off
    (client.showSidebarNavigation): before any session has run st.navigation it would list the
    pages/ folder with the entry file as "streamlit app", so a page opened first by a deep link
    would show a different navigation."""
    for page, (title, icon) in NAV.items():
        try:
            st.page_link(PAGES[page], label=title, icon=icon)
        except st.errors.StreamlitPageNotFoundError:
            return      # a page run alone as the main script (AppTest) knows no other pages


def link(page: str, label: str, icon: str | None = None, where=st) -> None:
    """st.page_link that degrades to plain text when the page isn't registered: a page file run
    as the main script itself (as AppTest does) knows no other pages."""
    try:
        where.page_link(PAGES[page], label=label, icon=icon)
    except st.errors.StreamlitPageNotFoundError:
        where.markdown(f"{icon or ''} {label} (see the sidebar)")


def setup(title: str) -> dict:
    """Page config, session defaults and the sidebar. Returns the session's settings (the draft
    run configuration). A page ends with `finish()` (or `stop()`), which redraws the sidebar's
    summary with the choices the page just made."""
    try:
        st.set_page_config(page_title=f"{title} · Finetune Lab", page_icon=":material/science:", layout="wide")
    except st.errors.StreamlitAPIException:
        pass     # already set by the entry file in this run
    if problem := paths.write_problem():
        st.error(problem)
        st.stop()
    MANAGER.start()      # after a server restart, the queue on disk trains again
    settings = lab().settings
    for key, value in default_settings().items():     # settings added since this session began
        settings.setdefault(key, value)
    with st.sidebar:
        nav_links()
        large_text()
        sign_in()
        _page.summary = st.empty()     # filled by finish() (or stop()) once the page is drawn
    who = user()
    lab().owner = who.id          # for display and tests; identity itself is never read from here
    if who is ANONYMOUS:
        sign_in_wall()
    return settings


def sign_in_wall() -> None:
    """A class server shows nothing to a browser that has not signed in (or whose sign-in
    cookie is not one this server made)."""
    st.title("Finetune Lab")
    st.info("Sign in to use this lab: with your class account (your teacher has your join code), "
            "or your school account where the teacher set one up.", icon=":material/lock:")
    st.link_button("Sign in", "/lab/sign-in", type="primary", icon=":material/login:")
    st.stop()


_page = threading.local()      # this script run's sidebar slot (each session reruns in its own thread)


def finish() -> None:
    """(Re)draw the sidebar summary, once the page has applied this run's choices."""
    slot = getattr(_page, "summary", None)
    if slot is not None:
        with slot.container():
            sidebar_summary(lab().settings)


def stop():
    """st.stop(), after bringing the sidebar summary up to date."""
    finish()
    st.stop()


def default_settings() -> dict:
    cfg = RunConfig(data_root=str(paths.DEMO_DATA.relative_to(paths.REPO_ROOT)))
    settings = cfg.to_dict()
    settings["data_label"] = "Built-in demo: Fashion-MNIST (10 classes × 100 photos)"
    return settings


def run_config(settings: dict) -> RunConfig:
    return RunConfig.from_dict(settings)


def sidebar_summary(settings: dict) -> None:
    st.caption("**Current choices**")
    st.caption(f"Data: {settings.get('data_label', settings['data_root'])}")
    st.caption(f"Model: `{settings['arch']}` · {settings['freeze'].replace('_', '-')}"
               + (f" {settings['top_k']}" if settings["freeze"] == "top_k" else ""))
    active = [r for r in my_runs()[:200] if r.status().get("state") in ACTIVE_STATES]
    running = [r for r in active if r.status().get("state") != "queued"]
    for run in running[:3]:
        st.caption(f"Training: {run.config.name or run.id} · {run.status().get('where', 'starting')}")
    if len(active) > len(running):
        st.caption(f"{len(active) - len(running)} of your run(s) waiting — see Train")
    st.caption(queue_line())


def queue_line() -> str:
    """The lab's executor in one line: slots in use and runs waiting, everyone's."""
    view = MANAGER.overview()
    devices = sorted({slot.device for slot in view["slots"]})
    where = "Ray cluster" if view["launcher"] == "ray" else ", ".join(devices)
    return (f":material/dns: Lab: {len(view['running'])} of {len(view['slots'])} slot(s) training "
            f"({where}) · {len(view['waiting'])} waiting")


# ---------------------------------------------------------------- settings widgets


def data_dir_hint() -> str:
    return str(paths.home())
