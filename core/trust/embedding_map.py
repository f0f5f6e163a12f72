"""The embedding map: every image as a point in 2-D, placed so that images the network sees as
alike land close together. For a trained run, two maps: the pretrained backbone's view ("before")
and the fine-tuned backbone's view ("after"), where classes that overlapped should come apart.

    from core.trust import embedding_map as M
    before, after = M.run_map_frames(run, "umap")            # pandas frames: x, y, path, class, …
    fig = M.map_figure(after, "After fine-tuning")          # matplotlib, for the HTML report

UMAP (umap-learn) gives the clearer picture; PCA is the fast fallback, and is used when umap-learn
is missing or there are too few images for UMAP's neighbourhoods to mean anything.
"""
from __future__ import annotations

import base64
import io
import random
import threading
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd

from core.data import DataError
from core.data import images as imaging
from core.hooks import eval_mode
from core.progress import Progress, part
from core.trust import embeddings

MAX_IMAGES = 2000           # a map of more points is slow to project and to send to a browser
MIN_UMAP = 30               # below this, UMAP's 15 neighbours span whole classes: use PCA
THUMB_PX = 64               # hover thumbnails, longest side
THUMB_BUDGET = 6_000_000    # bytes of thumbnail data per map at most (a page sends two maps)
PCA_DIMS = 50               # UMAP runs on the top principal components: same map, much faster
EXACT_BELOW = 4096          # umap-learn's own threshold for exact (all-pairs) neighbours
METHODS = {"umap": "UMAP", "pca": "PCA"}

# ---------------------------------------------------------------- projection

def project(vectors: np.ndarray, method: str = "umap", seed: int = 0) -> np.ndarray:
    """(N, 2) coordinates for (N, D) vectors; rows holding NaN (unreadable images) get NaN.
    UMAP falls back to PCA when umap-learn is missing or there are fewer than MIN_UMAP rows."""
    return _project(vectors, method, seed)[0]


def _project(vectors, method: str, seed: int) -> tuple[np.ndarray, str]:
    """(coordinates, the method actually used)."""
    vectors = np.asarray(vectors, dtype=np.float32)
    out = np.full((len(vectors), 2), np.nan, np.float32)
    if vectors.ndim != 2 or not len(vectors):
        return out, method
    good = np.isfinite(vectors).all(axis=1)
    x = vectors[good]
    if len(x) < 2:
        out[good] = 0.0
        return out, "pca"
    # Pooled features differ mostly in length (contrast, size of the object): compare directions.
    x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    umap = _umap_module() if method == "umap" and len(x) >= MIN_UMAP else None
    if umap is None:
        out[good] = _pca(x, 2, seed)
        return out, "pca"
    reduced = _pca(x, PCA_DIMS, seed) if x.shape[1] > PCA_DIMS else x
    options = dict(n_neighbors=min(15, len(x) - 1), n_epochs=200, random_state=seed, n_jobs=1)
    if len(x) < EXACT_BELOW:
        # umap-learn's small-data path calls its numba distance once per pair from Python (20 s
        # for 2,000 points); sklearn's vectorised distances give the same matrix in milliseconds.
        from sklearn.metrics import pairwise_distances
        reduced, options["metric"] = pairwise_distances(reduced), "precomputed"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")      # "n_jobs overridden by random_state": single thread is intended
        out[good] = umap.UMAP(**options).fit_transform(reduced)
    return out, "umap"


def _pca(x: np.ndarray, dims: int, seed: int) -> np.ndarray:
    from sklearn.decomposition import PCA
    k = min(dims, *x.shape)
    coords = PCA(k, random_state=seed).fit_transform(x).astype(np.float32)
    if k < dims:       # e.g. two images: one component only; the second axis is flat
        coords = np.pad(coords, ((0, 0), (0, dims - k)))
    return coords


def _umap_module():
    """umap-learn, imported on first use (it pulls in numba: seconds), or None when missing."""
    try:
        import umap
    except Exception:  # noqa: BLE001 - a broken install is as good as none: PCA still works
        return None
    return umap


_WARM = threading.Event()


def warm_up() -> None:
    """Import umap-learn and compile its numba code in a background thread, once per process, so
    the first real projection doesn't pay the 10-30 s compile. Called while images are embedded."""
    if _WARM.is_set():
        return
    _WARM.set()

    def work():
        fake = np.random.default_rng(0).random((120, PCA_DIMS + 10), dtype=np.float32)
        try:
            _project(fake, "umap", 0)
        except Exception:  # noqa: BLE001 - only a head start; the real call reports any problem
            pass

    threading.Thread(target=work, name="umap-warm-up", daemon=True).start()


# ---------------------------------------------------------------- frames

def _path_label(item) -> tuple[str, int]:
    """A folders.Item, or a (path, label) pair as splits.json stores them."""
    if hasattr(item, "path"):
        return item.path, int(item.label)
    return str(item[0]), int(item[1])


def _thumb(path: Path, size: int) -> str:
    try:
        img = imaging.open_rgb(path, size)
        img.thumbnail((size, size))
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=70)
    except Exception:  # noqa: BLE001 - an unreadable file just has no picture on hover
        return ""
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode()


def thumb_uris(root: str, rels: list[str], size: int = THUMB_PX, budget: int = THUMB_BUDGET) -> list[str]:
    """A small JPEG data URI per image, for hover tooltips; "" once `budget` bytes are used up
    (or beyond MAX_IMAGES images), so a huge data set can't make a page of tens of megabytes."""
    if len(rels) > MAX_IMAGES:
        return [""] * len(rels)
    with ThreadPoolExecutor(4) as pool:      # PIL decodes and encodes without holding the GIL
        uris = list(pool.map(lambda rel: _thumb(Path(root) / rel, size), rels))
    used = 0
    for i, uri in enumerate(uris):
        used += len(uri)
        if used > budget:
            uris[i] = ""
    return uris


def map_frame(root: str, items: list, classes: list[str], vectors: np.ndarray, method: str = "umap",
              predictions=None, flags=None, thumbs: list[str] | None = None, seed: int = 0) -> pd.DataFrame:
    """One row per item: x, y (NaN for an unreadable image), path, class, predicted ("" where
    unknown), misclassified, flag ("" where none) and thumb (a data URI for hover, or "").
    `predictions`: a frame with file/predicted columns (core.results.evaluate.load_predictions) or a
    {path: class} dict; `flags`: a {path: reason} dict or a list of paths. frame.attrs holds
    "method" (the projection actually used) and "root"."""
    pairs = [_path_label(it) for it in items]
    paths = [p for p, _ in pairs]
    coords, used = _project(vectors, method, seed)
    if isinstance(predictions, pd.DataFrame):
        predictions = dict(zip(predictions["file"], predictions["predicted"]))
    predictions = predictions or {}
    if flags is not None and not isinstance(flags, dict):
        flags = {p: "flagged" for p in flags}
    flags = flags or {}
    frame = pd.DataFrame({"x": coords[:, 0], "y": coords[:, 1], "path": paths,
                          "class": [classes[label] for _, label in pairs]})
    frame["predicted"] = [str(predictions.get(p, "")) for p in paths]
    frame["misclassified"] = (frame["predicted"] != "") & (frame["predicted"] != frame["class"])
    frame["flag"] = [str(flags.get(p, "") or "") for p in paths]
    frame["thumb"] = thumbs if thumbs is not None else thumb_uris(root, paths)
    frame.attrs.update(method=used, root=str(root))
    return frame


def sample(items: list, cap: int = MAX_IMAGES, seed: int = 0) -> list:
    """At most `cap` items, a seeded random choice kept in the original order."""
    if len(items) <= cap:
        return list(items)
    keep = sorted(random.Random(seed).sample(range(len(items)), cap))
    return [items[i] for i in keep]


def dataset_frame(root: str, items: list, classes: list[str], method: str = "umap", flags=None,
                  arch: str = embeddings.DEFAULT_ARCH, size: int = embeddings.DEFAULT_SIZE, seed: int = 0,
                  progress: Progress | None = None, stop: threading.Event | None = None) -> pd.DataFrame:
    """The map of a plain data set through the pretrained `arch` (embeddings cached on disk);
    at most MAX_IMAGES images, a seeded sample of bigger sets."""
    items = sample(list(items), MAX_IMAGES, seed)
    if method == "umap":
        warm_up()
    rels = [_path_label(it)[0] for it in items]
    vectors = embeddings.embed_items(root, rels, arch=arch, size=size, stop=stop, progress=part(
        progress, 0.0, 0.8, "Embedding images with the pretrained backbone"))
    return _finish(root, items, classes, vectors, method, None, flags, None, seed, progress, 0.8)


def _finish(root, items, classes, vectors, method, predictions, flags, thumbs, seed, progress, start):
    if progress:
        progress(round(100 * start), 100, f"Projecting ({METHODS.get(method, method)})…")
    return map_frame(root, items, classes, vectors, method, predictions, flags, thumbs, seed)


# ---------------------------------------------------------------- a trained run: before / after

def run_items(run, cap: int = MAX_IMAGES, seed: int = 0) -> tuple[str, list[tuple[str, int]], list[str]]:
    """(data root, [(path, label)], [stage]) of the run's splits: test images first (their
    predictions mark the mistakes), then validation, then training, up to `cap` images."""
    splits = run.read_json("splits.json", {}) or {}
    items, stages = [], []
    for stage in ("test", "val", "train"):
        own = [tuple(pair) for pair in splits.get(stage, [])]
        own = sample(own, max(cap - len(items), 0), seed)
        items += own
        stages += [stage] * len(own)
    return splits.get("root", ""), items, stages


def before_model(run):
    """(backbone or None, what it is, a sentence for the map). None: the pretrained backbone of
    the run's weights source, whose embeddings are cached on disk."""
    from core import rng
    from core.models.backbones import create_backbone
    cfg = run.config
    weights = "random" if cfg.freeze == "scratch" else cfg.weights
    if weights == "random":
        with rng.Stream(cfg.seed).active():        # the same draw as the run's own initial weights
            model = create_backbone(cfg.arch, "random", num_classes=0)
        return model, "untrained backbone", (
            f"This run was trained from random weights: 'before' is {cfg.arch} as it started, "
            "untrained, so expect little class structure there.")
    if weights == "file":
        return (create_backbone(cfg.arch, "file", cfg.weights_file, num_classes=0), "pretrained backbone",
                f"Before: {cfg.arch} with the weights file the run started from.")
    if weights == "auto":
        from core.models.backbones import default_weights
        weights = default_weights(cfg.arch)
    return None, "pretrained backbone", f"Before: {cfg.arch} pretrained ({weights} weights), not yet fine-tuned."


def run_map_frames(run, method: str = "umap", progress: Progress | None = None,
                   stop: threading.Event | None = None, seed: int = 0) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(before, after) maps of the run's images (at most MAX_IMAGES; test first): "before" from
    the backbone the run started from, "after" from its best checkpoint. Test images are marked
    misclassified from the run's stored test predictions (computed here once if missing); every
    row has its stage (train/val/test). frame.attrs: "title", "note", "method"."""
    from core.models.backbones import load_run_model, run_normalization
    cfg = run.config
    if cfg.baseline:
        raise ValueError("A baseline without a network has no embeddings to map.")
    root, items, stages = run_items(run, MAX_IMAGES, seed)
    if not items:
        raise ValueError("The run lists no images (its splits.json is missing or empty).")
    if not Path(root).is_dir():
        raise DataError(f"The run's data set at {root} was moved or deleted.")
    if method == "umap":
        warm_up()
    predictions = _test_predictions(run, progress)
    rels = [path for path, _ in items]
    backbone, what, before_note = before_model(run)
    tick = part(progress, 0.1, 0.45, f"Embedding images with the {what}")
    if backbone is None:
        before = embeddings.embed_items(root, rels, arch=cfg.arch, weights=cfg.weights, size=cfg.image_size,
                                progress=tick, stop=stop)
    else:
        before = embeddings.embed_items(root, rels, model=backbone, size=cfg.image_size, progress=tick, stop=stop)
    model = load_run_model(run)
    mean, std = run_normalization(run, model)
    tick = part(progress, 0.45, 0.8, "Embedding images with the fine-tuned model")
    after = embeddings.embed_items(root, rels, model=model, mean=mean, std=std, size=cfg.image_size,
                           progress=tick, stop=stop)
    after_note = "After: the backbone of the run's best checkpoint."
    if backbone is None:
        try:
            backbone = embeddings.pretrained(cfg.arch, cfg.weights)[0]
        except Exception:  # noqa: BLE001 - weights gone since: the cached "before" still stands
            backbone = None
    if backbone is not None and same_weights(backbone, model.backbone):
        # A frozen backbone gives the very same features after training: what changed is the head.
        after = head_scores(model, after)
        after_note = ("The backbone stayed frozen in this run, so its features are the same as before: "
                      "'after' maps the fine-tuned head's class scores instead.")
    if progress:
        progress(80, 100, "Making hover thumbnails…")
    thumbs = thumb_uris(root, rels)
    frames = []
    for vectors, title, note, start in ((before, "Before fine-tuning", before_note, 0.85),
                                        (after, "After fine-tuning", after_note, 0.92)):
        frame = _finish(root, items, run.classes, vectors, method, predictions, None, thumbs, seed, progress, start)
        frame["stage"] = stages
        frame.attrs.update(title=title, note=note)
        frames.append(frame)
    if progress:
        progress(100, 100, "Done")
    return frames[0], frames[1]


def same_weights(a, b) -> bool:
    """Whether two backbones hold identical parameters and buffers (e.g. a frozen backbone
    before and after training its head)."""
    import torch
    sa, sb = a.state_dict(), b.state_dict()
    if sa.keys() != sb.keys():
        return False
    return all(sa[k].shape == sb[k].shape and torch.equal(sa[k].cpu(), sb[k].cpu()) for k in sa
               if not k.endswith("num_batches_tracked"))


def head_scores(model, features: np.ndarray) -> np.ndarray:
    """The head's output (class scores) for backbone features; NaN rows stay NaN."""
    import torch
    head = getattr(model, "head", None)
    if head is None:
        return features
    with eval_mode(head), torch.inference_mode():
        param = next(head.parameters(), None)
        x = torch.from_numpy(np.ascontiguousarray(features))
        if param is not None:
            x = x.to(param.device, param.dtype)
        return head(x).float().cpu().numpy()


def _test_predictions(run, progress: Progress | None) -> pd.DataFrame | None:
    """The run's stored test predictions, computed once if missing (None without a test split)."""
    from core.results import evaluate as evaluation
    frame = evaluation.load_predictions(run, "test")
    if frame is not None or not (run.read_json("splits.json", {}) or {}).get("test"):
        return frame
    tick = part(progress, 0.0, 0.1, "Predicting the test images")
    try:
        evaluation.evaluate_run(run, "test", progress=tick)
    except (ValueError, FileNotFoundError):
        return None
    return evaluation.load_predictions(run, "test")


# ---------------------------------------------------------------- a picture for the report

def _plain(text: str) -> str:
    """A label matplotlib won't read as mathtext ('$5 & $6')."""
    return str(text).replace("$", r"\$")


def map_figure(frame: pd.DataFrame, title: str = ""):
    """The map as a matplotlib Figure (no pyplot: safe in threads): points coloured by class,
    misclassified images as crosses, flagged images ringed."""
    from matplotlib.figure import Figure
    fig = Figure(figsize=(6.4, 5.2))
    ax = fig.add_subplot()
    shown = frame.dropna(subset=["x", "y"])
    classes = list(dict.fromkeys(sorted(frame["class"].astype(str))))
    cmap = _class_colours(len(classes))
    for i, cls in enumerate(classes):
        own = shown[shown["class"] == cls]
        ok, wrong = own[~own["misclassified"]], own[own["misclassified"]]
        ax.scatter(ok["x"], ok["y"], s=12, color=cmap[i], alpha=0.75, linewidths=0, label=_plain(cls))
        if len(wrong):
            ax.scatter(wrong["x"], wrong["y"], s=40, color=cmap[i], marker="x", linewidths=1.5)
    flagged = shown[shown["flag"] != ""]
    if len(flagged):
        ax.scatter(flagged["x"], flagged["y"], s=90, facecolors="none", edgecolors="black", linewidths=1.2)
    if shown["misclassified"].any():
        ax.scatter([], [], marker="x", s=40, color="black", label="misclassified")
    if len(flagged):
        ax.scatter([], [], s=60, facecolors="none", edgecolors="black", label="flagged")
    if len(classes) <= 20:
        ax.legend(loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=8, frameon=False, markerscale=1.5)
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_title(_plain(title or frame.attrs.get("title", "")))
    method = METHODS.get(frame.attrs.get("method", ""), "")
    if method:
        ax.set_xlabel(f"{method} of the image embeddings (axes have no units)", fontsize=8)
    fig.tight_layout()
    return fig


def _class_colours(n: int) -> list:
    from matplotlib import colormaps
    cmap = colormaps["tab10" if n <= 10 else "tab20"]
    return [cmap(i % cmap.N) for i in range(n)]


# ---------------------------------------------------------------- kept with the run, for its report

MAP_COLUMNS = ["x", "y", "path", "class", "predicted", "misclassified", "flag"]


def save_run_maps(run, frames) -> None:
    """The before/after frames (without thumbnails) in the run folder, so the HTML report can
    draw them; written atomically, each with its title and note."""
    import json

    from core import paths
    folder = run.file("maps")
    folder.mkdir(exist_ok=True)
    for name, frame in zip(("before", "after"), frames):
        keep = frame[[c for c in MAP_COLUMNS if c in frame]]
        paths.atomic_write_text(folder / f"{name}.csv", keep.to_csv(index=False))
        paths.atomic_write_text(folder / f"{name}.json", json.dumps({k: str(v) for k, v in frame.attrs.items()}))


def load_run_maps(run) -> list[pd.DataFrame] | None:
    """The frames save_run_maps kept, or None."""
    import json
    frames = []
    for name in ("before", "after"):
        try:
            frame = pd.read_csv(run.file(f"maps/{name}.csv"), keep_default_na=False, dtype=str)
            frame["x"], frame["y"] = (pd.to_numeric(frame[c], errors="coerce") for c in ("x", "y"))
            frame["misclassified"] = frame["misclassified"] == "True"
            frame.attrs.update(json.loads(run.file(f"maps/{name}.json").read_text()))
        except (OSError, ValueError):
            return None
        frames.append(frame)
    return frames
