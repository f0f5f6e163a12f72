"""Self-contained HTML reports of a finished run or of a sweep.

One file that opens offline and prints to PDF: charts are matplotlib PNGs and images are small
JPEG thumbnails, both embedded as data: URIs; the CSS is inline and there is no JavaScript. A
Content-Security-Policy meta tag allows nothing but data: images and the inline style, so a
report never reaches out, even if a later section slips. Every text that can come from a user
(class, file, run and folder names) goes through `esc`.

    from core.report import save_run_report
    print(save_run_report(run))          # <run>/report.html
"""
from __future__ import annotations

import base64
import html
import io
import json
import math
from collections import Counter
from datetime import datetime
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
from PIL import Image

from core import data as D
from core import evaluate as E
from core import inspect as I
from core import paths
from core import sweeps as S
from core.store import Run

RUN_SECTIONS = {
    "summary": "Summary", "data": "Data", "config": "Configuration", "curves": "Training curves",
    "epochs": "Epochs", "metrics": "Metrics", "confusion": "Confusion matrix",
    "ranked": "Best and worst images per class", "misclassified": "Misclassified images",
    "inspection": "Inside the network",
}
SWEEP_SECTIONS = {"summary": "Summary", "config": "Shared configuration", "results": "Results",
                  "curves": "Curves", "runs": "Runs"}
THUMB = 96                # px, longest side of an embedded image
GALLERY_BUDGET = 400      # at most this many thumbnails in the best/worst galleries, any class count
MISCLASSIFIED = 30        # most confident mistakes shown
SAMPLES = 60              # data sample thumbnails, spread over the classes
INSPECT_IMAGES = 16       # images the sparsity is measured on
CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'"


# ---------------------------------------------------------------- small HTML pieces

def esc(value) -> str:
    return html.escape(str(value), quote=True)


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
    """A config value as HTML: lists and dicts as JSON."""
    return esc(json.dumps(value) if isinstance(value, (dict, list, tuple)) else value)


def note(text: str) -> str:
    return f'<p class="note">{esc(text)}</p>'


def table(header: list[str], rows: list[list[str]], numeric: set[int] = frozenset(),
          row_class=None) -> str:
    """Cells arrive as HTML (already escaped); the header is escaped here."""
    head = "".join(f"<th>{esc(h)}</th>" for h in header)
    body = []
    for i, row in enumerate(rows):
        cls = f' class="{row_class(i)}"' if row_class and row_class(i) else ""
        cells = "".join(f'<td class="num">{c}</td>' if j in numeric else f"<td>{c}</td>"
                        for j, c in enumerate(row))
        body.append(f"<tr{cls}>{cells}</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def tiles(values: dict[str, str]) -> str:
    return '<div class="tiles">' + "".join(
        f'<div class="tile"><span>{esc(k)}</span><b>{esc(v)}</b></div>' for k, v in values.items()) + "</div>"


def chart(src: str, caption: str = "", alt: str = "chart") -> str:
    cap = f"<figcaption>{esc(caption)}</figcaption>" if caption else ""
    return f'<figure class="chart"><img src="{src}" alt="{esc(alt)}">{cap}</figure>'


def gallery(items: list[tuple[str, str, list[str]]], wide: bool = False) -> str:
    """(src, file name, caption lines) per image."""
    if not items:
        return note("No images.")
    cls = "thumb wide" if wide else "thumb"
    figs = [f'<figure class="{cls}"><img src="{src}" alt="{esc(name)}" title="{esc(name)}">'
            f'<figcaption>{"<br>".join(esc(line) for line in lines)}</figcaption></figure>'
            for src, name, lines in items]
    return '<div class="gallery">' + "".join(figs) + "</div>"


# ---------------------------------------------------------------- embedded images

def _uri(data: bytes, mime: str) -> str:
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
            return D.open_rgb(path, None if small else THUMB)   # shrink big photos, never enlarge
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


# ---------------------------------------------------------------- the page

CSS = """
:root { color-scheme: light; }
body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; color: #1b1f24;
       background: #fff; margin: 0 auto; max-width: 1100px; padding: 16px 24px; }
h1 { font-size: 24px; margin: 0 0 4px; }
h2 { font-size: 19px; border-bottom: 2px solid #e3e7ec; padding-bottom: 4px; margin-top: 28px; }
h3 { font-size: 15px; margin: 16px 0 6px; }
.meta, .note, figcaption, footer { color: #57606a; }
.note { font-style: italic; }
nav a { margin-right: 12px; color: #0b5cad; text-decoration: none; }
table { border-collapse: collapse; margin: 8px 0; font-size: 13px; }
th, td { border: 1px solid #d8dee4; padding: 3px 8px; text-align: left; vertical-align: top; }
th { background: #f3f5f7; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
tr.best td { background: #e8f5e9; }
.tiles { display: flex; flex-wrap: wrap; gap: 10px; margin: 8px 0; }
.tile { border: 1px solid #d8dee4; border-radius: 6px; padding: 6px 12px; min-width: 110px; }
.tile span { font-size: 12px; color: #57606a; }
.tile b { display: block; font-size: 19px; }
figure { margin: 8px 0; }
figure.chart img { max-width: 100%; height: auto; }
.gallery { display: flex; flex-wrap: wrap; gap: 6px; }
figure.thumb { width: 104px; margin: 0; font-size: 11px; text-align: center; overflow-wrap: anywhere; }
figure.thumb.wide { width: 150px; }
figure.thumb img { width: 96px; height: 96px; object-fit: contain; image-rendering: pixelated;
                   background: #f3f5f7; }
footer { margin-top: 32px; font-size: 12px; }
@page { margin: 12mm; }
@media print {
  body { max-width: none; padding: 0; font-size: 10pt; background: #fff; }
  nav { display: none; }
  * { -webkit-print-color-adjust: exact; print-color-adjust: exact; }
  section, figure, table, .tiles, .gallery { break-inside: avoid; page-break-inside: avoid; }
  h2, h3 { break-after: avoid; page-break-after: avoid; }
}
"""


def section(sid: str, title: str, body: str) -> str:
    return f'<section id="{esc(sid)}">\n<h2>{esc(title)}</h2>\n{body}\n</section>'


def page(title: str, subtitle: str, sections: list[tuple[str, str, str]]) -> str:
    nav = "".join(f'<a href="#{esc(sid)}">{esc(name)}</a>' for sid, name, _ in sections)
    body = "\n".join(section(*s) for s in sections)
    stamp = datetime.now().strftime("%Y-%m-%d %H:%M")
    return (f'<!doctype html>\n<html lang="en"><head><meta charset="utf-8">\n'
            f'<meta http-equiv="Content-Security-Policy" content="{CSP}">\n'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">\n'
            f"<title>{esc(title)}</title>\n<style>{CSS}</style></head>\n<body>\n"
            f'<header><h1>{esc(title)}</h1><p class="meta">{esc(subtitle)}</p><nav>{nav}</nav></header>\n'
            f"<main>\n{body}\n</main>\n<footer>Finetune Lab report · generated {stamp}</footer>\n"
            f"</body></html>\n")


# ---------------------------------------------------------------- one run

def run_report(run: Run, include_inspection: bool = True, split: str = "test") -> str:
    """The whole report of `run` as one HTML string; `split` picks the stored predictions
    (test or val) that the metrics and galleries show."""
    cfg, status, classes = run.config, run.status(), run.classes
    splits = run.read_json("splits.json", {}) or {}
    thumbs = Thumbnails(splits.get("root", "."))
    metrics = run.read_json(f"{split}_metrics.json")
    frame = E.load_predictions(run, split) if metrics else None
    epochs = run.epochs()
    missing = note(f"No stored {split} predictions: open the run on the Evaluate page once.")
    bodies = {
        "summary": _summary(run, status, metrics, split),
        "data": _data(run, splits, classes, thumbs),
        "config": _config(run, status),
        "curves": chart(figure_uri(curves_figure(epochs)), alt="loss and accuracy per epoch")
        if epochs else note("No finished epoch."),
        "epochs": _epochs(epochs) if epochs else note("No finished epoch."),
        "metrics": _metrics(metrics, split) if metrics else missing,
        "confusion": _confusion(metrics) if metrics else missing,
        "ranked": _ranked(frame, classes, thumbs) if frame is not None else missing,
        "misclassified": _misclassified(frame, thumbs) if frame is not None else missing,
        "inspection": _inspection_or_note(run, splits, split, include_inspection),
    }
    sections = [(sid, RUN_SECTIONS[sid], body) for sid, body in bodies.items()]
    return page(f"Run {run.id}", f"{cfg.name or cfg.arch} · {status.get('state', '?')}", sections)


def save_run_report(run: Run, split: str = "test", include_inspection: bool = True) -> Path:
    """Write the report into the run folder (report.html for the test split) and return its path."""
    path = run.file("report.html" if split == "test" else f"report-{split}.html")
    paths.atomic_write_text(path, run_report(run, include_inspection, split))
    return path


def _summary(run: Run, status: dict, metrics: dict | None, split: str) -> str:
    cfg = run.config
    values = {"state": status.get("state", "?"), "best epoch": status.get("best_epoch", "—"),
              "best val acc": pct(status.get("best_val_acc"))}
    if metrics:
        values.update({f"{split} accuracy": pct(metrics["accuracy"]), f"{split} mAP": pct(metrics.get("mAP")),
                       "macro F1": pct(metrics["macro_f1"])})
    model = "logistic regression on raw pixels" if cfg.baseline == "logreg" else cfg.arch
    lines = [f"Model <b>{esc(model)}</b> · freeze {esc(cfg.freeze)} · head {esc(cfg.head)} · "
             f"{esc(cfg.optimizer)} lr {esc(f'{cfg.lr:g}')} · {esc(cfg.epochs)} epochs · "
             f"{esc(cfg.image_size)} px", f"Status: {esc(status.get('message', ''))}",
             f"Folder: <code>{esc(run.path)}</code>"]
    return tiles(values) + "".join(f"<p>{line}</p>" for line in lines)


def _split_counts(splits: dict, n_classes: int) -> dict[str, list[int]]:
    out = {}
    for split in D.SPLITS:
        per = Counter(label for _, label in splits.get(split, []))
        out[split] = [per.get(i, 0) for i in range(n_classes)]
    return out


def _data(run: Run, splits: dict, classes: list[str], thumbs: Thumbnails) -> str:
    if not classes or not splits:
        return note("The run stored no data split (it stopped before scanning the data).")
    counts = _split_counts(splits, len(classes))
    rows = [[esc(c)] + [str(counts[s][i]) for s in D.SPLITS] + [str(sum(counts[s][i] for s in D.SPLITS))]
            for i, c in enumerate(classes)]
    rows.append(["<b>all</b>"] + [f"<b>{sum(counts[s])}</b>" for s in D.SPLITS]
                + [f"<b>{sum(map(sum, counts.values()))}</b>"])
    parts = [f"<p>{len(classes)} classes in <code>{esc(splits.get('root', '?'))}</code></p>",
             table(["class", *D.SPLITS, "total"], rows, numeric={1, 2, 3, 4}),
             chart(figure_uri(counts_figure(counts, classes)), alt="images per class and split")]
    skipped = run.read_json("skipped.json", []) or []
    if skipped:
        parts.append(f"<p>{len(skipped)} file(s) could not be decoded and were left out:</p>")
        parts.append(table(["file", "reason"], [[esc(p), esc(r)] for p, r in skipped[:20]]))
    parts.append("<h3>Samples</h3>" + _samples(splits, classes, thumbs))
    return "\n".join(parts)


def _samples(splits: dict, classes: list[str], thumbs: Thumbnails) -> str:
    per_class = max(1, min(6, SAMPLES // len(classes)))
    picked: dict[int, list[str]] = {i: [] for i in range(len(classes))}
    for split in D.SPLITS:
        for path, label in splits.get(split, []):
            if len(picked[label]) < per_class:
                picked[label].append(path)
    items = [(thumbs(p), p, [classes[label]]) for label, files in picked.items() for p in files]
    return gallery(items)


def _config(run: Run, status: dict) -> str:
    config = run.read_json("config.json", {}) or {}
    rows = [[esc(k), setting(v)] for k, v in config.items()]
    norm = run.read_json("norm.json")
    if norm:
        rows.append(["normalisation", esc(f"{norm.get('source')}: mean {_rounded(norm['mean'])}, "
                                          f"std {_rounded(norm['std'])}")])
    if status.get("device"):
        rows.append(["trained on", esc(status["device"])])
    return table(["setting", "value"], rows)


def _rounded(values) -> str:
    return "(" + ", ".join(f"{v:.3f}" for v in values) + ")"


def _epochs(epochs: list[dict]) -> str:
    header = ["epoch", "phase", "LR", "train loss", "train acc", "val loss", "val acc", "s", "best"]
    rows = [[str(e["epoch"]), esc(e.get("phase", "")), num(e.get("lr"), ".1e"),
             num(e.get("train_loss")), pct(e.get("train_acc")), num(e.get("val_loss")),
             pct(e.get("val_acc")), num(e.get("seconds"), ".2f"), "✓" if e.get("best") else ""]
            for e in epochs]
    return table(header, rows, numeric={0, 2, 3, 4, 5, 6, 7},
                 row_class=lambda i: "best" if epochs[i].get("best") else "")


def _metrics(metrics: dict, split: str) -> str:
    values = {"accuracy": pct(metrics["accuracy"]), "mAP": pct(metrics.get("mAP")),
              "macro precision": pct(metrics["macro_precision"]),
              "macro recall": pct(metrics["macro_recall"]), "macro F1": pct(metrics["macro_f1"]),
              "images": str(metrics["n"])}
    rows = [[esc(r["cls"]), pct(r["precision"]), pct(r["recall"]), pct(r["f1"]), pct(r.get("ap")),
             str(r["support"])] for r in metrics["per_class"]]
    parts = [tiles(values), f"<p>On the {esc(split)} split, with the best epoch's checkpoint. "
             "mAP: mean average precision, one-vs-rest, macro over the classes present.</p>",
             table(["class", "precision", "recall", "F1", "AP", "support"], rows, numeric={1, 2, 3, 4, 5})]
    if metrics.get("skipped"):
        parts.append(note(f"{len(metrics['skipped'])} image(s) of this split could not be read."))
    return "\n".join(parts)


def _confusion(metrics: dict) -> str:
    classes, matrix = metrics["classes"], metrics["confusion"]
    parts = [chart(figure_uri(confusion_figure(matrix, classes)), "Rows: true class; columns: predicted.",
                   alt="confusion matrix")]
    if len(classes) <= 20:     # the same numbers as text: searchable, and readable in print
        rows = [[f"<b>{esc(c)}</b>"] + [str(v) for v in row] for c, row in zip(classes, matrix)]
        parts.append(table(["true \\ predicted", *classes], rows, numeric=set(range(1, len(classes) + 1))))
    return "\n".join(parts)


def _ranked(frame: pd.DataFrame, classes: list[str], thumbs: Thumbnails) -> str:
    n = max(1, min(5, GALLERY_BUDGET // (2 * max(1, len(classes)))))
    parts = [f"<p>Per class, the {n} images of that class the model is most and least sure "
             "about (by the probability it gives the true class).</p>"]
    for cls in classes:
        best, worst = E.rank_class(frame, cls, n)
        parts.append(f"<h3>{esc(cls)}</h3>")
        if best.empty:
            parts.append(note("No images of this class in the split."))
            continue
        for title, rows in (("most confident", best), ("least confident", worst)):
            items = [(thumbs(r["file"]), r["file"], [f"{r['p_' + cls]:.0%}"])
                     for r in rows.to_dict("records")]
            parts.append(f'<p class="meta">{title}</p>' + gallery(items))
    return "\n".join(parts)


def _misclassified(frame: pd.DataFrame, thumbs: Thumbnails) -> str:
    wrong = E.misclassified(frame, 3)
    shown = wrong.head(MISCLASSIFIED)
    items = [(thumbs(r["file"]), r["file"], [f"true: {r['true']}"] +
              [f"{k}. {c} {p:.0%}" for k, (c, p) in enumerate(r["top"], 1)])
             for r in shown.to_dict("records")]
    head = (f"<p>{len(wrong)} of {len(frame)} images misclassified; the {len(shown)} most confident "
            "mistakes, each with the model's top 3.</p>")
    return head + gallery(items, wide=True)


# ---------------------------------------------------------------- inspection

def _inspection_or_note(run: Run, splits: dict, split: str, include: bool) -> str:
    if not include:
        return note("Left out of this report.")
    if not run.checkpoint.exists():
        return note("No network checkpoint (a baseline without a network, or no finished epoch).")
    try:
        return _inspection(run, splits, split)
    except Exception as err:  # noqa: BLE001 - the rest of the report is worth having regardless
        return note(f"Could not look inside this network: {type(err).__name__}: {err}")


def _inspection(run: Run, splits: dict, split: str) -> str:
    cfg = run.config
    # CPU: a handful of images, and the accelerator may be busy training the next run
    model = E.load_run_model(run, "cpu")
    mean, std = E.run_normalization(run, model)
    transform = D.build_transform(cfg.image_size, mean, std)
    pool = splits.get(split) or splits.get("test") or splits.get("train") or []
    items = [D.Item(path, label) for path, label in pool[:INSPECT_IMAGES]]
    images, _ = D.decode_images(splits["root"], items, cfg.image_size)
    kept = [(item, img) for item, img in zip(items, images) if img is not None]
    if not kept:
        return note("None of the run's images can be read any more, so nothing was fed through the network.")
    x = torch.stack([transform(img) for _, img in kept])
    first, picture = kept[0]
    parts = [f"<h3>Feature maps</h3><p>The first 16 channels of every stage for "
             f"<code>{esc(first.path)}</code> ({esc(run.classes[first.label])}); each channel scaled "
             "to its own range.</p>",
             gallery([(image_uri(picture.permute(1, 2, 0).numpy(), max_side=THUMB), first.path, ["input"])])]
    for fmap in I.feature_maps(model, x[:1]):
        grid = I.channel_grid(fmap.tensor, 16, ncol=8)
        shape = " × ".join(map(str, fmap.shape))
        parts.append(chart(image_uri(grid, max_side=720), f"{fmap.name} · {shape}",
                           alt=f"feature maps of {fmap.name}"))
    name, conv = I.first_conv(model)
    scale = max(2, 36 // conv.weight.shape[-1])     # about 36 px a filter, whatever the kernel size
    parts.append(f"<h3>First-layer filters</h3><p><code>{esc(name)}</code>, each filter scaled to its "
                 "own range.</p>")
    parts.append(chart(image_uri(I.filter_grid(model, scale=scale), "PNG", max_side=720),
                       alt="first-layer filters"))
    rows = I.sparsity(model, [x])
    parts.append(f"<h3>Activation sparsity</h3><p>Share of activations that are non-zero (ReLU-like) "
                 f"or positive (smooth activations) per stage, over {len(kept)} images.</p>")
    parts.append(table(["stage", "active", "measure"],
                       [[esc(r["stage"]), pct(r["fraction"]), esc(r["measure"])] for r in rows], numeric={1}))
    parts.append(chart(figure_uri(sparsity_figure(rows)), alt="sparsity per stage"))
    return "\n".join(parts)


# ---------------------------------------------------------------- a sweep

def sweep_report(sweep_id: str, runs: list[Run] | None = None) -> str:
    """Results table, overlaid curves and one short section per run; `runs` defaults to the
    sweep's own (oldest first), and may be any list (the Experiments page's 'all runs')."""
    runs = runs if runs is not None else S.sweeps().get(sweep_id, [])
    frame = S.results(runs) if runs else pd.DataFrame()
    names = {r.id: r.config.name or r.id for r in runs}
    series = {names[r.id]: r.epochs() for r in runs if r.epochs()}
    bodies = {
        "summary": _sweep_summary(frame),
        "config": _shared_config(runs),
        "results": _results_table(frame) if not frame.empty else note("No runs."),
        "curves": chart(figure_uri(overlay_figure(series)), alt="validation curves of every run")
        if series else note("No finished epoch yet."),
        "runs": "\n".join(_sweep_run(i, r, names[r.id]) for i, r in enumerate(runs)) or note("No runs."),
    }
    sections = [(sid, SWEEP_SECTIONS[sid], body) for sid, body in bodies.items()]
    return page(f"Sweep {sweep_id}", f"{len(runs)} runs", sections)


def save_sweep_report(sweep_id: str, runs: list[Run] | None = None) -> Path:
    """Write the sweep's report below the lab's home (reports/) and return its path."""
    folder = paths.home() / "reports"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"sweep-{Path(sweep_id).name}.html"     # a name, never a path from outside
    paths.atomic_write_text(path, sweep_report(sweep_id, runs))
    return path


def _sweep_summary(frame: pd.DataFrame) -> str:
    if frame.empty:
        return note("This sweep has no runs.")
    states = Counter(frame["state"].fillna("?"))
    values = {"runs": str(len(frame)), **{state: str(n) for state, n in states.items()}}
    parts = [tiles(values)]
    for metric in ("test_acc", "best_val_acc"):
        scored = frame.dropna(subset=[metric]) if metric in frame else frame.iloc[:0]
        if not scored.empty:
            best = scored.loc[scored[metric].astype(float).idxmax()]
            parts.append(f"<p>Best {esc(metric.replace('_', ' '))}: <b>{pct(float(best[metric]))}</b> — "
                         f"{esc(best['name'])} (<code>{esc(best['run'])}</code>)</p>")
    return "\n".join(parts)


def _shared_config(runs: list[Run]) -> str:
    """The settings every run shares, and the ones the sweep varied."""
    configs = [r.read_json("config.json", {}) or {} for r in runs]
    if not configs:
        return note("No runs.")
    keys = [k for k in configs[0] if k not in ("name", "tags")]
    same = [k for k in keys if all(json.dumps(c.get(k)) == json.dumps(configs[0].get(k)) for c in configs)]
    varied = [k for k in keys if k not in same]
    rows = [[esc(k), setting(configs[0][k])] for k in same]
    return f"<p>Varied: <b>{esc(', '.join(varied) or 'nothing')}</b></p>" + table(["setting", "value"], rows)


def _results_table(frame: pd.DataFrame) -> str:
    def cell(col: str, value) -> str:
        if _missing(value):
            return "—"
        if isinstance(value, float):        # NaN-holding int columns (best_epoch) arrive as floats
            if col.endswith("acc"):
                return pct(value)
            return f"{value:g}" if col == "lr" or value.is_integer() else f"{value:.2f}"
        return esc(value)
    columns = list(frame.columns)
    rows = [[cell(c, row[c]) for c in columns] for row in frame.to_dict("records")]
    return table(columns, rows)


def _sweep_run(index: int, run: Run, name: str) -> str:
    status = run.status()
    metrics = run.read_json("test_metrics.json")
    values = {"state": status.get("state", "?"), "best val acc": pct(status.get("best_val_acc")),
              "test acc": pct(status.get("test_acc"))}
    if metrics:
        values.update({"mAP": pct(metrics.get("mAP")), "macro F1": pct(metrics["macro_f1"])})
    body = tiles(values) + f"<p><code>{esc(run.id)}</code> · {esc(status.get('message', ''))}</p>"
    if metrics:
        classes = metrics["classes"]
        fig = confusion_figure(metrics["confusion"], classes, side=min(6.0, 2 + 0.3 * len(classes)))
        body += chart(figure_uri(fig, dpi=80), "Test confusion matrix (rows: true class)",
                      alt="confusion matrix")
    return f'<article id="run-{index}"><h3>{esc(name)}</h3>{body}</article>'
