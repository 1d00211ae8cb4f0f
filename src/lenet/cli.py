"""The ``lenet`` command: a thin argparse layer over the Python API.

Each subcommand is a pair: ``add_<name>(subparsers)`` declares its flags and ``cmd_<name>(args)``
does the work by calling the API. Errors a user can cause are :class:`~lenet.errors.LenetError`
and end as one line on stderr with a non-zero exit status; heavy imports happen inside commands so
``lenet --help`` is instant.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from . import __version__
from .errors import LenetError


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (and exit status 2), not a usage dump."""

    def error(self, message: str):  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} must be at least 1")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not value > 0 or value != value or value == float("inf"):
        raise argparse.ArgumentTypeError(f"{text} must be a positive number")
    return value


def _key_value(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise argparse.ArgumentTypeError(f"{text!r} is not key=value (e.g. --set pool=max)")
    return key.strip(), value.strip()


def _add_data_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data-root", metavar="DIR",
                   help="folder with one sub-folder per dataset (default: $LENET_DATA_ROOT, the cache, "
                        "then /usr/share/datasets)")


def _add_engine_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="torch.compile the training step (default: yes where a C++ compiler or, on CUDA, "
                        "triton is available; falls back to eager mode if compiling fails)")
    p.add_argument("--compile-mode", default="default", choices=["default", "reduce-overhead", "max-autotune"],
                   help="torch.compile mode; reduce-overhead and max-autotune use CUDA graphs on a GPU")
    p.add_argument("--amp", default="off", choices=["off", "bf16", "fp16"],
                   help="mixed precision on CUDA (ignored on CPU; default off)")


# --------------------------------------------------------------------------------------------
# lenet train


def add_train(sub) -> None:
    from .data import DATASETS

    p = sub.add_parser("train", help="train a model (defaults: the textbook LeNet and recipe)",
                       description="Train a LeNet on a dataset and write a run folder.")
    p.add_argument("--model", default="classic", help="model preset (see `lenet models`; default classic)")
    p.add_argument("--set", dest="overrides", action="append", default=[], type=_key_value,
                   metavar="KEY=VALUE", help="override a model config field, e.g. --set pool=max (repeatable)")
    p.add_argument("--dataset", default="fashion-mnist", choices=sorted(DATASETS))
    _add_data_flags(p)
    p.add_argument("--epochs", type=_positive_int, default=10)
    p.add_argument("--lr", type=_positive_float, default=0.9)
    p.add_argument("--batch-size", type=_positive_int, default=256)
    p.add_argument("--optimizer", default="sgd", choices=["sgd", "momentum", "adam", "adamw"])
    p.add_argument("--momentum", type=float, default=0.9, help="for --optimizer momentum (default 0.9)")
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--schedule", default="constant", choices=["constant", "cosine", "onecycle"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", help="auto (cuda, then mps, then cpu), cpu, cuda, cuda:N, mps")
    p.add_argument("--out", metavar="RUN_DIR", help="run folder (default runs/<date>-<time>-<model>-<dataset>)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing run folder")
    p.add_argument("--resume", metavar="RUN_DIR",
                   help="continue an interrupted run from its last checkpoint, with its saved settings "
                        "(only --data-root, --device and --no-progress apply)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (one line per epoch only)")
    _add_engine_flags(p)


def cmd_train(args) -> int:
    from .distributed import world
    from .runs import default_run_dir
    from .training import TrainConfig, resume, train

    if not world().is_main:  # under torchrun, rank 0 alone talks
        sys.stdout = open(os.devnull, "w")
    progress = not args.no_progress and sys.stderr.isatty() and world().is_main
    if args.resume:
        result = resume(args.resume, data_root=args.data_root, device=None if args.device == "auto" else args.device,
                        progress=progress, log=lambda s: print(s, flush=True))
        print(result.book_lines())
        print(f"run saved in {result.run_dir}/")
        return 0
    cfg = TrainConfig(model=args.model, overrides=dict(args.overrides), dataset=args.dataset,
                      data_root=args.data_root, epochs=args.epochs, lr=args.lr,
                      batch_size=args.batch_size, optimizer=args.optimizer, momentum=args.momentum,
                      weight_decay=args.weight_decay, schedule=args.schedule, seed=args.seed,
                      device=args.device, compile=args.compile, compile_mode=args.compile_mode, amp=args.amp)
    out = Path(args.out) if args.out else default_run_dir(args.model, args.dataset)
    result = train(cfg, out=out, overwrite=args.overwrite, progress=progress,
                   log=lambda s: print(s, flush=True))
    print(result.book_lines())
    print(f"run saved in {result.run_dir}/ (metrics.csv, curves.png, model.safetensors)")
    return 0


# --------------------------------------------------------------------------------------------
# lenet evaluate


def add_evaluate(sub) -> None:
    p = sub.add_parser("evaluate", help="test accuracy, per-class accuracy and confusion matrix of a run")
    p.add_argument("run_dir", metavar="RUN_DIR")
    _add_data_flags(p)
    p.add_argument("--device", default="auto")
    p.add_argument("--out", metavar="PNG", help="confusion matrix figure (default RUN_DIR/confusion.png)")


def cmd_evaluate(args) -> int:
    from .data import load_dataset
    from .evaluation import evaluate
    from .plots import plot_confusion
    from .runs import load_run
    from .training import resolve_device

    device = resolve_device(args.device)
    run = load_run(args.run_dir, device)
    data = load_dataset(run.dataset, args.data_root)
    report = evaluate(run.model, data.test.images, data.test.labels, data.classes, device=device)
    print(report.format())
    out = Path(args.out) if args.out else Path(args.run_dir) / "confusion.png"
    plot_confusion(report.confusion, data.classes, out, title=f"{run.config['model']} on {data.name}")
    print(f"\nconfusion matrix saved to {out}")
    return 0


# --------------------------------------------------------------------------------------------
# lenet summary / lenet models


def add_summary(sub) -> None:
    p = sub.add_parser("summary", help="layer-by-layer output shapes, parameters and MACs")
    p.add_argument("--model", default="classic")
    p.add_argument("--set", dest="overrides", action="append", default=[], type=_key_value, metavar="KEY=VALUE")


def cmd_summary(args) -> int:
    from .models import create_model
    from .summary import format_table, spatial_path, trace

    model = create_model(args.model, **dict(args.overrides))
    rows = trace(model)
    print(format_table(rows, title=f"{args.model}: input (1, 1, 28, 28)"))
    print("sizes: " + " -> ".join(map(str, spatial_path(rows))))
    return 0


def add_models(sub) -> None:
    sub.add_parser("models", help="list the model presets")


def cmd_models(args) -> int:
    from .models import MODELS, create_model, param_count

    for name, entry in MODELS.items():
        print(f"{name:<10} {param_count(create_model(name)):>9,} params  {entry.description}")
    return 0


# --------------------------------------------------------------------------------------------
# lenet data where|fetch|verify


def add_data(sub) -> None:
    from .data import DATASETS

    p = sub.add_parser("data", help="where datasets are found; fetch or verify them")
    dsub = p.add_subparsers(dest="data_command", required=True, metavar="{where,fetch,verify}")
    for name, text in (("where", "show where each dataset is looked for and found"),
                       ("fetch", "make a dataset available (download it if it is nowhere)"),
                       ("verify", "check the SHA-256 of each file of a dataset")):
        q = dsub.add_parser(name, help=text)
        q.add_argument("--dataset", choices=sorted(DATASETS), default=None,
                       help="default: all for where, fashion-mnist otherwise")
        _add_data_flags(q)


def cmd_data(args) -> int:
    from . import data

    if args.data_command == "where":
        for name in ([args.dataset] if args.dataset else list(data.DATASETS)):
            found = data.locate(name, args.data_root)
            print(f"{name}: {'found in ' + str(found) if found else 'not found'}")
            for folder, origin in data.candidate_dirs(name, args.data_root):
                mark = "*" if found == folder else " "
                print(f"  {mark} {origin:<15} {folder}")
            print(f"    {'download to':<15} {data.download_root(args.data_root) / name}")
        return 0
    name = args.dataset or "fashion-mnist"
    if args.data_command == "fetch":
        folder = data.fetch(name, args.data_root, log=lambda s: print(s, flush=True))
        print(f"{name}: ready in {folder}")
        return 0
    report = data.verify(name, args.data_root)
    for path, status in report.items():
        print(f"{status:<3} {path}")
    print(f"{name}: all {len(report)} files match their checksums")
    return 0


# --------------------------------------------------------------------------------------------
# lenet bench


def add_bench(sub) -> None:
    from .data import DATASETS

    p = sub.add_parser("bench", help="benchmark: the textbook training loop vs lenet's engine, side by side",
                       description="Train with a plain textbook loop (DataLoader, eager, a host sync per "
                                   "batch) and with lenet's engine, alternating, on the same recipe; print "
                                   "training examples/sec, evaluation images/sec, peak memory and the "
                                   "accuracies each reached.")
    p.add_argument("--model", default="classic", help="model preset, a comma-separated list, or 'all'")
    p.add_argument("--set", dest="overrides", action="append", default=[], type=_key_value, metavar="KEY=VALUE")
    p.add_argument("--dataset", default="fashion-mnist", choices=sorted(DATASETS))
    _add_data_flags(p)
    p.add_argument("--epochs", type=_positive_int, default=10)
    p.add_argument("--batch-size", type=_positive_int, default=256)
    p.add_argument("--lr", type=_positive_float, default=0.9)
    p.add_argument("--seeds", type=_positive_int, default=1, help="runs per arm, seeds 0..N-1 (default 1)")
    p.add_argument("--device", default="auto")
    p.add_argument("--arms", default="plain,engine", help="which loops to run (default plain,engine)")
    p.add_argument("--quick", action="store_true",
                   help="a few steps on synthetic data: checks that everything runs, measures nothing useful")
    p.add_argument("--json", metavar="FILE", help="also write all measurements as JSON")
    _add_engine_flags(p)


def cmd_bench(args) -> int:
    import json

    import torch

    from .bench import ARMS, BenchSpec, HEADER, compare, format_summary
    from .errors import ConfigError
    from .models import MODELS, resolve_config
    from .training import TrainConfig, resolve_device

    arms = tuple(a.strip() for a in args.arms.split(",") if a.strip())
    if not arms or any(a not in ARMS for a in arms):
        raise ConfigError(f"--arms {args.arms!r}: choose from {', '.join(ARMS)} (comma-separated)")
    models = list(MODELS) if args.model == "all" else [m.strip() for m in args.model.split(",") if m.strip()]
    for name in models:
        resolve_config(name, dict(args.overrides))  # an unknown preset or setting is a user error
    TrainConfig(compile=args.compile, compile_mode=args.compile_mode, amp=args.amp).validate()
    device = resolve_device(args.device)
    epochs = min(args.epochs, 1) if args.quick else args.epochs
    results = []
    for name in models:
        spec = BenchSpec(model=name, dataset=args.dataset, data_root=args.data_root, epochs=epochs,
                         batch_size=args.batch_size, lr=args.lr, device=args.device, quick=args.quick,
                         compile=args.compile, amp=args.amp, overrides=dict(args.overrides))
        data = "synthetic data (--quick)" if args.quick else args.dataset
        print(f"{name}, batch {args.batch_size}, SGD lr {args.lr:g}, {epochs} epoch(s), "
              f"{args.seeds} seed(s), {data}, {device} ({torch.get_num_threads()} threads), "
              f"torch {torch.__version__}", flush=True)
        print(HEADER, flush=True)
        result = compare(spec, list(range(args.seeds)), arms, log=lambda s: print(s, flush=True))
        print(format_summary(result), flush=True)
        for note in sorted({n for r in result["runs"] for n in r.get("notes", [])}):
            print(note)
        print()
        results.append(result)
    if args.json:
        Path(args.json).write_text(json.dumps(results if len(results) > 1 else results[0], indent=2))
        print(f"measurements written to {args.json}")
    return 0


# --------------------------------------------------------------------------------------------

COMMANDS = ["train", "evaluate", "summary", "models", "data", "bench"]


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="lenet", description="Train, inspect and use LeNet-family networks.")
    parser.add_argument("--version", action="version", version=f"lenet {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND",
                                parser_class=_Parser)
    module = sys.modules[__name__]
    for name in COMMANDS:
        getattr(module, f"add_{name}")(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return getattr(sys.modules[__name__], f"cmd_{args.command}")(args) or 0
    except LenetError as exc:
        print(f"lenet: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("lenet: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1


if __name__ == "__main__":
    sys.exit(main())
