"""A Streamlit progress bar as a core.progress callback, so pages hand core jobs the same
`progress(done, total, message)` every long job in core/ reports through.

    with progress_bar("Checking the export…") as progress:
        check = run_heavy("export check", lambda checked: export_check.check_export(..., progress=checked), progress)
"""
from __future__ import annotations

import contextlib
from typing import Iterator

import streamlit as st

from core.progress import Progress


@contextlib.contextmanager
def progress_bar(text: str = "Starting…") -> Iterator[Progress]:
    """A bar showing `text` until the job reports; it goes away when the block ends, also on an
    error, so no page leaves a half-full bar above its error message. The callback also takes
    bare (done, total) from jobs that only count: the bar then keeps `text` (to word the counts,
    wrap it in core.progress.part(progress, 0, 1, "Predicting images"))."""
    bar = st.progress(0.0, text=text)

    def show(done: int, total: int, message: str = "") -> None:
        bar.progress(min(max(done / max(total, 1), 0.0), 1.0), text=message or text)
    try:
        yield show
    finally:
        bar.empty()
