"""The fork server's children (core.serve.forked): the same entry point as `python -m core`, with
exactly the environment, working folder and log they are given, and their exit status. (Signals,
killpg and a server restart are checked through the executor in test_executor.py.)"""
from __future__ import annotations

import time

import pytest

from core.serve import forked

pytestmark = pytest.mark.slow         # the fork server imports torch once


def wait(child: forked.Child, timeout: float = 120) -> int:
    end = time.monotonic() + timeout
    while (code := child.poll()) is None:
        assert time.monotonic() < end, "the child never ended"
        time.sleep(0.05)
    return code


def test_a_child_runs_the_cli_with_the_environment_and_log_it_is_given(tmp_path, monkeypatch, image_folder):
    monkeypatch.setenv("FINETUNE_LAB_HOME", str(tmp_path / "the-tests-home"))   # the server's: must not leak
    home, log = tmp_path / "given-home", tmp_path / "train.log"
    env = {"PATH": "/usr/bin:/bin", "FINETUNE_LAB_HOME": str(home), "FINETUNE_LAB_THREADS": "1"}
    child = forked.start(["data", "versions", "no_such_set"], env, log, tmp_path)
    assert wait(child) == 2 and child.poll() == 2
    assert "No data set called 'no_such_set'" in log.read_text()
    child = forked.start(["data", "snapshot", str(image_folder(classes=2, per_class=2)), "pets"], env, log, tmp_path)
    assert wait(child) == 0
    assert "pets/v1: 4 files" in log.read_text()
    assert (home / "datasets" / "versions" / "manifests" / "pets" / "v1.json").exists()
    assert f"folder: {home}" in log.read_text() and "the-tests-home" not in log.read_text()


def test_a_pages_script_swapped_in_as_main_is_not_run_again(tmp_path, monkeypatch):
    """Streamlit runs a page with the page's script as __main__: a child started meanwhile (the
    dispatcher thread) must not run that page again (multiprocessing would, to 'prepare' it)."""
    import types
    page = tmp_path / "page.py"
    page.write_text("raise SystemExit('the page ran in the child')\n")
    main = types.ModuleType("__main__")
    main.__file__, main.__spec__ = str(page), None
    monkeypatch.setitem(__import__("sys").modules, "__main__", main)
    log = tmp_path / "train.log"
    env = {"PATH": "/usr/bin:/bin", "FINETUNE_LAB_HOME": str(tmp_path / "home")}
    assert wait(forked.start(["data", "versions", "nothing"], env, log, tmp_path)) == 2
    assert "the page ran" not in log.read_text() and "No data set called 'nothing'" in log.read_text()
