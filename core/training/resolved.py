"""A run's resolved settings. What training fills in that the config left open (a model's native
image size, a time budget's epochs) becomes a new config, never an edit of the one in hand, so a
value passed around earlier keeps meaning what it meant. Each is written to config.json, which
pages, the command line and Resume read as the run's settings."""
from __future__ import annotations

from dataclasses import replace

from core.config import RunConfig
from core.models.backbones import native_input_size
from core.serve.store import Run


def resolved(run: Run, cfg: RunConfig, **changes) -> RunConfig:
    new = replace(cfg, **changes)
    run.write_json("config.json", new.to_dict())
    return new


def at_native_size(run: Run, cfg: RunConfig) -> RunConfig:
    """Some models only take one input size (a ViT's position embeddings fix it)."""
    native = native_input_size(cfg.arch)
    return resolved(run, cfg, image_size=native) if native and native != cfg.image_size else cfg
