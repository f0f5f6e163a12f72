"""Command line: the app's runs without the browser, and on several processes under torchrun.

    python -m core config --out demo.json            # the app's default (demo) configuration
    python -m core train demo.json --set epochs=3    # a normal run folder the app lists live
    python -m core train assets/presets/lab-best-in-5-minutes.json --set data_root=photos
    python -m core train demo.json --set freeze=top_k --set time_budget_s=300
    python -m core lr demo.json --set freeze=full    # learning-rate range test, prints a suggestion
    torchrun --nproc_per_node=2 -m core train demo.json
    python -m core resume RUN_ID
    python -m core evaluate RUN_ID
    python -m core predict RUN_ID photo.jpg folder/ --out predictions.csv
    python -m core sweep demo.json --grid lr=1e-3,1e-2 --grid optimizer=sgd,adamw
    python -m core export RUN_ID --onnx
    python -m core doctor FOLDER --out doctor.csv    # audit a data set: label errors, duplicates, ...
    python -m core queue                             # the lab's slots, runs training and waiting
    python -m core data snapshot FOLDER flowers --note "as collected"   # a data set's first version
    python -m core data versions flowers             # its versions: id, parent, files, note, author
    python -m core data diff flowers v1 v2           # what changed between two versions
    python -m core data delete flowers v3            # a version no run uses; frees what only it held
"""
from __future__ import annotations

import argparse
import ast
import difflib
import json
import os
import sys
import threading
import time
from pathlib import Path

from core import paths
from core.config import ConfigError, RunConfig, config_shape_problem, field_kind, validate_config
from core.serve.store import Run, RunBusy, disk_problem, get_run

FINAL_STATES = ("finished", "stopped", "failed", "interrupted")


def parse_setting(key: str, text: str):
    """A `--set` (or `--grid`) value read as its setting's type: `lr=abc` stays the text 'abc', so
    validate_config says "lr must be a number, got 'abc'"; `scheduler=none` stays "none"; a split
    is `0.8,0.1,0.1` or `[0.8, 0.1, 0.1]`; augment and tags are JSON objects."""
    kind, optional = field_kind(key)
    word = text.strip().lower()
    if optional and word in ("", "none", "null"):
        return None
    if kind == "bool":
        return {"true": True, "false": False, "yes": True, "no": False, "1": True, "0": False}.get(word, text)
    if kind in ("int", "float"):
        for read in (int, float):      # an int stays one (a sweep's tag reads lr=20, not 20.0)
            try:
                return read(text)
            except ValueError:
                pass
        return text
    if kind == "tuple":
        try:
            return [float(part) for part in text.strip().strip("[]()").split(",")]
        except ValueError:
            return text
    if kind == "dict":
        try:
            return json.loads(text)
        except json.JSONDecodeError:
            pass
        try:        # Python's spelling, {'hflip': True}
            return ast.literal_eval(text)
        except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
            return text
    return text


def read_config_file(path: str) -> dict:
    """The settings in a config.json (the app's download, a run folder's file) or a preset file
    (its checked settings, which replace the defaults); ConfigError with a sentence otherwise."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such file.") from None
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"{path} can't be read as a config ({type(err).__name__}: {err}).") from None
    try:
        data = json.loads(text)
    except (json.JSONDecodeError, RecursionError) as err:
        raise ConfigError(f"{path} is not valid JSON ({err}).") from None
    if isinstance(data, dict) and isinstance(data.get("settings"), dict):
        from core.serve.presets import PresetError, parse_preset
        try:
            return dict(parse_preset(text)["settings"])
        except PresetError as err:
            raise ConfigError(f"{path}: {err}") from None
    if isinstance(data, dict) and isinstance(data.get("config"), dict):
        data = data["config"]
    problem = config_shape_problem(data)
    if problem:
        raise ConfigError(f"{path}: {problem}")
    return data


def load_config(path: str, overrides: list[str] = ()) -> RunConfig:
    """The file's settings with the `--set KEY=VALUE` overrides, validated (types, ranges, model
    name) before anything is created: ConfigError lists every problem, one sentence each."""
    data = read_config_file(path)
    problems = []
    for item in overrides:
        key, equals, value = item.partition("=")
        key = key.strip()
        if not equals:
            problems.append(f"--set {item!r}: write KEY=VALUE, e.g. --set epochs=3.")
        elif key not in RunConfig.__dataclass_fields__:
            close = difflib.get_close_matches(key, RunConfig.__dataclass_fields__, n=1)
            problems.append(f"--set: unknown setting {key!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
        else:
            data[key] = parse_setting(key, value)
    try:
        cfg = validate_config(data)
    except ConfigError as err:
        problems += err.problems
    if not data.get("data_root"):
        problems.append(f"{path} names no data set: add --set data_root=FOLDER")
    if problems:
        raise ConfigError(problems)
    return cfg


# ---------------------------------------------------------------- progress in the terminal

def follow(run: Run, worker: threading.Thread) -> None:
    """Show the run's status.json and epochs.jsonl as the app does, until the worker ends: a bar
    on a terminal (redrawn only when the status changed), plain lines at most every
    PLAIN_EVERY seconds otherwise (a log file gets no redrawn bars)."""
    from tqdm import tqdm
    tty = sys.stderr.isatty()
    bar = tqdm(total=1, unit="step", dynamic_ncols=True, leave=False, disable=not tty)
    shown, told, seen, printed = 0, set(), None, 0.0
    while worker.is_alive():
        shown = show_new_epochs(run, shown, bar)
        status = run.status()
        told = show_speed_notes(status, told, bar)
        if status.get("updated") != seen:
            seen = status.get("updated")
            if tty:
                if status.get("steps"):
                    bar.total, bar.n = status["steps"], min(status.get("step") or 0, status["steps"])
                bar.set_description(status.get("message", "")[:90], refresh=False)
                bar.refresh()
            elif time.monotonic() - printed >= PLAIN_EVERY and status.get("message"):
                print(status["message"], file=sys.stderr, flush=True)
                printed = time.monotonic()
        worker.join(0.5)
    show_new_epochs(run, shown, bar)
    bar.close()


PLAIN_EVERY = 10.0


def show_speed_notes(status: dict, told: set, bar) -> set:
    """The time-budget plan, caches and precision, each printed once when the run decides them."""
    notes = [f"plan: {note}" for note in status.get("plan") or []]
    if status.get("cache"):
        c = status["cache"]
        notes.append(f"cache: {c['what']}, {c['views']} view(s) per image, {c['mb']:g} MB in {c['where']}")
    if status.get("cache_off"):
        notes.append(f"no cache: {status['cache_off']}")
    if status.get("precision"):
        notes.append("precision: " + ", ".join(f"{k} {v}" for k, v in status["precision"].items()))
    for note in notes:
        if note not in told:
            bar.write(note)
            told.add(note)
    return told


def show_new_epochs(run: Run, shown: int, bar) -> int:
    rows = run.epochs()
    for row in rows[shown:]:
        bar.write(f"epoch {row['epoch']:>3} [{row['phase']}]  train loss {row['train_loss']:.4f} "
                  f"acc {row['train_acc']:.3f}  val loss {row['val_loss']:.4f} acc {row['val_acc']:.3f}"
                  f"  {row['seconds']:.1f}s" + ("  *best" if row.get("best") else ""))
    return len(rows)


def train_foreground(run: Run, resume: bool = False, quiet: bool = False) -> dict:
    from core.training import distributed as dist
    from core.training.run import train_run
    if quiet or not dist.is_main():
        return train_run(run, resume=resume)
    worker = threading.Thread(target=train_run, args=(run,), kwargs=dict(resume=resume), daemon=True)
    worker.start()
    try:
        follow(run, worker)
    except KeyboardInterrupt:
        run.set_status("stopped", message="Stopped from the terminal (Ctrl+C).")
        raise
    return run.status()


def summary(run: Run) -> int:
    status = run.status()
    acc = status.get("test_acc")
    print(f"{run.id}: {status.get('state')} — {status.get('message', '')}"
          + (f" · test accuracy {acc:.4f}" if isinstance(acc, float) else ""))
    print(f"run folder: {run.path}")
    return 0 if status.get("state") == "finished" else 1


# ---------------------------------------------------------------- commands

def cmd_config(args) -> int:
    from core.data.folders import demo_dataset
    cfg = RunConfig(data_root=str(demo_dataset().relative_to(paths.REPO_ROOT)))
    text = json.dumps(cfg.to_dict(), indent=1)
    if args.out:
        Path(args.out).write_text(text, encoding="utf-8")
    else:
        print(text)
    return 0


def cmd_train(args) -> int:
    from core.training import distributed as dist
    cfg = load_config(args.config, args.set)
    dist.init()
    try:
        path = dist.broadcast(str(Run.create(cfg, owner="cli").path) if dist.is_main() else None)
        run = Run(path)
        if dist.is_main():
            print(f"training {run.id} on {dist.world()} process(es)", flush=True)
        train_foreground(run, quiet=args.quiet)
        dist.barrier()
        return summary(run) if dist.is_main() else 0
    finally:
        dist.finish()


def cmd_resume(args) -> int:
    from core.training import distributed as dist
    run = get_run(args.run)
    dist.init()
    try:     # under torchrun rank 0 decides: another rank could already see its 'queued' status
        if not dist.broadcast(run.resumable() if dist.is_main() else None):
            raise SystemExit(f"{run.id} cannot be resumed: it finished, or it has no finished epoch.")
        if dist.is_main():
            run.set_status("queued", message="Resuming from the command line", owner="cli")
        train_foreground(run, resume=True, quiet=args.quiet)
        dist.barrier()
        return summary(run) if dist.is_main() else 0
    finally:
        dist.finish()


def cmd_evaluate(args) -> int:
    from core.results.evaluate import evaluate_run
    run = get_run(args.run)
    metrics = evaluate_run(run, args.split)
    print(f"{run.id} {args.split}: accuracy {metrics['accuracy']:.4f} · macro F1 {metrics['macro_f1']:.4f}"
          f" · mAP {metrics['mAP']:.4f} on {metrics['n']} images")
    print(f"written: {run.file(f'{args.split}_metrics.json')}, {run.file(f'{args.split}_predictions.csv')}")
    return 0


def cmd_predict(args) -> int:
    from core.models import predict
    from core.data.images import IMAGE_EXTENSIONS
    files = []
    for name in args.images:
        p = Path(name)
        files += sorted(f for f in p.rglob("*") if f.suffix.lower() in IMAGE_EXTENSIONS) if p.is_dir() else [p]
    frame = predict.predict_files(predict.from_run(get_run(args.run)), files)
    from core.tables import csv_safe
    csv_safe(frame).to_csv(args.out, index=False)
    for row in frame.head(20).itertuples():
        print(f"{row.file}: {getattr(row, 'predicted', None) or getattr(row, 'error', '')}"
              + (f" ({row.confidence:.3f})" if hasattr(row, "confidence") and row.confidence == row.confidence else ""))
    print(f"{len(frame)} predictions written to {args.out}")
    return 0


def cmd_sweep(args) -> int:
    from core.training import distributed as dist
    from core.training import sweeps
    if dist.launched():     # every rank would create and train its own copy of each run
        raise SystemExit("sweep runs one process; train a single configuration under torchrun instead.")
    base = load_config(args.config, args.set)
    configs, problems = [], []
    for cfg in sweeps.expand(base, grid_axes(args.grid)):
        try:
            configs.append(validate_config(cfg.to_dict()))
        except ConfigError as err:
            problems += [f"{cfg.name}: {problem}" for problem in err.problems]
    if problems:
        raise ConfigError(problems)
    runs = [Run.create(cfg, owner="cli") for cfg in configs]     # only once every one is valid
    for i, run in enumerate(runs, 1):
        print(f"[{i}/{len(runs)}] {run.config.name}", flush=True)
        train_foreground(run, quiet=args.quiet)
    print(sweeps.results(runs).to_string(index=False))
    return 0


def grid_axes(items: list[str]) -> dict[str, list]:
    """`--grid AXIS=V1,V2` as {axis: values}, each value of its setting's type; ConfigError with a
    sentence per bad axis or value (the combinations are validated after expanding)."""
    from core.training import sweeps
    from core.data.transforms import PRESETS
    axes, problems = {}, []
    for item in items:
        axis, _, values = item.partition("=")
        axis = axis.strip()
        if axis not in sweeps.AXES:
            problems.append(f"--grid: {axis!r} is not one of {', '.join(sweeps.AXES)}")
            continue
        if axis in RunConfig.__dataclass_fields__ and axis != "augment":
            axes[axis] = [parse_setting(axis, v) for v in values.split(",")]
        else:
            axes[axis] = [v.strip() for v in values.split(",")]
        allowed = {"augment": tuple(PRESETS), "init": ("pretrained", "random")}.get(axis)
        for value in axes[axis] if allowed else ():
            if value not in allowed:
                problems.append(f"--grid {axis}: {value!r} is not one of {', '.join(allowed)}")
    if problems:
        raise ConfigError(problems)
    return axes


def cmd_lr(args) -> int:
    from core.training.lr_find import suggest_lr
    cfg = load_config(args.config, args.set)

    def progress(done, total, message):
        if not args.quiet and (done == total or done % 10 == 0):
            print(f"  {message}", flush=True)
    result = suggest_lr(cfg, progress=progress)
    for lr, loss in zip(result["lrs"][::5], result["losses"][::5]):
        print(f"lr {lr:9.2e}  loss {loss:.4f}")
    print(f"training {result['trains']}: {result['sentence']}")
    print(f"suggested: --set lr={result['suggestion']:g}" if result["suggestion"] else "no suggestion")
    return 0


def cmd_export(args) -> int:
    """Each format is checked on the run's test images as soon as it is written; status 1 when
    one of them does not agree with the trained model."""
    from core.trust.export_check import check_line, export_checked
    run = get_run(args.run)
    out = Path(args.out or run.file("export"))
    flagged = False
    for kind in ("safetensors", "onnx") if args.onnx else ("safetensors",):
        try:
            result = export_checked(run, kind, out)
        except RuntimeError as err:           # the ONNX exporter can't handle this architecture
            print(f"error: {err}", file=sys.stderr)
            return 1
        script = "predict.py" if kind == "safetensors" else "predict_onnx.py"
        print(f"written: {out / result['file']}" + (f", {out / 'model.json'}" if kind == "safetensors" else "")
              + f", {out / script}")
        print(f"  {'ok' if result['ok'] else 'FLAGGED'}: {check_line(result)}")
        flagged = flagged or not result["ok"]
    return 1 if flagged else 0


def cmd_doctor(args) -> int:
    """One row per flagged image (path relative to FOLDER, issue, given label, suggested label,
    score), the verdicts, and the same rows as CSV with --out."""
    from core.trust import doctor
    from core.data import DataError
    last = [""]

    def progress(done, total, text):
        step = " ".join(text.split()[:2])      # one line per step, not per batch
        if not args.quiet and (step != last[0] or done >= total):
            last[0] = step
            print(f"  {text}", flush=True)
    try:
        result = doctor.audit(args.folder, arch=args.arch, progress=progress)
    except DataError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    frame = result.findings
    if len(frame):
        print(frame[["path", "issue", "label", "suggested", "score"]].to_string(index=False))
    print(f"{len(result.items)} images, {len(result.classes)} classes, {frame['path'].nunique()} flagged:")
    for line in result.verdicts:
        print(f"- {line}")
    if args.out:
        Path(args.out).write_text(doctor.findings_csv(result))
        print(f"written: {args.out}")
    return 0


def cmd_job(args) -> int:
    """One run of the lab's queue in its own process (the executor starts this; not for people)."""
    from core.serve.jobs import run_job
    return run_job(args.run, resume=args.resume, limit_s=args.limit_s)


def cmd_task(args) -> int:
    """One page task in its own process (the executor starts this; not for people)."""
    from core.serve.tasks import run_task
    return run_task(args.run, limit_s=args.limit_s)


def cmd_queue(args) -> int:
    """The lab's queue as the pages show it; with --serve, this process starts queued runs (a
    server-less executor, e.g. on a head machine while no browser is open)."""
    from core.serve.worker import MANAGER
    if args.serve:
        MANAGER.start()
        print("serving the queue (Ctrl+C ends this; running runs go on)", flush=True)
        while True:
            time.sleep(3600)
    view = MANAGER.overview()
    print(f"{view['launcher']} executor, {len(view['slots'])} slot(s): "
          + ", ".join(slot.label() for slot in view["slots"]))
    for job in view["running"]:
        print(f"training  {job.run_id}  {job.owner or '-'}  slot {job.slot} {job.device} on {job.host}")
    for job in view["waiting"]:
        print(f"waiting   {job.run_id}  {job.owner or '-'}")
    return 0


def cmd_token(args) -> int:
    """The teacher token of a class server: the environment's (not printed), or one made once and
    kept (0600) in the data directory, printed for the teacher's own terminal."""
    from core.serve import access
    if os.environ.get(access.TOKEN_ENV) and access.configured_token():
        print("The teacher token is the one in FINETUNE_LAB_ADMIN_TOKEN.")
        return 0
    token = access.configured_token() or access.make_token_file()
    print(f"Teacher token (sign in at /lab/sign-in, 'Teacher token'; kept in "
          f"{paths.home() / 'accounts' / 'teacher-token'}):\n  {token}")
    return 0


def cmd_accounts(args) -> int:
    """Class accounts from the command line: a class of names (or a count) with join codes."""
    from core.serve import accounts
    names = int(args.names[0]) if len(args.names) == 1 and args.names[0].isdigit() else args.names
    rows = accounts.create_class(args.klass, names, role="teacher" if args.teacher else "student")
    print("account,name,join code")
    for account, code in rows:
        print(f"{account.id},{account.name},{code}")
    return 0


def cmd_data(args) -> int:
    """Data set versions (core.data.versions): list a data set's versions, compare two, or
    snapshot a class folder as a new version."""
    return {"versions": data_versions, "diff": data_diff, "snapshot": data_snapshot,
            "delete": data_delete}[args.data_command](args)


def data_delete(args) -> int:
    """Delete a version nothing derives from and no run uses (as the teacher would)."""
    from core.data import feedback, versions
    from core.serve.access import User
    freed = feedback.delete_version(User("cli", admin=True), versions.get(args.name, args.id))
    print(f"deleted {args.name}/{args.id}; {freed / 2**20:,.1f} MB freed")
    return 0


def data_snapshot(args) -> int:
    from core.data import versions
    v = versions.snapshot(args.folder, args.name, args.author, args.note)
    print(f"{v.ref}: {len(v.files)} files, {v.note} (hash {v.manifest_hash[:12]})")
    print(f"folder: {v.folder}")
    return 0


def data_diff(args) -> int:
    from core.data import versions
    change = versions.diff(versions.get(args.name, args.a), versions.get(args.name, args.b))
    print(f"{args.name} {args.a} -> {args.b}: {change.summary()}")
    for title, rows in (("added", [e["path"] for e in change.added]),
                        ("removed", [e["path"] for e in change.removed]),
                        ("changed", [b["path"] for _, b in change.changed]),
                        ("relabelled", [f"{a['path']} -> {b['path']} ({a['label']} -> {b['label']})"
                                        for a, b in change.relabelled])):
        print("\n".join([f"{title}:"] + [f"  {row}" for row in rows]) if rows else f"{title}: none")
    return 0


def data_versions(args) -> int:
    from core.data import versions
    chain = versions.versions(args.name)
    if not chain:
        raise ValueError(f"No data set called {args.name!r} (make one with `python -m core data snapshot`).")
    rows = [("id", "parent", "files", "note", "author", "created")]
    rows += [(v.id, v.parent or "-", str(len(v.files)), v.note, v.author, v.created) for v in chain]
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip())
    return 0


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m core", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command", required=True)
    p = sub.add_parser("config", help="print or write the default (demo) configuration")
    p.add_argument("--out")
    for name, helptext in (("train", "train a config file"), ("sweep", "train every combination"),
                           ("lr", "learning-rate range test for a config: prints the curve and a suggestion")):
        p = sub.add_parser(name, help=helptext)
        p.add_argument("config")
        p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
        p.add_argument("--quiet", action="store_true")
    sub.choices["sweep"].add_argument("--grid", action="append", required=True, metavar="AXIS=V1,V2")
    p = sub.add_parser("resume", help="go on from a stopped or interrupted run's last epoch")
    p.add_argument("run")
    p.add_argument("--quiet", action="store_true")
    p = sub.add_parser("job", help="train one queued run in this process (started by the app's executor)")
    p.add_argument("run")
    p.add_argument("--resume", action="store_true")
    p.add_argument("--limit-s", type=float, default=None)
    p = sub.add_parser("task", help="run one queued page task in this process (started by the app's executor)")
    p.add_argument("run")
    p.add_argument("--limit-s", type=float, default=None)
    p.add_argument("--resume", action="store_true", help=argparse.SUPPRESS)
    p = sub.add_parser("token", help="print (making it once) the teacher token of a class server")
    p = sub.add_parser("accounts", help="create class accounts: CLASS NAME [NAME ...] or CLASS COUNT")
    p.add_argument("klass", metavar="CLASS")
    p.add_argument("names", nargs="+")
    p.add_argument("--teacher", action="store_true", help="the accounts are teachers (admins)")
    p = sub.add_parser("queue", help="show the lab's queue and slots; --serve starts queued runs")
    p.add_argument("--serve", action="store_true")
    p = sub.add_parser("evaluate", help="evaluate a run's best checkpoint")
    p.add_argument("run")
    p.add_argument("--split", default="test", choices=["train", "val", "test"])
    p = sub.add_parser("predict", help="classify images or folders into a CSV")
    p.add_argument("run")
    p.add_argument("images", nargs="+")
    p.add_argument("--out", default="predictions.csv")
    p = sub.add_parser("export", help="safetensors + JSON + predict.py (and ONNX) of a run's best checkpoint, "
                                     "each checked on the run's test images")
    p.add_argument("run")
    p.add_argument("--out")
    p.add_argument("--onnx", action="store_true")
    p = sub.add_parser("doctor", help="audit a data set: likely label errors, duplicates, outliers, odd images")
    p.add_argument("folder")
    p.add_argument("--out", help="also write the flagged images as CSV")
    p.add_argument("--arch", default="mobilenetv2_100", help="backbone whose embeddings are used")
    p.add_argument("--quiet", action="store_true")
    p = sub.add_parser("data", help="data set versions: list them, compare two, snapshot a folder")
    data = p.add_subparsers(dest="data_command", required=True)
    data.add_parser("versions", help="a data set's versions").add_argument("name")
    p = data.add_parser("diff", help="what changed between two versions of a data set")
    for name in ("name", "a", "b"):
        p.add_argument(name, metavar={"a": "V1", "b": "V2"}.get(name, "NAME"))
    p = data.add_parser("snapshot", help="a class folder as a data set's (next) version")
    p.add_argument("folder")
    p.add_argument("name")
    p.add_argument("--note", default="")
    p.add_argument("--author", default="cli")
    p = data.add_parser("delete", help="delete a version no run uses and nothing derives from")
    p.add_argument("name")
    p.add_argument("id", metavar="V")
    return ap


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    command = {"config": cmd_config, "train": cmd_train, "resume": cmd_resume, "evaluate": cmd_evaluate,
               "predict": cmd_predict, "sweep": cmd_sweep, "export": cmd_export, "lr": cmd_lr,
               "doctor": cmd_doctor, "job": cmd_job, "task": cmd_task, "queue": cmd_queue,
               "token": cmd_token, "accounts": cmd_accounts, "data": cmd_data}[args.command]
    if args.command != "config" and (problem := paths.write_problem()):
        print(f"error: {problem}", file=sys.stderr)
        return 2
    try:
        return command(args)
    except RunBusy as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except OSError as err:           # a disk that fills up or turns read-only mid-way
        print(f"error: {disk_problem(err) or err}", file=sys.stderr)
        return 2
    except ConfigError as err:      # argparse-style: the sentences on stderr, status 2, no traceback
        print("error: " + "\n  ".join(err.problems), file=sys.stderr)
        return 2
    except (FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
