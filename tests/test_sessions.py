"""Several browser sessions on one server, with Streamlit's AppTest (each AppTest instance is its
own session, signed in as its own account; all share the lab's queue, as real sessions on one
server do).

* (Students and the teacher on one server: tests/test_shared_server.py.)
* A load test: five sessions each start a small head-only run on the demo data; all finish and
  nothing is logged as an exception.
"""
from __future__ import annotations

import ast
import logging
import threading
import traceback
from pathlib import Path

import pytest
from streamlit import config
from streamlit.testing.v1 import AppTest
from streamlit.testing.v1.util import patch_config_options

from apptest_helpers import assert_ok, start_button
from core.serve.store import get_run, list_runs
from core.serve.worker import MANAGER

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("idle_manager")]   # the queue is process-wide

REPO_ROOT = Path(__file__).resolve().parents[1]
ENTRY = str(REPO_ROOT / "streamlit_app.py")
TRAIN = "pages/3_Train.py"
TIMEOUT = 120
ENDED = ("finished", "failed", "stopped", "interrupted")
ORIGINAL_GET_OPTION = config.get_option


def session(claims: dict) -> AppTest:
    """A new browser session signed in with these claims (as its cookie would hold): the entry
    file once (Home)."""
    at = AppTest.from_file(ENTRY, default_timeout=TIMEOUT)
    at.user = dict(claims, is_logged_in=True)
    at.run()
    assert_ok(at)
    return at


def teachers(n: int) -> list[dict]:
    """n teacher accounts of a class server (each sees everyone's runs, "Only my runs" by default)."""
    from core.serve import accounts
    made = accounts.create_class("staff", [f"teacher {i}" for i in range(n)], role="teacher")
    for account, code in made:
        accounts.sign_in(account.id, code, new_password="correct horse")
    return [accounts.account_claims(accounts.get(account.id)) for account, _ in made]


def test_five_sessions_train_on_the_demo_data_at_once(caplog, monkeypatch):
    """Five sessions, each in its own thread, open Train and start a 2-epoch head-only run on
    the built-in demo data at the same moment. All five queue, all finish, each belongs to its
    session, and no exception reaches any session or the log."""
    caplog.set_level(logging.WARNING)
    st_logger = logging.getLogger("streamlit")
    if not st_logger.propagate:          # streamlit's own handler would keep them from caplog
        st_logger.addHandler(caplog.handler)
    monkeypatch.delenv("FINETUNE_LAB_LOCAL", raising=False)      # a class server: five people
    sessions = [session(claims) for claims in teachers(5)]
    for i, at in enumerate(sessions):
        at.session_state["lab"].image_size_chosen = True
        settings = dict(at.session_state["lab"].settings)
        settings.update(epochs=2, image_size=64, seed=i, device="cpu")
        at.session_state["lab"].settings = settings
    barrier = threading.Barrier(len(sessions))
    # Each AppTest compiles pages itself (a server shares one locked script cache). CPython
    # 3.11.7's ast.parse is not safe in parallel threads (gh-106905: "AST constructor recursion
    # depth mismatch"), so the page loads take turns; the clicks that start training do not.
    compiling = threading.Lock()
    errors: list[str] = []
    # The clicks' reruns compile the page again, in parallel: parsing (only) takes turns too.
    parse, parsing = ast.parse, threading.Lock()

    def parse_in_turn(*args, **kwargs):
        with parsing:
            return parse(*args, **kwargs)
    monkeypatch.setattr(ast, "parse", parse_in_turn)

    def browse(at: AppTest) -> None:
        try:
            with compiling:
                at.switch_page(TRAIN).run()
            barrier.wait(timeout=300)
            start_button(at).click().run()
        except BaseException:  # noqa: BLE001 - reported below
            errors.append(traceback.format_exc())

    try:
        # AppTest.run() switches Streamlit's "global.appTest" option on by patching
        # config.get_option for the length of the run; runs in parallel threads would undo each
        # other's patch (widgets then miss their test hooks: KeyError in AppTest itself). Holding
        # it on around all of them keeps the parallel runs independent.
        with patch_config_options({"global.appTest": True}):
            threads = [threading.Thread(target=browse, args=(at,)) for at in sessions]
            for t in threads:
                t.start()
            for t in threads:
                t.join(timeout=400)
        assert not errors, "\n".join(errors)
        for at in sessions:
            assert_ok(at)
        ids = [at.session_state["lab"].current_run for at in sessions]
        assert len(set(ids)) == 5 and len(list_runs()) == 5
        for at, run_id in zip(sessions, ids):
            run = get_run(run_id)
            assert run.owner == at.session_state["lab"].owner
            cfg = run.config
            assert (cfg.data_root, cfg.freeze, cfg.epochs, cfg.image_size) == (
                "assets/demo/fashion_mnist", "head", 2, 64)

        for run_id in ids:
            assert MANAGER.wait(run_id, timeout=300), f"{run_id} did not leave the queue"
        for at, run_id in zip(sessions, ids):
            status = get_run(run_id).status()
            assert status["state"] == "finished", status.get("message")
            assert len(get_run(run_id).epochs()) == 2
            at.run()                      # each session's page shows its finished run
            assert_ok(at)
            assert at.selectbox(key="run_pick").value == run_id
            assert "Test accuracy (best epoch)" in [m.label for m in at.metric]
            labels = at.selectbox(key="run_pick").options
            assert len(labels) == 1 and labels[0].startswith("★ ")      # "Only my runs" by default
            at.toggle(key="run_pick_mine").set_value(False).run()
            labels = at.selectbox(key="run_pick").options
            assert len(labels) == 5 and sum(label.startswith("★ ") for label in labels) == 1
        assert len({at.session_state["lab"].owner for at in sessions}) == 5
    finally:
        st_logger.removeHandler(caplog.handler)
    assert config.get_option is ORIGINAL_GET_OPTION, "a parallel AppTest run left its config patch behind"

    problems = [r for r in caplog.records
                if r.levelno >= logging.ERROR or r.exc_info or "Traceback" in r.getMessage()]
    assert not problems, [f"{r.name}: {r.getMessage()}" for r in problems]
    assert "Traceback" not in caplog.text
