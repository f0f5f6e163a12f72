"""Data set versions (core.data.versions): snapshot, derive, diff, hard-linked storage, immutable
manifests, hostile names, the pin every run records, the CLI and the quota."""
from __future__ import annotations

import os
import shutil
import threading
from pathlib import Path

import pytest
from conftest import class_image, tiny_run_config

from core.data import versions as V
from core.serve.access import folder_bytes
from core.data.folders import scan_folder


def new_image(tmp_path: Path, label: int, index: int, name: str = "") -> Path:
    path = tmp_path / "incoming" / (name or f"new_{label}_{index}.png")
    path.parent.mkdir(parents=True, exist_ok=True)
    class_image(label, index).save(path)
    return path


@pytest.fixture
def flowers(image_folder):
    return V.snapshot(image_folder(classes=3, per_class=6), "flowers", "alice")


def test_snapshot_derive_diff(flowers, tmp_path):
    assert (flowers.id, flowers.parent, len(flowers.files)) == ("v1", None, 18)
    assert flowers.note == "first version: 18 images in 3 classes"
    scan = scan_folder(flowers.folder)            # every class-folder reader reads a version
    assert scan.classes == ["class_a", "class_b", "class_c"] and len(scan.items) == 18
    v2 = V.derive(flowers, add=[(new_image(tmp_path, 0, 50), "class_a"), (new_image(tmp_path, 1, 50), "class_b")],
                  relabel={"class_a/img_000.png": "class_c"}, remove=["class_b/img_001.png"], author="alice")
    assert (v2.id, v2.parent) == ("v2", "v1")
    assert v2.note == "+2 images, 1 removed, 1 moved to 'class_c'"
    change = V.diff(flowers.files, v2.files)
    assert [e["path"] for e in change.added] == ["class_a/new_0_50.png", "class_b/new_1_50.png"]
    assert [e["path"] for e in change.removed] == ["class_b/img_001.png"]
    assert [(a["path"], b["path"], b["label"]) for a, b in change.relabelled] == \
        [("class_a/img_000.png", "class_c/img_000-2.png", "class_c")]      # unique in its new folder
    assert change.changed == [] and change.summary() == v2.note
    old = {e["path"]: e["sha256"] for e in flowers.files}
    assert all(old[e["path"]] == e["sha256"] for e in v2.files if e["path"] in old)   # paths kept
    assert [v.id for v in V.versions("flowers")] == ["v1", "v2"] and V.names() == ["flowers"]
    assert V.get("flowers", "v2").manifest_hash == v2.manifest_hash == V.entries_hash(v2.files)
    assert V.version_of(v2.folder).ref == "flowers/v2" and V.version_of(tmp_path) is None
    assert not V.diff(flowers, flowers) and V.diff(flowers, flowers).summary() == "no changes"


def test_groups_of_near_copies_follow_their_files_into_children(flowers, tmp_path):
    """The Doctor's "keep in one split" groups live in the manifest and in the folder's
    SAME_SPLIT_FILE, which the split reads; a relabel moves a member, a removal drops it."""
    v2 = V.derive(flowers, together=[["class_a/img_000.png", "class_b/img_000.png"],
                                     ["class_b/img_000.png", "class_c/img_001.png"], ["class_c/img_002.png"]],
                  author="alice")
    assert v2.groups == [["class_a/img_000.png", "class_b/img_000.png", "class_c/img_001.png"]]
    assert v2.note == "1 group(s) of near copies kept in one split" and not V.diff(flowers, v2)
    assert scan_folder(v2.folder).together == v2.groups
    v3 = V.derive(v2, relabel={"class_a/img_000.png": "class_c"}, remove=["class_c/img_001.png"], author="alice")
    assert v3.groups == [["class_b/img_000.png", "class_c/img_000-2.png"]]
    shutil.rmtree(v3.folder)
    assert scan_folder(v3.folder).together == v3.groups            # made again, groups too
    assert V.snapshot(v3.folder, "copied", "alice").groups == v3.groups
    with pytest.raises(V.VersionError, match="nothing to save"):
        V.derive(v3, together=[["class_c/img_000-2.png", "class_b/img_000.png"]])
    assert V.derive(v3, together=[["class_a/img_001.png", "class_b/img_001.png"]], note="by hand").note == "by hand"


def test_added_names_are_unique_and_safe(flowers, tmp_path):
    same = new_image(tmp_path, 0, 60, "img_000.png")
    odd = new_image(tmp_path, 0, 61, "..héllo wörld!.PNG")
    v2 = V.derive(flowers, add=[(same, "class_a"), (same, "class_a"), (odd, "class_a")], author="alice")
    added = sorted(e["path"] for e in V.diff(flowers, v2).added)
    assert added == ["class_a/héllo_wörld.png", "class_a/img_000-2.png", "class_a/img_000-3.png"]
    assert len(list((v2.folder / "class_a").iterdir())) == 9


def test_changed_content_at_the_same_path():
    a = [dict(path="c/x.png", label="c", sha256="1", size=1), dict(path="c/y.png", label="c", sha256="2", size=1)]
    b = [dict(path="c/x.png", label="c", sha256="9", size=1), dict(path="d/y.png", label="d", sha256="2", size=1)]
    change = V.diff(a, b)
    assert [n["path"] for _, n in change.changed] == ["c/x.png"]
    assert change.summary() == "1 changed, 1 moved to 'd'" and not change.added and not change.removed


def test_ten_versions_cost_about_one_copy(flowers, tmp_path):
    chain = [flowers]
    for i in range(9):
        chain.append(V.derive(chain[-1], add=[(new_image(tmp_path, i % 3, 200 + i), f"class_{'abc'[i % 3]}")],
                              remove=[chain[-1].files[0]["path"]], author="alice"))
    one_copy = chain[-1].size()
    folders = [v.folder for v in chain]
    assert sum(folder_bytes(f) for f in folders) > 9 * one_copy    # as if each were a copy...
    stored = folder_bytes(V.store() / "objects", *folders)
    assert stored < 1.6 * one_copy                                   # ...but it is links to one
    kept = chain[0].files[-1]        # in every version: the object plus ten links, one inode
    inode = os.stat(V.object_path(kept["sha256"]))
    assert inode.st_nlink == 11
    assert all(os.stat(f / kept["path"]).st_ino == inode.st_ino for f in folders)
    from core.serve import access
    books = [p for p in V.store().rglob("*") if p.is_file() and p.relative_to(V.store()).parts[0] not in ("objects", "sets")]
    assert access.folder_bytes(V.store()) == stored + sum(p.stat().st_size for p in books)   # each inode once


def test_manifests_are_immutable_and_concurrent_derives_get_their_own_ids(flowers, tmp_path):
    manifest = V.store() / "manifests" / "flowers" / "v1.json"
    before, listing = manifest.read_bytes(), sorted(p.name for p in flowers.folder.rglob("*"))
    added, made, errors = [new_image(tmp_path, 2, 300 + i) for i in range(4)], [], []

    def child(src):
        try:
            made.append(V.derive(flowers, add=[(src, "class_c")], author="alice"))
        except Exception as err:   # noqa: BLE001 - reported below
            errors.append(err)
    threads = [threading.Thread(target=child, args=(src,)) for src in added]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and sorted(v.id for v in made) == ["v2", "v3", "v4", "v5"]
    assert all(len(V.get("flowers", v.id).files) == 19 for v in made)
    assert manifest.read_bytes() == before and sorted(p.name for p in flowers.folder.rglob("*")) == listing
    assert not os.stat(manifest).st_mode & 0o222 and not os.stat(V.object_path(flowers.files[0]["sha256"])).st_mode & 0o222
    if os.geteuid() != 0:                  # root writes anyway (check_pin reports that as changed)
        with pytest.raises(PermissionError):
            (flowers.folder / flowers.files[0]["path"]).write_bytes(b"edited")
    leftovers = [p for p in (V.store() / "sets" / "flowers").iterdir() if p.name.startswith(".")]
    assert leftovers == []


def test_a_deleted_version_folder_comes_back(flowers):
    import shutil
    shutil.rmtree(flowers.folder)
    assert len(scan_folder(V.get("flowers", "v1").folder).items) == 18


@pytest.mark.parametrize("name", ["../x", ".hidden", "a/b", "", "x" * 65, "a\\b", "a..b", "/abs"])
def test_hostile_data_set_names_are_refused(image_folder, name):
    with pytest.raises(V.VersionError):
        V.snapshot(image_folder(), name, "alice")
    with pytest.raises(V.VersionError):
        V.versions(name)


@pytest.mark.parametrize("change", [
    dict(remove=["../../etc/passwd.png"]), dict(remove=["/abs/x.png"]), dict(remove=["class_a/.hidden.png"]),
    dict(remove=["class_a/missing.png"]), dict(relabel={"class_a/img_000.png": "../etc"}),
    dict(relabel={"class_a/img_000.png": ".x"}), dict(relabel={"class_a/img_000.png": "train"}),
    dict(relabel={"class_a/img_000.png": "a/b"}), dict(relabel={"class_a/img_000.png": "a\nb"}),
    dict(add=[("SRC", "..")]), dict(add=[("SRC", "")]), dict(add=[("NOTIMAGE", "class_a")]),
    dict(add=[("LINK", "class_a")]), dict(), dict(author="../bob")])
def test_hostile_changes_are_refused(flowers, tmp_path, change):
    src = new_image(tmp_path, 0, 70)
    (tmp_path / "notes.txt").write_text("not an image")
    (tmp_path / "link.png").symlink_to(src)
    swap = {"SRC": src, "NOTIMAGE": tmp_path / "notes.txt", "LINK": tmp_path / "link.png"}
    change = dict(change, add=[(swap[s], label) for s, label in change.get("add", [])])
    with pytest.raises(V.VersionError):
        V.derive(flowers, **change)
    assert [v.id for v in V.versions("flowers")] == ["v1"]


def test_hostile_ids_and_authors_are_refused(flowers, image_folder):
    for bad in ("../v1", "v0", "v1.json", "1"):
        with pytest.raises(V.VersionError):
            V.get("flowers", bad)
    with pytest.raises(V.VersionError):
        V.snapshot(image_folder(), "other", "../alice")


def test_manifest_of_folder_hashes_once(image_folder, monkeypatch):
    folder = image_folder(classes=2, per_class=4)
    calls = []
    real = V.file_sha256
    monkeypatch.setattr(V, "file_sha256", lambda path: calls.append(path) or real(path))
    first = V.manifest_of_folder(folder)
    assert len(first) == len(calls) == 8 and first[0]["label"] == "class_a"
    calls.clear()
    assert V.manifest_of_folder(folder) == first and calls == []         # the second look is stats only
    class_image(1, 99).save(folder / "class_a" / "img_000.png")
    assert [e["path"] for _, e in V.diff(first, V.manifest_of_folder(folder)).changed] == ["class_a/img_000.png"]
    assert len(calls) == 1


def test_pin_of_a_version_needs_no_reading(flowers, monkeypatch):
    monkeypatch.setattr(V, "file_sha256", lambda path: pytest.fail(f"read {path}"))
    items = [[e["path"], 0] for e in flowers.files]
    pin = V.pin_for(flowers.folder, {"root": str(flowers.folder), "train": items[:12], "val": items[12:], "test": []})
    assert pin["version"] == "flowers/v1" and pin["manifest"] == flowers.manifest_hash
    assert pin["files"] == {e["path"]: e["sha256"] for e in flowers.files}
    assert not V.check_pin(flowers.folder, pin)


def test_a_run_pins_its_files_and_check_pin_sees_what_changed(image_folder):
    import core
    folder = image_folder(classes=2, per_class=6)
    run = core.train(tiny_run_config(folder, epochs=1))
    assert run.status()["state"] == "finished", run.status()
    splits = run.read_json("splits.json")
    pin, root = splits["pin"], Path(splits["root"])
    used = sorted(path for s in ("train", "val", "test") for path, _ in splits[s])
    assert sorted(pin["files"]) == used and pin["version"] is None
    assert pin["manifest"] == V.entries_hash(V.manifest_of_folder(folder))     # all of the folder
    assert pin["unused"] == [] and not V.check_pin(root, pin)
    edited, deleted, moved = used[0], used[1], used[-1]
    class_image(1, 77).save(root / edited)
    (root / deleted).unlink()
    target = root / "class_a" / "moved.png"
    os.replace(root / moved, target)
    change = V.check_pin(root, pin)
    assert [b["path"] for _, b in change.changed] == [edited]
    assert [e["path"] for e in change.removed] == [deleted]
    assert [(a["path"], b["path"]) for a, b in change.relabelled] == [(moved, "class_a/moved.png")]
    assert change.added == [] and "1 changed" in change.summary()
    class_image(0, 78).save(root / "class_b" / "new.png")
    assert [e["path"] for e in V.check_pin(root, pin).added] == ["class_b/new.png"]
    old_pin = {k: v for k, v in pin.items() if k != "unused"}          # pinned before "unused" was kept
    assert V.check_pin(root, old_pin).added == []
    left_out = dict(pin, files={k: v for k, v in pin["files"].items() if k != used[2]}, unused=[used[2]])
    assert used[2] not in [e["path"] for e in V.check_pin(root, left_out).added]   # max_per_class left it out
    gone = root.parent / "gone"
    assert [e["path"] for e in V.check_pin(gone, pin).removed] == used and not gone.exists()


def test_cli(image_folder, tmp_path, capsys):
    from core.cli import main
    folder = image_folder()
    assert main(["data", "snapshot", str(folder), "flowers", "--note", "as collected"]) == 0
    assert "flowers/v1: 36 files, as collected" in capsys.readouterr().out
    V.derive(V.get("flowers", "v1"), add=[(new_image(tmp_path, 0, 80), "class_b")],
             relabel={"class_a/img_001.png": "class_c"}, author="bob")
    assert main(["data", "versions", "flowers"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["id", "parent", "files", "note", "author", "created"]
    assert lines[1].split()[:5] == ["v1", "-", "36", "as", "collected"]
    assert lines[2].split()[:3] == ["v2", "v1", "37"] and " bob " in lines[2]
    assert main(["data", "diff", "flowers", "v1", "v2"]) == 0
    out = capsys.readouterr().out
    assert "flowers v1 -> v2: +1 image, 1 moved to 'class_c'" in out
    assert "  class_b/new_0_80.png" in out and "removed: none" in out
    assert "class_a/img_001.png -> class_c/img_001-2.png (class_a -> class_c)" in out
    assert main(["data", "versions", "nothing"]) == 2
    assert main(["data", "diff", "flowers", "v1", "v9"]) == 2
    assert "no version v9" in capsys.readouterr().err
    assert main(["data", "delete", "flowers", "v1"]) == 2
    assert "later versions" in capsys.readouterr().err
    assert main(["data", "delete", "flowers", "v2"]) == 0
    assert "deleted flowers/v2; 0.0 MB freed" in capsys.readouterr().out


def test_usage_counts_toward_the_author_only(image_folder, tmp_path):
    from core.serve import access
    rules = access.Policy(upload_mb=1000, user_mb=1000, total_mb=0)
    alice, bob = access.User("alice"), access.User("bob")
    before = {u.id: access.upload_allowance(u, rules) for u in (alice, bob)}
    v1 = V.snapshot(image_folder(), "flowers", "alice")
    assert V.usage("alice") == v1.size() > 0 and V.usage("bob") == 0
    assert access.upload_allowance(alice, rules) == before["alice"] - v1.size()
    assert access.upload_allowance(bob, rules) == before["bob"]
    added = new_image(tmp_path, 0, 90)
    V.derive(v1, add=[(added, "class_a")], relabel={"class_a/img_000.png": "class_b"}, author="bob")
    assert V.usage("bob") == added.stat().st_size       # what bob brought, not alice's set
    assert V.usage("alice") == v1.size()


def test_pre_split_sets_keep_their_splits(image_folder, tmp_path):
    v1 = V.snapshot(image_folder(classes=2, splits={"train": 4, "valid": 2, "test": 2}), "split", "alice")
    assert {e["path"].split("/")[0] for e in v1.files} == {"train", "valid", "test"}
    assert V.label_of("valid/class_b/img_000.png") == "class_b"
    v2 = V.derive(v1, add=[(new_image(tmp_path, 0, 5), "class_a")],
                  relabel={"test/class_a/img_000.png": "class_b"}, author="alice")
    change = V.diff(v1, v2)
    assert [e["path"] for e in change.added] == ["train/class_a/new_0_5.png"]
    assert [b["path"] for _, b in change.relabelled] == ["test/class_b/img_000-2.png"]
    scan = scan_folder(v2.folder)
    assert scan.presplit and len(scan.items) == 17 and scan.classes == ["class_a", "class_b"]


def test_a_student_may_train_on_versions_of_their_data_set_only(image_folder):
    """Version folders sit outside a student's uploads: the author (and whoever made a version
    of the same data set) may read them, another student may not."""
    from core.serve import access
    rules = access.Policy(server_folders=False)
    alice, carol = access.User("alice"), access.User("carol")
    v1 = V.snapshot(image_folder(), "flowers", "alice")
    assert access.data_problem(alice, v1.folder.resolve(), rules) is None
    assert access.data_problem(alice, (v1.folder / "class_a").resolve(), rules) is None
    assert access.data_problem(carol, v1.folder.resolve(), rules) is not None
    assert access.data_problem(carol, (V.store() / "objects").resolve(), rules) is not None


def test_removing_the_newest_version_frees_what_only_it_held(flowers, tmp_path):
    extra = new_image(tmp_path, 0, 90)
    v2 = V.derive(flowers, add=[(extra, "class_a")], author="alice")
    added = V.diff(flowers, v2).added[0]
    with pytest.raises(V.VersionError, match="later versions"):
        V.remove(flowers)
    assert V.collect_garbage() == 0                         # every object is named
    freed = V.remove(v2)
    assert freed == 0 and V.object_path(added["sha256"]).exists()      # too young: it may be in flight
    assert V.collect_garbage(min_age_s=0) == added["size"] and not V.object_path(added["sha256"]).exists()
    assert [v.id for v in V.versions("flowers")] == ["v1"] and not (V.store() / "sets/flowers/v2").exists()
    assert all(V.object_path(e["sha256"]).exists() for e in flowers.files)
    with pytest.raises(V.VersionError, match="no version v2"):
        V.get("flowers", "v2")
    assert V.derive(flowers, add=[(extra, "class_a")], author="alice").id == "v2"    # the id is free again
