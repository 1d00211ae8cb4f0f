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
    p.add_argument("--num-classes", type=_positive_int, metavar="N",
                   help="output units (same as --set num_classes=N; extra units are never targets)")
    # Left unset, these come from the model preset's recipe (see `lenet models`), else the book's.
    p.add_argument("--epochs", type=_positive_int, default=None, help="default: the preset's recipe, else 10")
    p.add_argument("--lr", type=_positive_float, default=None, help="default: the preset's recipe, else 0.9")
    p.add_argument("--batch-size", type=_positive_int, default=None, help="default: the preset's recipe, else 256")
    p.add_argument("--optimizer", default=None, choices=["sgd", "momentum", "adam", "adamw", "sdlm"],
                   help="sdlm: stochastic diagonal Levenberg-Marquardt (LeNet-5's). "
                        "Default: the preset's recipe, else sgd")
    p.add_argument("--momentum", type=float, default=0.9, help="for --optimizer momentum (default 0.9)")
    p.add_argument("--weight-decay", type=float, default=None, help="default: the preset's recipe, else 0")
    p.add_argument("--schedule", default=None, choices=["constant", "cosine", "onecycle", "lecun"],
                   help="lecun: the 1998 paper's steps per pass. Default: the preset's recipe, else constant")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", help="auto (cuda, then mps, then cpu), cpu, cuda, cuda:N, mps")
    p.add_argument("--out", metavar="RUN_DIR", help="run folder (default runs/<date>-<time>-<model>-<dataset>)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing run folder")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (one line per epoch only)")


def cmd_train(args) -> int:
    from .errors import ConfigError
    from .runs import default_run_dir
    from .training import TrainConfig, train

    overrides = dict(args.overrides)
    if args.num_classes is not None:
        if overrides.get("num_classes", str(args.num_classes)) != str(args.num_classes):
            raise ConfigError(f"--num-classes {args.num_classes} contradicts --set num_classes="
                             f"{overrides['num_classes']}: give one of them")
        overrides["num_classes"] = str(args.num_classes)
    recipe_flags = ("epochs", "lr", "batch_size", "optimizer", "weight_decay", "schedule")
    given = {k: getattr(args, k) for k in recipe_flags if getattr(args, k) is not None}
    cfg = TrainConfig.for_model(args.model, overrides=overrides, dataset=args.dataset,
                                data_root=args.data_root, momentum=args.momentum, seed=args.seed,
                                device=args.device, **given)
    out = Path(args.out) if args.out else default_run_dir(args.model, args.dataset)
    progress = not args.no_progress and sys.stderr.isatty()
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
    from .models import create_model, resolve_config
    from .summary import format_table, spatial_path, trace

    model = create_model(args.model, **dict(args.overrides))
    cfg = resolve_config(args.model, dict(args.overrides))
    size = getattr(cfg, "in_size", 28)
    shape = (1, getattr(cfg, "in_channels", 1), size, size)
    rows = trace(model, shape)
    print(format_table(rows, title=f"{args.model}: input {shape}"))
    print("sizes: " + " -> ".join(map(str, spatial_path(rows, size))))
    return 0


def add_models(sub) -> None:
    sub.add_parser("models", help="list the model presets")


def cmd_models(args) -> int:
    from .models import MODELS, create_model, param_count

    for name, entry in MODELS.items():
        print(f"{name:<10} {param_count(create_model(name)):>9,} params  {entry.description}")
        if entry.recipe:
            recipe = ", ".join(f"{k.replace('_', '-')} {v}" for k, v in entry.recipe.items())
            print(f"{'':<10} {'':>16} recipe (used when `lenet train` is not given these flags): {recipe}")
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

COMMANDS = ["train", "evaluate", "summary", "models", "data"]


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
