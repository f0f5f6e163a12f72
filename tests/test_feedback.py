"""Feedback into data (core.data.feedback): judged predictions and relabels become a new data set
version that keeps the old run's splits, within the student's rights and quota; and what a run's
pin says about its data (labels, changes since training, runs on different data).

The runs here are made without training (Run.create + the splits.json prepare_data writes): the
feedback only reads a run's config, classes and splits."""
from __future__ import annotations

import io
import shutil
from pathlib import Path

import pytest
from conftest import class_image, tiny_run_config

from core.data import feedback as F
from core.data import versions as V
from core.data.folders import scan_folder
from core.data.splits import split_items
from core.serve import access
from core.serve.store import Run

LOCAL = access.User("local", admin=True)
ROOMY = access.Policy(upload_mb=1000, user_mb=1000, total_mb=0)


def made_run(folder: Path, owner: str = "local", **overrides) -> Run:
    """A run folder as prepare_data leaves it (config, classes, splits with their pin), untrained."""
    cfg = tiny_run_config(folder, **overrides)
    scan = scan_folder(folder, check=False)
    splits = split_items(scan, cfg.split, cfg.split_seed, cfg.max_per_class)
    run = Run.create(cfg, owner=owner)
    run.write_json("classes.json", scan.classes)
    rows = dict(root=scan.root, **{s: [(it.path, it.label) for it in items] for s, items in splits.items()})
    rows["pin"] = V.pin_for(scan.root, splits, present=[it.path for it in scan.items])
    run.write_json("splits.json", rows)
    return run


def png(label: int, index: int) -> bytes:
    buf = io.BytesIO()
    class_image(label, index).save(buf, "PNG")
    return buf.getvalue()


def new_file(tmp_path: Path, label: int, index: int) -> Path:
    path = tmp_path / "incoming" / f"photo_{label}_{index}.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    class_image(label, index).save(path)
    return path


def assignment(run: Run, version: V.Version, path_map: dict | None = None) -> dict[str, str]:
    """{the run's path: the split a run with its settings would give it on `version`}."""
    cfg = run.config
    now = {it.path: s for s, items in split_items(scan_folder(version.folder, check=False), cfg.split,
                                                   cfg.split_seed, cfg.max_per_class).items() for it in items}
    return {old: now.get((path_map or {}).get(old, old)) for old in F.run_splits(run)}


@pytest.fixture
def flat_run(image_folder):
    return made_run(image_folder(classes=3, per_class=12))


# ---------------------------------------------------------------- Predict's verdicts

def test_verdicts():
    assert F.Example("a.png", "rose").verdict == "skip"
    assert F.Example("a.png", "rose", "rose").verdict == "accept"
    assert F.Example("a.png", "rose", "tulip").verdict == "correct"
    assert [e.name for e in F.judged([F.Example("a", "x"), F.Example("b", "x", "y")])] == ["b"]


def test_accepted_and_corrected_images_go_to_train_and_old_ones_keep_their_split(flat_run, tmp_path):
    root = F.run_root(flat_run)
    examples = [F.Example("kept.png", "class_a", "class_a", path=new_file(tmp_path, 0, 70)),          # accepted
                F.Example("fixed.png", "class_a", "class_c", data=png(2, 71)),                         # corrected
                F.Example("ignored.png", "class_b", None, data=png(1, 72))]                            # skipped
    assert F.base_name(flat_run, LOCAL) == root.name
    saved = F.save_feedback(flat_run, LOCAL, ROOMY, examples)
    v1, v2 = saved.base, saved.version
    assert saved.snapshotted and (v1.ref, v2.ref, v2.parent) == (f"{root.name}/v1", f"{root.name}/v2", "v1")
    assert v1.note == f"the folder run {flat_run.id} trained on" and v1.hash == flat_run.read_json("splits.json")["pin"]["manifest"]
    assert (saved.accepted, saved.corrected, saved.relabelled, saved.duplicates) == (1, 1, 0, [])
    assert saved.restructured and saved.moved == []
    assert saved.summary() == f"{v2.ref}: +2 images to train (1 confirmed, 1 corrected)"
    assert v2.note.startswith(f"feedback on run {flat_run.id}: +2 images to train (1 confirmed, 1 corrected)")
    # the old run's assignment is the new version's folders; the new images are in train
    used = F.run_splits(flat_run)
    by_path = {e["path"]: e for e in v2.files}
    for rel, split in used.items():
        assert f"{split}/{rel}" in by_path, rel
    assert by_path["train/class_a/photo_0_70.png"]["label"] == "class_a"
    assert by_path["train/class_c/fixed.png"]["label"] == "class_c"
    assert len(v2.files) == len(v1.files) + 2
    again = assignment(flat_run, v2, {rel: f"{split}/{rel}" for rel, split in used.items()})
    assert again == used                                    # a run with the same settings: same splits
    scan = scan_folder(v2.folder)
    assert scan.presplit and scan.classes == flat_run.classes


def test_a_plain_derive_would_move_old_images_between_splits(flat_run, tmp_path):
    """Why the split is kept as folders: split_items shuffles each class with one seeded
    generator, so one added image reshuffles the classes."""
    v1 = V.snapshot(F.run_root(flat_run), "plain", "local")
    v2 = V.derive(v1, add=[(new_file(tmp_path, 0, 80), "class_a")])
    moved = {rel for rel, split in assignment(flat_run, v2).items() if split != F.run_splits(flat_run)[rel]}
    assert moved


def test_a_run_on_a_kept_split_version_gets_a_plain_child(flat_run, tmp_path):
    first = F.save_feedback(flat_run, LOCAL, ROOMY, [F.Example("x.png", "class_b", "class_b", data=png(1, 90))])
    second_run = made_run(first.version.folder)
    assert F.base_name(second_run, LOCAL) == first.version.name
    test_image = next(rel for rel, split in F.run_splits(second_run).items()
                      if split == "test" and rel.startswith("test/class_a/"))
    saved = F.save_feedback(second_run, LOCAL, ROOMY, [F.Example("y.png", "class_a", "class_b", data=png(1, 91))],
                            relabel={test_image: "class_c"})
    assert not saved.snapshotted and not saved.restructured and saved.base.ref == first.version.ref
    assert saved.version.parent == first.version.id and saved.moved == []
    change = V.diff(saved.base, saved.version)
    assert [e["path"] for e in change.added] == ["train/class_b/y.png"]
    (old, new), = change.relabelled
    assert old["path"] == test_image and new["path"].startswith("test/class_c/")     # still a test image
    assert (saved.corrected, saved.relabelled) == (1, 1)
    assert "1 moved to 'class_c'" in saved.version.note


def test_evaluate_relabel_of_a_test_image_keeps_it_in_test(flat_run):
    test_image = next(rel for rel, split in F.run_splits(flat_run).items() if split == "test")
    saved = F.save_feedback(flat_run, LOCAL, ROOMY, relabel={test_image: "class_c" if not test_image.startswith("class_c")
                                                             else "class_a"})
    entry = next(e for e in saved.version.files if e["sha256"] == flat_run.read_json("splits.json")["pin"]["files"][test_image])
    assert entry["path"].startswith("test/") and entry["label"] != test_image.split("/")[0]
    assert saved.moved == [] and saved.relabelled == 1 and saved.summary().endswith("1 image moved to another class")


def test_images_already_in_the_data_set_are_left_out(flat_run):
    root = F.run_root(flat_run)
    inside = sorted(F.run_splits(flat_run))[0]
    again = F.Example("copy.png", "class_a", "class_a", data=(root / inside).read_bytes())
    fresh = F.Example("new.png", "class_a", "class_a", data=png(0, 60))
    twice = F.Example("new-again.png", "class_a", "class_a", data=png(0, 60))
    saved = F.save_feedback(flat_run, LOCAL, ROOMY, [again, fresh, twice])
    assert saved.duplicates == ["copy.png", "new-again.png"] and saved.accepted == 1
    with pytest.raises(F.FeedbackError, match="in the data set already"):
        F.save_feedback(flat_run, LOCAL, ROOMY, [again])


def test_a_snapshot_is_reused_while_the_folder_is_unchanged(flat_run):
    F.save_feedback(flat_run, LOCAL, ROOMY, [F.Example("a.png", "class_a", "class_a", data=png(0, 61))])
    F.save_feedback(flat_run, LOCAL, ROOMY, [F.Example("b.png", "class_a", "class_a", data=png(0, 62))])
    chain = V.versions(F.base_name(flat_run, LOCAL))
    assert [v.parent for v in chain] == [None, "v1", "v2"]        # one snapshot, two versions from it


def test_camera_bytes_without_an_extension_get_one(flat_run):
    saved = F.save_feedback(flat_run, LOCAL, ROOMY, [F.Example("camera snapshot", "class_a", "class_b",
                                                               data=png(1, 63))])
    assert "train/class_b/camera_snapshot.png" in {e["path"] for e in saved.version.files}
    with pytest.raises(F.FeedbackError, match="not an image"):
        F.save_feedback(flat_run, LOCAL, ROOMY, [F.Example("junk", "class_a", "class_b", data=b"no image")])


def test_a_link_is_not_followed(flat_run, tmp_path):
    link = tmp_path / "incoming" / "link.png"
    link.parent.mkdir(parents=True, exist_ok=True)
    link.symlink_to(new_file(tmp_path, 0, 73))
    with pytest.raises(F.FeedbackError, match="not an image file"):
        F.save_feedback(flat_run, LOCAL, ROOMY, [F.Example("link.png", "class_a", "class_a", path=link)])


@pytest.mark.parametrize("case", ["nothing judged", "a class the run doesn't have", "a path not in the data"])
def test_refused_feedback(flat_run, case):
    kwargs = {"nothing judged": dict(examples=[F.Example("a.png", "class_a", None, data=png(0, 1))]),
              "a class the run doesn't have": dict(examples=[F.Example("a.png", "class_a", "zebra", data=png(0, 1))]),
              "a path not in the data": dict(relabel={"class_a/nope.png": "class_b"})}[case]
    with pytest.raises(F.FeedbackError):
        F.save_feedback(flat_run, LOCAL, ROOMY, **kwargs)
    if case != "a path not in the data":
        assert V.names() == []                 # refused before anything was stored


# ---------------------------------------------------------------- students

def student_run(image_folder, student: access.User) -> Run:
    upload = access.uploads_dir(student) / "flowers-0123456789abcdef"
    shutil.copytree(image_folder(classes=2, per_class=8), upload)
    return made_run(upload, owner=student.id)


def test_a_student_snapshots_their_own_upload_under_their_name(image_folder):
    alice, bob = access.User("alice"), access.User("bob")
    run = student_run(image_folder, alice)
    assert F.data_set_name(F.run_root(run), alice) == "alice.flowers-01234567"
    saved = F.save_feedback(run, alice, ROOMY, [F.Example("a.png", "class_a", "class_b", data=png(1, 64))])
    assert saved.version.author == "alice" and saved.version.name == "alice.flowers-01234567"
    assert F.may_read(alice, saved.base) and F.may_read(alice, saved.version) and F.may_read(LOCAL, saved.version)
    assert not F.may_read(bob, saved.version)
    assert F.readable_names(alice) == [saved.version.name] and F.readable_names(bob) == []
    assert access.run_data_problem(alice, str(saved.version.folder), ROOMY) is None    # she may train on it
    assert access.run_data_problem(bob, str(saved.version.folder), ROOMY)
    bobs = made_run(saved.version.folder, owner="bob")
    assert "someone else" in F.base_problem(bobs, bob)


def test_a_student_over_quota_is_refused(image_folder):
    alice = access.User("alice")
    run = student_run(image_folder, alice)
    (access.uploads_dir(alice) / "big.bin").write_bytes(b"\0" * (2 << 20))     # 2 MB of a 1 MB quota
    tight = access.Policy(upload_mb=1000, user_mb=1, total_mb=0)
    with pytest.raises(access.AccessError, match="quota"):
        F.save_feedback(run, alice, tight, [F.Example("a.png", "class_a", "class_b", data=png(1, 65))])
    assert V.names() == []


def test_the_snapshot_and_the_additions_are_checked_against_the_quota_at_once(image_folder):
    alice = access.User("alice")
    run = student_run(image_folder, alice)
    folder_bytes = sum(e["size"] for e in V.manifest_of_folder(F.run_root(run)))
    room = access.upload_allowance(alice, ROOMY)
    big = F.Example("big.png", "class_a", "class_a", data=png(0, 66) + b"\0" * (room - folder_bytes))
    with pytest.raises(access.AccessError, match="MB left"):
        F.save_feedback(run, alice, ROOMY, [big])
    assert V.names() == []                                     # not even the snapshot
    base, made = F.base_version(run, alice, ROOMY)             # alone, the snapshot fits
    assert made and base.size() == folder_bytes and V.usage("alice") == folder_bytes


def test_a_student_versions_a_shared_folder_they_may_train_on_and_pays_for_it(image_folder):
    """The demo and the teacher's shared folders: a data set of the student's own, on their quota."""
    folder = image_folder(classes=2, per_class=8)
    alice = access.User("alice")
    run = made_run(folder, owner="alice")
    closed = access.Policy(server_folders=False)
    with pytest.raises(F.FeedbackError, match="turned off server folders"):
        F.save_feedback(run, alice, closed, [F.Example("a.png", "class_a", "class_b", data=png(1, 67))])
    shared = access.Policy(roots=[str(folder.parent)])
    saved = F.save_feedback(run, alice, shared, [F.Example("a.png", "class_a", "class_b", data=png(1, 67))])
    assert saved.snapshotted and saved.base.name.startswith("alice.") and saved.version.author == "alice"
    assert V.usage("alice") == saved.version.size()
    assert F.base_problem(run, access.User("bob"), shared) is None     # bob may make his own


def test_the_doctors_fixes_are_a_version(image_folder):
    """Left out, moved and kept-together images make the next version of the audited folder's
    data set (stored first when it isn't); the original folder is not touched."""
    folder = image_folder(classes=2, per_class=8)
    before = V.manifest_of_folder(folder)
    new, first = F.fix_as_version(folder, LOCAL, ROOMY, exclude=["class_a/img_001.png"],
                                  move={"class_a/img_002.png": "class_b"},
                                  together=[["class_a/img_003.png", "class_b/img_003.png"]])
    assert first is not None and first.hash == V.entries_hash(before) and new.parent == first.id
    assert new.note == "the Doctor's fixes: 1 left out, 1 moved to 'class_b', 1 group(s) of near copies kept in one split"
    change = V.diff(first, new)
    assert [e["path"] for e in change.removed] == ["class_a/img_001.png"]
    assert [(a["path"], b["label"]) for a, b in change.relabelled] == [("class_a/img_002.png", "class_b")]
    assert new.groups == [["class_a/img_003.png", "class_b/img_003.png"]]
    assert V.manifest_of_folder(folder) == before
    again, none = F.fix_as_version(new.folder, LOCAL, ROOMY, exclude=["class_b/img_004.png"])
    assert none is None and again.parent == new.id and again.groups == new.groups
    with pytest.raises(F.FeedbackError, match="turned off server folders"):
        F.fix_as_version(folder, access.User("alice"), access.Policy(server_folders=False), exclude=["class_a/img_001.png"])


# ---------------------------------------------------------------- training again, and the pins

def test_train_again_config(flat_run):
    saved = F.save_feedback(flat_run, LOCAL, ROOMY, [F.Example("a.png", "class_a", "class_b", data=png(1, 68))])
    cfg = F.train_again_config(flat_run, saved.version)
    old = flat_run.config
    assert cfg.data_root == str(saved.version.folder) and cfg.name == f"{old.arch} · {saved.version.ref}"
    assert {k: v for k, v in cfg.to_dict().items() if k not in ("data_root", "name")} == \
        {k: v for k, v in old.to_dict().items() if k not in ("data_root", "name")}


def test_data_labels_changes_and_mixed_versions(flat_run, image_folder):
    root = F.run_root(flat_run)
    check = F.data_check(flat_run)
    assert not check.changed and check.label.startswith("files ") and len(check.label) == 18
    saved = F.save_feedback(flat_run, LOCAL, ROOMY, [F.Example("a.png", "class_a", "class_b", data=png(1, 69))])
    on_version = made_run(saved.version.folder)
    assert F.data_label(on_version) == saved.version.ref
    assert F.data_versions_note([flat_run, flat_run]) is None
    note = F.data_versions_note([flat_run, on_version, on_version])
    assert f"{saved.version.ref} (2 runs)" in note and f"{check.label} (1 run)" in note
    # edit, remove and move files of the folder the run trained on
    used = sorted(F.run_splits(flat_run))
    class_image(2, 99).save(root / used[0])
    (root / used[1]).unlink()
    check = F.data_check(flat_run)
    assert check.changed and not check.gone and check.pinned == saved.base      # its snapshot holds the files
    lines = check.change.lines()
    assert lines == [f"1 image removed: `{used[1]}`", f"1 image changed content: `{used[0]}`"]
    (root / "class_c" / "late.png").write_bytes(png(2, 98))
    assert F.data_check(flat_run).change.lines()[0] == "1 image added: `class_c/late.png`"
    shutil.rmtree(root)
    assert F.data_check(flat_run).gone
    assert F.data_label(Run.create(tiny_run_config(root))) == "not recorded"


def test_deleting_a_version_checks_who_and_which_runs_use_it(flat_run):
    saved = F.save_feedback(flat_run, LOCAL, ROOMY, [F.Example("a.png", "class_a", "class_b", data=png(1, 71))])
    new = saved.version
    alices = V.derive(new, remove=[new.files[0]["path"]], author="alice")
    with pytest.raises(F.FeedbackError, match="someone else"):
        F.delete_version(access.User("bob"), alices)
    F.delete_version(access.User("alice"), alices)
    on_it = made_run(new.folder)
    with pytest.raises(F.FeedbackError, match=f"1 run\\(s\\) trained on {new.ref} \\({on_it.id}\\)"):
        F.delete_version(LOCAL, new)
    assert F.runs_on(saved.base) == [] and [r.id for r in F.runs_on(new)] == [on_it.id]
    shutil.rmtree(on_it.path)
    F.delete_version(LOCAL, new)
    assert [v.id for v in V.versions(new.name)] == [saved.base.id]


def test_a_student_on_the_demo_adds_corrected_images_to_a_version_of_their_own():
    """The issue's walk as a student of a class: the demo is a shared folder, so the first save
    stores it as the student's own data set (on their quota) and the new version derives from it."""
    from core import paths as lab_paths
    alice = access.User("alice")
    run = made_run(lab_paths.DEMO_DATA, owner="alice")
    assert F.base_problem(run, alice, ROOMY) is None
    corrected = F.Example("shoe.png", predicted=run.classes[0], label=run.classes[1], data=png(1, 72))
    saved = F.save_feedback(run, alice, ROOMY, [corrected])
    assert saved.snapshotted and saved.base.name == "alice.fashion_mnist" and saved.version.author == "alice"
    assert saved.corrected == 1 and V.usage("alice") == saved.version.size()
    assert F.readable_names(alice) == ["alice.fashion_mnist"] and F.readable_names(access.User("bob")) == []
    assert access.run_data_problem(alice, str(saved.version.folder), ROOMY) is None
    assert lab_paths.DEMO_DATA.is_dir() and not V.version_of(lab_paths.DEMO_DATA)      # the demo is untouched
