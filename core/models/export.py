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
import shutil
import sys
from pathlib import Path

import safetensors.torch
import timm
import torch
from torch import nn

from core.hooks import eval_mode
from core.models.backbones import FineTuneModel, feature_dim, make_head
from core.models.backbones import load_run_model, run_normalization
from core.serve.store import Run


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
    module = ship_model_module(model.backbone, out)
    if module:
        meta["model_module"] = module
    info.write_text(json.dumps(meta, indent=1), encoding="utf-8")
    (out / "predict.py").write_text(predict_script(meta), encoding="utf-8")
    return weights, info


def ship_model_module(backbone: torch.nn.Module, out: Path) -> str | None:
    """A backbone registered with timm by this app (not by timm itself) can't be rebuilt by plain
    timm: its self-contained model file goes beside the export, and predict.py imports it."""
    module = sys.modules.get(type(backbone).__module__)
    if module is None or module.__name__.split(".")[0] == "timm" or not getattr(module, "__file__", None):
        return None
    name = module.__name__.rsplit(".", 1)[-1]
    shutil.copyfile(module.__file__, out / f"{name}.py")
    return name


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
    head = make_head(feature_dim(backbone), len(meta["classes"]), head_cfg.get("type", "linear"),
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
    try:
        with eval_mode(model):
            torch.onnx.export(model, (dummy,), str(path), input_names=["image"], output_names=["logits"],
                              dynamic_axes={"image": {0: "batch"}, "logits": {0: "batch"}}, dynamo=False)
    except Exception as err:  # noqa: BLE001 - exporter support varies by architecture
        raise RuntimeError(f"ONNX export failed for this architecture: {type(err).__name__}: {err}") from err
    path = Path(path)
    if (path.parent / "model.json").exists():
        (path.parent / "predict_onnx.py").write_text(ONNX_SCRIPT.replace("model.onnx", path.name),
                                                     encoding="utf-8")
    return path


# ---------------------------------------------------------------- predict.py next to an export
# The scripts repeat core.data.images.open_rgb + build_transform step for step (JPEG draft decode,
# whole-factor reduce, EXIF turn, transparency on white, bilinear resize to the short side,
# centre crop, normalise), so their probabilities are the app's; tests/test_export_check.py
# runs them against core.models.predict. Float TIFFs are the one case left out: the app stretches
# their range (core.data.images._float_to_l), Pillow's plain conversion here clips it.

_LOAD = '''HERE = Path(__file__).parent
META = json.loads((HERE / "model.json").read_text(encoding="utf-8"))
SIZE, CLASSES = META["image_size"], META["classes"]


def load(path):  # Finetune Lab's decoding: RGB with short side SIZE
    with Image.open(path) as im:
        full = im.size
        if im.format == "JPEG":
            im.draft("RGB", (SIZE, SIZE))
        im.load()
        if min(im.size) // SIZE >= 2 and im.mode in ("L", "LA", "RGB", "RGBA", "CMYK", "I", "F"):
            im = im.reduce(min(im.size) // SIZE)
        stored, im = im.size, ImageOps.exif_transpose(im)
        if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
            im = Image.alpha_composite(Image.new("RGBA", im.size, "white"), im.convert("RGBA"))
        if im.mode.startswith("I;16") or im.mode == "I":
            im = im.point(lambda v: v / 256).convert("L")
        im = im.convert("RGB")
    w, h = full[::-1] if im.size != stored else full
    target = max(1, round(w * SIZE / min(w, h))), max(1, round(h * SIZE / min(w, h)))
    return im if im.size == target else im.resize(target, Image.Resampling.BILINEAR)


def report(path, p):  # one CSV row per image, like the app's predictions CSV
    OUT.writerow([path, CLASSES[p.argmax()], f"{p.max():.6f}", *(f"{v:.6f}" for v in p)])


OUT = csv.writer(sys.stdout)
OUT.writerow(["file", "predicted", "confidence", *(f"p_{c}" for c in CLASSES)])
'''

_HEADER = '''"""Classify images with this export, exactly as Finetune Lab does:
    python {name} IMAGE [IMAGE ...] > predictions.csv
Needs {needs}."""
import csv
import json
import sys
{stdlib}from pathlib import Path

{imports}
from PIL import Image, ImageOps

'''

_TORCH_TAIL = '''
{model}
model.load_state_dict(load_file(HERE / "model.safetensors"))
model.eval()
prepare = v2.Compose([v2.PILToTensor(), v2.Resize(SIZE, antialias=True), v2.CenterCrop(SIZE),
                      v2.ToDtype(torch.float32, scale=True), v2.Normalize(META["mean"], META["std"])])
with torch.inference_mode():
    for path in sys.argv[1:]:
        report(path, model(prepare(load(path))[None]).softmax(-1)[0].numpy())
'''

_TIMM_MODEL = 'model = timm.create_model(META["arch"], num_classes=len(CLASSES))'
# The other key layout (an MLP head, or a backbone whose classifier timm names in parts):
# the app's FineTuneModel, i.e. timm without its classifier followed by the new head.
_OWN_MODEL = '''backbone = timm.create_model(META["arch"], num_classes=0)
WIDTH = getattr(backbone, "head_hidden_size", None) or backbone.num_features   # VGG: pre-logits width
head = nn.Sequential({head})
model = nn.Sequential(OrderedDict(backbone=backbone, head=head))'''

ONNX_SCRIPT = _HEADER.format(name="predict_onnx.py", needs="onnxruntime, numpy and Pillow",
                             stdlib="", imports="import numpy as np\nimport onnxruntime") + _LOAD + '''


def prepare(im):  # centre crop, scale to 0..1, normalise, as torchvision does in the app
    x = np.asarray(im, dtype=np.float32).transpose(2, 0, 1) * np.float32(1 / 255)
    top, left = round((x.shape[1] - SIZE) / 2), round((x.shape[2] - SIZE) / 2)
    x = x[:, top:top + SIZE, left:left + SIZE]
    return (x - np.float32(META["mean"])[:, None, None]) / np.float32(META["std"])[:, None, None]


session = onnxruntime.InferenceSession(str(HERE / "model.onnx"), providers=["CPUExecutionProvider"])
for path in sys.argv[1:]:
    logits = session.run(None, {session.get_inputs()[0].name: prepare(load(path))[None]})[0][0]
    e = np.exp(logits - logits.max())
    report(path, e / e.sum())
'''


def predict_script(meta: dict) -> str:
    """The standalone predict.py for an export with this model.json."""
    if meta.get("keys") == "timm":
        model, extra = _TIMM_MODEL, ""
    else:
        head = meta.get("head", {})
        layers = ("nn.Linear(WIDTH, {h}), nn.ReLU(), nn.Dropout(), nn.Linear({h}, len(CLASSES))"
                  .format(h=int(head.get("hidden", 128))) if head.get("type") == "mlp"
                  else "nn.Dropout(), nn.Linear(WIDTH, len(CLASSES))")
        model, extra = _OWN_MODEL.format(head=layers), "from collections import OrderedDict\n"
    imports = ("import timm\nimport torch\nfrom safetensors.torch import load_file\n"
               + ("from torch import nn\n" if extra else "") + "from torchvision.transforms import v2")
    if meta.get("model_module"):
        imports += f"\n\nimport {meta['model_module']}  # noqa: F401 - registers {meta['arch']} with timm (shipped beside this script)"
    header = _HEADER.format(name="predict.py", needs="torch, timm (with its torchvision), safetensors and Pillow",
                            stdlib=extra, imports=imports)
    return header + _LOAD + _TORCH_TAIL.format(model=model)
