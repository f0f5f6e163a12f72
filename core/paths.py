"""Where Finetune Lab keeps its files: one data directory, configurable with FINETUNE_LAB_HOME."""
from __future__ import annotations

import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
ASSETS = REPO_ROOT / "assets"
DEMO_DATA = ASSETS / "demo" / "fashion_mnist"


def home() -> Path:
    """The app's data directory; everything the app writes stays below it."""
    path = Path(os.environ.get("FINETUNE_LAB_HOME", REPO_ROOT / "lab_data")).expanduser().resolve()
    path.mkdir(parents=True, exist_ok=True)
    return path


def runs_dir() -> Path:
    return _sub("runs")


def datasets_dir() -> Path:
    return _sub("datasets")


def weights_dir() -> Path:
    return _sub("weights")


def _sub(name: str) -> Path:
    path = home() / name
    path.mkdir(parents=True, exist_ok=True)
    return path


def atomic_write_text(path: Path, text: str) -> None:
    """Write via a temp file and rename, so readers never see half a file."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def resolve_data_root(root: str) -> str:
    """Configs may store the demo set relative to the repo, so presets travel between machines."""
    return str(REPO_ROOT / root) if root.startswith("assets/") else root
