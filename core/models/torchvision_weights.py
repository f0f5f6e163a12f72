"""Torchvision's own weight files (`resnet18-f37072fd.pth`, `vgg16-397923af.pth`, ...) through
timm's conversion for torchvision-origin weights.

timm ships pretrained configs tagged `tv*` (`resnet18.tv_in1k`, `vgg16_bn.tv_in1k`) for the weights
it ported from torchvision. Building that config with the file as its source runs the
architecture's own checkpoint filter (VGG's classifier Linear layers become timm's `pre_logits`
convs), so nothing here renames a key or names an architecture: whether the route exists is
timm's registry, whether a file fits it is timm's strict load.
"""
from __future__ import annotations

import os

import timm
from torch import nn

from core import rng


def torchvision_tag(arch: str) -> str | None:
    """timm's pretrained config for `arch`'s torchvision weights, if timm has one. The original
    release (`tv_in1k`) comes before later recipes (`tv2_in1k`): they share the key layout and
    differ only in evaluation crop, which this app does not take from the config."""
    names = timm.list_pretrained(f"{arch}.tv*")
    original = f"{arch}.tv_in1k"
    return original if original in names else (names[0] if names else None)


def create_from_torchvision_file(arch: str, path: str | os.PathLike,
                                 num_classes: int = 0) -> nn.Module | None:
    """`arch` with the weights of the torchvision-format file at `path`, converted by timm; None
    when timm has no torchvision config for `arch` or the file doesn't fit that layout (the
    caller then tries its own ways). The file must already have passed the app's checks: timm
    reads it again (weights_only=True) for its filter."""
    name = torchvision_tag(arch)
    if name is None:
        return None
    try:
        with rng.exclusive():        # a model's random init draws the global generator
            # At the file's own class count (the config's): timm loads strictly only then; for
            # another count it drops the classifier and loads loosely, so a missing tensor of
            # the backbone would pass unnoticed.
            model = timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=str(path)))
            if num_classes != model.num_classes:
                model.reset_classifier(num_classes)
    except (RuntimeError, ValueError, KeyError):     # missing, extra or misshapen tensors
        return None
    return model
