"""Runs leave the web server (issue 22): each run trains in its own process on a slot, the queue
lives on disk, a killed process is one run's problem, and two servers never take the same run.

Every test here starts real child processes (`python -m core job RUN_ID`, forked from the warm
fork server on CPU slots: core.serve.forked)."""
from __future__ import annotations

import os
import signal
import threading
import time

import pytest

from core import paths
from core.serve import runqueue, slots
from core.serve.executor import Executor, LocalLauncher, death_sentence
from core.serve.store import ACTIVE_STATES, Run
from core.serve.worker import RunManager
from test_faults import wait_for

TIMEOUT = 180


def two_slots():
    return slots.plan(setting=2, n_cores=2, n_gpus=0, mps=False)


MADE: list[RunManager] = []


def manager(plan=two_slots) -> RunManager:
    made = RunManager(Executor(LocalLauncher(plan=plan)))
    MADE.append(made)
    return made


@pytest.fixture(autouse=True)
def no_env_slots(monkeypatch):
    """Each test's own managers only: the lab's global dispatcher (started by earlier tests in
    this process) would otherwise take their runs too, as a second server would."""
    from core.serve.worker import MANAGER
    MANAGER.close()
    monkeypatch.delenv(slots.ENV_SLOTS, raising=False)
    monkeypatch.delenv(slots.ENV_PER_GPU, raising=False)


@pytest.fixture(autouse=True)
def stop_all():
    """Whatever a test leaves in the queue is stopped, its processes ended and its dispatchers
    closed afterwards (a dispatcher follows FINETUNE_LAB_HOME into the next test otherwise)."""
    yield lambda m: None
    for job in runqueue.waiting():
        runqueue.remove_waiting(job.run_id)
    for job in runqueue.running():
        Run(paths.runs_dir() / job.run_id).request_stop()
    end = time.monotonic() + 30
    while runqueue.running() and time.monotonic() < end and any(m.executor._thread for m in MADE):
        time.sleep(0.1)
    for job in runqueue.running():
        if job.pid and job.pid != os.getpid():
            try:
                os.killpg(job.pid, signal.SIGKILL)
            except OSError:
                pass
    for m in MADE:
        m.executor.close()
    MADE.clear()


# ---------------------------------------------------------------- slots

def test_slot_plans():
    assert [s.threads for s in slots.plan(n_cores=2, n_gpus=0, mps=False)] == [2]
    assert [s.threads for s in slots.plan(n_cores=4, n_gpus=0, mps=False)] == [4]
    assert [s.threads for s in slots.plan(n_cores=16, n_gpus=0, mps=False)] == [8, 8]
    assert [s.threads for s in slots.plan(n_cores=32, n_gpus=0, mps=False)] == [8, 8, 8, 8]
    assert [s.threads for s in slots.plan(setting=2, n_cores=2, n_gpus=0, mps=False)] == [1, 1]
    gpus = slots.plan(n_cores=16, n_gpus=4)
    assert [s.device for s in gpus] == ["cuda:0", "cuda:1", "cuda:2", "cuda:3"]
    assert [s.env["CUDA_VISIBLE_DEVICES"] for s in gpus] == ["0", "1", "2", "3"]
    assert len(slots.plan(n_cores=16, n_gpus=2, per_gpu=3)) == 6
    assert [s.device for s in slots.plan(n_cores=8, n_gpus=0, mps=True)] == ["mps"]
    cpu = slots.plan(n_cores=16, n_gpus=0, mps=False)
    assert all(s.env["CUDA_VISIBLE_DEVICES"] == "" for s in cpu)


def test_environment_overrides_the_teachers_setting(monkeypatch):
    monkeypatch.setenv(slots.ENV_SLOTS, "3")
    assert len(slots.plan(setting=1, n_cores=12, n_gpus=0, mps=False)) == 3
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "5,7")
    monkeypatch.delenv(slots.ENV_SLOTS)
    assert [s.env["CUDA_VISIBLE_DEVICES"] for s in slots.plan(n_cores=8, n_gpus=2)] == ["5", "7"]


def test_death_sentences():
    assert "ran out of memory" in death_sentence(-signal.SIGKILL)
    assert "disk filled up" in death_sentence(-signal.SIGBUS)
    assert "segmentation fault" in death_sentence(-signal.SIGSEGV)
    assert "status 2: boom" in death_sentence(2, "trace\nboom")
    assert "server restart" in death_sentence(None)


# ---------------------------------------------------------------- processes

@pytest.mark.slow
def test_two_slots_train_at_once_in_fair_order(tiny_config, stop_all):
    """A teacher and two students queue six runs on 2 slots: two train at once, each user's
    first run starts before anyone's second, and none trains in this process."""
    m = manager()
    stop_all(m)
    owners = ["teacher", "teacher", "teacher", "a", "a", "b"]
    m.start = lambda: None         # all six are queued before the first one starts
    runs = [m.submit(tiny_config(epochs=2, seed=i), owner=o) for i, o in enumerate(owners)]
    del m.start
    m.start()
    overlap = []
    while any(m.knows(r.id) for r in runs):
        overlap.append(len(runqueue.running()))
        time.sleep(0.05)
        assert len(overlap) < TIMEOUT * 20, "the queue did not drain"
    assert max(overlap) == 2
    assert all(r.status()["state"] == "finished" for r in runs), [r.status() for r in runs]
    pids = {r.status()["pid"] for r in runs}
    assert os.getpid() not in pids and len(pids) == 6
    started = sorted(runs, key=lambda r: r.status()["slot_started"])
    first_three = {r.owner for r in started[:3]}
    assert first_three == {"teacher", "a", "b"}, [r.owner for r in started]
    assert {r.status()["where"].split(" · ")[0] for r in runs} == {"slot 1", "slot 2"}


@pytest.mark.slow
def test_kill_9_is_one_runs_problem(tiny_config, stop_all):
    """kill -9 of a training process mid-epoch: that run is interrupted with a sentence and
    resumable; the other runs (one training beside it, one queued) finish."""
    m = manager()
    stop_all(m)
    victim = m.submit(tiny_config(freeze="full", epochs=400), owner="a")
    beside = m.submit(tiny_config(epochs=3), owner="b")
    after = m.submit(tiny_config(epochs=2), owner="c")
    wait_for(lambda: victim.file("last_state.pt").exists(), what="the victim's first resume state")
    os.kill(m.where(victim.id).pid, signal.SIGKILL)
    assert m.wait(victim.id, 30)
    status = victim.status()
    assert status["state"] == "interrupted" and "killed (signal 9)" in status["message"], status
    assert victim.resumable()
    for run in (beside, after):
        assert m.wait(run.id, TIMEOUT)
        assert run.status()["state"] == "finished", run.status()

    victim_epochs = len(victim.epochs())
    victim.write_json("config.json", dict(victim.read_json("config.json"), epochs=victim_epochs + 1))
    m.resume(victim)
    assert m.wait(victim.id, TIMEOUT)
    assert victim.status()["state"] == "finished", victim.status()


@pytest.mark.slow
def test_a_dead_fork_server_does_not_end_its_children(tiny_config, stop_all):
    """The fork server that reports a child's exit is killed (the OOM killer's favourite: it is
    big): the run it started trains on, its slot stays taken, and it still finishes."""
    from multiprocessing import forkserver
    m = manager()
    stop_all(m)
    run = m.submit(tiny_config(freeze="full", epochs=400, image_size=48), owner="a")
    wait_for(lambda: run.epochs(), what="the first epoch")
    os.kill(forkserver._forkserver._forkserver_pid, signal.SIGKILL)
    time.sleep(1)
    assert run.status()["state"] == "running" and runqueue.get(run.id) is not None
    done = len(run.epochs())
    wait_for(lambda: len(run.epochs()) > done, what="an epoch after the fork server died")
    m.stop(run.id)                              # still the executor's: Stop reaches it, it is reaped
    assert m.wait(run.id, TIMEOUT)
    assert run.status()["state"] == "stopped", run.status()


@pytest.mark.slow
def test_stop_reaches_the_process(tiny_config, stop_all):
    m = manager()
    stop_all(m)
    run = m.submit(tiny_config(freeze="full", epochs=400))
    wait_for(lambda: run.epochs(), what="the first epoch")
    asked = time.monotonic()
    m.stop(run.id)
    assert m.stopping(run.id)
    wait_for(lambda: run.status()["state"] not in ACTIVE_STATES, 30, "the stop")
    took = time.monotonic() - asked
    assert run.status()["state"] == "stopped" and run.resumable()
    assert took < 10, f"Stop took {took:.1f} s"          # the benchmark measures the real figure
    assert m.wait(run.id, 30) and not run.stop_requested()


def test_stop_a_queued_run_removes_it(tiny_config):
    m = manager()             # its dispatcher never starts: everything stays queued
    m.start = lambda: None
    run = m.submit(tiny_config(), owner="a")
    assert runqueue.has(run.id) and run.status()["state"] == "queued"
    m.stop(run.id)
    assert not runqueue.has(run.id)
    assert run.status()["state"] == "stopped"


@pytest.mark.slow
def test_a_restart_loses_no_queued_run(tiny_config, stop_all):
    """Runs queued by a server that then went away (its dispatcher never ran) stay 'queued'
    across the restart, and the next server trains them."""
    before = manager()
    before.start = lambda: None
    runs = [before.submit(tiny_config(epochs=1, seed=i), owner=o) for i, o in enumerate("aab")]
    assert all(r.status()["state"] == "queued" for r in runs)
    del before
    after = manager()
    stop_all(after)
    after.start()
    for run in runs:
        assert after.wait(run.id, TIMEOUT)
        assert run.status()["state"] == "finished", run.status()


def test_a_dead_servers_running_record_is_cleaned(tiny_config):
    """A record whose training process and server both died (a power cut) frees its slot and
    leaves the run interrupted."""
    m = manager()
    m.start = lambda: None
    run = m.submit(tiny_config())
    with runqueue.locked():
        job = runqueue.take_next()
    job.slot, job.host, job.pid, job.spawner = 1, __import__("core.serve.store").serve.store.HOST, 2 ** 22 + 7, 2 ** 22 + 9
    runqueue.update_running(job)
    run.set_status("running", message="training", pid=job.pid)
    Executor(LocalLauncher(plan=two_slots)).reap()
    assert not runqueue.has(run.id)
    assert run.status()["state"] == "interrupted" and "server restart" in run.status()["message"]


def test_two_servers_never_take_the_same_run(tiny_config):
    """Two dispatchers (two server processes on one data directory) fill slots at once; each run
    is taken once, and no more than the slots are used."""
    m = manager()
    m.start = lambda: None
    runs = [m.submit(tiny_config(), owner=str(i)) for i in range(6)]
    taken: list[str] = []

    class Recorder(LocalLauncher):
        def start(self, job, slot, run):
            taken.append(job.run_id)
            job.pid = os.getpid()          # pretend; nothing is started
            return job
    one, two = Executor(Recorder(plan=two_slots)), Executor(Recorder(plan=two_slots))
    threads = [threading.Thread(target=e.fill) for e in (one, two, one, two)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert len(taken) == 2 and len(set(taken)) == 2
    assert len(runqueue.running()) == 2 and len(runqueue.waiting()) == 4
    for job in runqueue.running():
        runqueue.done(job.run_id)
    for run in runs:
        runqueue.remove_waiting(run.id)
