"""Hostile configurations: every input (a JSON config, `--set`, `--grid`, a preset, a weights file)
is checked once, with types, and refused with one sentence per problem before anything is created.

All offline and quick: the CLI is called in-process (core.cli.main, the code `python -m core`
runs), except one real process that shows the refusal carries no traceback and exits with 2.
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import safetensors.torch
import timm
import torch

from core.models import WeightsError
from core.models import backbones
from core import cli
from core.serve import presets
from core.config import ConfigError, RunConfig, setting_problems, split_problems, validate_config
from core.serve.store import list_runs

REPO = Path(__file__).resolve().parents[1]


def write_json(path: Path, data) -> Path:
    path.write_text(json.dumps(data) if not isinstance(data, str) else data, encoding="utf-8")
    return path


@pytest.fixture
def cfg_file(tmp_path) -> Path:
    """A valid config (its data set need not exist: validation comes before any reading)."""
    return write_json(tmp_path / "cfg.json", RunConfig(data_root=str(tmp_path / "photos"),
                                                       arch="test_resnet").to_dict() | {"split": [0.7, 0.15, 0.15]})


def refused(argv: list[str], capsys) -> str:
    """Run the CLI in-process; it must answer status 2 with sentences on stderr and create nothing."""
    assert cli.main(argv) == 2, argv
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "Traceback" not in err, err
    assert list_runs() == [], "a refused config created a run folder"
    return err


# ---------------------------------------------------------------- validate_config

@pytest.mark.parametrize("data, words", [
    ([1, 2], "a config must be a JSON object of settings, not a list."),
    ("lr=1", "not a string"), (None, "not null"), (3, "not a number")])
def test_a_config_that_is_not_an_object_is_refused(data, words):
    with pytest.raises(ConfigError, match=words):
        validate_config(data)


def test_types_are_converted_and_unknown_keys_dropped():
    cfg = validate_config({"epochs": 3.0, "lr": 1, "split": [0.8, 0.1, 0.1], "max_per_class": None,
                           "weights_file": None, "from_a_newer_version": {"x": 1}, "augment": {"hflip": True}})
    assert cfg.epochs == 3 and type(cfg.epochs) is int
    assert cfg.lr == 1.0 and type(cfg.lr) is float
    assert cfg.split == (0.8, 0.1, 0.1) and isinstance(cfg.split, tuple)
    assert "from_a_newer_version" not in cfg.to_dict() and cfg.augment == {"hflip": True}


@pytest.mark.parametrize("key, value, sentence", [
    ("lr", "abc", "lr must be a number, got 'abc'."),
    ("lr", True, "lr must be a number, got True."),
    ("lr", math.nan, "lr must be a finite number, got nan."),
    ("lr", math.inf, "lr must be a finite number, got inf."),
    ("epochs", 2.5, "epochs must be a whole number, got 2.5."),
    ("epochs", "3", "epochs must be a whole number, got '3'."),
    ("cache_features", 1, "cache_features must be true or false, got 1."),
    ("optimizer", 3, "optimizer must be text, got 3."),
    ("split", "abc", "split must be three finite numbers (train, val, test)"),
    ("split", [math.nan, 0, 0], "got [nan, 0, 0]."),
    ("split", [0.5, 0.5], "got [0.5, 0.5]."),
    ("split", [True, 0, 0], "split must be three finite numbers"),
    ("augment", [1], 'augment must be a JSON object like {"hflip": true, "rotation": 15}, got [1].'),
    ("tags", "x", "tags must be a JSON object, got 'x'."),
    ("max_per_class", "fast", "max_per_class must be a whole number or null, got 'fast'."),
    ("weights_file", 3, "weights_file must be text or null, got 3."),
    ("lr", None, "lr must be a number, got None."),
], ids=lambda v: None)
def test_each_wrong_type_gets_a_sentence(key, value, sentence):
    with pytest.raises(ConfigError) as err:
        validate_config({key: value})
    assert err.value.problems[0].startswith(key) and sentence in str(err.value)
    assert len(err.value.problems) == 1, err.value.problems        # not also a range complaint


def test_every_problem_is_listed_once():
    with pytest.raises(ConfigError) as err:
        validate_config({"lr": "abc", "epochs": 0, "optimizer": "lion", "augment": {"rotation": "lots"},
                         "arch": "no_such_net"})
    assert len(err.value.problems) == 5
    assert isinstance(err.value, ValueError)
    for words in ("lr must be a number", "epochs is 0", "optimizer is 'lion'",
                  "augment rotation must be a number", "arch is 'no_such_net'"):
        assert words in str(err.value)


@pytest.mark.parametrize("arch, ok", [
    ("test_resnet", True), ("resnet18.a1_in1k", True), ("mobilenetv2_100", True),
    ("hf-hub:timm/vit_tiny_patch16_224.augreg_in21k", True), ("hf_hub:org/name", True),
    ("no_such_net", False), ("", False), ("../../x", False), ("hf-hub:../../etc", False),
    ("hf-hub:org/../x", False), ("hf-hub:org/na me", False), ("hf-hub:org/x;rm -rf", False),
    ("hf-hub:/abs", False)])
def test_arch_must_be_a_timm_model_or_a_plain_hub_id(arch, ok):
    if ok:
        assert validate_config({"arch": arch}).arch == arch
    else:
        with pytest.raises(ConfigError, match="arch is"):
            validate_config({"arch": arch})


def test_setting_problems_survive_wrong_types():
    """Called alone (the Experiments page, sweeps), it must state, not crash or pass."""
    problems = setting_problems({"split": "abc", "augment": [1], "lr": math.nan, "optimizer": ["sgd"]})
    assert any(p.startswith("split is 'abc'") for p in problems)
    assert any(p.startswith("augment is [1]; it must be a JSON object") for p in problems)
    assert any(p.startswith("lr is nan") for p in problems)
    assert any(p.startswith("optimizer is ['sgd']") for p in problems)
    assert split_problems([math.nan, 0, 0]) and split_problems([1.0, math.nan, 0.0])
    assert split_problems(["a", "b", "c"]) and split_problems(5)
    assert split_problems([1, 0, 0]) == [] and split_problems([1, 0, 0], for_widgets=True)
    assert setting_problems({"augment": {"hflip": "yes"}}) == ["augment hflip must be true or false, got 'yes'."]


# ---------------------------------------------------------------- the command line

def test_cli_set_lr_not_a_number(cfg_file, capsys):
    err = refused(["train", str(cfg_file), "--set", "lr=abc"], capsys)
    assert "lr must be a number, got 'abc'" in err


def test_cli_set_nan_and_whole_numbers(cfg_file, capsys):
    assert "lr must be a finite number, got nan" in refused(["train", str(cfg_file), "--set", "lr=nan"], capsys)
    assert "epochs must be a whole number, got 2.5" in refused(
        ["train", str(cfg_file), "--set", "epochs=2.5"], capsys)
    assert cli.load_config(str(cfg_file), ["epochs=3.0", "lr=1e-2"]).epochs == 3


def test_cli_set_scheduler_none_stays_text(cfg_file):
    cfg = cli.load_config(str(cfg_file), ["scheduler=none", "max_per_class=none", "weights_file=null"])
    assert cfg.scheduler == "none" and cfg.max_per_class is None and cfg.weights_file is None


@pytest.mark.parametrize("text", ["0.8,0.1,0.1", "[0.8,0.1,0.1]", "[0.8, 0.1, 0.1]"])
def test_cli_set_split_as_a_list(cfg_file, text):
    assert cli.load_config(str(cfg_file), [f"split={text}"]).split == (0.8, 0.1, 0.1)


def test_cli_set_bad_split(cfg_file, capsys):
    assert "split must be three finite numbers" in refused(["train", str(cfg_file), "--set", "split=abc"], capsys)
    assert "got [nan, 0.0, 0.0]" in refused(["train", str(cfg_file), "--set", "split=[NaN,0,0]"], capsys)
    assert "split is [0.5, 0.6, -0.1]" in refused(["train", str(cfg_file), "--set", "split=0.5,0.6,-0.1"], capsys)


def test_cli_set_augment_json(cfg_file, capsys):
    cfg = cli.load_config(str(cfg_file), ['augment={"hflip": true, "rotation": 15}'])
    assert cfg.augment == {"hflip": True, "rotation": 15}
    assert cli.load_config(str(cfg_file), ["augment={'vflip': True}"]).augment == {"vflip": True}
    err = refused(["train", str(cfg_file), "--set", "augment=[1]"], capsys)
    assert "augment must be a JSON object" in err and "got [1]" in err
    assert "augment must be a JSON object" in refused(["train", str(cfg_file), "--set", "augment={oops"], capsys)


def test_cli_bool_and_unknown_settings(cfg_file, capsys):
    assert cli.load_config(str(cfg_file), ["cache_features=false", "class_weights=true"]).class_weights is True
    assert "cache_features must be true or false, got 'maybe'" in refused(
        ["train", str(cfg_file), "--set", "cache_features=maybe"], capsys)
    err = refused(["train", str(cfg_file), "--set", "epochz=1", "--set", "lr=abc"], capsys)
    assert "--set: unknown setting 'epochz' (did you mean 'epochs'?)" in err and "lr must be a number" in err
    assert "write KEY=VALUE" in refused(["train", str(cfg_file), "--set", "epochs"], capsys)


@pytest.mark.parametrize("verb", [["train"], ["lr"], ["sweep", "--grid", "lr=0.01"]], ids=["train", "lr", "sweep"])
@pytest.mark.parametrize("content, words", [
    ("[0.8, 0.1, 0.1]", "a config must be a JSON object of settings, not a list."),
    ("{oops", "is not valid JSON"),
    ('"just text"', "not a string"),
    (json.dumps({"arch": "no_such_net", "data_root": "x"}), "arch is 'no_such_net'"),
    (json.dumps({"lr": "fast", "data_root": "x"}), "lr must be a number, got 'fast'"),
], ids=["list", "invalid-json", "string", "unknown-arch", "lr-text"])
def test_cli_bad_config_file_is_refused_by_every_verb(tmp_path, capsys, verb, content, words):
    path = write_json(tmp_path / "bad.json", content)
    err = refused([verb[0], str(path), *verb[1:]], capsys)
    assert words in err


def test_cli_missing_config_file(tmp_path, capsys):
    assert "no such file" in refused(["train", str(tmp_path / "nope.json")], capsys)


def test_cli_sweep_bad_grid_creates_nothing(cfg_file, capsys):
    err = refused(["sweep", str(cfg_file), "--grid", "lr=0.01,abc,20"], capsys)
    assert "lr=abc: lr must be a number, got 'abc'" in err and "lr=20: lr is 20" in err
    assert "'foo' is not one of none, flips" in refused(
        ["sweep", str(cfg_file), "--grid", "augment=none,foo"], capsys)
    assert "arch is 'no_such_net'" in refused(["sweep", str(cfg_file), "--grid", "model=no_such_net"], capsys)
    assert "'colour' is not one of" in refused(["sweep", str(cfg_file), "--grid", "colour=red"], capsys)


def test_cli_preset_file_with_bad_split(tmp_path, capsys):
    path = write_json(tmp_path / "preset.json", {"name": "p", "settings": {"split": [1, 0, 0]}})
    err = refused(["train", str(path), "--set", "data_root=x"], capsys)
    assert "split is [1, 0, 0]" in err


@pytest.mark.slow
def test_cli_refusal_in_a_real_process_has_no_traceback(cfg_file, lab_home):
    env = dict(os.environ, FINETUNE_LAB_HOME=str(lab_home), HF_HUB_OFFLINE="1")
    done = subprocess.run([sys.executable, "-m", "core", "train", str(cfg_file), "--set", "lr=abc"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stderr
    assert "lr must be a number, got 'abc'" in done.stderr and "Traceback" not in done.stderr
    assert not (lab_home / "runs").exists() or not any((lab_home / "runs").iterdir())


# ---------------------------------------------------------------- presets

@pytest.mark.parametrize("split, words", [
    ([1, 0, 0], "the Data page offers 1-98 % for train"),
    ([0.99, 0.01, 0], "the Data page offers 1-98 % for train"),
    ([0.01, 0.99, 0], "0-98 % for validation"),
    ([float("nan"), 0, 0], "split must be three finite numbers"),
    (["a", "b", "c"], "split must be three finite numbers"),
    ([0.5, 0.5], "split must be three finite numbers"),
])
def test_preset_split_the_data_page_cannot_show_is_refused(split, words):
    blob = json.dumps({"settings": {"split": split}})       # json writes NaN as NaN, as Python reads it
    with pytest.raises(presets.PresetError, match="can't use") as err:
        presets.parse_preset(blob)
    assert words in str(err.value)


def test_preset_good_split_stays_a_list():
    assert presets.parse_preset(json.dumps({"settings": {"split": [0.8, 0.1, 0.1]}}))["settings"] == {
        "split": [0.8, 0.1, 0.1]}


@pytest.mark.parametrize("arch, ok", [("resnet18", True), ("hf-hub:timm/resnet18.a1_in1k", True),
                                      ("no_such_net", False), ("hf-hub:../../x", False), (7, False)])
def test_preset_arch_is_checked(arch, ok):
    blob = json.dumps({"settings": {"arch": arch}})
    if ok:
        assert presets.parse_preset(blob)["settings"] == {"arch": arch}
    else:
        with pytest.raises(presets.PresetError, match="arch"):
            presets.parse_preset(blob)


@pytest.mark.parametrize("settings, sentence", [
    ({"lr": "fast"}, "lr must be a number, got 'fast'."),
    ({"lr": None}, "lr must be a number, got None."),
    ({"epochs": 3.5}, "epochs must be a whole number, got 3.5."),
    ({"augment": [1]}, "augment must be a JSON object"),
    ({"augment": {"rotation": "lots"}}, "augment rotation must be a number"),
    ({"lr": float("inf")}, "lr must be a finite number, got inf."),
])
def test_preset_types_use_the_same_sentences(settings, sentence):
    with pytest.raises(presets.PresetError) as err:
        presets.parse_preset(json.dumps({"settings": settings}))
    assert sentence in str(err.value)
    assert presets.parse_preset(json.dumps({"settings": {"epochs": 4.0}}))["settings"] == {"epochs": 4}


# ---------------------------------------------------------------- weights files

@pytest.mark.parametrize("kind", ["safetensors", "pth"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")], ids=["nan", "inf"])
def test_weights_file_with_nan_or_inf_is_refused(tmp_path, kind, bad):
    state = {k: v.clone().contiguous() for k, v in timm.create_model("test_resnet", num_classes=0).state_dict().items()}
    name = next(k for k, v in state.items() if v.is_floating_point() and v.ndim == 4)
    state[name].view(-1)[3] = bad
    path = tmp_path / f"w.{kind}"
    if kind == "safetensors":
        safetensors.torch.save_file(state, str(path))
    else:
        torch.save(state, path)
    with pytest.raises(WeightsError) as err:
        backbones.create_backbone("test_resnet", "file", weights_file=str(path))
    assert f"the weights file holds nan or infinite values in {name}" in str(err.value).lower()
    state[name].view(-1)[3] = 0.0                      # the same file without it loads
    good = tmp_path / f"good.{kind}"
    safetensors.torch.save_file(state, str(good)) if kind == "safetensors" else torch.save(state, good)
    backbones.create_backbone("test_resnet", "file", weights_file=str(good))
