"""A shared lab server probed by hostile students (issue 14): roles, allowed roots, per-user runs,
uploads and presets, quotas, a fair queue that can't die, one trainer per run, full and read-only
disks. Library, CLI and pages (AppTest, several sessions with different identities); offline, on
generated files. The zip/image cases are in test_hostile_data.py, typed settings in
test_hostile_config.py."""
from __future__ import annotations

import errno
import io
import os
import time
import zipfile
from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest

from apptest_helpers import ENTRY, assert_ok, errors, keys, texts, use_small_settings, wait_state
from conftest import class_folders, tiny_run_config
from core.config import ConfigError, RunConfig
from core import paths
from core.serve import access, presets
from core.serve import store
from core.training import run as training
from core.serve.worker import MANAGER, QueueFull, RunManager

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("idle_manager")]   # the queue is process-wide

TOKEN = "teacher-secret-" + "0123456789abcdefghij"
TRAIN, DATA, EVALUATE, PREDICT = "pages/3_Train.py", "pages/1_Data.py", "pages/4_Evaluate.py", "pages/5_Predict.py"
ENDED = ("finished", "failed", "stopped", "interrupted")


@pytest.fixture
def classroom(monkeypatch):
    """A class server: no local mode, a teacher token; every session signs in (a class account
    per student() call, the token for teacher())."""
    monkeypatch.delenv(access.LOCAL_ENV, raising=False)
    monkeypatch.setenv(access.TOKEN_ENV, TOKEN)


_STUDENTS = iter(range(10 ** 6))


def signed_in(claims: dict) -> AppTest:
    """A session whose st.user holds these claims, as the sign-in cookie would (AppTest.user)."""
    at = AppTest.from_file(ENTRY, default_timeout=180)
    at.user = dict(claims, is_logged_in=True)
    at.run()
    assert_ok(at)
    return at


def new_account() -> dict:
    from core.serve import accounts
    (account, code), = accounts.create_class("lab", [f"student {next(_STUDENTS)}"])
    accounts.sign_in(account.id, code, new_password="correct horse")
    return accounts.account_claims(accounts.get(account.id))


@pytest.fixture
def shared_set():
    """A small data set where the teacher shares data (students may read it)."""
    return class_folders(paths.shared_dir() / "shapes", classes=3, per_class=12, size=40)


def path_box(at: AppTest):
    return next(t for t in at.text_input if t.label == "Folder path on the server")


def student(data_root: Path | None = None, page: str | None = None, **settings) -> AppTest:
    at = signed_in(new_account())
    if data_root is not None:
        use_small_settings(at, data_root, **{"image_size": 32, "epochs": 1, **settings})
    if page:
        at.switch_page(page).run()
        assert_ok(at)
    return at


def teacher(page: str | None = None) -> AppTest:
    from core.serve import accounts
    at = signed_in(accounts.teacher_claims(TOKEN))
    assert "teacher)" in "\n".join(c.value for c in at.sidebar.caption)
    if page:
        at.switch_page(page).run()
        assert_ok(at)
    return at


def start(at: AppTest) -> str:
    next(b for b in at.button if "Start training" in b.label).click().run()
    assert_ok(at)
    return at.session_state["lab"].current_run


def picker_ids(at: AppTest, key: str = "run_pick") -> set[str]:
    return {label.split("★ ")[-1].split(" · ")[0] for label in at.selectbox(key=key).options}


# ---------------------------------------------------------------- roles

def test_who_is_admin(monkeypatch):
    """Local mode only when asked for; a token must be long; nobody is admin by address."""
    monkeypatch.delenv(access.LOCAL_ENV, raising=False)
    assert not access.local_mode()
    monkeypatch.setenv(access.LOCAL_ENV, "1")
    assert access.local_mode() and "only user" in access.role_note("")
    monkeypatch.setenv(access.TOKEN_ENV, TOKEN)
    assert access.configured_token("from-secrets") == TOKEN
    monkeypatch.setenv(access.TOKEN_ENV, " ")
    assert access.configured_token("a") == ""              # one space or one letter: no token
    with pytest.raises(ValueError):
        access.User("../../etc")


def test_default_server_is_local_and_shows_no_tracebacks():
    """The shipped config binds to localhost and hides tracebacks from browsers (the server log
    keeps them); being on localhost makes nobody the admin (./lab.sh sets local mode)."""
    import tomllib
    cfg = tomllib.loads((paths.REPO_ROOT / ".streamlit" / "config.toml").read_text())
    assert cfg["server"]["address"] == "localhost"
    assert cfg["client"]["showErrorDetails"] == "none"
    assert "FINETUNE_LAB_LOCAL=1" in (paths.REPO_ROOT / "lab.sh").read_text()


def test_anonymous_and_forged_sessions_see_only_the_sign_in(classroom):
    """No sign-in, claims for an account that doesn't exist, another account's name with this
    one's mac, a teacher claim for an old token: the page asks to sign in and shows nothing else."""
    from core.serve import accounts
    mine = new_account()
    forged = [{}, dict(mine, lab_account="lab-someone-else"), {"lab_account": "lab-x", "lab_mac": "0" * 64},
              accounts.teacher_claims(TOKEN + "-old"), {"lab_teacher": "x", "lab_mac": "y"}]
    for claims in forged:
        at = AppTest.from_file(ENTRY, default_timeout=180)
        at.user = dict(claims, is_logged_in=bool(claims))
        at.run()
        assert_ok(at)
        assert "Sign in to use this lab" in texts(at)
        assert "policy_form" not in str(at.main)
        assert "Quick demo" not in " ".join(b.label for b in at.button)


def test_a_provider_user_is_a_student_unless_on_the_teacher_list(classroom, monkeypatch):
    claims = {"iss": "http://idp", "sub": "42", "email": "Sam@School.org", "name": "Sam"}
    at = signed_in(claims)
    assert "student)" in "\n".join(c.value for c in at.sidebar.caption)
    monkeypatch.setenv(access.TEACHERS_ENV, "teacher@school.org, sam@school.org")
    at = signed_in(claims)
    assert "teacher)" in "\n".join(c.value for c in at.sidebar.caption)


def test_students_see_and_manage_only_their_own_runs(classroom, shared_set):
    """Two students and the teacher on one server: each student's pages list only their own
    runs (Train, Evaluate, Home); a forged stop/delete of the other's run does nothing; the
    teacher sees both, stops one and deletes it. No tick box lets a student manage others' runs."""
    a = student(shared_set, TRAIN, epochs=300, batch_size=4, augment={"hflip": True})
    b = student(shared_set, TRAIN)
    long_id = start(a)
    wait_state(long_id, ("running",) + ENDED, timeout=90)
    short_id = start(b)
    assert "ahead of it in the lab's queue" in texts(b)       # B sees its place and a start time
    assert store.get_run(long_id).owner == a.session_state["lab"].owner != b.session_state["lab"].owner
    for at, own in ((a, long_id), (b, short_id)):
        at.run()
        assert_ok(at)
        assert picker_ids(at) == {own}
        assert "manage_all" not in keys(at, "checkbox")
    # B forges A's run id as its current run: the pages fall back to B's own run
    b.session_state["lab"].current_run = long_id
    b.run()
    assert_ok(b)
    assert b.selectbox(key="run_pick").value == short_id
    with pytest.raises(access.AccessError):
        access.check_manage(access.User(b.session_state["lab"].owner), store.get_run(long_id))

    t = teacher(TRAIN)
    assert "run_pick" not in keys(t, "selectbox")           # "Only my runs" is on by default
    t.toggle(key="run_pick_mine").set_value(False).run()
    assert picker_ids(t) == {long_id, short_id}
    t.selectbox(key="run_pick").set_value(long_id).run()
    assert_ok(t)
    assert "Started by another user" in texts(t)
    t.button(key="stop").click().run()
    assert wait_state(long_id)["state"] == "stopped"
    assert MANAGER.wait(short_id, timeout=120)
    assert store.get_run(short_id).status()["state"] == "finished"
    b.switch_page(EVALUATE).run()
    assert_ok(b)
    assert picker_ids(b, "eval_run_pick") == {short_id}
    t.run()
    t.button(key="delete").click().run()
    assert_ok(t)
    assert [r.id for r in store.list_runs()] == [short_id]


def test_home_lists_only_my_runs_and_shows_the_admin_panel_to_the_teacher(classroom, shared_set):
    cfg = tiny_run_config(shared_set, epochs=1)
    theirs = store.Run.create(cfg, owner="someone1")
    theirs.set_status("finished")
    at = student()
    assert theirs.id not in str(at.dataframe) if at.dataframe else True
    assert "You are a student" in texts(at)
    t = teacher()
    assert ":material/key: Teacher (admin) settings" in [e.label for e in t.expander]
    from core.serve import accounts
    again = signed_in(accounts.teacher_claims(TOKEN))     # a reload: the same signed cookie
    assert "teacher)" in "\n".join(c.value for c in again.sidebar.caption)
    copied = AppTest.from_file(ENTRY, default_timeout=60)  # the teacher's session state, no cookie
    copied.session_state["lab"] = type(t.session_state["lab"])(settings=dict(t.session_state["lab"].settings),
                                                                owner=t.session_state["lab"].owner)
    copied.run()
    assert_ok(copied)
    assert "Sign in to use this lab" in texts(copied)
    assert theirs.id in t.dataframe[0].value["run"].tolist()


# ---------------------------------------------------------------- folders and data

def test_student_server_folders_stay_below_the_roots(classroom, shared_set, tmp_path, image_folder):
    """Another user's home, /etc, the data directory's uploads, a symlink out of the shared
    folder: each one sentence, no thumbnails, no file names."""
    elsewhere = image_folder(name="someone_elses_photos")
    (elsewhere / "diary.txt").write_text("private")
    (paths.shared_dir() / "sneaky").symlink_to(elsewhere)
    other_upload = paths.datasets_dir() / "users" / "someone1" / "photos"
    class_folders(other_upload, classes=2, per_class=3)
    at = student(page=DATA)
    at.radio(key="data_source").set_value("path").run()
    for typed in (str(elsewhere), "/etc", str(other_upload), str(paths.shared_dir() / "sneaky"),
                  str(paths.shared_dir() / ".." / "users" / "someone1")):
        path_box(at).input(typed).run()
        assert_ok(at)
        assert "Students may open folders only below" in errors(at), typed
        assert not at.get("imgs"), typed
    path_box(at).input(str(shared_set)).run()
    assert_ok(at)
    assert not errors(at) and "Classes" in [m.label for m in at.metric]


def test_student_sees_no_names_of_non_image_files(classroom, shared_set):
    (shared_set / "class_a" / "grades.xlsx").write_bytes(b"secret")
    at = student(page=DATA)
    at.radio(key="data_source").set_value("path").run()
    path_box(at).input(str(shared_set)).run()
    assert_ok(at)
    assert "grades.xlsx" not in str(at.dataframe[-1].value.to_dict())
    assert "not images are not listed" in texts(at)


def test_teacher_can_turn_server_folders_off(classroom, shared_set):
    access.save_policy(access.Policy(server_folders=False))
    at = student(page=DATA)
    at.radio(key="data_source").set_value("path").run()
    path_box(at).input(str(shared_set)).run()
    assert "turned off server folders" in errors(at)


def test_a_preset_naming_someone_elses_folder_is_not_trained(classroom, image_folder):
    elsewhere = image_folder(name="private")
    at = student(elsewhere, TRAIN)
    next(b for b in at.button if "Start training" in b.label).click().run()
    assert_ok(at)
    assert "Students may open folders only below" in errors(at)
    assert store.list_runs() == []


def test_predict_batch_folder_is_checked_too(classroom, image_folder, shared_set):
    elsewhere = image_folder(name="private")
    at = student(page=PREDICT)
    at.radio(key="pred_source").set_value("imagenet").run()
    assert_ok(at)
    folder_box = at.text_input(key="pred_folder")
    folder_box.input(str(elsewhere)).run()
    assert_ok(at)
    assert "Students may open folders only below" in errors(at)


def test_uploads_go_to_the_users_own_folder_within_quota(classroom, monkeypatch):
    """A student's upload lands in their folder; over the per-upload, per-user or total caps it
    is refused before anything is written, with the limit in the sentence."""
    alice, bob = access.User("alice1"), access.User("bob1")
    rules = access.Policy(upload_mb=1, user_mb=2, total_mb=0)
    assert access.upload_allowance(alice, rules) == 1 * access.MB
    (access.uploads_dir(alice) / "old").mkdir()
    (access.uploads_dir(alice) / "old" / "big.bin").write_bytes(b"x" * (2 * access.MB))
    with pytest.raises(access.AccessError, match="whole quota of 2 MB"):
        access.upload_allowance(alice, rules)
    assert access.upload_allowance(bob, rules) == 1 * access.MB      # Bob's own quota is untouched
    with pytest.raises(access.AccessError, match="data directory is full"):
        access.upload_allowance(bob, access.Policy(total_mb=1))
    assert access.my_uploads(bob) == []
    assert [name for name, *_ in access.my_uploads(alice)] == ["old"]
    with pytest.raises(access.AccessError):
        access.delete_upload(bob, "old")                              # not Bob's
    with pytest.raises(access.AccessError):
        access.delete_upload(bob, "../alice1/old")
    access.delete_upload(alice, "old")
    assert access.my_uploads(alice) == []


def test_clean_up_deletes_only_old_uploads(classroom):
    import os
    alice = access.User("alice1")
    old, new = access.uploads_dir(alice) / "old", access.uploads_dir(alice) / "new"
    old.mkdir(), new.mkdir()
    os.utime(old, (time.time() - 40 * 86400,) * 2)
    assert access.clean_up(30) == 1
    assert not old.exists() and new.exists()


def class_zip(per_class: int = 3, padding: int = 0) -> bytes:
    from conftest import class_image
    blob = io.BytesIO()
    with zipfile.ZipFile(blob, "w") as z:
        for label, cls in enumerate(("a", "b")):
            for i in range(per_class):
                buf = io.BytesIO()
                class_image(label, i).save(buf, "PNG")
                z.writestr(f"{cls}/{i}.png", buf.getvalue())
        if padding:
            z.writestr("a/notes.txt", bytes(padding))
    return blob.getvalue()


def test_zip_uploads_land_in_my_folder_within_my_quota(classroom):
    """A student's zip unpacks into their own folder, listed under My uploads; once their quota
    is used up the next zip is refused with the limit, before anything is written."""
    access.save_policy(access.Policy(user_mb=1))
    at = student(page=DATA)
    at.radio(key="data_source").set_value("zip").run()
    at.file_uploader(key="zip_upload").upload("set.zip", class_zip(), "application/zip").run()
    assert_ok(at)
    owner = at.session_state["lab"].owner
    root = Path(at.session_state["lab"].settings["data_root"])
    assert root.parent == paths.datasets_dir() / "users" / owner
    assert any("My uploads (1," in e.label for e in at.expander)
    other = student(page=DATA)
    assert any("My uploads (0," in e.label for e in other.expander)
    other.radio(key="data_source").set_value("zip").run()
    other.file_uploader(key="zip_upload").upload("big.zip", class_zip(padding=3 * access.MB),
                                                 "application/zip").run()
    assert_ok(other)
    assert "would unpack to more than 1.0 MB" in errors(other)
    assert not any((paths.datasets_dir() / "users" / other.session_state["lab"].owner).iterdir())


# ---------------------------------------------------------------- presets

def test_presets_are_per_user_and_never_overwrite_others(classroom):
    preset = presets.make_preset(RunConfig().to_dict(), "Lab 3!")
    teachers = presets.save_preset(preset)                         # the teacher's, shared
    mine = presets.save_preset(presets.make_preset(RunConfig(lr=0.01).to_dict(), "lab 3"),
                               presets.user_dir("alice1"))
    assert mine != teachers and teachers.exists() and presets.parse_preset(teachers.read_bytes())["settings"]["lr"] == 1e-3
    with pytest.raises(presets.PresetError, match="already called"):
        presets.save_preset(preset)
    presets.save_preset(preset, replace=True)
    shipped = next(presets.SHIPPED_DIR.glob("*.json"))
    name = presets.parse_preset(shipped.read_bytes())["name"]
    with pytest.raises(presets.PresetError, match="shipped with the app"):
        presets.save_preset(presets.make_preset({}, name), presets.user_dir("alice1"), replace=True)
    labels = [label for label, _ in presets.list_presets("bob1")]
    assert not any("(mine)" in label for label in labels)
    assert any("(mine)" in label for label, _ in presets.list_presets("alice1"))
    with pytest.raises(presets.PresetError):
        presets.user_dir("../teacher")


def test_a_student_saving_a_preset_leaves_the_teachers_alone(classroom):
    teachers = presets.save_preset(presets.make_preset(RunConfig().to_dict(), "Lab 3"))
    before = teachers.read_text()
    at = student()
    at.text_input(key="preset_name").input("lab 3!").run()
    at.button(key="preset_save").click().run()
    assert_ok(at)
    assert teachers.read_text() == before
    assert "for you only" in texts(at)
    owner = at.session_state["lab"].owner
    assert (presets.user_dir(owner) / "lab-3.json").exists()


# ---------------------------------------------------------------- the queue

class FakeLauncher:
    """A launcher that starts nothing: it records the order runs start in, and each "process"
    ends (finished) when the test says go. One slot, like a small laptop."""
    name = "local"

    def __init__(self):
        from core.serve import slots
        self.order: list[str] = []
        self.go = False
        self._slots = slots.plan(setting=1, n_cores=1, n_gpus=0, mps=False)

    def slots(self):
        return self._slots

    def start(self, job, slot, run):
        self.order.append(run.config.name)
        job.pid = os.getpid()
        return job

    def started(self, job):
        return job.pid is not None

    def mine(self, job):
        return True

    def collect(self):
        pass

    def poll(self, job):
        if self.go:
            store.get_run(job.run_id).set_status("finished", message="done")
        return self.go, 0 if self.go else None

    def kill(self, job):
        pass


def fake_manager():
    from core.serve.executor import Executor
    MANAGER.close()       # the lab's own dispatcher would take these runs too, as a second server would
    launcher = FakeLauncher()
    manager = RunManager(Executor(launcher))
    manager.start = lambda: None          # the test drives the dispatcher with tick()
    return manager, launcher


def test_runs_of_many_users_interleave(tmp_path):
    """Alice queues four runs, then Bob and Carol one each: they start A1, B1, C1, A2, ... and
    each user sees their place and an estimated start."""
    manager, fake = fake_manager()
    submitted = {}
    cfg = tiny_run_config(tmp_path, epochs=2)
    for owner, name in [("alice", "A1"), ("alice", "A2"), ("alice", "A3"), ("alice", "A4"),
                        ("bob", "B1"), ("carol", "C1")]:
        cfg.name = name
        submitted[name] = manager.submit(cfg, owner=owner)
    manager.executor.tick()
    assert fake.order == ["A1"]
    place, eta = manager.place(submitted["C1"].id)
    assert place == 2 and eta > 0          # A1 trains, B1 is next, then C1
    assert manager.place(submitted["A1"].id) is None      # training, not waiting
    fake.go = True
    for _ in range(20):
        manager.executor.tick()
    assert not manager.busy()
    assert fake.order == ["A1", "B1", "C1", "A2", "A3", "A4"]


def test_a_student_can_queue_only_so_many(monkeypatch, tmp_path):
    manager, fake = fake_manager()
    cfg = tiny_run_config(tmp_path)
    manager.submit(cfg, owner="alice", max_queued=2)
    manager.executor.tick()                                 # the first one trains...
    for _ in range(2):
        manager.submit(cfg, owner="alice", max_queued=2)   # ...two wait
    before = len(store.list_runs())
    with pytest.raises(QueueFull, match="allows 2 at a time"):
        manager.submit(cfg, owner="alice", max_queued=2)
    assert len(store.list_runs()) == before                    # nothing created for the refused one
    manager.submit(cfg, owner="bob", max_queued=2)          # others are not affected
    from core.training import sweeps
    monkeypatch.setattr(sweeps, "MANAGER", manager)
    with pytest.raises(QueueFull):
        sweeps.queue([cfg, cfg], owner="alice", max_queued=2)
    for run in store.list_runs():
        manager.stop(run.id)
    fake.go = True
    manager.executor.tick()
    assert not manager.busy()


def test_the_teachers_minute_cap_stops_a_student_run(tiny_config):
    """A real training process, stopped by its time cap (the clock starts with the process)."""
    manager = RunManager()
    try:
        run = manager.submit(tiny_config(freeze="full", epochs=400), owner="alice", limit_s=3)
        assert manager.wait(run.id, timeout=120)
    finally:
        manager.close()     # its dispatcher would follow FINETUNE_LAB_HOME into later tests
    status = run.status()
    assert status["state"] == "stopped" and "teacher's time limit" in status["message"], status


def test_the_teachers_epoch_cap(classroom):
    cfg, note = access.capped(RunConfig(epochs=50, phase1_epochs=40), access.User("alice1"),
                              access.Policy(max_epochs=10))
    assert cfg.epochs == 10 and cfg.phase1_epochs == 10 and "capped at 10" in note
    cfg, note = access.capped(RunConfig(epochs=50), access.User("t1", admin=True), access.Policy(max_epochs=10))
    assert cfg.epochs == 50 and not note


def test_a_failing_run_never_stops_the_queue(monkeypatch, tmp_path):
    """A run whose folder vanished while queued, and one whose training raises: both end, and
    the next run still trains."""
    data = class_folders(tmp_path / "data", 3, 8)
    cfg = tiny_run_config(data, epochs=1).to_dict()
    manager = MANAGER
    first = manager.submit(RunConfig(**{**cfg, "name": "first"}), owner="a")
    gone = manager.submit(RunConfig(**{**cfg, "name": "gone"}), owner="b")
    boom = manager.submit(RunConfig(**{**cfg, "name": "boom", "data_root": str(tmp_path / "no such folder")}), owner="c")
    last = manager.submit(RunConfig(**{**cfg, "name": "last"}), owner="d")
    import shutil
    shutil.rmtree(gone.path)
    for run in (first, gone, boom, last):
        assert manager.wait(run.id, timeout=120)
    assert first.status()["state"] == "finished"
    assert last.status()["state"] == "finished"
    assert boom.status()["state"] == "failed" and "no such folder" in boom.status()["message"], boom.status()


# ---------------------------------------------------------------- one trainer per run, full disks

def test_a_run_is_trained_by_one_process_at_a_time(tiny_config):
    """A paused trainer (here: a second open of the lock, as another process would hold it)
    keeps the run: Resume is refused with a sentence, a direct train_run backs off without
    touching the status, and the run doesn't read as interrupted."""
    import fcntl
    run = store.Run.create(tiny_config(epochs=2))
    run.write_json("status.json", dict(state="running", last_epoch=1, pid=1, updated=time.time() - 3600))
    with open(run.file(".lock"), "a+") as holder:
        fcntl.flock(holder, fcntl.LOCK_EX | fcntl.LOCK_NB)
        assert run.busy()
        with pytest.raises(store.RunBusy):
            training.train_run(run)
        assert run.status()["state"] == "running"          # pid 1 is alive and holds the lock
        run.set_status("stopped")
        run.file("last_state.pt").write_bytes(b"x")
        with pytest.raises(ValueError, match="Another process is still training this run"):
            MANAGER.resume(run)
    assert not run.busy()


def test_a_full_disk_fails_with_a_sentence_leaves_no_temp_files_and_resumes(tiny_config, monkeypatch):
    import safetensors.torch
    real = safetensors.torch.save_file
    writes = {"n": 0}

    def save_file(state, path, *args, **kwargs):
        writes["n"] += 1
        if writes["n"] == 4:         # epoch 2's best/last checkpoint: the disk is full
            Path(path).write_bytes(b"half")
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(state, path, *args, **kwargs)
    monkeypatch.setattr(safetensors.torch, "save_file", save_file)
    run = store.Run.create(tiny_config(epochs=3))
    status = training.train_run(run)
    assert status["state"] == "failed"
    assert "The disk is full" in status["message"] and "Resume" in status["message"]
    assert not list(run.path.glob("*.tmp")) and not list(run.path.glob(".*.tmp"))
    assert run.resumable()
    monkeypatch.setattr(safetensors.torch, "save_file", real)
    assert training.train_run(run, resume=True)["state"] == "finished"
    assert [row["epoch"] for row in run.epochs()] == [1, 2, 3]


def test_torch_save_on_a_full_disk_reads_as_a_full_disk(tiny_config, monkeypatch):
    """torch.save reports a full disk as RuntimeError("basic_ios::clear"); the run says "disk full"."""
    import shutil
    import torch
    real = torch.save

    def save(obj, f, *args, **kwargs):
        # epoch 2's resume state (its row is already written; epoch 1's state is on disk)
        if str(f).endswith("last_state.pt.tmp") and len(run.epochs()) >= 2:
            Path(f).write_bytes(b"half")
            raise RuntimeError("[enforce fail at inline_container.cc:626] . unexpected pos; basic_ios::clear")
        return real(obj, f, *args, **kwargs)
    free = shutil.disk_usage
    monkeypatch.setattr(torch, "save", save)
    monkeypatch.setattr(shutil, "disk_usage", lambda p: free(p)._replace(free=1024))
    run = store.Run.create(tiny_config(epochs=3))
    status = training.train_run(run)
    assert status["state"] == "failed" and "The disk is full" in status["message"]
    assert not list(run.path.glob(".*.tmp")) and run.resumable()


def test_a_read_only_data_directory_gives_one_sentence(monkeypatch, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    with monkeypatch.context() as mp:
        mp.setenv("FINETUNE_LAB_HOME", str(blocker / "lab"))
        assert "can't write to its data directory" in paths.write_problem()
        at = AppTest.from_file(str(paths.REPO_ROOT / "streamlit_app.py"), default_timeout=60).run()
        assert_ok(at)
        assert "can't write to its data directory" in errors(at)
        import contextlib
        from core import cli
        err = io.StringIO()
        with contextlib.redirect_stderr(err):
            assert cli.main(["train", str(tmp_path / "config.json")]) == 2
        assert "can't write to its data directory" in err.getvalue() and "Traceback" not in err.getvalue()


def test_an_unknown_or_hostile_arch_creates_no_folder(tmp_path):
    before = {p for p in tmp_path.rglob("*")}
    for arch in ("../../../../elsewhere", "no_such_model", "hf-hub:../../x"):
        with pytest.raises(ConfigError, match="arch is"):
            MANAGER.submit(RunConfig(data_root=str(tmp_path), arch=arch))
    queue = paths.home() / "queue"          # the lab's background queue ticks there in every test
    new = {p for p in tmp_path.rglob("*") if p != queue and queue not in p.parents} - before
    assert new <= {paths.home(), paths.runs_dir()}
    assert store.list_runs() == []


def test_resume_pressed_right_after_stop_trains_on(tiny_config):
    """The browser walk pressed Resume as soon as the page read "stopped", while the stopped
    job was still tidying up: the run stayed "queued" for good (the old job's clean-up took the
    new job's place). Now Resume waits for it and the run finishes."""
    run = MANAGER.submit(tiny_config(freeze="full", epochs=6, image_size=64, batch_size=4), owner="me")
    end = time.monotonic() + 120
    while len(run.epochs()) < 1:
        assert time.monotonic() < end, run.status()
        time.sleep(0.01)
    MANAGER.stop(run.id)
    while run.status().get("state") != "stopped":
        assert time.monotonic() < end, run.status()
        time.sleep(0.005)
    MANAGER.resume(run, owner="me")
    assert MANAGER.wait(run.id, timeout=120)
    assert run.status()["state"] == "finished"
    assert [row["epoch"] for row in run.epochs()] == [1, 2, 3, 4, 5, 6]
