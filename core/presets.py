"""Presets: named settings files a teacher hands out, so every student starts from the same
configuration ("Lab 3: head-only vs full fine-tune").

A preset is JSON: {"format", "name", "description", "settings": {RunConfig fields}}. It may hold
only some fields (the shipped report presets leave the data set and backbone alone), and loading it
changes only those.
"""
from __future__ import annotations

import json
import re
from dataclasses import fields
from pathlib import Path

from core import paths
from core.runs import RunConfig, setting_problems

FORMAT = "finetune-lab-preset/1"
SHIPPED_DIR = paths.REPO_ROOT / "assets" / "presets"
DATA_FIELDS = ("data_root", "split", "split_seed", "max_per_class")
NOT_SAVED = ("sweep", "tags", "name", "weights_file")   # belong to one run or one machine
MAX_BYTES = 64 * 1024


class PresetError(ValueError):
    """A preset file that can't be used, with the reason in words."""


def user_dir() -> Path:
    folder = paths.home() / "presets"
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def make_preset(settings: dict, name: str, description: str = "", include_data: bool = False) -> dict:
    known = {f.name for f in fields(RunConfig)} - set(NOT_SAVED)
    if not include_data:
        known -= set(DATA_FIELDS)
    chosen = RunConfig.from_dict(settings).to_dict()
    chosen["split"] = list(chosen["split"])
    return dict(format=FORMAT, name=name.strip() or "Untitled preset", description=description.strip(),
                settings={k: v for k, v in chosen.items() if k in known})


def slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")[:60] or "preset"


def save_preset(preset: dict, folder: Path | None = None) -> Path:
    path = (folder or user_dir()) / f"{slug(preset['name'])}.json"
    paths.atomic_write_text(path, json.dumps(preset, indent=1))
    return path


def parse_preset(data: bytes | str) -> dict:
    """Validate an uploaded or stored preset: JSON, the right format, known settings of the
    right types. Unknown settings are dropped, never executed or used as paths elsewhere."""
    if len(data) > MAX_BYTES:
        raise PresetError("This file is too large to be a preset.")
    try:
        preset = json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise PresetError(f"Not a preset: the file is not valid JSON ({err}).") from None
    if not isinstance(preset, dict) or not isinstance(preset.get("settings"), dict):
        raise PresetError("Not a preset: it has no \"settings\" section.")
    defaults = RunConfig().to_dict()
    settings = {}
    for key, value in preset["settings"].items():
        if key in defaults and key not in NOT_SAVED:
            settings[key] = checked(key, value, defaults[key])
    problems = setting_problems(settings, for_widgets=True)
    if problems:
        raise PresetError("This preset has settings the app can't use: " + " ".join(problems))
    return dict(format=FORMAT, name=str(preset.get("name", "Preset"))[:100],
                description=str(preset.get("description", ""))[:2000], settings=settings)


EXAMPLES = {"max_per_class": 100, "augment": {"hflip": True, "rotation": 15.0}}   # where the default shows no type


def checked(key: str, value, default):
    """`value` if it has the type the setting needs (ints may stand for floats)."""
    default = EXAMPLES.get(key, default)
    if default is None or value is None:
        return value
    if isinstance(default, bool) or isinstance(value, bool):
        ok = isinstance(value, bool) and isinstance(default, bool)
    elif isinstance(default, float):
        ok = isinstance(value, (int, float))
        value = float(value) if ok else value
    elif isinstance(default, tuple):
        ok = (isinstance(value, list) and len(value) == len(default)
              and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value))
    elif isinstance(default, dict):     # augment: {name: on, strength, or "randaugment" for auto}
        ok = isinstance(value, dict) and all(isinstance(v, (int, float)) or (k == "auto" and isinstance(v, str))
                                             for k, v in value.items())
    else:
        ok = isinstance(value, type(default))
    if not ok:
        raise PresetError(f"Setting {key!r} should be like {default!r}, not {value!r}.")
    return value


def list_presets() -> list[tuple[str, Path]]:
    """(label, path) of the shipped presets, then the ones saved on this server. A file that is
    not a usable preset is listed by its file name, so loading it says what is wrong with it."""
    out = []
    for folder, where in ((SHIPPED_DIR, "shipped"), (user_dir(), "saved")):
        for path in sorted(folder.glob("*.json")):
            try:
                label = f"{parse_preset(path.read_bytes())['name']} ({where})"
            except (PresetError, OSError):
                label = f"{path.name} ({where}, can't be used)"
            out.append((label, path))
    return out


def apply_preset(settings: dict, preset: dict) -> dict:
    """The settings with the preset's fields replacing theirs."""
    merged = dict(settings)
    merged.update(preset["settings"])
    if "augment" in preset["settings"]:
        merged["augment"] = dict(preset["settings"]["augment"])
    return merged
