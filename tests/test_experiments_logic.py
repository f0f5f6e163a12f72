"""What the Experiments page asks of core.training.sweeps, without Streamlit: the values each axis
offers and starts with (the settings' own options from core.config), the typed number lists, the
run count, the problems that block a sweep, and the overlaid curves."""
from __future__ import annotations

import json

import pytest

from core import config
from core.config import FREEZE_MODES, RunConfig
from core.data.transforms import PRESETS
from core.models.backbones import CATALOG
from core.serve.store import Run
from core.training import sweeps

LISTED = [axis for axis in sweeps.AXES if axis not in sweeps.NUMBER_AXES]


def test_every_axis_is_typed_or_listed():
    assert set(sweeps.NUMBER_AXES) | set(LISTED) == set(sweeps.AXES)
    assert set(sweeps.AXIS_DEFAULTS) == set(sweeps.AXES)


def test_settings_axes_offer_what_the_settings_widgets_offer():
    for axis in ("optimizer", "freeze", "batch_size"):
        assert sweeps.axis_options(axis) == config.options(axis)
    assert sweeps.axis_options("augment") == list(PRESETS)
    assert sweeps.axis_options("init") == ["pretrained", "random"]
    assert sweeps.axis_options("model") == list(CATALOG) + list(sweeps.BASELINES)


@pytest.mark.parametrize("axis", LISTED)
def test_listed_defaults_are_offered_and_apply(axis):
    defaults = sweeps.axis_defaults(axis, "mobilenetv2_100")
    assert len(defaults) >= 2 and set(defaults) <= set(sweeps.axis_options(axis))
    for value in defaults:
        assert isinstance(sweeps.apply(RunConfig(data_root="x"), axis, value), RunConfig)


def test_defaults_the_page_starts_with():
    assert sweeps.axis_defaults("lr", "resnet18") == [0.01, 0.001, 0.0001]
    assert sweeps.axis_defaults("max_per_class", "resnet18") == [5, 20, 0]
    assert sweeps.axis_defaults("optimizer", "resnet18") == ["sgd", "adam"]
    assert sweeps.axis_defaults("batch_size", "resnet18") == [16, 32]
    assert sweeps.axis_defaults("model", "resnet18") == ["resnet18", "logreg"]
    # a backbone the catalogue doesn't list is left out rather than offered as a default
    assert sweeps.axis_defaults("model", "no_such_net") == ["logreg"]


def test_typed_numbers():
    assert sweeps.parse_numbers("0.01, 0.001; 1e-4", float) == [0.01, 0.001, 0.0001]
    assert sweeps.parse_numbers(" 5, ,20,0 ", int) == [5, 20, 0]
    assert sweeps.parse_numbers("", float) == []
    with pytest.raises(ValueError):
        sweeps.parse_numbers("0.1, fast", float)
    with pytest.raises(ValueError):
        sweeps.parse_numbers("2.5", int)


def test_value_labels():
    assert sweeps.value_label("head") == FREEZE_MODES["head"]
    assert sweeps.value_label("logreg") == sweeps.BASELINES["logreg"]
    assert sweeps.value_label("adam") == "adam" and sweeps.value_label(16) == "16"


def test_run_count_is_the_product_of_the_axes():
    assert sweeps.run_count({"lr": [0.1, 0.01, 0.001], "optimizer": ["sgd", "adam"]}) == 6
    assert sweeps.run_count({"lr": [0.1], "optimizer": []}) == 0
    assert sweeps.run_count({"lr": [0.1, 0.2]}) == 2


def test_problems_name_each_bad_setting_once():
    base = RunConfig(data_root="x")
    assert sweeps.problems(base, {"lr": [0.01, 0.5]}) == []
    bad = sweeps.problems(base, {"lr": [0.01, 50], "optimizer": ["sgd", "adam"]})
    assert bad == ["lr is 50; it must be between 1e-06 and 10."]
    assert sweeps.problems(base, {"lr": []}) == []


def test_curves_of_the_picked_runs(lab_home):
    runs = [Run.create(cfg) for cfg in sweeps.expand(RunConfig(data_root="x"), {"lr": [0.1, 0.01]})]
    for i, run in enumerate(runs):
        lines = [json.dumps(dict(epoch=e, val_acc=0.5 + e / 10 + i, seconds=1.0)) for e in (1, 2)]
        run.file("epochs.jsonl").write_text("\n".join(lines) + "\n")
    assert len(runs[0].epochs()) == 2
    frame = sweeps.curves(runs, [runs[1].id])
    assert list(frame["run"]) == ["lr=0.01"] * 2 and list(frame["epoch"]) == [1, 2]
    assert sweeps.curves(runs, []).empty
