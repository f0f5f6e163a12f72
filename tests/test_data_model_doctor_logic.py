"""The rules the Data, Model and Doctor pages used to hold, now in core/: tested without AppTest."""
from __future__ import annotations

import os

import pandas as pd
import pytest
import safetensors.torch
import timm

from conftest import class_folders
from core.models import WeightsError
from core import config, paths
from core.data import folders, zips
from core.models import backbones
from core.serve import access
from core.trust import doctor

# ---------------------------------------------------------------- Data page: folders and uploads


def test_tree_stamp_changes_when_a_class_folder_gains_files(tmp_path):
    root = class_folders(tmp_path / "data", classes=2, per_class=2)
    before = folders.tree_stamp(root)
    assert before > 0
    (root / "new_class").mkdir()
    os.utime(root / "new_class", (before + 100, before + 100))
    assert folders.tree_stamp(root) != before
    assert folders.tree_stamp(tmp_path / "missing") == 0.0


def test_class_count_falls_back_when_the_folder_cant_be_read(tmp_path):
    assert folders.class_count(class_folders(tmp_path / "data", classes=3, per_class=2)) == 3
    assert folders.class_count(tmp_path / "nowhere") == 10
    assert folders.class_count(tmp_path / "nowhere", fallback=2) == 2


@pytest.mark.parametrize("typed, name", [("  cats ", "cats"), ("a/../b", "ab"), ("mug_2-x y", "mug_2-x y"),
                                         ("../..", "class"), ("x" * 80, "x" * 60)])
def test_class_folder_name_keeps_only_safe_characters(typed, name):
    assert folders.class_folder_name(typed) == name


def test_snapshots_are_numbered_per_class_and_counted(tmp_path):
    tmp_path = tmp_path / "uploads"          # beside lab_home, which is no class folder
    tmp_path.mkdir()
    assert zips.save_snapshot(tmp_path, "mug!", b"jpeg") == ("mug", 1)
    assert zips.save_snapshot(tmp_path, "mug", b"jpeg") == ("mug", 2)
    assert zips.save_snapshot(tmp_path, "pen", b"jpeg") == ("pen", 1)
    assert sorted(p.name for p in (tmp_path / "mug").iterdir()) == ["camera-0001.jpg", "camera-0002.jpg"]
    assert folders.class_counts(tmp_path) == {"mug": 2, "pen": 1}


def test_save_upload_files_lists_the_refused_names(tmp_path):
    refused = zips.save_upload_files(tmp_path, [("a/1.png", b"1"), ("../../etc/x", b"2"), ("bad\x00", b"3")])
    assert refused == ["bad\x00"]
    assert (tmp_path / "a" / "1.png").read_bytes() == b"1"
    assert (tmp_path / "etc" / "x").exists(), "'..' parts are dropped, the file stays inside"


def test_folder_upload_dir_follows_names_and_sizes(tmp_path):
    files = [("set/a/1.png", 10), ("set/b/2.png", 20)]
    first = zips.folder_upload_dir(files, tmp_path)
    assert first.parent == tmp_path and first == zips.folder_upload_dir(list(files), tmp_path)
    assert zips.folder_upload_dir([("set/a/1.png", 11), files[1]], tmp_path) != first


def test_save_files_within_the_allowance_and_refused_beyond_it():
    alice = access.User("alice1")
    rules = access.Policy(upload_mb=1, user_mb=2, total_mb=0)
    target = access.uploads_dir(alice) / "images"
    assert access.save_files(alice, rules, target / "cats", [("1.png", b"x" * 100)]) == []
    assert (target / "cats" / "1.png").exists()
    with pytest.raises(access.AccessError, match="These files take 2 MB; you have 1 MB left"):
        access.save_files(alice, rules, target / "dogs", [("big.png", b"x" * (2 * access.MB))])
    assert not (target / "dogs").exists(), "nothing is written over the allowance"


def test_split_percents_round_trip():
    assert config.split_percents((0.7, 0.15, 0.15)) == (70, 15)
    assert config.split_from_percents(70, 15) == (0.7, 0.15, 0.15)
    assert config.split_from_percents(60, 40) == (0.6, 0.4, 0.0)
    assert config.split_from_percents(80, 30) is None


def test_the_split_rule_uses_the_percent_ranges_the_data_page_offers():
    low, high = config.SPLIT_PERCENT["train"]
    assert config.split_problems((high / 100, 0.0, 1 - high / 100), for_widgets=True) == []
    assert config.split_problems((0.99, 0.0, 0.01), for_widgets=True)
    assert config.split_problems((0.99, 0.0, 0.01)) == []           # a run may use it


def test_data_root_path_resolves_relative_roots_below_the_app(tmp_path):
    demo = str(paths.DEMO_DATA.relative_to(paths.REPO_ROOT))
    assert paths.data_root_path(demo) == paths.DEMO_DATA
    assert paths.data_root_path("some/data") == paths.REPO_ROOT / "some" / "data"
    assert paths.data_root_path(str(tmp_path)) == tmp_path


# ---------------------------------------------------------------- Model page: backbone and weights

def test_head_labels_cover_the_head_choices():
    assert list(config.HEAD_KINDS) == config.options("head")


def test_unknown_arch_names_close_matches():
    assert backbones.unknown_arch_problem("resnet18") is None
    problem = backbones.unknown_arch_problem("resnet1")
    assert problem.startswith("timm has no model called 'resnet1'.") and "resnet18" in problem
    assert backbones.unknown_arch_problem("zzz_no_such_model") == "timm has no model called 'zzz_no_such_model'."


def test_chosen_weights_keeps_an_available_choice_else_the_first_offline_one():
    sources = [backbones.WeightSource("bundled", "b", False), backbones.WeightSource("hub-cache", "c", True),
               backbones.WeightSource("file", "f", True), backbones.WeightSource("random", "r", True)]
    assert backbones.chosen_weights("file", sources) == "file"
    assert backbones.chosen_weights("bundled", sources) == "hub-cache"
    assert backbones.chosen_weights("hub", sources[2:]) == "random"


@pytest.fixture
def weights_bytes(tmp_path) -> bytes:
    path = tmp_path / "w.safetensors"
    safetensors.torch.save_file(timm.create_model("test_resnet", num_classes=0).state_dict(), str(path))
    return path.read_bytes()


@pytest.fixture
def owner_dir(tmp_path):
    (tmp_path / "weights").mkdir()
    return tmp_path / "weights"


def test_an_uploaded_weights_file_is_kept_by_content_when_it_fits(owner_dir, weights_bytes):
    target = backbones.save_uploaded_weights(weights_bytes, "mine.safetensors", "test_resnet", owner_dir, 10**9)
    assert target.parent == owner_dir and target.suffix == ".safetensors" and target.read_bytes() == weights_bytes
    assert "mine" not in target.name
    again = backbones.save_uploaded_weights(weights_bytes, "other.safetensors", "test_resnet", owner_dir, 10**9)
    assert again == target and len(list(owner_dir.iterdir())) == 1


def test_an_uploaded_weights_file_over_the_quota_is_not_written(owner_dir, weights_bytes):
    with pytest.raises(WeightsError, match="larger than what is left of your upload quota"):
        backbones.save_uploaded_weights(weights_bytes, "w.safetensors", "test_resnet", owner_dir, 10)
    assert list(owner_dir.iterdir()) == []


def test_an_uploaded_weights_file_that_does_not_fit_is_removed(owner_dir, weights_bytes):
    with pytest.raises(WeightsError):
        backbones.save_uploaded_weights(weights_bytes, "w.safetensors", "resnet18", owner_dir, 10**9)
    with pytest.raises(WeightsError):
        backbones.save_uploaded_weights(b"not a weights file", "w.pth", "test_resnet", owner_dir, 10**9)
    assert list(owner_dir.iterdir()) == []


# ---------------------------------------------------------------- Doctor page: findings and fixes

@pytest.fixture
def audited(tmp_path) -> doctor.Audit:
    root = class_folders(tmp_path / "pets", classes=["cat", "dog"], per_class=3)
    scan = folders.scan_folder(root)
    rows = [dict(path="cat/img_000.png", issue="label", label="cat", suggested="dog", score=0.9, detail=""),
            dict(path="cat/img_001.png", issue="exact duplicate", label="cat", suggested="", score=1.0, detail=""),
            dict(path="cat/img_002.png", issue="near duplicate", label="cat", suggested="", score=0.98, detail=""),
            dict(path="dog/img_000.png", issue="dark", label="dog", suggested="", score=0.1, detail="")]
    split_of = {it.path: "train" for it in scan.items} | {"cat/img_002.png": "test"}
    groups = [["cat/img_001.png", "cat/img_002.png"], ["dog/img_001.png", "dog/img_002.png"]]
    return doctor.Audit(str(root), scan.classes, scan.items, pd.DataFrame(rows), groups, split_of,
                        {"cat": 3, "dog": 3})


def test_findings_by_kind(audited):
    assert list(doctor.findings_of(audited, doctor.PROPERTY_ISSUES)["path"]) == ["dog/img_000.png"]
    assert len(doctor.findings_of(audited, doctor.DUPLICATE_ISSUES)) == 2
    assert doctor.crossing_groups(audited) == [["cat/img_001.png", "cat/img_002.png"]]
    assert doctor.group_kinds(audited, audited.groups[0]) == {"exact duplicate", "near duplicate"}
    assert doctor.group_kinds(audited, audited.groups[1]) == set()


def test_an_image_is_left_out_or_moved_never_both(audited):
    fixes = doctor.Fixes()
    assert not fixes.any(audited)
    fixes.toggle_move("a", "dog")
    fixes.toggle_exclude("a")
    assert fixes.exclude == {"a"} and fixes.move == {}
    fixes.toggle_move("a", "dog")
    assert fixes.exclude == set() and fixes.move == {"a": "dog"}
    fixes.toggle_move("a", "dog")
    assert fixes.move == {}
    fixes.toggle_exclude("b")
    fixes.toggle_exclude("b")
    assert fixes.exclude == set()
    fixes.exclude_all(["a", "b"])
    fixes.move_all({"b": "cat"})
    assert fixes.exclude == {"a"} and fixes.move == {"b": "cat"}
    fixes.exclude_all(iter(["b"]))
    assert fixes.exclude == {"a", "b"} and fixes.move == {}


def test_keeping_groups_together_counts_as_a_fix(audited):
    fixes = doctor.Fixes(together=True)
    assert fixes.groups(audited) == audited.groups and fixes.any(audited)
    assert doctor.Fixes().groups(audited) == []


def test_a_fixed_copy_is_written_there(audited, tmp_path):
    fixes = doctor.Fixes()
    fixes.toggle_move("cat/img_000.png", "dog")
    dest = tmp_path / "pets-fixed"
    written = doctor.write_fixed_copy(audited, dest, exclude=fixes.exclude, move=fixes.move,
                                      together=fixes.groups(audited))
    assert written == dest and folders.scan_folder(written).counts() == {"cat": 2, "dog": 4}
