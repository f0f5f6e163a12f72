"""Export a trained run as `model.safetensors` + `model.json`, load it back, and ONNX.

With a linear head the tensors use timm's own names (the new classifier under
`pretrained_cfg['classifier']`), so plain timm loads the file:

    meta = json.load(open("model.json"))
    model = timm.create_model(meta["arch"], num_classes=len(meta["classes"]), pretrained=True,
                              pretrained_cfg_overlay=dict(file="model.safetensors",
                                                          num_classes=len(meta["classes"])))
"""
from __future__ import annotations

import json
from pathlib import Path

import safetensors.torch
import timm
import torch
from torch import nn

from core.backbones import FineTuneModel, make_head
from core.backbones import load_run_model, run_normalization
from core.store import Run


def export_run(run: Run, out_dir: str | Path) -> tuple[Path, Path]:
    """Write model.safetensors and model.json for `run`'s best checkpoint into `out_dir`."""
    cfg, classes = run.config, run.classes
    model = load_run_model(run)
    mean, std = run_normalization(run, model)
    classifier = model.backbone.pretrained_cfg.get("classifier")
    timm_native = cfg.head == "linear" and isinstance(classifier, str)
    state = {f"backbone.{k}": v for k, v in model.backbone.state_dict().items()}
    state.update({f"head.{k}": v for k, v in model.head.state_dict().items()})
    if timm_native:
        state = {k.removeprefix("backbone."): v for k, v in state.items() if k.startswith("backbone.")}
        state[f"{classifier}.weight"] = model.head[-1].weight
        state[f"{classifier}.bias"] = model.head[-1].bias
    meta = dict(format="finetune-lab/1", arch=cfg.arch, classes=classes, image_size=cfg.image_size,
                mean=mean, std=std,
                head=dict(type=cfg.head, hidden=cfg.hidden, dropout=cfg.dropout),
                keys="timm" if timm_native else "finetune-lab", run=run.id)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    weights, info = out / "model.safetensors", out / "model.json"
    safetensors.torch.save_file({k: v.detach().cpu().contiguous() for k, v in state.items()},
                                str(weights), metadata={"format": "pt"})
    info.write_text(json.dumps(meta, indent=1), encoding="utf-8")
    return weights, info


def load_exported(weights: str | Path, meta: dict) -> FineTuneModel:
    """Rebuild a FineTuneModel from an export (either key layout); ValueError if the two files
    are broken or don't belong together."""
    try:
        return _load_exported(weights, meta)
    except Exception as err:  # noqa: BLE001 - corrupt file, wrong JSON, mismatched tensors
        raise ValueError(f"Not a valid export ({type(err).__name__}: {str(err)[:200]})") from err


def _load_exported(weights: str | Path, meta: dict) -> FineTuneModel:
    state = safetensors.torch.load_file(str(weights))
    backbone = timm.create_model(meta["arch"], pretrained=False, num_classes=0)
    head_cfg = meta.get("head", {})
    head = make_head(backbone.num_features, len(meta["classes"]), head_cfg.get("type", "linear"),
                     head_cfg.get("hidden", 128), head_cfg.get("dropout", 0.0))
    model = FineTuneModel(backbone, head)
    if meta.get("keys") == "timm":
        classifier = backbone.pretrained_cfg["classifier"]
        mapped = {f"backbone.{k}": v for k, v in state.items() if not k.startswith(classifier + ".")}
        mapped["head.1.weight"] = state[f"{classifier}.weight"]
        mapped["head.1.bias"] = state[f"{classifier}.bias"]
        state = mapped
    model.load_state_dict(state)
    return model.eval()


def export_onnx(model: nn.Module, image_size: int, path: str | Path) -> Path | None:
    """ONNX via torch's exporter; RuntimeError with the reason if the architecture can't export."""
    dummy = torch.randn(1, 3, image_size, image_size)
    was_training = model.training
    model.eval()
    try:
        torch.onnx.export(model, (dummy,), str(path), input_names=["image"], output_names=["logits"],
                          dynamic_axes={"image": {0: "batch"}, "logits": {0: "batch"}}, dynamo=False)
    except Exception as err:  # noqa: BLE001 - exporter support varies by architecture
        raise RuntimeError(f"ONNX export failed for this architecture: {type(err).__name__}: {err}") from err
    finally:
        model.train(was_training)
    return Path(path)
