"""Report 004's tables with its own backbone, SqueezeNet 1.1, as the Experiments page runs them:

    python bench/bench_report004.py                       # imagenette_mini, split seeds 0 1 2
    python bench/bench_report004.py --data hymenoptera --seeds 0
    python bench/bench_report004.py --data eurosat_rgb --axes freeze      # the ordering only

Starts from the "Report 004 (SqueezeNet)" preset and sweeps (core.training.sweeps, the same code
the Experiments page queues) freeze mode (scratch / head / full), optimizer (SGD vs Adam) and
augmentation (flips vs flips + colour jitter), one axis at a time, each on the same splits.
Prints test accuracy and seconds per run and the mean over split seeds; the report's ordering is
scratch < head only < full fine-tune.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import core
from core.config import validate_config
from core.training import sweeps

SHARED = ROOT.parent / "shared" / "datasets"
PRESET = ROOT / "assets" / "presets" / "report-004-squeezenet.json"
AXES = {"freeze": ["scratch", "head", "full"], "optimizer": ["sgd", "adam"],
        "augment": ["flips", "flips + colour jitter"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default="imagenette_mini")
    ap.add_argument("--seeds", nargs="*", type=int, default=[0, 1, 2])
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--axes", nargs="*", choices=list(AXES), default=list(AXES), help="the axes to vary")
    args = ap.parse_args()
    data = SHARED / args.data if (SHARED / args.data).is_dir() else Path(args.data)
    settings = dict(json.loads(PRESET.read_text())["settings"], data_root=str(data), epochs=args.epochs)
    results: dict[tuple, list] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for seed in args.seeds:
            base = validate_config(dict(settings, split_seed=seed))
            for axis, values in ((a, AXES[a]) for a in args.axes):
                for cfg in sweeps.expand(base, {axis: values}):
                    start = time.perf_counter()
                    run = core.train(cfg, root=Path(tmp) / "runs")
                    status = run.status()
                    row = dict(seed=seed, axis=axis, value=cfg.tags[axis], test_acc=status.test_acc,
                               state=str(status.state), seconds=round(time.perf_counter() - start, 1))
                    print(json.dumps(row), flush=True)
                    results.setdefault((axis, cfg.tags[axis]), []).append(row)
    print(f"\n{'axis':<10} {'value':<24} {'test acc (mean ± sd)':>22} {'s/run':>7}")
    for (axis, value), rows in results.items():
        accs = [r["test_acc"] for r in rows if r["test_acc"] is not None]
        sd = statistics.stdev(accs) if len(accs) > 1 else 0.0
        acc = f"{statistics.mean(accs):.1%} ± {sd:.1%}" if accs else "—"
        print(f"{axis:<10} {value:<24} {acc:>22} {statistics.mean(r['seconds'] for r in rows):>7.0f}")


if __name__ == "__main__":
    main()
