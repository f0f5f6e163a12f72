"""The run configuration: one typed record of every setting, and the single place that says what
a setting may be (type, range, choices, rules between settings). The pages' widget limits,
presets, sweeps, the command line and the queue all validate with `validate_config`.

Plain dataclasses (no pydantic): the config is a flat record that must stay JSON-friendly and
cheap to copy inside the training loop, and its checks must read as sentences for a student
("lr must be a number, got 'abc'"), which per-field range and choice tables give directly.
"""
from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, field, fields

@dataclass
class RunConfig:
    """Everything that defines a run; stored as config.json."""
    data_root: str = ""
    split: tuple = (0.7, 0.15, 0.15)
    split_seed: int = 0
    max_per_class: int | None = None
    arch: str = "mobilenetv2_100"
    weights: str = "auto"            # auto, bundled, hub-cache, hub, file, random
    weights_file: str | None = None
    freeze: str = "head"             # head, top_k, full, scratch
    top_k: int = 1
    head: str = "linear"             # linear, mlp
    hidden: int = 128
    dropout: float = 0.0
    optimizer: str = "adamw"         # sgd, adam, adamw, rmsprop
    lr: float = 1e-3
    weight_decay: float = 1e-4
    momentum: float = 0.9
    scheduler: str = "none"          # none, step, cosine (with warm-up), onecycle
    step_size: int = 7
    gamma: float = 0.1
    warmup_epochs: int = 0
    label_smoothing: float = 0.0
    patience: int = 0                # early stopping: epochs without val improvement (0 = off)
    phase1_epochs: int = 0           # two-phase: this many head-only epochs first, then unfreeze
    backbone_lr_mult: float = 1.0    # backbone LR = lr x this, while the backbone trains
    normalize: str = "backbone"      # backbone (its pretrained mean/std) or dataset (computed)
    epochs: int = 10
    batch_size: int = 32
    image_size: int = 128
    seed: int = 0
    augment: dict = field(default_factory=dict)
    cache_features: bool = True      # run frozen layers once per image and train on their output
    aug_views: int = 0               # augmented views per training image cached through frozen layers
                                     # (0: augmentations run live, so caching is off when augmenting)
    time_budget_s: int = 0           # >0: plan the phases to fit this many seconds (core.training.budget)
    pick_backbone: bool = False      # with a time budget: probe the offline backbones and image sizes
                                     # on this data and train the best (core.training.choose)
    tta: str = ""                    # test-time augmentation: "" none, "hflip" average with the
                                     # mirrored image, "auto" hflip when it helps on validation
    max_epochs: int = 0              # the teacher's epoch cap, which a time budget's plan keeps to (0 = none)
    device: str = "auto"
    name: str = ""
    class_weights: bool = False      # weight the loss by 1/class frequency (imbalanced data)
    baseline: str = ""               # "logreg": logistic regression on raw pixels, no network
    sweep: str = ""                  # id of the sweep this run belongs to
    tags: dict = field(default_factory=dict)   # the settings a sweep varied, for the results table

    @classmethod
    def from_dict(cls, data: dict) -> "RunConfig":
        known = {f.name for f in fields(cls)}
        cfg = cls(**{k: v for k, v in data.items() if k in known})
        cfg.split = tuple(cfg.split)
        return cfg

    def to_dict(self) -> dict:
        return asdict(self)

    def with_rules(self) -> "RunConfig":
        """The rules between settings, applied: training from scratch starts from a random
        init, and is recorded so (not as the weights the Model page last showed)."""
        if self.freeze == "scratch":
            self.weights, self.weights_file = "random", None
        return self


FREEZE_MODES = {
    "head": "Head only (backbone frozen)",
    "top_k": "Top k blocks + head",
    "full": "Full fine-tune",
    "scratch": "From scratch (random init, all trainable)",
}

# What the app's widgets offer. A preset must fit them, since a page can only show what its widget
# allows; a command-line config must fit the ranges but may use any batch or image size.
RANGES = {"lr": (1e-6, 10.0), "weight_decay": (0.0, 1.0), "momentum": (0.0, 0.999),
          "epochs": (1, 500), "max_epochs": (0, 500), "seed": (0, 10**6), "split_seed": (0, 10**6), "step_size": (1, 100),
          "gamma": (0.01, 1.0), "warmup_epochs": (0, 50), "label_smoothing": (0.0, 0.5),
          "patience": (0, 100), "phase1_epochs": (0, 500), "backbone_lr_mult": (0.001, 10.0),
          "hidden": (8, 4096), "dropout": (0.0, 0.9), "top_k": (1, 1000), "max_per_class": (1, 100_000),
          "batch_size": (1, 65536), "image_size": (16, 2048), "aug_views": (0, 16),
          "time_budget_s": (0, 7 * 86400)}
CHOICES = {"optimizer": ("sgd", "adam", "adamw", "rmsprop"),
           "scheduler": ("none", "step", "cosine", "onecycle"),
           "freeze": tuple(FREEZE_MODES), "head": ("linear", "mlp"),
           "normalize": ("backbone", "dataset"), "baseline": ("", "logreg"),
           "weights": ("auto", "bundled", "hub-cache", "hub", "file", "random"),
           "tta": ("", "hflip", "auto")}
WIDGET_CHOICES = {"batch_size": (4, 8, 16, 32, 64, 128, 256),
                  "image_size": (64, 96, 128, 160, 192, 224, 256, 288, 320, 384)}


def setting_problems(settings: dict, for_widgets: bool = False) -> list[str]:
    """One sentence per setting outside what a run (or, `for_widgets`, the app's pages) accepts.
    Values of the wrong type are left to typed_settings (validate_config runs both), except where
    they would hide a problem here (a split or augment that isn't one)."""
    problems = []
    for key, (low, high) in RANGES.items():
        value = settings.get(key)
        if _is_number(value) and not (_finite(value) and low <= value <= high):
            problems.append(f"{key} is {_num(value)}; it must be between {low:g} and {high:g}.")
    choices = CHOICES | (WIDGET_CHOICES if for_widgets else {})
    for key, allowed in choices.items():
        if key in settings and not any(_same(settings[key], a) for a in allowed):
            shown = ", ".join(repr(a) if isinstance(a, str) else str(a) for a in allowed)
            problems.append(f"{key} is {_shown(settings[key])}; it must be one of {shown}.")
    augment = settings.get("augment")
    return (problems + split_problems(settings.get("split"), for_widgets)
            + augment_problems({} if augment is None else augment))


def split_problems(split, for_widgets: bool = False) -> list[str]:
    """The split must be three finite fractions adding up to 1 with some training images; on the
    Data page (`for_widgets`) train must also round to 1-98 % and validation to 0-98 %."""
    if split is None:
        return []
    if not (isinstance(split, (list, tuple)) and len(split) == 3 and all(_is_number(v) for v in split)):
        return [f"split is {_shown(split)}; it must be three numbers (train, val, test) adding up to 1, "
                "like [0.8, 0.1, 0.1]."]
    if (not all(_finite(v) for v in split) or min(split) < 0 or split[0] <= 0
            or abs(sum(split) - 1) > 0.011):
        return [f"split is {list(split)}; it must be three fractions (train, val, test) adding up to 1, "
                "with some training images."]
    train, val = round(split[0] * 100), round(split[1] * 100)
    (train_low, train_high), (val_low, val_high) = SPLIT_PERCENT["train"], SPLIT_PERCENT["val"]
    if for_widgets and not (train_low <= train <= train_high and val_low <= val <= val_high):
        return [f"split is {list(split)}; the Data page offers 1-98 % for train and 0-98 % for "
                "validation, so keep some images for validation or test."]
    return []


def augment_problems(augment) -> list[str]:
    from core.data.transforms import AUGMENT_RANGES, AUGMENTATIONS, AUTO_AUGMENTS
    if not isinstance(augment, dict):
        return [f"augment is {_shown(augment)}; it must be a JSON object like "
                '{"hflip": true, "rotation": 15}.']
    problems = []
    for name, value in augment.items():
        low, high, _ = AUGMENT_RANGES.get(name, (None, None, None))
        if name not in AUGMENTATIONS:
            problems.append(f"augment has {name!r}; known augmentations are {', '.join(AUGMENTATIONS)}.")
        elif name == "auto":
            if not any(_same(value, a) for a in (*AUTO_AUGMENTS, True, False, 0, 1)):
                problems.append(f"augment auto is {_shown(value)}; it must be one of "
                                f"{', '.join(AUTO_AUGMENTS)}.")
        elif not isinstance(value, (bool, int, float)):
            what = "a number (0 or false for off)" if low is not None else "true or false"
            problems.append(f"augment {name} must be {what}, got {_shown(value)}.")
        elif low is not None and (value or not _finite(value)) and not (_finite(value) and low <= value <= high):
            problems.append(f"augment {name} is {_num(value)}; it must be between {low:g} and {high:g}.")
    return problems


# ---------------------------------------------------------------- one validation for every input

class ConfigError(ValueError):
    """A configuration that can't be used: `problems` holds one sentence per problem."""

    def __init__(self, problems: list[str] | str):
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        super().__init__(" ".join(self.problems))


HUB_ID = re.compile(r"(hf-hub|hf_hub):[A-Za-z0-9][A-Za-z0-9_.\-]*/[A-Za-z0-9_.\-/]*[A-Za-z0-9_\-]")


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _finite(value) -> bool:
    try:
        return math.isfinite(value)
    except OverflowError:        # an int too large for a float
        return False


def _num(value) -> str:
    try:
        return f"{value:g}"
    except OverflowError:
        return "a number too large"


def _shown(value) -> str:
    """A value as a sentence quotes it: strings in quotes, the rest as Python writes them, cut short."""
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _same(value, allowed) -> bool:
    """`value == allowed` with its type: True is not 1, 1.0 is not "1"."""
    return type(value) is type(allowed) and value == allowed or (
        _is_number(value) and _is_number(allowed) and value == allowed)


def _what_it_is(data) -> str:
    if data is None:
        return "null"
    if isinstance(data, bool):
        return "true or false"
    return {list: "a list", tuple: "a list", str: "a string", int: "a number", float: "a number"}.get(
        type(data), f"a {type(data).__name__}")


def config_shape_problem(data) -> str | None:
    """The sentence for a config that is not a mapping of settings at all (a JSON list, a number)."""
    if isinstance(data, dict):
        return None
    return f"a config must be a JSON object of settings, not {_what_it_is(data)}."


def field_kind(key: str) -> tuple[str, bool]:
    """(type name, whether None is allowed) of a RunConfig field, from its annotation."""
    kind = str(RunConfig.__dataclass_fields__[key].type).replace(" ", "")
    return kind.removesuffix("|None"), kind.endswith("|None")


def typed_setting(key: str, value):
    """(value as the field's type, None) or (None, the sentence saying why it isn't one). Ints
    accept integral floats, floats accept ints; bools are neither; NaN and infinity are refused."""
    kind, optional = field_kind(key)
    if value is None and optional:
        return None, None
    or_null = " or null" if optional else ""
    if kind == "bool":
        if isinstance(value, bool):
            return value, None
        return None, f"{key} must be true or false, got {_shown(value)}."
    if kind in ("int", "float"):
        if _is_number(value) and not _finite(value) and not isinstance(value, int):
            return None, f"{key} must be a finite number, got {_shown(value)}."
        if kind == "float" and _is_number(value):
            if not _finite(value):
                return None, f"{key} must be a finite number, got a number too large."
            return float(value), None
        if kind == "int" and isinstance(value, float) and value.is_integer():
            return int(value), None
        if kind == "int" and _is_number(value) and isinstance(value, int):
            return value, None
        what = "a whole number" if kind == "int" else "a number"
        return None, f"{key} must be {what}{or_null}, got {_shown(value)}."
    if kind == "str":
        if isinstance(value, str):
            return value, None
        return None, f"{key} must be text{or_null}, got {_shown(value)}."
    if kind == "tuple":     # split
        if (isinstance(value, (list, tuple)) and len(value) == 3
                and all(_is_number(v) and _finite(v) for v in value)):
            return tuple(value), None
        return None, (f"{key} must be three finite numbers (train, val, test) like [0.8, 0.1, 0.1], "
                      f"got {_shown(value)}.")
    if kind == "dict":
        if isinstance(value, dict):
            return dict(value), None
        like = ' like {"hflip": true, "rotation": 15}' if key == "augment" else ""
        return None, f"{key} must be a JSON object{like}, got {_shown(value)}."
    return value, None


def typed_settings(data) -> tuple[dict, list[str]]:
    """The known settings in `data`, each as its field's type, and one sentence per value that
    isn't one. Unknown keys (from an older or newer version) are left out, silently."""
    problem = config_shape_problem(data)
    if problem:
        return {}, [problem]
    settings, problems = {}, []
    for key, value in data.items():
        if key in RunConfig.__dataclass_fields__:
            value, problem = typed_setting(key, value)
            if problem:
                problems.append(problem)
            else:
                settings[key] = value
    return settings, problems


def arch_problems(arch: str) -> list[str]:
    """`arch` must be a model timm knows, or a Hugging Face hub id of plain characters."""
    if HUB_ID.fullmatch(arch) and ".." not in arch and "//" not in arch:
        return []
    if not HUB_ID.fullmatch(arch) and not arch.startswith(("hf-hub:", "hf_hub:")):
        import timm
        if arch and (timm.is_model(arch) or arch in timm.list_models()):
            return []
        return [f"arch is {_shown(arch)}; timm has no model of that name (see the Model page, or "
                "timm.list_models()); a Hugging Face model is written hf-hub:org/name."]
    return [f"arch is {_shown(arch)}; a hub id must be hf-hub:org/name with only letters, digits, "
            "'-', '_', '.' and '/' (no '..')."]


def config_problems(data, for_widgets: bool = False) -> tuple[dict, list[str]]:
    """(the settings present in `data`, typed; one sentence per problem): types, then ranges and
    choices, then the model name. For a full config or a preset's subset of settings alike."""
    settings, problems = typed_settings(data)
    problems += setting_problems(settings, for_widgets)
    if "arch" in settings:
        problems += arch_problems(settings["arch"])
    return settings, problems + weights_problems(settings)


def validate_config(data, for_widgets: bool = False) -> RunConfig:
    """The RunConfig for `data` (a dict from JSON, a preset, a form; missing settings take their
    defaults, unknown ones are dropped), or ConfigError with every problem, one sentence each."""
    settings, problems = config_problems(data, for_widgets)
    if problems:
        raise ConfigError(problems)
    return RunConfig.from_dict(settings).with_rules()


# ---------------------------------------------------------------- what widgets offer, and the rules
# between settings. Pages read these and never restate an option list, a range or a rule.

HEAD_LR, FULL_LR = 1e-3, 3e-4     # AdamW rates for training the head alone / every block
DEPTH_FOLLOWING = ("adam", "adamw")   # optimizers whose default rate follows the depth


def options(name: str) -> list:
    """What a widget for setting `name` offers: its choices (CHOICES, then the pages' own
    WIDGET_CHOICES for numbers offered as steps)."""
    return list(WIDGET_CHOICES.get(name) or CHOICES[name])


def default_image_size(device_type: str) -> int:
    """Smaller images on a CPU keep a demo quick; a GPU affords the backbones' usual 224 px."""
    return 128 if device_type == "cpu" else 224


def with_backbone(settings: dict, arch: str) -> dict:
    """A new backbone brings its own default weights: a weights file or an unfrozen depth chosen
    for the old one means nothing for it."""
    if arch == settings.get("arch"):
        return settings
    # a backbone the user picks is pinned: a time budget no longer chooses one
    return {**settings, "arch": arch, "weights": "auto", "weights_file": None, "top_k": 1,
            "pick_backbone": False}


def clamp_top_k(settings: dict, blocks: int) -> dict:
    """top_k can't exceed the backbone's number of blocks."""
    return {**settings, "top_k": max(1, min(int(settings.get("top_k", 1)), max(blocks, 1)))}


def depth_lr(trainable_fraction: float) -> float:
    """A sensible AdamW learning rate for training this share of the backbone's blocks: the
    head's 1e-3 with none, falling geometrically to 3e-4 for all."""
    f = min(1.0, max(0.0, trainable_fraction))
    return HEAD_LR * (FULL_LR / HEAD_LR) ** f


def trained_share(freeze: str, top_k: int, blocks: int) -> float:
    """The share of the backbone's blocks that train (scratch starts from nothing: a head's rate)."""
    return {"head": 0.0, "top_k": top_k / max(blocks, 1), "full": 1.0, "scratch": 0.0}[freeze]


def lr_for_depth(settings: dict, blocks: int) -> float | None:
    """The learning rate the depth suggests (2 significant digits), or None where the rule
    doesn't apply (SGD and RMSprop want other rates)."""
    if settings.get("optimizer") not in DEPTH_FOLLOWING:
        return None
    share = trained_share(settings["freeze"], int(settings.get("top_k", 1)), blocks)
    return float(f"{depth_lr(share):.1e}")


def follow_depth(settings: dict, blocks: int, last_suggested: float | None) -> tuple[dict, float | None]:
    """(settings, the suggestion): the rate follows the depth unless the user typed one of
    their own, which is any rate other than the default or the last suggestion."""
    suggested = lr_for_depth(settings, blocks)
    if suggested is None:
        return settings, None
    if settings["lr"] in (last_suggested, RunConfig().lr) and settings["lr"] != suggested:
        settings = {**settings, "lr": suggested}
    return settings, suggested


def weights_problems(settings: dict) -> list[str]:
    """weights=file needs a file, except from scratch (which ignores weights)."""
    if settings.get("weights") == "file" and not settings.get("weights_file") \
            and settings.get("freeze") != "scratch":
        return ["weights is 'file' but no weights_file is given: upload a weights file on the "
                "Model page (or pass weights_file=PATH), or pick other weights."]
    return []


HEAD_KINDS = {"linear": "Linear", "mlp": "MLP (hidden layer + dropout)"}   # the head choices, as shown
SPLIT_PERCENT = {"train": (1, 98), "val": (0, 98)}     # what the Data page offers, in whole percent


def split_percents(split) -> tuple[int, int]:
    """A split's train and validation shares in whole percent, as the Data page shows them."""
    return int(round(split[0] * 100)), int(round(split[1] * 100))


def split_from_percents(train_pct: int, val_pct: int) -> tuple[float, float, float] | None:
    """The split for whole-percent train and validation shares, test taking the rest; None when
    train and validation add up to more than 100 %."""
    test_pct = 100 - train_pct - val_pct
    if test_pct < 0:
        return None
    return train_pct / 100, val_pct / 100, test_pct / 100


# The Train page's choices, as shown (the values are CHOICES'; a label missing here shows the value).
OPTIMIZER_LABELS = {"sgd": "SGD + momentum", "adam": "Adam", "adamw": "AdamW", "rmsprop": "RMSprop"}
SCHEDULER_LABELS = {"none": "Constant", "step": "StepLR", "cosine": "Cosine (+ warm-up)",
                    "onecycle": "One-cycle"}
NORMALIZE_LABELS = {"backbone": "Backbone's mean/std", "dataset": "This data set's mean/std"}
MOMENTUM_OPTIMIZERS = ("sgd", "rmsprop")       # the optimizers that take a momentum
BUDGET_MINUTES = (0.0, 600.0)    # the Train page's time budget in minutes; a config file may ask for more


def uses_momentum(optimizer: str) -> bool:
    """Whether `optimizer` has a momentum setting (Adam's betas play that part and aren't offered)."""
    return optimizer in MOMENTUM_OPTIMIZERS


def two_phase_applies(freeze: str) -> bool:
    """Head-only epochs first, then unfreezing, needs a pretrained backbone that trains: not with
    the backbone frozen throughout, nor from scratch (nothing pretrained to protect)."""
    return freeze not in ("head", "scratch")


def budget_seconds(minutes: float) -> int:
    """The time budget a number of minutes typed on the Train page stands for."""
    return int(round(minutes * 60))
