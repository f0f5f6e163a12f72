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
from core.config import RunConfig, config_problems, typed_setting

FORMAT = "finetune-lab-preset/1"
SHIPPED_DIR = paths.REPO_ROOT / "assets" / "presets"
DATA_FIELDS = ("data_root", "split", "split_seed", "max_per_class")
NOT_SAVED = ("sweep", "tags", "name", "weights_file")   # belong to one run or one machine
MAX_BYTES = 64 * 1024


class PresetError(ValueError):
    """A preset file that can't be used, with the reason in words."""


def user_dir(owner: str | None = None) -> Path:
    """Saved presets: the shared folder (the teacher's, listed for everyone), or one user's own
    folder below it (listed for that user only)."""
    folder = paths.home() / "presets"
    if owner:
        if not re.fullmatch(r"[A-Za-z0-9_-]{1,40}", owner):
            raise PresetError("Not a user id.")
        folder = folder / "users" / owner
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


def save_preset(preset: dict, folder: Path | None = None, replace: bool = False) -> Path:
    """Write a preset as <slug of its name>.json. Never over a shipped preset's name, and over
    an existing file only when `replace` says so."""
    name = f"{slug(preset['name'])}.json"
    if slug(preset["name"]) in shipped_names():
        raise PresetError(f"A preset shipped with the app is called “{preset['name']}”: choose another name.")
    path = (folder or user_dir()) / name
    if path.exists() and not replace:
        raise PresetError(f"A saved preset is already called “{preset['name']}” ({name}): tick "
                          "*Replace* to overwrite it, or choose another name.")
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
    present = {key: value for key, value in preset["settings"].items()
               if key in RunConfig.__dataclass_fields__ and key not in NOT_SAVED}
    # the checks of core.config.validate_config (types, ranges, choices, model name), on the
    # settings the preset holds, and within what the pages' widgets offer
    settings, problems = config_problems(present, for_widgets=True)
    if problems:
        raise PresetError("This preset has settings the app can't use: " + " ".join(problems))
    if "split" in settings:
        settings["split"] = list(settings["split"])      # as JSON writes it
    return dict(format=FORMAT, name=str(preset.get("name", "Preset"))[:100],
                description=str(preset.get("description", ""))[:2000], settings=settings)


def checked(key: str, value, default=None):
    """`value` as the type setting `key` needs (an integral float for an int, an int for a float),
    else PresetError with the sentence validate_config gives. `default` is no longer used."""
    value, problem = typed_setting(key, value)
    if problem:
        raise PresetError(problem)
    return value


def shipped_names() -> set[str]:
    """Slugs a saved preset may not take: the shipped files' names and their presets' names."""
    names = set()
    for path in SHIPPED_DIR.glob("*.json"):
        names.add(path.stem)
        try:
            names.add(slug(str(json.loads(path.read_text(encoding="utf-8")).get("name", ""))))
        except (OSError, ValueError, AttributeError):
            pass
    return names


def list_presets(owner: str | None = None) -> list[tuple[str, Path]]:
    """(label, path) of the shipped presets, the teacher's saved ones, then `owner`'s own. A file
    that is not a usable preset is listed by its file name, so loading it says what is wrong."""
    out = []
    sources = [(SHIPPED_DIR, "shipped"), (user_dir(), "saved")]
    if owner:
        sources.append((user_dir(owner), "mine"))
    for folder, where in sources:
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
