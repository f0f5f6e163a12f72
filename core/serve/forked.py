"""The executor's CPU children started from a warm process instead of a fresh interpreter.

`python -m core job RUN_ID` spends 3-5 s of CPU importing torch, torchvision, timm and
scikit-learn before it trains a single batch: on a class's 2-core server, thirty runs and every
Doctor audit pay it again. Here a multiprocessing "forkserver" imports the worker's modules once
(in its own single-threaded process, never the web server's) and forks each child from that state
in milliseconds. A child is the same program (`python -m core ARGS`, run with runpy, with the
same environment), in a session of its own with its output in the run's train.log, so everything that
watches children (exit codes and signals, killpg, the run folder) is unchanged.

Only CPU slots use it: a process that forks must never have touched CUDA, and a GPU child's
CUDA_VISIBLE_DEVICES must be read by a fresh CUDA runtime; GPU slots start `python -m core` as
before. FINETUNE_LAB_FORKSERVER=0 turns it off everywhere.
"""
from __future__ import annotations

import logging
import multiprocessing
import multiprocessing.context
import multiprocessing.process
import os
import runpy
import sys
import threading
from multiprocessing import popen_forkserver, spawn
from pathlib import Path

log = logging.getLogger(__name__)
PRELOAD = ["core.cli", "core.serve.jobs", "core.serve.tasks", "core.training.run", "core.trust.doctor",
           "core.training.lr_find", "core.results.evaluate"]
_LOCK = threading.RLock()
LOST = 255           # the status a child reads as when the fork server that reports it went away
_CONTEXT: list = []


def available() -> bool:
    return (os.environ.get("FINETUNE_LAB_FORKSERVER", "1") != "0"
            and "forkserver" in multiprocessing.get_all_start_methods())


def _context():
    with _LOCK:
        if not _CONTEXT:
            context = multiprocessing.get_context("forkserver")
            context.set_forkserver_preload(PRELOAD)
            _CONTEXT.append(context)
        return _CONTEXT[0]


def warm() -> None:
    """Start the fork server (its imports take seconds) before the first run needs it."""
    if available():
        from multiprocessing import forkserver
        _context()
        threading.Thread(target=forkserver.ensure_running, name="finetune-lab-forkserver", daemon=True).start()


class Child:
    """A started child, polled like subprocess.Popen: poll() is None while it runs, then its exit
    status (negative: the signal that ended it)."""

    def __init__(self, process):
        self.process, self.pid = process, process.pid

    def poll(self) -> int | None:
        code = self.process.exitcode
        if code is not None:
            self.process.close()
            self.poll = lambda: code
        return code


class _Popen(popen_forkserver.Popen):
    def _launch(self, process_obj) -> None:
        """As multiprocessing's, without the parent's main module: a Streamlit page swaps its own
        script in as __main__ while it runs, and the child would run that page again."""
        with _LOCK:
            original = spawn.get_preparation_data
            spawn.get_preparation_data = _without_main(original)
            try:
                super()._launch(process_obj)
            finally:
                spawn.get_preparation_data = original


def _without_main(get_data):
    def prepared(name):
        return {k: v for k, v in get_data(name).items() if k not in ("init_main_from_path", "init_main_from_name")}
    return prepared


class _Process(multiprocessing.context.ForkServerProcess):
    @staticmethod
    def _Popen(process_obj):
        return _Popen(process_obj)


def start(argv: list[str], env: dict, log_path: Path, cwd: Path) -> Child:
    _context()
    process = _Process(target=child_main, args=(list(argv), dict(env), str(log_path), str(cwd)),
                       name=f"finetune-lab {' '.join(argv[:2])}")
    process.start()
    # multiprocessing joins its children when the server exits; a run must go on training (as a
    # Popen child in its own session does), so this one is not on that list
    multiprocessing.process._children.discard(process)
    return Child(process)


def child_main(argv: list[str], env: dict, log_path: str, cwd: str) -> None:
    """In the forked child: what `python -m core ARGV` with `env`, output to `log_path`, would do."""
    os.setsid()
    out = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    null = os.open(os.devnull, os.O_RDONLY)
    for fd, target in ((out, 1), (out, 2), (null, 0)):
        os.dup2(fd, target)
    os.close(out)
    os.close(null)
    os.environ.clear()
    os.environ.update(env)
    os.chdir(cwd)
    if env.get("PYTHONUNBUFFERED"):          # set too late for the interpreter: the log must not lag
        for stream in (sys.stdout, sys.stderr):
            getattr(stream, "reconfigure", lambda **_: None)(write_through=True)
    _size_thread_pools(env.get("FINETUNE_LAB_THREADS", ""))
    sys.argv = [f"{sys.executable} -m core", *argv]
    runpy.run_module("core", run_name="__main__", alter_sys=True)      # exits with the command's status


def _size_thread_pools(threads: str) -> None:
    """The pools were sized from the fork server's environment at import: size them to the slot."""
    if not threads.isdigit() or int(threads) < 1:
        return
    import threadpoolctl
    import torch
    threadpoolctl.threadpool_limits(int(threads))
    torch.set_num_threads(int(threads))
