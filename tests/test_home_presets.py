"""Presets (core.serve.presets and the presets panel), the Home page (intro, checklist, Quick demo)
and the teaching aids, tested with plain calls and Streamlit's AppTest.

Notes:
* Saved presets live in FINETUNE_LAB_HOME/presets, which the autouse `lab_home` fixture makes
  private to each test; two AppTest instances in one test share it like two browser sessions
  on one server.
* Training runs on `core.serve.worker.MANAGER`, the process-wide queue; `idle_manager` makes sure no
  run outlives its test.
"""
from __future__ import annotations

import json
from dataclasses import fields
from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest

from core.serve import presets
from apptest_helpers import assert_ok, opened, texts
from core.config import RunConfig
from core.serve.store import list_runs
from core.serve.worker import MANAGER

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("idle_manager")]   # the queue is process-wide

REPO_ROOT = Path(__file__).resolve().parents[1]
ENTRY = str(REPO_ROOT / "streamlit_app.py")
TRAIN, EVALUATE = "pages/3_Train.py", "pages/4_Evaluate.py"
MODEL, INSPECT = "pages/2_Model.py", "pages/6_Inspect.py"
TIMEOUT = 120
SHIPPED = sorted((REPO_ROOT / "assets" / "presets").glob("*.json"))
EXCLUDED = set(presets.NOT_SAVED)


# ---------------------------------------------------------------- helpers

def go_home(at: AppTest) -> None:
    at.switch_page("pages/0_Home.py").run()
    assert_ok(at)


def changed_settings(data_root: str) -> dict:
    """Every saved RunConfig field with a value different from its default."""
    return dict(
        data_root=data_root, split=(0.6, 0.2, 0.2), split_seed=3, max_per_class=40,
        arch="resnet18", weights="random", freeze="top_k", top_k=2, head="mlp", hidden=64,
        dropout=0.25, optimizer="sgd", lr=0.005, weight_decay=0.001, momentum=0.8,
        scheduler="step", step_size=3, gamma=0.5, warmup_epochs=1, label_smoothing=0.1,
        patience=4, phase1_epochs=2, backbone_lr_mult=0.1, normalize="dataset", epochs=7,
        batch_size=16, image_size=96, seed=11, augment={"hflip": True, "rotation": 15.0},
        cache_features=False, aug_views=4, time_budget_s=300, pick_backbone=True, tta="hflip", max_epochs=6, device="cpu", class_weights=True,
        baseline="logreg",
        # per run / per machine, never saved:
        name="my run", sweep="sw1", tags={"lr": 0.005}, weights_file="/tmp/w.safetensors")


def saved_fields(include_data: bool) -> set[str]:
    names = {f.name for f in fields(RunConfig)} - EXCLUDED
    return names if include_data else names - set(presets.DATA_FIELDS)


# ---------------------------------------------------------------- core.serve.presets

def test_changed_settings_cover_every_field():
    """The round trip below is only meaningful if every field differs from its default."""
    default = RunConfig().to_dict()
    changed = changed_settings("some/where")
    assert set(changed) == {f.name for f in fields(RunConfig)}
    assert [k for k in changed if changed[k] == default[k]] == []


@pytest.mark.parametrize("include_data", [False, True], ids=["without-data", "with-data"])
def test_round_trip_restores_every_saved_field(tmp_path, include_data):
    original = changed_settings("datasets/flowers")
    preset = presets.make_preset(dict(original, data_label="Flowers"), "  Lab 3: SGD vs Adam ", " why ",
                           include_data)
    assert preset["name"] == "Lab 3: SGD vs Adam" and preset["description"] == "why"
    assert set(preset["settings"]) == saved_fields(include_data)

    path = presets.save_preset(preset, tmp_path)
    assert path == tmp_path / "lab-3-sgd-vs-adam.json"
    loaded = presets.parse_preset(path.read_bytes())
    assert loaded["name"] == "Lab 3: SGD vs Adam"

    start = RunConfig().to_dict()
    cfg = RunConfig.from_dict(presets.apply_preset(start, loaded))
    restored = cfg.to_dict()
    for key in saved_fields(include_data):
        want = tuple(original[key]) if key == "split" else original[key]
        assert restored[key] == want, key
    for key in EXCLUDED | (set() if include_data else set(presets.DATA_FIELDS)):
        assert restored[key] == start[key], f"{key} must not travel with a preset"


def test_apply_preset_changes_only_its_fields_and_copies_augment():
    settings = RunConfig(data_root="d", lr=0.5, augment={"vflip": True}).to_dict()
    preset = presets.parse_preset(json.dumps({"settings": {"lr": 0.01, "augment": {"hflip": True}}}))
    merged = presets.apply_preset(settings, preset)
    assert merged["lr"] == 0.01 and merged["augment"] == {"hflip": True}
    assert merged["data_root"] == "d" and settings["lr"] == 0.5       # the input is left alone
    merged["augment"]["rotation"] = 5.0
    assert preset["settings"]["augment"] == {"hflip": True}


@pytest.mark.parametrize("path", SHIPPED, ids=[p.stem for p in SHIPPED])
def test_shipped_preset_parses_and_applies(path):
    raw = json.loads(path.read_text())
    preset = presets.parse_preset(path.read_bytes())
    assert preset["format"] == presets.FORMAT and preset["name"] == raw["name"] and preset["description"]
    assert set(preset["settings"]) == set(raw["settings"]), "a shipped preset holds an unknown field"
    assert not set(preset["settings"]) & EXCLUDED
    settings = RunConfig(data_root="assets/demo/fashion_mnist").to_dict()
    cfg = RunConfig.from_dict(presets.apply_preset(settings, preset))
    assert cfg.data_root == "assets/demo/fashion_mnist"         # report presets leave data alone
    for key, value in raw["settings"].items():
        got = getattr(cfg, key)
        assert (list(got) if isinstance(got, tuple) else got) == value, key
    assert cfg.optimizer in ("sgd", "adam", "adamw", "rmsprop")
    assert cfg.scheduler in ("none", "step", "cosine", "onecycle")
    assert cfg.freeze in ("head", "top_k", "full", "scratch")
    assert abs(sum(cfg.split) - 1) < 1e-9 and 0 < cfg.lr < 1 and cfg.epochs >= 1


def test_shipped_presets_are_listed():
    listed = presets.list_presets()
    shipped = [label for label, path in listed if path.parent == presets.SHIPPED_DIR]
    assert len(shipped) == len(SHIPPED) and all(label.endswith("(shipped)") for label in shipped)


def test_a_saved_preset_that_went_bad_is_listed_and_explains_itself():
    """A teacher's file edited by hand (lr 100) stays in the list, marked, and says why on load."""
    (presets.user_dir() / "hot.json").write_text(json.dumps({"name": "Hot", "settings": {"lr": 100}}))
    at = opened(TRAIN)
    at.selectbox(key="preset_pick").set_value("hot.json (saved, can't be used)").run()
    at.button(key="preset_load").click().run()
    assert_ok(at)
    assert any("lr is 100; it must be between" in e.value for e in at.error)


@pytest.mark.parametrize("blob, message", [
    (b"{not json", "not valid JSON"),
    (b"\xff\xfe\x00garbage", "not valid JSON"),
    (b"[1, 2, 3]", 'no "settings" section'),
    (b'{"name": "x"}', 'no "settings" section'),
    (b'{"settings": [1]}', 'no "settings" section'),
    (b'{"settings": {"lr": "fast"}}', "lr must be a number, got 'fast'."),
    (b'{"settings": {"epochs": 2.5}}', "epochs must be a whole number, got 2.5."),
    (b'{"settings": {"epochs": true}}', "epochs must be a whole number, got True."),
    (b'{"settings": {"cache_features": 1}}', "cache_features must be true or false, got 1."),
    (b'{"settings": {"split": [0.5, 0.5]}}', "split must be three finite numbers"),
    (b'{"settings": {"augment": ["hflip"]}}', "augment must be a JSON object"),
    (b'{"settings": {"optimizer": 3}}', "optimizer must be text, got 3."),
    (b'{"settings": {"lr": 100}}', "lr is 100; it must be between 1e-06 and 10."),
    (b'{"settings": {"epochs": 0}}', "epochs is 0; it must be between 1 and 500."),
    (b'{"settings": {"batch_size": 12}}', "batch_size is 12; it must be one of 4, 8, 16"),
    (b'{"settings": {"image_size": 100}}', "image_size is 100; it must be one of 64, 96"),
    (b'{"settings": {"optimizer": "lion"}}', "optimizer is 'lion'; it must be one of 'sgd'"),
    (b'{"settings": {"freeze": "half"}}', "freeze is 'half'"),
    (b'{"settings": {"augment": {"rotation": 500}}}', "augment rotation is 500; it must be between 1 and 180."),
    (b'{"settings": {"augment": {"zoom": 2}}}', "augment has 'zoom'"),
    (b'{"settings": {"augment": {"auto": "autoaugment"}}}', "augment auto is 'autoaugment'"),
    (b'{"settings": {"split": [0.5, 0.6, -0.1]}}', "adding up to 1"),
], ids=["broken-json", "binary", "list", "no-settings", "settings-list", "lr-fast", "float-epochs",
        "bool-epochs", "int-bool", "short-split", "augment-list", "int-optimizer", "lr-too-high",
        "zero-epochs", "odd-batch", "odd-size", "unknown-optimizer", "unknown-freeze", "rotation-500",
        "unknown-augment", "unknown-auto", "split-over-100"])
def test_bad_preset_is_refused_with_a_reason(blob, message):
    with pytest.raises(presets.PresetError) as err:
        presets.parse_preset(blob)
    assert message in str(err.value)
    assert isinstance(err.value, ValueError)


def test_too_large_preset_is_refused_before_parsing():
    blob = json.dumps({"settings": {"lr": 0.01}, "description": "x" * presets.MAX_BYTES}).encode()
    with pytest.raises(presets.PresetError, match="too large"):
        presets.parse_preset(blob)
    just_fits = json.dumps({"settings": {"lr": 0.01}, "pad": "x" * (presets.MAX_BYTES - 100)}).encode()
    assert len(just_fits) <= presets.MAX_BYTES
    assert presets.parse_preset(just_fits)["settings"] == {"lr": 0.01}


def test_unknown_and_excluded_keys_are_dropped():
    blob = json.dumps({"format": "something-else", "name": "n" * 500, "description": 5,
                       "settings": {"lr": 2, "__class__": "os.system", "evil": {"a": 1},
                                    "weights_file": "/etc/passwd", "name": "x", "tags": {"a": 1},
                                    "sweep": "s", "max_per_class": None}}).encode()
    preset = presets.parse_preset(blob)
    assert preset["settings"] == {"lr": 2.0, "max_per_class": None}
    assert isinstance(preset["settings"]["lr"], float)
    assert len(preset["name"]) == 100 and preset["description"] == "5"
    assert preset["format"] == presets.FORMAT


def test_slug_and_untitled_name():
    assert presets.slug("Lab 3: head-only vs FULL!") == "lab-3-head-only-vs-full"
    assert presets.slug("../../etc/passwd") == "etc-passwd"
    assert presets.slug("???") == "preset"
    assert presets.make_preset(RunConfig().to_dict(), "   ")["name"] == "Untitled preset"


def test_preset_with_wrong_nested_types_is_refused():
    """Values the pages would choke on (a slider fed "lots", a number input fed "fast")."""
    for settings, key in [({"augment": {"rotation": "lots"}}, "augment rotation must be a number"),
                          ({"max_per_class": "fast"}, "max_per_class must be a whole number"),
                          ({"max_per_class": True}, "max_per_class must be a whole number"),
                          ({"split": ["a", "b", "c"]}, "split must be three finite numbers")]:
        with pytest.raises(presets.PresetError, match=key):
            presets.parse_preset(json.dumps({"settings": settings}))
    ok = presets.parse_preset(json.dumps({"settings": {"max_per_class": 20, "augment": {
        "hflip": True, "rotation": 10, "auto": "randaugment"}}}))
    assert ok["settings"] == {"max_per_class": 20, "augment": {"hflip": True, "rotation": 10,
                                                               "auto": "randaugment"}}


# ---------------------------------------------------------------- presets panel (AppTest)

WIDGETS = {"w_optimizer": "sgd", "w_lr": 0.02, "w_momentum": 0.7, "w_epochs": 3, "w_batch_size": 16,
           "w_image_size": 96, "w_scheduler": "step", "w_step_size": 2, "aug_on_hflip": True}


def session_one_saves(data_root: str, name: str, with_data: bool = True) -> dict:
    """Session 1: many settings changed (through session_state on Home, then a few widgets on
    Train), saved as a preset with `name`. Returns the session's settings afterwards."""
    at = opened()
    settings = changed_settings(data_root)
    for key in ("name", "sweep", "tags", "weights_file"):
        settings.pop(key)
    settings.update(normalize="backbone", data_label="Test images")
    at.session_state["lab"].settings = settings
    at.session_state["lab"].image_size_chosen = True        # keep 96 px rather than the device default
    at.switch_page(TRAIN).run()
    assert_ok(at)
    at.selectbox(key="w_optimizer").set_value("sgd").run()
    at.number_input(key="w_lr").set_value(0.02).run()
    at.number_input(key="w_momentum").set_value(0.7).run()
    at.number_input(key="w_epochs").set_value(3).run()
    at.select_slider(key="w_batch_size").set_value(16).run()
    at.select_slider(key="w_image_size").set_value(96).run()
    at.selectbox(key="w_scheduler").set_value("step").run()
    at.number_input(key="w_step_size").set_value(2).run()
    at.checkbox(key="aug_on_hflip").check().run()
    assert_ok(at)
    at.checkbox(key="aug_on_vflip").check().run()
    at.checkbox(key="aug_on_rotation").uncheck().run()
    assert_ok(at)
    saved = dict(at.session_state["lab"].settings)
    assert saved["augment"] == {"hflip": True, "vflip": True}
    assert (saved["optimizer"], saved["lr"], saved["epochs"], saved["batch_size"]) == ("sgd", 0.02, 3, 16)

    at.text_input(key="preset_name").input(name).run()
    at.text_area(key="preset_description").input("Same start for everyone").run()
    if with_data:
        at.checkbox(key="preset_with_data").check().run()
    at.button(key="preset_save").click().run()
    assert_ok(at)
    assert any(f"Saved: {presets.slug(name)}.json" in s.value for s in at.success), texts(at)
    assert at.session_state["lab"].settings == saved       # saving changes nothing
    return saved


def assert_settings_match(settings: dict, saved: dict, include_data: bool = True) -> None:
    for key in saved_fields(include_data):
        want, got = saved[key], settings[key]
        assert (list(got) if isinstance(got, tuple) else got) == (list(want) if isinstance(want, tuple) else want), key


def assert_widgets_show(at: AppTest, saved: dict) -> None:
    assert at.selectbox(key="w_optimizer").value == saved["optimizer"] == "sgd"
    assert at.number_input(key="w_lr").value == saved["lr"] == 0.02
    assert at.number_input(key="w_momentum").value == saved["momentum"] == 0.7
    assert at.number_input(key="w_epochs").value == saved["epochs"] == 3
    assert at.select_slider(key="w_batch_size").value == saved["batch_size"] == 16
    assert at.select_slider(key="w_image_size").value == saved["image_size"] == 96
    assert at.selectbox(key="w_scheduler").value == "step"
    assert at.number_input(key="w_step_size").value == 2
    assert at.number_input(key="w_patience").value == saved["patience"]
    assert at.number_input(key="w_phase1_epochs").value == saved["phase1_epochs"]
    assert at.checkbox(key="w_class_weights").value is True
    assert at.checkbox(key="aug_on_hflip").value and at.checkbox(key="aug_on_vflip").value
    assert not at.checkbox(key="aug_on_rotation").value


def test_saved_preset_loads_in_a_fresh_session(image_folder):
    data_root = str(image_folder(classes=2, per_class=4))
    saved = session_one_saves(data_root, "Lab 7: SGD, two phases")
    path = presets.user_dir() / "lab-7-sgd-two-phases.json"
    stored = json.loads(path.read_text())
    assert set(stored["settings"]) == saved_fields(True)
    assert stored["description"] == "Same start for everyone"

    # session 2 starts from the defaults, on Home, and loads it from the list
    at = opened()
    assert at.session_state["lab"].settings["optimizer"] == "adamw"
    pick = at.selectbox(key="preset_pick")
    assert "Lab 7: SGD, two phases (saved)" in pick.options
    assert at.button(key="preset_load").disabled
    pick.set_value("Lab 7: SGD, two phases (saved)").run()
    at.button(key="preset_load").click().run()
    assert_ok(at)
    assert any("Loaded “Lab 7: SGD, two phases”" in s.value and "Same start for everyone" in s.value
               for s in at.success), texts(at)
    assert_settings_match(at.session_state["lab"].settings, saved)
    assert at.session_state["lab"].settings["data_label"] == f"From preset: {data_root}"
    assert "resnet18" in texts(at)                       # the checklist shows the loaded model

    at.switch_page(TRAIN).run()         # first visit to Train in this session: must keep 96 px
    assert_ok(at)
    assert_widgets_show(at, saved)
    assert_settings_match(at.session_state["lab"].settings, saved)
    cfg = RunConfig.from_dict(at.session_state["lab"].settings)
    assert (cfg.arch, cfg.freeze, cfg.top_k, cfg.head, cfg.data_root) == ("resnet18", "top_k", 2, "mlp", data_root)


def test_preset_loaded_on_train_redraws_widgets_and_keeps_data(image_folder):
    data_root = str(image_folder(classes=2, per_class=4))
    saved = session_one_saves(data_root, "No data", with_data=False)
    at = opened(TRAIN)
    before = dict(at.session_state["lab"].settings)
    at.number_input(key="w_lr").set_value(0.5).run()           # widget state the preset must replace
    at.selectbox(key="preset_pick").set_value("No data (saved)").run()
    at.button(key="preset_load").click().run()
    assert_ok(at)
    assert_widgets_show(at, saved)
    settings = at.session_state["lab"].settings
    assert_settings_match(settings, saved, include_data=False)
    for key in presets.DATA_FIELDS + ("data_label",):
        assert settings[key] == before[key], key              # the data set stayed


def test_preset_upload_and_bad_upload():
    at = opened(TRAIN)
    shipped = (REPO_ROOT / "assets" / "presets" / "report-003-sgd-steplr-augment.json").read_bytes()
    assert at.button(key="preset_load").disabled and at.button(key="preset_load").label == "Load preset"
    at.selectbox(key="preset_pick").set_value(next(
        label for label in at.selectbox(key="preset_pick").options if label.startswith("Lab: full"))).run()
    assert at.button(key="preset_load").label == "Load Lab: full fine-tune (shipped)"
    at.file_uploader(key="preset_upload").upload("report3.json", shipped, "application/json").run()
    assert not at.button(key="preset_load").disabled
    assert at.button(key="preset_load").label == "Load report3.json"      # the upload wins, and says so
    assert any("uploaded file is the one loaded" in c.value for c in at.caption)
    at.button(key="preset_load").click().run()
    assert_ok(at)
    assert not at.error
    assert any("Loaded “Report 003" in s.value for s in at.success)
    settings = at.session_state["lab"].settings
    assert (settings["optimizer"], settings["lr"], settings["momentum"], settings["scheduler"],
            settings["step_size"], settings["epochs"], settings["batch_size"], settings["freeze"]) == \
        ("sgd", 0.001, 0.9, "step", 7, 15, 16, "full")
    assert settings["augment"] == json.loads(shipped)["settings"]["augment"]
    assert at.number_input(key="w_epochs").value == 15 and at.select_slider(key="w_batch_size").value == 16
    assert at.checkbox(key="aug_on_vflip").value and at.slider(key="aug_v_rotation").value == 30.0
    good = dict(at.session_state["lab"].settings)

    for name, blob, message in [
            ("notes.json", b"hello, not json", "not valid JSON"),
            ("empty.json", b'{"name": "no settings"}', 'no "settings" section'),
            ("fast.json", b'{"settings": {"lr": "fast"}}', "lr must be a number, got 'fast'"),
            ("lots.json", b'{"settings": {"augment": {"rotation": "lots"}}}', "augment rotation must be a number"),
            ("big.json", b'{"settings": {}, "x": "' + b"x" * (70 * 1024) + b'"}', "too large"),
            ("hot.json", b'{"settings": {"lr": 100, "batch_size": 12}}', "lr is 100; it must be between")]:
        at.file_uploader(key="preset_upload").upload(name, blob, "application/json").run()
        at.button(key="preset_load").click().run()
        assert_ok(at)
        assert any(message in e.value for e in at.error), (name, [e.value for e in at.error])
        assert at.session_state["lab"].settings == good, f"{name} changed the settings"


# ---------------------------------------------------------------- Home and teaching aids

def expander_text(at: AppTest, title: str) -> str:
    boxes = [e for e in at.expander if title in e.label]
    assert boxes, f"no expander {title!r} in {[e.label for e in at.expander]}"
    return "\n".join(m.value for m in boxes[0].markdown)


def popover_text(at: AppTest, title: str) -> str:
    boxes = [p for p in at.get("popover") if title in p.proto.popover.label]
    assert boxes, f"no popover {title!r}"
    return "\n".join(m.value for m in boxes[0].markdown)


def test_home_intro_checklist_and_presets_panel():
    at = opened()
    assert at.title[0].value == "Finetune Lab"
    intro = at.markdown[0].value
    assert "ImageNet" in intro and "without writing code" in intro and "report" in intro
    assert at.button(key="quick_demo_button").label == "▶️ Quick demo"
    links = at.main.get("page_link")
    assert [link.label for link in links] == ["1. Data", "2. Model", "3. Train", "4. Evaluate", "5. Inspect"]
    done, todo = ":material/check_box:", ":material/check_box_outline_blank:"
    assert [link.icon for link in links] == [done, done, todo, todo, todo]
    body = texts(at)
    assert "Fashion-MNIST" in body and "the built-in default" in body
    assert "`mobilenetv2_100`, head" in body and "0 run(s) started in this session" in body
    assert "0 finished" in body
    assert any("Presets" in e.label for e in at.expander)
    assert len(at.selectbox(key="preset_pick").options) >= len(SHIPPED)


def test_teaching_aids_on_model_train_and_inspect():
    at = opened(MODEL)
    text = expander_text(at, "What does freezing do?")
    assert "Freezing" in text and "Head only" in text and "From scratch" in text
    at.switch_page(TRAIN).run()
    assert_ok(at)
    text = popover_text(at, "What does the learning rate do?")
    assert "size of each step" in text and "10× smaller" in text
    text = popover_text(at, "What is augmentation")
    assert "flipped 2 is not a 2" in text and "feature cache is off" in text
    at.switch_page(INSPECT).run()
    assert_ok(at)
    text = expander_text(at, "What does sparsity mean?")
    assert "non-zero" in text and "ReLU" in text


def test_quick_demo_trains_and_opens_evaluate(idle_manager):
    at = opened()
    owner = at.session_state["lab"].owner if "owner" in at.session_state else None
    at.button(key="quick_demo_button").click().run()
    assert_ok(at)
    runs = list_runs()
    assert len(runs) == 1
    run = runs[0]
    assert run.owner == at.session_state["lab"].owner and (owner is None or owner == run.owner)
    assert at.session_state["lab"].quick_demo == run.id == at.session_state["lab"].current_run
    cfg = run.config
    assert (cfg.name, cfg.arch, cfg.freeze, cfg.data_root) == (
        "Quick demo", "mobilenetv2_100", "head", "assets/demo/fashion_mnist")
    assert at.get("progress") or "finished" in texts(at)        # the progress bar while it trains
    assert MANAGER.wait(run.id, timeout=400), "the quick demo did not finish"
    status = run.status()
    assert status["state"] == "finished", status.get("message")

    at.run()
    assert_ok(at)
    assert at.title[0].value == "Evaluate", [t.value for t in at.title]
    metrics = {m.label: m.value for m in at.metric}
    assert metrics["Accuracy"] == f"{status['test_acc']:.1%}"
    assert "150 test images" in texts(at)
    assert at.session_state["lab"].quick_demo is None
    text = expander_text(at, "Why are validation and test accuracy different?")
    assert "overfitting" in text and "honest estimate" in text

    go_home(at)                                      # back Home: the checklist is all done
    assert_ok(at)
    assert at.title[0].value == "Finetune Lab"
    assert [link.icon for link in at.main.get("page_link")] == [":material/check_box:"] * 5
    assert "1 run(s) started in this session" in texts(at) and "1 finished" in texts(at)
