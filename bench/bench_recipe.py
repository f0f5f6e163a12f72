"""Does the time-budget recipe pick a good backbone and image size? Mean and spread over split seeds.

    python bench/bench_recipe.py                                  # every shared set, 3 seeds, 300 s
    python bench/bench_recipe.py --data hymenoptera --budget 60 --seeds 0 1 2
    python bench/bench_recipe.py --backbones mobilenetv2_100 squeezenet1_1
    python bench/bench_recipe.py --no-recipe --backbones tf_efficientnet_lite2   # pinned runs only

For each data set and split seed (the only thing that changes between seeds), in a fresh process
each: the "Best accuracy in 5 minutes" preset as shipped (MobileNetV2 at 160 px; with
pick_backbone on in the preset, it probes and picks the backbone and size), then the same preset
pinned to each other offline backbone (at the preset's image size). Prints one row per run and a
summary (mean ± standard deviation of test accuracy, seconds, share of the budget used), and
writes bench/recipe.json. Run it on a quiet machine: the budget is wall-clock time.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from core.models.backbones import CATALOG, default_weights
from core.training.choose import OFFLINE

SHARED = ROOT.parent / "shared" / "datasets"
PRESET = ROOT / "assets" / "presets" / "lab-best-in-5-minutes.json"


def data_sets(names: list[str] | None) -> dict[str, Path]:
    found = {p.name: p for p in sorted(SHARED.glob("*")) if p.is_dir()}
    found["demo"] = ROOT / "assets" / "demo"
    return {n: found[n] for n in names if n in found} if names else found


def offline_backbones() -> list[str]:
    return [arch for arch in CATALOG if default_weights(arch) in OFFLINE]


def one_run(data: Path, seed: int, budget: int, home: Path, pinned: str | None) -> dict:
    """Train the preset in a fresh process; the run folder says what it chose and scored."""
    settings = dict(json.loads(PRESET.read_text())["settings"], data_root=str(data), split_seed=seed,
                    time_budget_s=budget, name=f"{data.name}-{seed}-{pinned or 'recipe'}")
    if pinned:
        settings.update(arch=pinned, pick_backbone=False, weights="auto")
    config = home / f"{settings['name']}.json"
    config.write_text(json.dumps(settings))
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "core", "train", str(config), "--quiet"], cwd=ROOT,
                          capture_output=True, text=True, env=_env(home))
    seconds = time.perf_counter() - start
    run = sorted((home / "runs").iterdir(), key=lambda p: p.stat().st_mtime)[-1]
    status, cfg = _read(run / "status.json"), _read(run / "config.json")
    in_run = status.get("updated", 0) - _started(run.name)
    return dict(data=data.name, seed=seed, what=pinned or "recipe", arch=cfg.get("arch"),
                size=cfg.get("image_size"), tta=cfg.get("tta"), state=status.get("state"),
                test_acc=status.get("test_acc"), seconds=round(seconds, 1), run_seconds=round(in_run, 1),
                budget_used=round(in_run / budget, 3), error=done.stderr[-300:] if done.returncode else "")


def _started(run_id: str) -> float:
    """When the run began, from its id (20261205-071706280-...): the budget counts from there; the
    process's start (imports, ~4 s; none in the app, whose runs fork from a warm server) does not."""
    import datetime
    stamp = datetime.datetime.strptime(run_id[:18], "%Y%m%d-%H%M%S%f")
    return stamp.timestamp()             # the id is written in local time


def _env(home: Path) -> dict:
    import os
    return dict(os.environ, FINETUNE_LAB_HOME=str(home), FINETUNE_LAB_LOCAL="1", HF_HUB_OFFLINE="1")


def _read(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def summary(rows: list[dict]) -> list[dict]:
    out = []
    for key in sorted({(r["data"], r["what"]) for r in rows}):
        group = [r for r in rows if (r["data"], r["what"]) == key and r["test_acc"] is not None]
        accs, secs = [r["test_acc"] for r in group], [r["seconds"] for r in group]
        out.append(dict(data=key[0], what=key[1], runs=len(group),
                        acc_mean=statistics.mean(accs) if accs else None,
                        acc_sd=statistics.stdev(accs) if len(accs) > 1 else 0.0,
                        seconds_mean=statistics.mean(secs) if secs else None,
                        used=_span([r["budget_used"] for r in group]),
                        chosen=sorted({f"{r['arch']}@{r['size']}" for r in group})))
    return out


def _span(values: list[float]) -> str:
    return f"{min(values):.0%}-{max(values):.0%}" if values else "—"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", nargs="*", help="shared data set names (default: all, and the demo)")
    ap.add_argument("--seeds", nargs="*", type=int, default=[0, 1, 2])
    ap.add_argument("--budget", type=int, default=300)
    ap.add_argument("--backbones", nargs="*", help="pinned backbones to compare (default: every offline one)")
    ap.add_argument("--no-recipe", action="store_true", help="run only the pinned backbones")
    ap.add_argument("--out", default=str(ROOT / "bench" / "recipe.json"))
    args = ap.parse_args()
    pinned = args.backbones if args.backbones is not None else offline_backbones()
    shipped = json.loads(PRESET.read_text())["settings"]
    if not shipped.get("pick_backbone"):      # the preset is already pinned: don't run it twice
        pinned = [b for b in pinned if b != shipped["arch"]]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for data in data_sets(args.data).values():
            for seed in args.seeds:
                for what in ([] if args.no_recipe else [None]) + pinned:
                    row = one_run(data, seed, args.budget, Path(tmp), what)
                    rows.append(row)
                    print(json.dumps(row), flush=True)
    table = summary(rows)
    print(f"\n{'data':<16} {'what':<22} {'runs':>4} {'test acc':>16} {'seconds':>8} {'budget used':>12}  chosen")
    for r in table:
        acc = "—" if r["acc_mean"] is None else f"{r['acc_mean']:.1%} ± {r['acc_sd']:.1%}"
        secs = "—" if r["seconds_mean"] is None else f"{r['seconds_mean']:.0f}"
        print(f"{r['data']:<16} {r['what']:<22} {r['runs']:>4} {acc:>16} {secs:>8} {r['used']:>12}  "
              f"{', '.join(r['chosen'])}")
    Path(args.out).write_text(json.dumps(dict(budget=args.budget, rows=rows, summary=table), indent=1))


if __name__ == "__main__":
    main()
