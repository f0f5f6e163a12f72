"""Self-contained HTML reports of a finished run or of a sweep.

One file that opens offline and prints to PDF: charts are matplotlib PNGs and images are small
JPEG thumbnails, both embedded as data: URIs; the CSS is inline and there is no JavaScript. A
Content-Security-Policy meta tag allows nothing but data: images and the inline style, so a
report never reaches out, even if a later section slips.

The page is assets/templates/report.html.j2 (section bodies in report_sections.html.j2),
rendered by Jinja2 with autoescape on: this module gathers plain values, the templates hold the
markup, and every value (class, file, run and folder names, messages, settings) is escaped there
by default. Nothing is marked safe.

    from core.results.report import save_run_report
    print(save_run_report(run))          # <run>/report.html
"""
from __future__ import annotations

import base64
import functools
import io
import json
import math
from collections import Counter
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import jinja2
import numpy as np
import pandas as pd
import torch
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
from PIL import Image

from core.models.backbones import load_run_model, run_normalization
from core.data import folders
from core.data import images as imaging
from core.data import transforms
from core.results import evaluate as evaluation
from core.results import inspection
from core import paths
from core.training import sweeps
from core.serve.store import Run

RUN_SECTIONS = {
    "summary": "Summary", "data": "Data", "doctor": "Dataset doctor", "config": "Configuration",
    "curves": "Training curves",
    "epochs": "Epochs", "metrics": "Metrics", "confusion": "Confusion matrix",
    "ranked": "Best and worst images per class", "misclassified": "Misclassified images",
    "map": "Embedding map", "inspection": "Inside the network",
}
SWEEP_SECTIONS = {"summary": "Summary", "config": "Shared configuration", "results": "Results",
                  "curves": "Curves", "runs": "Runs"}
THUMB = 96                # px, longest side of an embedded image
GALLERY_BUDGET = 400      # at most this many thumbnails in the best/worst galleries, any class count
MISCLASSIFIED = 30        # most confident mistakes shown
SAMPLES = 60              # data sample thumbnails, spread over the classes
INSPECT_IMAGES = 16       # images the sparsity is measured on
TEMPLATES = paths.ASSETS / "templates"
TEMPLATE = "report.html.j2"


# ---------------------------------------------------------------- rendering

@functools.cache
def _env() -> jinja2.Environment:
    # autoescape=True (not by file name): every {{ value }} is HTML-escaped whatever the template
    # is called. StrictUndefined: a misspelt field fails the report instead of leaving a silent gap.
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(TEMPLATES), autoescape=True,
                             undefined=jinja2.StrictUndefined, trim_blocks=True,
                             lstrip_blocks=True, keep_trailing_newline=True)
    env.tests["bold"] = lambda cell: isinstance(cell, _Bold)
    return env


def _render(kind: str, title: str, subtitle: str, bodies: dict[str, dict]) -> str:
    """The page; `bodies` maps a section id to the values its macro `<kind>_<id>` shows (or a _note)."""
    titles = RUN_SECTIONS if kind == "run" else SWEEP_SECTIONS
    sections = [{"id": sid, "title": titles[sid], "data": data} for sid, data in bodies.items()]
    return _env().get_template(TEMPLATE).render(kind=kind, title=title, subtitle=subtitle, sections=sections,
                                                stamp=datetime.now().strftime("%Y-%m-%d %H:%M"))


def _note(text: str) -> dict:
    """A section body that is only a remark (no data to show)."""
    return {"note": text}


def _table(header: list, rows: list[list], numeric=frozenset(), row_classes: list[str] | None = None) -> dict:
    """What the template's `table` macro shows: cells are plain values, or _Bold ones."""
    return {"header": header, "rows": rows, "numeric": numeric, "row_classes": row_classes}


@dataclass(frozen=True)
class _Bold:
    """A table cell shown in bold (a type of its own: no data value can pass for one)."""
    value: object


# ---------------------------------------------------------------- small text pieces

def plain(text) -> str:
    """A label for matplotlib: a class called '$5 & $6' must not be parsed as mathtext."""
    return str(text).replace("$", r"\$")


def pct(value) -> str:
    return "—" if _missing(value) else f"{value:.1%}"


def num(value, fmt: str = ".4f") -> str:
    return "—" if _missing(value) else format(value, fmt)


def _missing(value) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def setting(value) -> str:
    """A config value as text: lists and dicts as JSON."""
    return json.dumps(value) if isinstance(value, (dict, list, tuple)) else str(value)


# ---------------------------------------------------------------- embedded images

def _uri(data: bytes, mime: str) -> str:
    # base64 and "data:image/...;base64," hold none of & < > " ', so autoescape leaves the URI
    # unchanged: it needs no trust (no |safe) to reach an <img src>.
    return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"


def image_uri(img: Image.Image | np.ndarray, fmt: str = "JPEG", max_side: int | None = None) -> str:
    img = Image.fromarray(img) if isinstance(img, np.ndarray) else img
    img = img.convert("RGB")           # a copy: thumbnail() below works in place
    if max_side:
        img.thumbnail((max_side, max_side))
    buf = io.BytesIO()
    img.save(buf, fmt, **({"quality": 80, "optimize": True} if fmt == "JPEG" else {"optimize": True}))
    return _uri(buf.getvalue(), f"image/{fmt.lower()}")


def figure_uri(fig: Figure, dpi: int = 100) -> str:
    """A PNG of a Figure made without pyplot: no global backend or state, safe in the app's threads."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight")
    return _uri(buf.getvalue(), "image/png")


class Thumbnails:
    """Data URIs of a data set's images, each file encoded once per report (best/worst and the
    misclassified gallery often share images). A file that is gone becomes a grey tile, so the
    report of a moved data set still has no broken images."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.seen: dict[str, str] = {}

    def __call__(self, rel: str) -> str:
        if rel not in self.seen:
            self.seen[rel] = image_uri(self._load(self.root / rel), max_side=THUMB)
        return self.seen[rel]

    @staticmethod
    def _load(path: Path) -> Image.Image:
        try:
            with Image.open(path) as probe:
                small = min(probe.size) <= THUMB
            return imaging.open_rgb(path, None if small else THUMB)   # shrink big photos, never enlarge
        except Exception:  # noqa: BLE001 - any unreadable file is shown as a placeholder
            return Image.new("RGB", (THUMB, THUMB), (200, 200, 200))


# ---------------------------------------------------------------- charts

def curves_figure(epochs: list[dict]) -> Figure:
    """Loss and accuracy per epoch, train vs val; dashed lines where a new phase began."""
    fig = Figure(figsize=(9, 3.2))
    x = [e["epoch"] for e in epochs]
    starts = [e["epoch"] - 0.5 for prev, e in zip(epochs, epochs[1:]) if e.get("phase") != prev.get("phase")]
    for ax, metric, title in zip(fig.subplots(1, 2), ("loss", "acc"), ("Loss", "Accuracy")):
        for part in ("train", "val"):
            ax.plot(x, [_float(e.get(f"{part}_{metric}")) for e in epochs], marker="o", label=part)
        for start in starts:
            ax.axvline(start, ls="--", c="grey", lw=1)
        _style(ax, title)
    return fig


def overlay_figure(series: dict[str, list[dict]]) -> Figure:
    """Validation accuracy and loss of several runs on shared axes."""
    fig = Figure(figsize=(9, 3.4))
    for ax, metric in zip(fig.subplots(1, 2), ("val_acc", "val_loss")):
        for name, epochs in series.items():
            ax.plot([e["epoch"] for e in epochs], [_float(e.get(metric)) for e in epochs],
                    marker="o", ms=3, label=plain(name))
        _style(ax, metric, legend=False)
    handles, labels = fig.axes[0].get_legend_handles_labels()
    if handles:
        fig.legend(handles, labels, loc="upper center", bbox_to_anchor=(0.5, 0), fontsize=8,
                   ncol=min(3, len(labels)), frameon=False)
    return fig


def _style(ax, title: str, legend: bool = True) -> None:
    ax.set_title(title)
    ax.set_xlabel("epoch")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
    if legend:
        ax.legend()


def _float(value) -> float:
    return float("nan") if value is None else float(value)


def confusion_figure(matrix, classes: list[str], side: float | None = None) -> Figure:
    m = np.asarray(matrix)
    n = len(classes)
    side = side or min(10.0, 2.5 + 0.45 * n)
    fig = Figure(figsize=(side + 1, side))
    ax = fig.subplots()
    image = ax.imshow(m, cmap="Blues")
    labels = [plain(c) for c in classes]
    ax.set_xticks(range(n), labels, rotation=45, ha="right", fontsize=8)
    ax.set_yticks(range(n), labels, fontsize=8)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    if n <= 30:     # beyond that the numbers are unreadable; the colour still tells
        for (i, j), v in np.ndenumerate(m):
            ax.text(j, i, str(v), ha="center", va="center", fontsize=7,
                    color="white" if v > m.max() / 2 else "black")
    fig.colorbar(image, ax=ax, shrink=0.8)
    return fig


def counts_figure(counts: dict[str, list[int]], classes: list[str]) -> Figure:
    """Images per class, stacked by split (horizontal, so long class names stay readable)."""
    fig = Figure(figsize=(7, 1.2 + 0.28 * len(classes)))
    ax = fig.subplots()
    left = np.zeros(len(classes))
    for split, values in counts.items():
        ax.barh(range(len(classes)), values, left=left, label=split)
        left += np.asarray(values)
    ax.set_yticks(range(len(classes)), [plain(c) for c in classes], fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("images")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1), frameon=False)   # beside the bars
    return fig


def sparsity_figure(rows: list[dict]) -> Figure:
    fig = Figure(figsize=(7, 1.2 + 0.3 * len(rows)))
    ax = fig.subplots()
    ax.barh(range(len(rows)), [r["fraction"] for r in rows])
    ax.set_yticks(range(len(rows)), [plain(r["stage"]) for r in rows], fontsize=8)
    ax.invert_yaxis()
    ax.set_xlim(0, 1)
    ax.set_xlabel("fraction of activations active")
    return fig


# ---------------------------------------------------------------- one run

def run_report(run: Run, include_inspection: bool = True, split: str = "test", progress=None) -> str:
    """The whole report of `run` as one HTML string; `split` picks the stored predictions
    (test or val) that the metrics and galleries show. `progress(done, total, message)` hears of each
    section before it is built (the network's inspection is the slow one)."""
    cfg, status, classes = run.config, run.status(), run.classes
    splits = run.read_json("splits.json", {}) or {}
    thumbs = Thumbnails(splits.get("root", "."))
    metrics = run.read_json(f"{split}_metrics.json")
    frame = evaluation.load_predictions(run, split) if metrics else None
    epochs = run.epochs()
    missing = _note(f"No stored {split} predictions: open the run on the Evaluate page once.")
    sections = {
        "summary": lambda: _summary(run, status, metrics, split),
        "data": lambda: _data(run, splits, classes, thumbs),
        "doctor": lambda: _doctor(run, thumbs),
        "config": lambda: _config(run, status),
        "curves": lambda: {"chart": figure_uri(curves_figure(epochs))} if epochs else _note("No finished epoch."),
        "epochs": lambda: _epochs(epochs) if epochs else _note("No finished epoch."),
        "metrics": lambda: _metrics(metrics, split) if metrics else missing,
        "confusion": lambda: _confusion(metrics) if metrics else missing,
        "ranked": lambda: _ranked(frame, classes, thumbs) if frame is not None else missing,
        "misclassified": lambda: _misclassified(frame, thumbs) if frame is not None else missing,
        "map": lambda: _map(run),
        "inspection": lambda: _inspection_or_note(run, splits, split, include_inspection),
    }
    bodies = {}
    for i, (name, build) in enumerate(sections.items()):
        if progress:
            progress(i, len(sections), f"Report: {SECTION_TITLES.get(name, name)}…")
        bodies[name] = build()
    if progress:
        progress(len(sections), len(sections), "Report: writing the file…")
    return _render("run", f"Run {run.id}", f"{cfg.name or cfg.arch} · {status.get('state', '?')}", bodies)


SECTION_TITLES = {"summary": "summary", "data": "data set and sample images", "doctor": "dataset doctor",
                  "config": "settings",
                  "curves": "training curves", "epochs": "epoch table", "metrics": "metrics",
                  "confusion": "confusion matrix", "ranked": "best and worst images per class",
                  "misclassified": "misclassified images", "map": "embedding map",
                  "inspection": "looking inside the network (feature maps, filters, sparsity)"}


def save_run_report(run: Run, split: str = "test", include_inspection: bool = True, progress=None) -> Path:
    """Write the report into the run folder (report.html for the test split) and return its path."""
    path = run.file("report.html" if split == "test" else f"report-{split}.html")
    paths.atomic_write_text(path, run_report(run, include_inspection, split, progress))
    return path


def _map(run: Run) -> dict:
    """The before/after embedding map, when it was computed on the Evaluate page."""
    from core.trust import embedding_map
    frames = embedding_map.load_run_maps(run)
    if not frames:
        return _note("Not computed: Evaluate → Embedding map → Compute the maps, then build the report again.")
    return {"charts": [(figure_uri(embedding_map.map_figure(f, f.attrs.get("title", name))), f.attrs.get("note", ""))
                       for f, name in zip(frames, ("before", "after"))]}


def _doctor(run: Run, thumbs: "Thumbnails") -> dict:
    """The last audit of the run's data folder (the Doctor page or `python -m core doctor`), and
    what the Doctor's fixes changed."""
    from core.trust import doctor
    root = paths.resolve_data_root(run.config.data_root)
    audit, fixed = doctor.saved(root), _fixed(root)
    if not audit and not fixed:
        return _note("This data set was not audited (Doctor page, or python -m core doctor FOLDER).")
    body = {"fixed": fixed}
    if audit:
        rows = audit["findings"]
        labels = [r for r in rows if r["issue"] == "label"][:MISCLASSIFIED]
        body.update(
            verdicts=audit["verdicts"], flagged=len({r["path"] for r in rows}), total=sum(audit["counts"].values()),
            pictures=[(thumbs(r["path"]), r["path"], [f"labelled {r['label']}", f"looks like {r['suggested']}",
                                                      pct(r["score"])]) for r in labels],
            table=_table(["file", "issue", "label", "suggested", "score", "detail"],
                         [[r["path"], r["issue"], r["label"], r["suggested"] or "", num(r["score"], ".3f"),
                           r["detail"]] for r in rows[:200]], numeric={4}))
    return body


def _fixed(root) -> str | None:
    """What the Doctor's fixes changed, when the run's data set is their version (or a fixed copy
    written by doctor.write_fixed_copy)."""
    from core.data import feedback
    from core.trust import doctor
    if version := feedback.doctors_version(root):
        return f"This data set is version {version.ref}, made from {version.parent}: {version.note}."
    if fixed := doctor.fixed_from(root):
        return (f"This data set is a fixed copy of {fixed['from']}: {len(fixed['excluded'])} image(s) left out, "
                f"{len(fixed['moved'])} moved to another class, {fixed['kept_together']} group(s) kept in one split.")
    return None


def _summary(run: Run, status: dict, metrics: dict | None, split: str) -> dict:
    cfg = run.config
    tiles = {"state": status.get("state", "?"), "best epoch": status.get("best_epoch", "—"),
             "best val acc": pct(status.get("best_val_acc"))}
    if metrics:
        tiles.update({f"{split} accuracy": pct(metrics["accuracy"]), f"{split} mAP": pct(metrics.get("mAP")),
                      "macro F1": pct(metrics["macro_f1"])})
    model = "logistic regression on raw pixels" if cfg.baseline == "logreg" else cfg.arch
    return {"tiles": tiles, "model": model, "cfg": cfg, "lr": f"{cfg.lr:g}",
            "message": status.get("message", ""), "folder": run.path}


def _split_counts(splits: dict, n_classes: int) -> dict[str, list[int]]:
    out = {}
    for split in folders.SPLITS:
        per = Counter(label for _, label in splits.get(split, []))
        out[split] = [per.get(i, 0) for i in range(n_classes)]
    return out


def _data(run: Run, splits: dict, classes: list[str], thumbs: Thumbnails) -> dict:
    if not classes or not splits:
        return _note("The run stored no data split (it stopped before scanning the data).")
    counts = _split_counts(splits, len(classes))
    rows = [[c, *(counts[s][i] for s in folders.SPLITS), sum(counts[s][i] for s in folders.SPLITS)]
            for i, c in enumerate(classes)]
    totals = ("all", *(sum(counts[s]) for s in folders.SPLITS), sum(map(sum, counts.values())))
    rows.append([_Bold(v) for v in totals])
    skipped = run.read_json("skipped.json", []) or []
    from core.data import feedback
    check = feedback.data_check(run)
    return {"classes": len(classes), "root": splits.get("root", "?"), "pinned": check.label,
            "changed": check.change.lines(quote="") if check.changed else [],
            "table": _table(["class", *folders.SPLITS, "total"], rows, numeric={1, 2, 3, 4}),
            "chart": figure_uri(counts_figure(counts, classes)), "skipped": len(skipped),
            "skipped_table": _table(["file", "reason"], skipped[:20]),
            "samples": _samples(splits, classes, thumbs)}


def _samples(splits: dict, classes: list[str], thumbs: Thumbnails) -> list[tuple]:
    per_class = max(1, min(6, SAMPLES // len(classes)))
    picked: dict[int, list[str]] = {i: [] for i in range(len(classes))}
    for split in folders.SPLITS:
        for path, label in splits.get(split, []):
            if len(picked[label]) < per_class:
                picked[label].append(path)
    return [(thumbs(p), p, [classes[label]]) for label, files in picked.items() for p in files]


def _config(run: Run, status: dict) -> dict:
    config = run.read_json("config.json", {}) or {}
    rows = [[k, setting(v)] for k, v in config.items()]
    norm = run.read_json("norm.json")
    if norm:
        rows.append(["normalisation", f"{norm.get('source')}: mean {_rounded(norm['mean'])}, "
                                      f"std {_rounded(norm['std'])}"])
    if status.get("device"):
        rows.append(["trained on", status["device"]])
    return {"table": _table(["setting", "value"], rows)}


def _rounded(values) -> str:
    return "(" + ", ".join(f"{v:.3f}" for v in values) + ")"


def _epochs(epochs: list[dict]) -> dict:
    header = ["epoch", "phase", "LR", "train loss", "train acc", "val loss", "val acc", "s", "best"]
    rows = [[e["epoch"], e.get("phase", ""), num(e.get("lr"), ".1e"),
             num(e.get("train_loss")), pct(e.get("train_acc")), num(e.get("val_loss")),
             pct(e.get("val_acc")), num(e.get("seconds"), ".2f"), "✓" if e.get("best") else ""]
            for e in epochs]
    return {"table": _table(header, rows, numeric={0, 2, 3, 4, 5, 6, 7},
                            row_classes=["best" if e.get("best") else "" for e in epochs])}


def _metrics(metrics: dict, split: str) -> dict:
    tiles = {"accuracy": pct(metrics["accuracy"]), "mAP": pct(metrics.get("mAP")),
             "macro precision": pct(metrics["macro_precision"]),
             "macro recall": pct(metrics["macro_recall"]), "macro F1": pct(metrics["macro_f1"]),
             "images": metrics["n"]}
    rows = [[r["cls"], pct(r["precision"]), pct(r["recall"]), pct(r["f1"]), pct(r.get("ap")), r["support"]]
            for r in metrics["per_class"]]
    return {"tiles": tiles, "split": split, "unreadable": len(metrics.get("skipped") or []),
            "table": _table(["class", "precision", "recall", "F1", "AP", "support"], rows,
                            numeric={1, 2, 3, 4, 5})}


def _confusion(metrics: dict) -> dict:
    classes, matrix = metrics["classes"], metrics["confusion"]
    table = None
    if len(classes) <= 20:     # the same numbers as text: searchable, and readable in print
        rows = [[_Bold(c), *row] for c, row in zip(classes, matrix)]
        table = _table(["true \\ predicted", *classes], rows, numeric=set(range(1, len(classes) + 1)))
    return {"chart": figure_uri(confusion_figure(matrix, classes)), "table": table}


def _ranked(frame: pd.DataFrame, classes: list[str], thumbs: Thumbnails) -> dict:
    n = max(1, min(5, GALLERY_BUDGET // (2 * max(1, len(classes)))))

    def pictures(rows: pd.DataFrame, cls: str) -> list[tuple]:
        return [(thumbs(r["file"]), r["file"], [f"{r['p_' + cls]:.0%}"]) for r in rows.to_dict("records")]

    shown = []
    for cls in classes:
        best, worst = evaluation.rank_class(frame, cls, n)
        shown.append({"name": cls, "empty": best.empty, "best": pictures(best, cls),
                      "worst": pictures(worst, cls)})
    return {"n": n, "classes": shown}


def _misclassified(frame: pd.DataFrame, thumbs: Thumbnails) -> dict:
    wrong = evaluation.misclassified(frame, 3)
    shown = wrong.head(MISCLASSIFIED)
    pictures = [(thumbs(r["file"]), r["file"], [f"true: {r['true']}"] +
                 [f"{k}. {c} {p:.0%}" for k, (c, p) in enumerate(r["top"], 1)])
                for r in shown.to_dict("records")]
    return {"wrong": len(wrong), "total": len(frame), "shown": len(shown), "pictures": pictures}


# ---------------------------------------------------------------- inspection

def _inspection_or_note(run: Run, splits: dict, split: str, include: bool) -> dict:
    if not include:
        return _note("Left out of this report.")
    if not run.checkpoint.exists():
        return _note("No network checkpoint (a baseline without a network, or no finished epoch).")
    try:
        return _inspection(run, splits, split)
    except Exception as err:  # noqa: BLE001 - the rest of the report is worth having regardless
        return _note(f"Could not look inside this network: {type(err).__name__}: {err}")


def _inspection(run: Run, splits: dict, split: str) -> dict:
    cfg = run.config
    # CPU: a handful of images, and the accelerator may be busy training the next run
    model = load_run_model(run, "cpu")
    mean, std = run_normalization(run, model)
    transform = transforms.build_transform(cfg.image_size, mean, std)
    pool = splits.get(split) or splits.get("test") or splits.get("train") or []
    items = [folders.Item(path, label) for path, label in pool[:INSPECT_IMAGES]]
    images, _ = imaging.decode_images(splits["root"], items, cfg.image_size)
    kept = [(item, img) for item, img in zip(items, images) if img is not None]
    if not kept:
        return _note("None of the run's images can be read any more, so nothing was fed through the network.")
    x = torch.stack([transform(img) for _, img in kept])
    first, picture = kept[0]
    maps = [(image_uri(inspection.channel_grid(fmap.tensor, 16, ncol=8), max_side=720), fmap.name,
             " × ".join(map(str, fmap.shape))) for fmap in inspection.feature_maps(model, x[:1])]
    name, conv = inspection.first_conv(model)
    scale = max(2, 36 // conv.weight.shape[-1])     # about 36 px a filter, whatever the kernel size
    rows = inspection.sparsity(model, [x])
    return {"file": first.path, "label": run.classes[first.label], "maps": maps, "conv": name,
            "input": [(image_uri(picture.permute(1, 2, 0).numpy(), max_side=THUMB), first.path, ["input"])],
            "filters": image_uri(inspection.filter_grid(model, scale=scale), "PNG", max_side=720),
            "images": len(kept), "sparsity": figure_uri(sparsity_figure(rows)),
            "table": _table(["stage", "active", "measure"],
                            [[r["stage"], pct(r["fraction"]), r["measure"]] for r in rows], numeric={1})}


# ---------------------------------------------------------------- a sweep

def sweep_report(sweep_id: str, runs: list[Run] | None = None) -> str:
    """Results table, overlaid curves and one short section per run; `runs` defaults to the
    sweep's own (oldest first), and may be any list (the Experiments page's 'all runs')."""
    runs = runs if runs is not None else sweeps.sweeps().get(sweep_id, [])
    frame = sweeps.results(runs) if runs else pd.DataFrame()
    names = {r.id: r.config.name or r.id for r in runs}
    series = {names[r.id]: r.epochs() for r in runs if r.epochs()}
    bodies = {
        "summary": _sweep_summary(frame),
        "config": _shared_config(runs),
        "results": _results_table(frame) if not frame.empty else _note("No runs."),
        "curves": {"chart": figure_uri(overlay_figure(series))} if series
        else _note("No finished epoch yet."),
        "runs": {"runs": [_sweep_run(i, r, names[r.id]) for i, r in enumerate(runs)]} if runs
        else _note("No runs."),
    }
    return _render("sweep", f"Sweep {sweep_id}", f"{len(runs)} runs", bodies)


def save_sweep_report(sweep_id: str, runs: list[Run] | None = None) -> Path:
    """Write the sweep's report below the lab's home (reports/) and return its path."""
    folder = paths.home() / "reports"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"sweep-{Path(sweep_id).name}.html"     # a name, never a path from outside
    paths.atomic_write_text(path, sweep_report(sweep_id, runs))
    return path


def _sweep_summary(frame: pd.DataFrame) -> dict:
    if frame.empty:
        return _note("This sweep has no runs.")
    states = Counter(frame["state"].fillna("?"))
    best = []
    for metric in ("test_acc", "best_val_acc"):
        scored = frame.dropna(subset=[metric]) if metric in frame else frame.iloc[:0]
        if not scored.empty:
            top = scored.loc[scored[metric].astype(float).idxmax()]
            best.append((metric.replace("_", " "), pct(float(top[metric])), top["name"], top["run"]))
    return {"tiles": {"runs": len(frame), **states}, "best": best}


def _shared_config(runs: list[Run]) -> dict:
    """The settings every run shares, and the ones the sweep varied."""
    configs = [r.read_json("config.json", {}) or {} for r in runs]
    if not configs:
        return _note("No runs.")
    keys = [k for k in configs[0] if k not in ("name", "tags")]
    same = [k for k in keys if all(json.dumps(c.get(k)) == json.dumps(configs[0].get(k)) for c in configs)]
    varied = [k for k in keys if k not in same]
    rows = [[k, setting(configs[0][k])] for k in same]
    return {"varied": ", ".join(varied) or "nothing", "table": _table(["setting", "value"], rows)}


def _results_table(frame: pd.DataFrame) -> dict:
    def cell(col: str, value):
        if _missing(value):
            return "—"
        if isinstance(value, float):        # NaN-holding int columns (best_epoch) arrive as floats
            if col.endswith("acc"):
                return pct(value)
            return f"{value:g}" if col == "lr" or value.is_integer() else f"{value:.2f}"
        return value
    columns = list(frame.columns)
    rows = [[cell(c, row[c]) for c in columns] for row in frame.to_dict("records")]
    return {"table": _table(columns, rows)}


def _sweep_run(index: int, run: Run, name: str) -> dict:
    status = run.status()
    metrics = run.read_json("test_metrics.json")
    tiles = {"state": status.get("state", "?"), "best val acc": pct(status.get("best_val_acc")),
             "test acc": pct(status.get("test_acc"))}
    confusion = None
    if metrics:
        tiles.update({"mAP": pct(metrics.get("mAP")), "macro F1": pct(metrics["macro_f1"])})
        classes = metrics["classes"]
        fig = confusion_figure(metrics["confusion"], classes, side=min(6.0, 2 + 0.3 * len(classes)))
        confusion = figure_uri(fig, dpi=80)
    return {"index": index, "name": name, "tiles": tiles, "id": run.id,
            "message": status.get("message", ""), "confusion": confusion}
