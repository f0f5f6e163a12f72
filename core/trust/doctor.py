"""The dataset doctor: one audit of a folder of labelled images, from the pretrained backbone's
embeddings (core.trust.embeddings, cached on disk).

- likely label errors: out-of-sample class probabilities from k-fold cross-validation of a
  logistic regression on the embeddings, ranked by cleanlab's confident learning;
- near-duplicates (embedding cosine) and exact copies (file hashes), noting pairs that a split
  would put in different splits;
- outliers (far from every other image: cleanlab's k-nearest-neighbour out-of-distribution score);
- image properties (very dark or bright, blurry, tiny, extreme aspect ratio) compared with the
  rest of the data set;
- class balance, and one verdict line per problem.

    from core.trust import doctor
    audit = doctor.audit("my_data")
    audit.findings            # a DataFrame: path, issue, label, suggested, score, detail
    doctor.write_fixed_copy(audit, "my_data_fixed", exclude=[...], move={path: "cat"})

The user's folder is never changed: fixes are written as a new copy (hard links where possible).
"""
from __future__ import annotations

import json
import os
import shutil
import threading
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image
import pandas as pd

from core.data import folders
from core.data import images as imaging
from core.data import splits as splitting
from core.trust import embeddings
from core.models.backbones import DEFAULT_ARCH
from core.progress import Progress, check_cancel, part, silent

ISSUES = {   # issue -> what it means, in a few words (the page's gallery titles and the CSV)
    "label": "labelled as one class, looks like another",
    "exact duplicate": "byte-identical file",
    "near duplicate": "almost the same picture",
    "outlier": "unlike every other image",
    "dark": "very dark",
    "bright": "very bright (washed out)",
    "blurry": "much blurrier than the rest",
    "tiny": "much smaller than the rest",
    "aspect": "extreme aspect ratio",
}
NEAR_DUPLICATE_COSINE = 0.97     # L2-normalised pooled features; re-encoded or re-framed copies score above
NEAR_TOP_K = 10                 # near-duplicates kept per image (a group still links up through them)
NEAR_FACTOR = 0.2                # ...and a fifth of the data set's median nearest-neighbour distance
OUTLIER_MADS = 5.0               # a neighbour distance this many robust deviations above the median
DARK, BRIGHT = 0.08, 0.94        # mean intensity in [0, 1]...
RELATIVE = 0.25                  # ...and a quarter of the data set's median (from black or white)
BLUR_FACTOR = 0.1                # Laplacian variance under a tenth of the data set's median
TINY_FACTOR, TINY_PX = 0.25, 16  # short side under a quarter of the median, or under 16 px
ASPECT = 4.0                     # long side over short side
PROPERTY_SIDE = 64               # properties are measured on a 64 px decode
PCA_DIMS = 64                    # the label-error classifier's inputs
REGULARISATION = (0.01, 0.1, 1.0, 10.0)   # logistic regression C values tried; the best log-loss wins


@dataclass
class Audit:
    root: str
    classes: list[str]
    items: list[folders.Item]
    findings: pd.DataFrame                       # path, issue, label, suggested, score, detail
    groups: list[list[str]]                      # near or exact duplicates (relative paths)
    split_of: dict[str, str]                     # where the app's default split puts each image
    counts: dict[str, int]
    verdicts: list[str] = field(default_factory=list)
    vectors: np.ndarray | None = None            # the embeddings, for the embedding map
    pred_probs: np.ndarray | None = None         # out-of-sample probabilities per image
    seconds: dict[str, float] = field(default_factory=dict)

    def of(self, issue: str) -> pd.DataFrame:
        return self.findings[self.findings["issue"] == issue]

    def to_json(self) -> dict:
        return {"root": self.root, "classes": self.classes, "counts": self.counts,
                "verdicts": self.verdicts, "groups": self.groups,
                "findings": self.findings.to_dict(orient="records"),
                "items": [[it.path, it.label, it.split] for it in self.items], "split_of": self.split_of}

    @classmethod
    def from_json(cls, data: dict) -> "Audit":
        """The audit a worker process saved (no embeddings: the map reads the disk cache)."""
        findings = pd.DataFrame(data["findings"], columns=["path", "issue", "label", "suggested", "score", "detail"])
        items = [folders.Item(path, int(label), split) for path, label, split in data.get("items", [])]
        return cls(data["root"], list(data["classes"]), items, findings, [list(g) for g in data["groups"]],
                   dict(data.get("split_of", {})), dict(data["counts"]), list(data["verdicts"]))


def audit(folder: str | os.PathLike, arch: str = DEFAULT_ARCH, weights: str = "auto",
          size: int = embeddings.DEFAULT_SIZE, folds: int = 5, split=(0.7, 0.15, 0.15), split_seed: int = 0,
          progress: Progress | None = None,
          stop: threading.Event | None = None) -> Audit:
    """Audit the data set at `folder`. `progress(done, total, message)` names each step; setting
    `stop` raises core.progress.Cancelled between batches."""
    import time
    say = progress or silent
    scan = folders.scan_folder(folder)
    seconds = {}
    start = time.perf_counter()
    vectors = embeddings.embed_items(scan.root, scan.items, arch, weights, size, stop=stop,
                             progress=part(say, 0.0, 0.6, "Embedding images"))
    seconds["embeddings"] = time.perf_counter() - start
    labels = np.array([it.label for it in scan.items])
    ok = ~np.isnan(vectors).any(axis=1)
    rows: list[dict] = []
    say(62, 100, "Looking for label errors (cross-validation, cleanlab)…")
    probs = out_of_sample_probs(vectors, labels, ok, folds)
    rows += label_issues(scan, labels, probs, ok)
    say(75, 100, "Looking for duplicates and outliers…")
    groups, dup_rows = duplicates(scan, vectors, ok)
    rows += dup_rows
    rows += outliers(scan, vectors, ok)
    say(80, 100, "Measuring brightness, sharpness and size…")
    rows += property_issues(scan, stop=stop, progress=part(say, 0.8, 1.0, "Measuring image properties"))
    seconds["total"] = time.perf_counter() - start
    splits = splitting.split_items(scan, split, split_seed)
    split_of = {it.path: name for name, items in splits.items() for it in items}
    findings = pd.DataFrame(rows, columns=["path", "issue", "label", "suggested", "score", "detail"])
    result = Audit(scan.root, scan.classes, scan.items, findings, groups, split_of, scan.counts(),
                   vectors=vectors, pred_probs=probs, seconds=seconds)
    result.verdicts = verdicts(result)
    save(result)
    say(100, 100, "Done")
    return result


# ---------------------------------------------------------------- label errors

def out_of_sample_probs(vectors: np.ndarray, labels: np.ndarray, ok: np.ndarray, folds: int = 5) -> np.ndarray:
    """Class probabilities for each image from a logistic regression that never saw it (k-fold
    cross-validation on the embeddings, compressed to PCA_DIMS dimensions). The
    regularisation is the one of REGULARISATION with the best cross-validated log-loss on this data
    set, so no data set's constant is baked in. Images of classes too small for two folds, and
    unreadable ones, get NaN."""
    from sklearn.decomposition import PCA
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold, cross_val_predict
    from threadpoolctl import threadpool_limits
    n_classes = int(labels.max()) + 1 if len(labels) else 0
    probs = np.full((len(labels), n_classes), np.nan)
    counts = Counter(labels[ok].tolist())
    usable = ok & np.array([counts[label] >= 2 for label in labels])
    present = sorted({int(label) for label in labels[usable]})
    if len(present) < 2:
        return probs
    k = max(2, min(folds, min(counts[c] for c in present)))
    x = _normalised(vectors[usable])
    dims = max(1, min(PCA_DIMS, x.shape[0] - 1, x.shape[1]))
    z = PCA(dims, random_state=0).fit_transform(x)
    z /= z.std() or 1.0         # one scale for all: per-component scaling would blow up the noise directions
    y = labels[usable]
    cv = StratifiedKFold(n_splits=k, shuffle=True, random_state=0)
    best, best_loss = None, np.inf
    # One BLAS thread: small problems, and on a busy 2-core machine many threads were 50x slower.
    with threadpool_limits(1):
        for c in REGULARISATION:
            found = cross_val_predict(LogisticRegression(max_iter=300, C=c, tol=1e-3), z, y, cv=cv,
                                      method="predict_proba")
            loss = -np.log(found[np.arange(len(y)), np.searchsorted(present, y)] + 1e-12).mean()
            if loss < best_loss:
                best, best_loss = found, loss
    full = np.zeros((len(best), n_classes))
    full[:, present] = best
    probs[usable] = full
    return probs


def label_issues(scan: folders.DataScan, labels: np.ndarray, probs: np.ndarray, ok: np.ndarray) -> list[dict]:
    """cleanlab's ranking of likely label errors (self-confidence order)."""
    from cleanlab.filter import find_label_issues
    usable = ~np.isnan(probs).any(axis=1)
    if usable.sum() < 2 or len(set(labels[usable].tolist())) < 2:
        return []
    present = sorted(set(labels[usable].tolist()))
    remap = {c: i for i, c in enumerate(present)}
    sub_probs = probs[usable][:, present]
    sub_probs = sub_probs / sub_probs.sum(axis=1, keepdims=True)
    sub_labels = np.array([remap[c] for c in labels[usable]])
    # n_jobs=1: cleanlab would fork a process pool, and a fork of a process with threads (the
    # task worker's stop watcher, torch's pool) can deadlock the child: the audit then never ends
    ranked = find_label_issues(sub_labels, sub_probs, return_indices_ranked_by="self_confidence", n_jobs=1)
    index = np.flatnonzero(usable)
    rows = []
    for i in ranked:
        item = scan.items[index[i]]
        suggested = present[int(sub_probs[i].argmax())]
        rows.append(dict(path=item.path, issue="label", label=scan.classes[item.label],
                         suggested=scan.classes[suggested], score=round(float(sub_probs[i].max()), 3),
                         detail=f"given label's probability {sub_probs[i][sub_labels[i]]:.0%}"))
    return rows


# ---------------------------------------------------------------- duplicates and outliers

def _normalised(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def near_pairs(vectors: np.ndarray, ok: np.ndarray, threshold: float = NEAR_DUPLICATE_COSINE,
               chunk: int = 1024, top_k: int = NEAR_TOP_K) -> list[tuple[int, int, float]]:
    """(i, j, cosine) for i < j that are near-duplicates: cosine above `threshold`, and also far
    closer than images of this data set usually are to their nearest neighbour (NEAR_FACTOR of
    the median distance), so a set of look-alike pictures isn't one big group. In blocks of rows,
    keeping each image's `top_k` most similar others only: memory grows with the number of
    images, not with the number of look-alike pairs (20,000 blank scans would be 200 million)."""
    index = np.flatnonzero(ok)
    x = _normalised(vectors[index]).astype(np.float32)
    n = len(x)
    k = min(top_k, n - 1)
    nearest = np.ones(n, np.float32)
    rows_i, rows_j, cosines = [], [], []
    for start in range(0, n, chunk):
        sims = x[start:start + chunk] @ x.T
        own = np.arange(len(sims))
        sims[own, start + own] = -1.0       # not itself
        nearest[start:start + len(sims)] = 1.0 - sims.max(axis=1)
        if k < 1:
            continue
        top = np.argpartition(-sims, k - 1, axis=1)[:, :k]
        values = np.take_along_axis(sims, top, axis=1)
        keep = values >= threshold
        rows_i.append(np.broadcast_to((start + own)[:, None], top.shape)[keep].astype(np.int64))
        rows_j.append(top[keep].astype(np.int64))
        cosines.append(values[keep])
    if not rows_i or not sum(len(r) for r in rows_i):
        return []
    i, j, cos = np.concatenate(rows_i), np.concatenate(rows_j), np.concatenate(cosines)
    low, high = np.minimum(i, j), np.maximum(i, j)
    _, first = np.unique(low * n + high, return_index=True)      # (a, b) and (b, a) once
    limit = max(1.0 - threshold, 0.0) if n < 3 else min(1.0 - threshold, NEAR_FACTOR * float(np.median(nearest)))
    return [(int(index[low[f]]), int(index[high[f]]), float(cos[f])) for f in first
            if 1.0 - cos[f] <= limit + 1e-6]


def _grouped(n: int, pairs) -> list[list[int]]:
    parent = list(range(n))

    def find(i):
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i
    for i, j, *_ in pairs:
        parent[find(i)] = find(j)
    groups: dict[int, list[int]] = {}
    for i in {k for pair in pairs for k in pair[:2]}:
        groups.setdefault(find(i), []).append(i)
    return [sorted(g) for g in groups.values() if len(g) > 1]


def duplicates(scan: folders.DataScan, vectors: np.ndarray, ok: np.ndarray) -> tuple[list[list[str]], list[dict]]:
    """Groups of exact copies (file hash) and near-duplicates (cosine), and one finding per image
    in a group."""
    position = {it.path: i for i, it in enumerate(scan.items)}
    exact = [[position[p] for p in group] for group in splitting.identical_files(scan.root, list(position))]
    exact_set = {i for group in exact for i in group}
    near = near_pairs(vectors, ok)
    best = {}
    for i, j, cos in near:
        best[i], best[j] = max(best.get(i, 0), cos), max(best.get(j, 0), cos)
    groups = _grouped(len(scan.items), [(g[0], k) for g in exact for k in g[1:]] + near)
    rows = []
    for group in groups:
        names = [scan.items[i].path for i in group]
        for i in group:
            item = scan.items[i]
            kind = "exact duplicate" if i in exact_set else "near duplicate"
            others = ", ".join([n for n in names[:11] if n != item.path][:10])[:200]
            others += f" and {len(names) - 11} more" if len(names) > 11 else ""
            rows.append(dict(path=item.path, issue=kind, label=scan.classes[item.label], suggested="",
                             score=1.0 if kind == "exact duplicate" else round(best.get(i, 1.0), 3),
                             detail=f"same as {others}"))
    return [[scan.items[i].path for i in g] for g in groups], rows


def outliers(scan: folders.DataScan, vectors: np.ndarray, ok: np.ndarray, k: int = 10) -> list[dict]:
    """Images far from all others: cleanlab's out-of-distribution score from the k nearest
    neighbours in embedding space, flagged when the neighbour distance is OUTLIER_MADS robust
    deviations above the median."""
    from cleanlab.outlier import OutOfDistribution
    index = np.flatnonzero(ok)
    if len(index) <= k + 1:
        return []
    scores = OutOfDistribution(params={"k": k}).fit_score(features=_normalised(vectors[index]), verbose=False)
    distance = -np.log(np.maximum(scores, 1e-12))      # the mean neighbour distance behind the score
    median = np.median(distance)
    mad = np.median(np.abs(distance - median)) * 1.4826 or 1e-12
    rows = []
    for n in np.flatnonzero(distance > median + OUTLIER_MADS * mad):
        item = scan.items[index[n]]
        rows.append(dict(path=item.path, issue="outlier", label=scan.classes[item.label], suggested="",
                         score=round(float(scores[n]), 3),
                         detail=f"{(distance[n] - median) / mad:.0f} deviations further from its neighbours than usual"))
    return sorted(rows, key=lambda r: r["score"])


# ---------------------------------------------------------------- image properties

def measure(path: Path) -> dict:
    """Full size, mean intensity and sharpness (variance of the Laplacian) of one image."""
    from scipy.ndimage import laplace
    with Image.open(path) as img:
        full = img.size
    small = imaging.open_rgb(path, PROPERTY_SIDE).convert("L")
    gray = np.asarray(small, np.float32) / 255.0
    return {"w": full[0], "h": full[1], "mean": float(gray.mean()), "sharp": float(laplace(gray).var())}


def property_issues(scan: folders.DataScan, stop=None, progress=None) -> list[dict]:
    from concurrent.futures import ThreadPoolExecutor
    root = Path(scan.root)

    def one(item):
        try:
            return measure(root / item.path)
        except Exception:  # noqa: BLE001 - unreadable files are the scan's business, not this one's
            return None
    stats = []
    with ThreadPoolExecutor(max_workers=min(4, os.cpu_count() or 1)) as pool:
        for n, value in enumerate(pool.map(one, scan.items), 1):
            stats.append(value)
            check_cancel(stop)
            if progress and (n % 64 == 0 or n == len(scan.items)):
                progress(n, len(scan.items), f"Measuring image properties {n}/{len(scan.items)}")
    known = [s for s in stats if s]
    if not known:
        return []
    short = np.median([min(s["w"], s["h"]) for s in known])
    sharp = np.median([s["sharp"] for s in known])
    light = np.median([s["mean"] for s in known])
    # Dark or bright only against the rest: white-background product shots are all bright.
    dark, bright = min(DARK, RELATIVE * light), max(BRIGHT, 1 - RELATIVE * (1 - light))
    rows = []
    for item, s in zip(scan.items, stats):
        if s is None:
            continue
        side, ratio = min(s["w"], s["h"]), max(s["w"], s["h"]) / max(1, min(s["w"], s["h"]))
        checks = [("dark", s["mean"] < dark, 1 - s["mean"], f"mean brightness {s['mean']:.0%}"),
                  ("bright", s["mean"] > bright, s["mean"], f"mean brightness {s['mean']:.0%}"),
                  ("blurry", sharp > 0 and s["sharp"] < BLUR_FACTOR * sharp, 1 - s["sharp"] / sharp,
                   f"sharpness {s['sharp'] / sharp:.0%} of the data set's median"),
                  ("tiny", side < TINY_PX or side < TINY_FACTOR * short, 1 - side / short,
                   f"{s['w']}×{s['h']} px (median short side {short:.0f} px)"),
                  ("aspect", ratio > ASPECT, ratio, f"{s['w']}×{s['h']} px, {ratio:.1f}:1")]
        for issue, flagged, score, detail in checks:
            if flagged:
                rows.append(dict(path=item.path, issue=issue, label=scan.classes[item.label], suggested="",
                                 score=round(float(score), 3), detail=detail))
    return rows


# ---------------------------------------------------------------- verdicts

def verdicts(result: Audit) -> list[str]:
    """One line per problem found: how many images, and what to do."""
    out = []
    n = len(result.items)
    if sum(1 for c in result.counts.values() if c) < 2:
        out.append("Can't train: a classifier needs at least two classes (one folder of images per "
                   "class), and this data set has one.")
    labels = result.of("label")
    if len(labels):
        out.append(f"{len(labels)} image(s) ({len(labels) / n:.1%}) look mislabelled: check each one below, "
                   "then exclude it or move it to the suggested class.")
    crossing = [g for g in result.groups if len({result.split_of.get(p) for p in g}) > 1]
    if result.groups:
        line = f"{len(result.groups)} group(s) of duplicate or near-identical images"
        if crossing:
            line += (f"; {len(crossing)} of them would be split across train, validation and test, which "
                     "makes the test score look better than it is: keep each group in one split")
        out.append(line + ".")
    for issue in ("outlier", "dark", "bright", "blurry", "tiny", "aspect"):
        found = result.of(issue)
        if len(found):
            out.append(f"{len(found)} image(s) {ISSUES[issue]}: look at them; exclude those that "
                       "don't belong in the data set.")
    sizes = [c for c in result.counts.values() if c]
    if sizes and max(sizes) >= 3 * min(sizes):
        big = max(result.counts, key=result.counts.get)
        small = min(result.counts, key=lambda c: result.counts[c] or float("inf"))
        out.append(f"The classes are unbalanced: '{big}' has {result.counts[big]} images, '{small}' only "
                   f"{result.counts[small]}. Add images to the small classes or use the class-weighted loss.")
    few = [c for c, k in result.counts.items() if k < 10]
    if few:
        out.append(f"{len(few)} class(es) have fewer than 10 images ({', '.join(few[:5])}): results for them "
                   "will be noisy.")
    return out or ["No problems found: the labels agree with what the images look like, and there are no "
                   "duplicates, outliers or odd images."]


# ---------------------------------------------------------------- fixes: a new copy, never the original

def write_fixed_copy(result: Audit, dest: str | os.PathLike, exclude=(), move: dict | None = None,
                     together: list[list[str]] | None = None) -> Path:
    """Copy the audited data set to `dest` (hard links where the file system allows) without the
    `exclude`d images, with `move` = {path: class name} relabelled, and `together` groups kept in
    one split (a hidden folders.SAME_SPLIT_FILE). The original folder is not touched. Returns `dest`."""
    dest, root, move = Path(dest), Path(result.root), dict(move or {})
    if dest.exists():
        raise FileExistsError(f"{dest} already exists.")
    skip = set(exclude)
    placed: dict[str, str] = {}
    tmp = dest.with_name(dest.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        for item in result.items:
            if item.path in skip:
                continue
            cls = move.get(item.path, result.classes[item.label])
            parts = Path(item.path).parts
            split_dir = [parts[0]] if item.split else []       # pre-split folders keep their split
            target = tmp.joinpath(*split_dir, cls, parts[-1])
            target = _free_name(target)
            target.parent.mkdir(parents=True, exist_ok=True)
            _link_or_copy(root / item.path, target)
            placed[item.path] = str(target.relative_to(tmp))
        groups = [[placed[p] for p in g if p in placed] for g in (together or [])]
        groups = [g for g in groups if len(g) > 1]
        if groups:
            (tmp / folders.SAME_SPLIT_FILE).write_text(json.dumps(groups, indent=1))
        (tmp / ".doctor.json").write_text(json.dumps(
            {"from": str(root), "excluded": sorted(skip), "moved": move, "kept_together": len(groups)}, indent=1))
        tmp.rename(dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dest


def _free_name(target: Path) -> Path:
    n = 1
    out = target
    while out.exists():
        out = target.with_name(f"{target.stem}-{n}{target.suffix}")
        n += 1
    return out


def _link_or_copy(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def findings_csv(result: Audit) -> str:
    from core.tables import to_csv
    return to_csv(result.findings)


# ---------------------------------------------------------------- the last audit of a folder, kept on disk

def saved_path(root: str | os.PathLike) -> Path:
    import hashlib

    from core import paths
    name = hashlib.sha1(str(Path(root).resolve()).encode()).hexdigest()[:20]
    return paths.cache_dir(root, "doctor") / f"{name}.json"


def save(result: Audit) -> Path:
    """Keep the audit's findings (not the embeddings) for the page after a restart and the report."""
    from core import paths
    path = saved_path(result.root)
    path.parent.mkdir(parents=True, exist_ok=True)
    paths.atomic_write_text(path, json.dumps(result.to_json()))
    return path


def saved(root: str | os.PathLike) -> dict | None:
    """The last audit of the data set at `root` (to_json's dict), or None."""
    try:
        return json.loads(saved_path(root).read_text())
    except (OSError, ValueError):
        return None


def fixed_from(root: str | os.PathLike) -> dict | None:
    """For a copy written by write_fixed_copy: where it came from and what was changed."""
    try:
        return json.loads((Path(root) / ".doctor.json").read_text())
    except (OSError, ValueError):
        return None


# ---------------------------------------------------------------- what the Doctor page shows and fixes

PROPERTY_ISSUES = ("outlier", "dark", "bright", "blurry", "tiny", "aspect")   # the "odd images" tab, in order
DUPLICATE_ISSUES = ("exact duplicate", "near duplicate")


def findings_of(result: Audit, issues: tuple[str, ...]) -> pd.DataFrame:
    """The findings whose issue is one of `issues`."""
    return result.findings[result.findings["issue"].isin(list(issues))]


def crossing_groups(result: Audit) -> list[list[str]]:
    """Duplicate groups the audit's split puts in more than one split: the model would be tested
    on pictures it trained on."""
    return [g for g in result.groups if len({result.split_of.get(p) for p in g}) > 1]


def group_kinds(result: Audit, group: list[str]) -> set[str]:
    """Which duplicate issues ("exact duplicate", "near duplicate") link the images of `group`."""
    dups = findings_of(result, DUPLICATE_ISSUES)
    return set(dups[dups["path"].isin(group)]["issue"])


@dataclass
class Fixes:
    """The fixes chosen for the next version (or fixed copy): images to leave out, images to move to another
    class ({path: class}), and whether duplicate groups stay in one split. An image is either
    left out or moved, never both."""
    exclude: set[str] = field(default_factory=set)
    move: dict[str, str] = field(default_factory=dict)
    together: bool = False

    def toggle_exclude(self, path: str) -> None:
        """Leave `path` out, or (a second time) keep it again; either way it is not moved."""
        self.exclude.symmetric_difference_update({path})
        self.move.pop(path, None)

    def toggle_move(self, path: str, to: str) -> None:
        """Move `path` to class `to`, or (a second time) take the move back."""
        if path in self.move:
            self.move.pop(path)
        else:
            self.move[path] = to
            self.exclude.discard(path)

    def move_all(self, moves: dict[str, str]) -> None:
        self.move.update(moves)
        self.exclude.difference_update(moves)

    def exclude_all(self, paths) -> None:
        paths = list(paths)
        self.exclude.update(paths)
        for path in paths:
            self.move.pop(path, None)

    def groups(self, result: Audit) -> list[list[str]]:
        """The duplicate groups to keep in one split: all of the audit's, or none."""
        return result.groups if self.together else []

    def any(self, result: Audit) -> bool:
        """Whether the fixes would change the data set."""
        return bool(self.exclude or self.move or self.groups(result))
