"""The pages' side of core.data.feedback: a verdict widget per predicted image, the button that
stores judged images (or a relabel) as a new version of the run's data set, and "Train again on
the new version", which queues the run's settings on it the way the Train page starts a run."""
from __future__ import annotations

import hashlib

import streamlit as st

from core.data import feedback, versions
from core.serve.store import Run, get_run
from pages.common.ownership import policy, submit, user
from pages.common.state import lab

SKIP = ""           # the verdict selectbox's first option: leave the image out


def verdict(predicted: str, classes: list[str], key: str, where=st) -> str | None:
    """Skip (the default), "the model is right", or another of the run's classes; the class the
    image gets (None when skipped)."""
    options = [SKIP, predicted] + [c for c in classes if c != predicted]

    def shown(option: str) -> str:
        if option == SKIP:
            return "Skip: don't add it"
        return f"✓ {option}: the model is right" if option == predicted else f"✗ it is {option}"
    return where.selectbox("Into the data set", options, format_func=shown, key=key) or None


def save_version_button(run: Run, label: str, key: str, examples=(), relabel: dict | None = None,
                        disabled: bool = False) -> None:
    """The button that stores `examples` (judged predictions) and `relabel` as a new version of the
    run's data set, then the result below it (see saved_panel). The same judgement is stored once."""
    page = lab().page
    made = _fingerprint(run, examples, relabel)
    done = page.get(f"{key}_saved", {}).get("fingerprint") == made
    if st.button(label, key=f"{key}_save", type="primary", disabled=disabled or done,
                 icon=":material/library_add:"):
        try:
            with st.spinner("Storing the new version…"):
                saved = feedback.save_feedback(run, user(), policy(), examples, relabel)
        except (ValueError, OSError) as err:      # FeedbackError, AccessError (quota), VersionError
            st.error(str(err))
        else:
            page[f"{key}_saved"] = dict(run=run.id, ref=saved.version.ref, summary=saved.summary(),
                                        first=saved.base.ref if saved.snapshotted else None,
                                        moved=saved.moved, fingerprint=made, queued=None)
            st.rerun()          # the button above is drawn again, disabled: saved once
    saved_panel(run, key)


def saved_panel(run: Run, key: str) -> None:
    """What the last save made, and "Train again on the new version" (once)."""
    saved = lab().page.get(f"{key}_saved")
    if not saved or saved["run"] != run.id:
        return
    first = f" First, the folder the run trained on was stored as {saved['first']}." if saved["first"] else ""
    st.success(f"Saved {saved['summary']}.{first} The run's train/val/test split is kept: new images are "
               "training images.", icon=":material/check_circle:")
    if saved["moved"]:
        st.warning(f"{len(saved['moved'])} old image(s) would still change split in a new run (a class that had "
                   f"no validation or test images): {', '.join(saved['moved'][:3])}")
    if saved["queued"]:
        st.info(f"Queued run {saved['queued']}: this run's settings on {saved['ref']}.", icon=":material/schedule:")
        from pages.common import link
        link("train", "Follow it on the Train page", ":material/model_training:")
        return
    if st.button(f"Train again on the new version ({saved['ref']})", key=f"{key}_again",
                 icon=":material/replay:"):
        try:
            cfg = feedback.train_again_config(get_run(saved["run"]), versions.get(*saved["ref"].split("/", 1)))
            new = submit(cfg)
        except (ValueError, FileNotFoundError) as err:      # the student's queue cap, a deleted run
            st.error(str(err))
            return
        saved["queued"] = new.id
        lab().current_run = new.id
        st.rerun()


@st.cache_data(ttl=15, max_entries=32, show_spinner="Checking the run's files…")
def data_check(run_path: str, stamp: int) -> feedback.DataCheck:     # stamp: splits.json's, part of the key
    return feedback.data_check(Run(run_path))


def checked(run: Run) -> feedback.DataCheck:
    """What changed in the run's files since it trained (check_pin), re-read every 15 s."""
    try:
        stamp = run.file("splits.json").stat().st_mtime_ns
    except OSError:
        stamp = 0
    return data_check(str(run.path), stamp)


def changed_warning(run: Run) -> None:
    """The warning a page that reads a run's images shows when they changed since training."""
    check = checked(run)
    if check.changed:
        st.warning(f"**Run {run.id}'s data set changed since it trained** (`{check.root}`); what is shown "
                   "here reads the files as they are now:\n\n" + "\n".join(f"- {line}" for line in check.change.lines()),
                   icon=":material/difference:")


def _fingerprint(run: Run, examples, relabel: dict | None) -> str:
    digest = hashlib.sha256(run.id.encode())
    for e in feedback.judged(examples):
        digest.update(f"{e.name}\0{e.label}\0{e.path}\0".encode())
        digest.update(hashlib.sha256(e.data).digest() if e.data is not None else b"")
    digest.update(repr(sorted((relabel or {}).items())).encode())
    return digest.hexdigest()
