"""The dataset doctor (core/doctor.py, `python -m core doctor`, the Doctor page): on generated
class images with known problems planted (moved labels, copies, a black, a tiny and a very wide
image), it must find them, and its fixes must go into a new copy without touching the original."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from PIL import Image

from apptest_helpers import assert_ok, opened
from conftest import class_folders, class_image
from core.data import folders
from core.data import splits as splitting
from core.trust import doctor
from core.cli import main as cli

pytestmark = pytest.mark.slow

CLASSES = ["red", "green", "blue"]
FLIPPED = {"red/img_003.png": "green", "green/img_005.png": "blue"}    # file -> folder it is moved to


@pytest.fixture
def planted(tmp_path):
    """24 images a class, two of them in the wrong class folder, plus an exact copy across
    classes and a black, a tiny and a very wide picture."""
    root = class_folders(tmp_path / "planted", CLASSES, per_class=24, size=48)
    moved = {}
    for rel, to in FLIPPED.items():
        target = root / to / f"moved_{rel.replace('/', '_')}"
        shutil.move(root / rel, target)
        moved[str(target.relative_to(root))] = rel.split("/")[0]
    shutil.copy(root / "blue/img_010.png", root / "blue/img_010_copy.png")
    Image.new("RGB", (48, 48)).save(root / "red/black.png")
    class_image(0, 99, 6).save(root / "red/tiny.png")
    class_image(1, 98, (240, 30)).save(root / "green/wide.png")
    return root, moved


def audit(root):
    return doctor.audit(root, arch="test_resnet", weights="random", size=48)


def test_finds_the_planted_problems(planted, monkeypatch):
    root, moved = planted

    def no_pool(*_, **__):
        raise AssertionError("a process pool forked from the task worker (threads running) can deadlock")
    monkeypatch.setattr("multiprocessing.Pool", no_pool)
    monkeypatch.setattr("os.fork", no_pool)
    result = audit(root)
    labels = result.of("label").set_index("path")
    assert set(moved) <= set(labels.index), (moved, labels)
    for path, original in moved.items():
        assert labels.loc[path, "suggested"] == original
    assert len(labels) <= 2 * len(moved), f"too many false alarms: {labels}"
    assert ["blue/img_010.png", "blue/img_010_copy.png"] in [sorted(g) for g in result.groups]
    issues = {(r.path, r.issue) for r in result.findings.itertuples()}
    assert {("red/black.png", "dark"), ("red/tiny.png", "tiny"), ("green/wide.png", "aspect")} <= issues
    assert any("mislabelled" in line for line in result.verdicts)
    assert doctor.saved(root)["findings"], "the audit is kept for the report and the page"


def test_fixes_go_into_a_new_copy(planted, tmp_path):
    root, moved = planted
    before = sorted(p.relative_to(root) for p in root.rglob("*") if p.is_file())
    result = audit(root)
    suggested = dict(zip(result.of("label")["path"], result.of("label")["suggested"]))
    dest = doctor.write_fixed_copy(result, tmp_path / "fixed", exclude=["red/black.png"], move=suggested,
                                   together=result.groups)
    assert sorted(p.relative_to(root) for p in root.rglob("*") if p.is_file()) == before, "original changed"
    fixed = folders.scan_folder(dest)
    names = {it.path for it in fixed.items}
    assert "red/black.png" not in names
    for path, original in moved.items():
        assert f"{original}/{path.split('/')[-1]}" in names
    assert fixed.together, "the duplicate group is kept for the split"
    for group in fixed.together:
        splits = splitting.split_items(fixed, (0.5, 0.25, 0.25), seed=3)
        where = {it.path: s for s, items in splits.items() for it in items}
        assert len({where[p] for p in group}) == 1
    assert json.loads((dest / ".doctor.json").read_text())["excluded"] == ["red/black.png"]
    with pytest.raises(FileExistsError):
        doctor.write_fixed_copy(result, dest)


def test_keep_together_moves_a_group_into_train():
    items = [folders.Item(f"c{label}/{i}.png", label) for label in range(2) for i in range(10)]
    scan = folders.DataScan("/x", ["a", "b"], items, together=[["c0/0.png", "c0/1.png", "c0/2.png"]])
    for seed in range(5):
        splits = splitting.split_items(scan, seed=seed)
        where = {it.path: s for s, its in splits.items() for it in its}
        assert len({where[p] for p in scan.together[0]}) == 1
        assert sum(map(len, splits.values())) == len(items)


def test_out_of_sample_probs_skip_tiny_classes():
    rng = np.random.default_rng(0)
    vectors = np.concatenate([rng.normal(c, 0.1, (10, 8)) for c in range(2)] + [rng.normal(5, 0.1, (1, 8))])
    labels = np.array([0] * 10 + [1] * 10 + [2])
    probs = doctor.out_of_sample_probs(vectors, labels, np.ones(len(labels), bool))
    assert np.isnan(probs[-1]).all() and not np.isnan(probs[:-1]).any()
    assert (probs[:-1].argmax(1) == labels[:-1]).all()


def test_command_line_writes_csv(planted, tmp_path, capsys):
    root, moved = planted
    out = tmp_path / "doctor.csv"
    assert cli(["doctor", str(root), "--out", str(out), "--arch", "test_resnet", "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "mislabelled" in printed
    import pandas as pd
    frame = pd.read_csv(out)
    assert list(frame.columns) == ["path", "issue", "label", "suggested", "score", "detail"]
    assert set(moved) <= set(frame[frame.issue == "label"].path)
    assert cli(["doctor", str(tmp_path / "nowhere")]) == 2


def finish_task(at, timeout: float = 180) -> None:
    """The audit runs in a worker process: wait for it, then run the page again (fragments
    don't tick in AppTest)."""
    import time

    from core.serve import tasks
    task_id = at.session_state["lab"].page["doctor"]["task"]
    end = time.monotonic() + timeout
    while tasks.get_task(task_id).status().get("state") in ("queued", "preparing", "running"):
        assert time.monotonic() < end, tasks.get_task(task_id).status()
        time.sleep(0.2)
    assert tasks.get_task(task_id).status()["state"] == "finished", tasks.get_task(task_id).status()
    at.run()
    assert_ok(at)


def test_doctor_page_audits_and_saves_the_fixes_as_a_version(planted):
    root, moved = planted
    at = opened("pages/8_Doctor.py")
    at.session_state["lab"].settings["data_root"] = str(root)
    at.run()
    at.button(key="doctor_go").click().run()
    assert_ok(at)
    finish_task(at)
    assert any("mislabelled" in w.value for w in at.warning), [w.value for w in at.warning]
    at.button(key="move_all").click().run()
    at.button(key="write_fixed").click().run()
    assert_ok(at)
    from core.data import feedback, versions
    new_root = at.session_state["lab"].settings["data_root"]
    fixed = versions.version_of(new_root)
    assert fixed is not None and fixed == feedback.doctors_version(new_root) and fixed.id == "v2"
    assert len(versions.diff(versions.get(fixed.name, "v1"), fixed).relabelled) == len(moved)
    assert any(f"Now using the fixed version {fixed.ref}" in s.value for s in at.success), [s.value for s in at.success]
    assert (root / next(iter(moved))).exists(), "the original folder was changed"
    at.run()
    assert any(f"This is version {fixed.ref}" in i.value for i in at.info), [i.value for i in at.info]


def test_the_run_report_shows_the_audit(planted, tmp_path):
    from conftest import tiny_run_config, train_apart
    from core.results import report as reports
    root, moved = planted
    audit(root)
    run = train_apart(tiny_run_config(root, epochs=1), tmp_path)
    html = reports.run_report(run, include_inspection=False)
    assert '<section id="doctor">' in html and "look mislabelled" in html
    for path in moved:
        assert path in html
