"""Finetune Lab: transfer learning of image classifiers on timm backbones, in the browser.

`streamlit run streamlit_app.py` imports this file once as the web server (the `else` branch: the
sign-in routes beside Streamlit's own) and runs it as the script of every browser session (the
`__main__` branch: only the navigation; every page, Home included, lives in pages/)."""
import streamlit as st

if __name__ == "__main__":
    from pages import NAV, PAGES

    # The navigation goes first: until the browser has it, a page opened by a deep link shows
    # nothing at all, not even the loading line below.
    pages = [st.Page(PAGES[key], title=title, icon=icon, default=key == "home") for key, (title, icon) in NAV.items()]
    chosen = st.navigation(pages, position="hidden")      # the sidebar's links are the app's own (common.nav_links)
    loading = st.empty()        # the first visit after a start imports PyTorch and timm: say so at once
    loading.caption(":material/hourglass_top: Loading Finetune Lab (PyTorch, timm)…")
    from pages import common  # noqa: E402,F401 - after the message on purpose

    loading.empty()
    chosen.run()
else:
    from streamlit import config

    from pages.common import signin

    config.set_option("server.cookieSecret", signin.cookie_secret())    # a restart signs nobody out
    app = st.App(__file__, routes=signin.routes(), middleware=signin.middleware())
