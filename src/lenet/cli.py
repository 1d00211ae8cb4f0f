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
from .options import (COMPILE_MODES, DEVICE_HELP, MAX_PIXELS, OPTIMIZERS, PRECISIONS, SCHEDULES, SERVE_MAX_IMAGES,
                      SERVE_MAX_UPLOAD, flag)


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (and exit status 2), not a usage dump."""

    def error(self, message: str):  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _typed(rule: str, convert=int):
    """An argparse type that converts a flag's text and checks it by its rule in lenet.options."""
    from .options import problem

    def parse(text: str):
        try:
            value = convert(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {'an integer' if convert is int else 'a number'}") from None
        why = problem(rule, value)
        if why:
            raise argparse.ArgumentTypeError(f"{text} {why}")
        return value

    parse.__name__ = rule  # argparse names the type in its messages
    return parse


_positive_int = _typed("count")
_positive_float = _typed("positive", float)


def _choices(vocabulary: dict[str, str]) -> str:
    return "; ".join(f"{name}: {text}" for name, text in vocabulary.items())


def _key_value(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise argparse.ArgumentTypeError(f"{text!r} is not key=value (e.g. --set pool=max)")
    return key.strip(), value.strip()


DATASET_HELP = ("fashion-mnist (default), mnist, or the path of your own: a folder of class folders of images "
                "(train/<class>/*.png, test/<class>/...), a Kaggle-style CSV file or folder (label,pixel1,...), "
                "or a folder of IDX files (+ classes.txt)")


def _add_data_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data-root", metavar="DIR",
                   help="folder with one sub-folder per built-in dataset (default: $LENET_DATA_ROOT, the cache, "
                        "then /usr/share/datasets)")


def _add_dataset_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dataset", default="fashion-mnist", metavar="NAME_OR_PATH", help=DATASET_HELP)
    _add_data_flags(p)
    p.add_argument("--test-fraction", type=_typed("fraction", float), default=0.1, metavar="F",
                   help="for a dataset of your own without a test split: the share of each class held out "
                        "for testing (seeded, stratified; default 0.1)")


def _add_engine_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="torch.compile the training step (default: yes where a C++ compiler or, on CUDA, "
                        "triton is available; falls back to eager mode if compiling fails)")
    p.add_argument("--compile-mode", default="default", choices=list(COMPILE_MODES),
                   help=f"torch.compile mode ({_choices(COMPILE_MODES)})")
    p.add_argument("--amp", default="off", choices=list(PRECISIONS),
                   help=f"mixed precision on CUDA, ignored on CPU ({_choices(PRECISIONS)}; default off)")
    p.add_argument("--fast-conv", action=argparse.BooleanOptionalAction, default=None,
                   help="run conv layers through lenet's batch-last CPU kernels (default: yes on the CPU "
                        "where they build and cover the model; --no-fast-conv uses PyTorch's)")


# --------------------------------------------------------------------------------------------
# lenet train


def add_train(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("train", help="train a model (defaults: the textbook LeNet and recipe)",
                       description="Train a LeNet on a dataset and write a run folder.")
    p.add_argument("--model", default="classic", help="model preset (see `lenet models`; default classic)")
    p.add_argument("--set", dest="overrides", action="append", default=[], type=_key_value,
                   metavar="KEY=VALUE", help="override a model config field, e.g. --set pool=max (repeatable)")
    _add_dataset_flags(p)
    p.add_argument("--num-classes", type=_positive_int, metavar="N",
                   help="output units (same as --set num_classes=N; extra units are never targets)")
    # Left unset, these come from the model preset's recipe (see `lenet models`), else the book's.
    p.add_argument("--epochs", type=_positive_int, default=None, help="default: the preset's recipe, else 10")
    p.add_argument("--lr", type=_positive_float, default=None, help="default: the preset's recipe, else 0.9")
    p.add_argument("--batch-size", type=_positive_int, default=None, help="default: the preset's recipe, else 256")
    p.add_argument("--optimizer", default=None, choices=list(OPTIMIZERS),
                   help=f"{_choices(OPTIMIZERS)}. Default: the preset's recipe, else sgd")
    p.add_argument("--momentum", type=_typed("unit", float), default=0.9, help="for --optimizer momentum (default 0.9)")
    p.add_argument("--weight-decay", type=_typed("nonneg", float), default=None,
                   help="default: the preset's recipe, else 0")
    p.add_argument("--schedule", default=None, choices=list(SCHEDULES),
                   help=f"{_choices(SCHEDULES)}. Default: the preset's recipe, else constant")
    p.add_argument("--shift", type=_typed("seed"), default=None, metavar="PIXELS",
                   help="augment: move each training image by up to PIXELS in each direction (default: the "
                        "preset's recipe, else 0)")
    p.add_argument("--flip", action=argparse.BooleanOptionalAction, default=None,
                   help="augment: mirror half the training images left-right (default: the preset's recipe, else off)")
    p.add_argument("--label-smoothing", type=_typed("unit", float), default=None, metavar="EPS",
                   help="cross-entropy's label smoothing (default: the preset's recipe, else 0)")
    p.add_argument("--test-flip", action=argparse.BooleanOptionalAction, default=None,
                   help="test-time flips: score each test image and its mirror image, average the probabilities "
                        "(for a model trained with --flip; default: the preset's recipe, else off)")
    p.add_argument("--seed", type=_typed("seed"), default=0)
    p.add_argument("--device", default="auto", help=DEVICE_HELP)
    p.add_argument("--out", metavar="RUN_DIR", help="run folder (default runs/<date>-<time>-<model>-<dataset>)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing run folder")
    p.add_argument("--resume", metavar="RUN_DIR",
                   help="continue an interrupted run from its last checkpoint, with its saved settings "
                        "(only --data-root, --device and --no-progress apply)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (one line per epoch only)")
    _add_engine_flags(p)
    return p


RESUME_FLAGS = ("resume", "data_root", "device", "no_progress")  # what --resume still applies


def _refuse_with_resume(args) -> None:
    """--resume continues with the run's saved settings: any other train flag given is an error."""
    from .errors import ConfigError

    train_flags = add_train(_Parser(prog="lenet").add_subparsers())._actions  # the flags and their defaults
    given = ["/".join(a.option_strings) if isinstance(a, argparse.BooleanOptionalAction) else a.option_strings[-1]
             for a in train_flags if a.option_strings and a.dest not in (*RESUME_FLAGS, "help")
             and getattr(args, a.dest) != a.default]
    if given:
        raise ConfigError(f"--resume {args.resume} continues the run with its saved settings: drop "
                          f"{', '.join(given)} (only --data-root, --device and --no-progress apply)")


def cmd_train(args) -> int:
    from .training.distributed import world
    from .errors import ConfigError
    from .training.runs import default_run_dir
    from .training import TrainConfig, resume, train

    if not world().is_main:  # under torchrun, rank 0 alone talks
        sys.stdout = open(os.devnull, "w")
    progress = not args.no_progress and sys.stderr.isatty() and world().is_main
    if args.resume:
        _refuse_with_resume(args)
        result = resume(args.resume, data_root=args.data_root, device=None if args.device == "auto" else args.device,
                        progress=progress, log=lambda s: print(s, flush=True))
        print(result.book_lines())
        print(f"{result.train_time_s:.1f} s of training ({result.engine})")
        print(f"run saved in {result.run_dir}/")
        return 0
    overrides = dict(args.overrides)
    if args.num_classes is not None:
        try:
            same = int(overrides.get("num_classes", args.num_classes)) == args.num_classes
        except ValueError:
            same = False
        if not same:
            raise ConfigError(f"--num-classes {args.num_classes} contradicts --set num_classes="
                             f"{overrides['num_classes']}: give one of them")
        overrides["num_classes"] = str(args.num_classes)
    recipe_flags = ("epochs", "lr", "batch_size", "optimizer", "weight_decay", "schedule", "shift", "flip",
                    "label_smoothing", "test_flip")
    given = {k: getattr(args, k) for k in recipe_flags if getattr(args, k) is not None}
    cfg = TrainConfig.for_model(args.model, overrides=overrides, dataset=args.dataset,
                                data_root=args.data_root, test_fraction=args.test_fraction,
                                momentum=args.momentum, seed=args.seed,
                                device=args.device, compile=args.compile,
                                compile_mode=args.compile_mode, amp=args.amp, fast_conv=args.fast_conv,
                                **given)
    out = Path(args.out) if args.out else default_run_dir(args.model, Path(args.dataset).stem or args.dataset)
    result = train(cfg, out=out, overwrite=args.overwrite, progress=progress,
                   log=lambda s: print(s, flush=True))
    print(result.book_lines())
    print(f"{result.train_time_s:.1f} s of training ({result.engine})")
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
    from .inspect.evaluation import evaluate
    from .inspect.plots import plot_confusion
    from .training.runs import load_run
    from .options import resolve_device

    device = resolve_device(args.device)
    run = load_run(args.run_dir, device)
    out = _figure_out(args, "confusion.png")  # a bad --out fails before the work, not after
    data = run.load_data(args.data_root)
    report = evaluate(run.model, data.test.images, data.test.labels, data.classes, device=device,
                      test_flip=run.test_flip)  # evaluated as the run was
    print(report.format())
    _save(lambda o: plot_confusion(report.confusion, data.classes, o, title=f"{run.config['model']} on {data.name}"), out)
    print(f"\nconfusion matrix saved to {out}")
    return 0


# --------------------------------------------------------------------------------------------
# lenet summary / lenet models


def add_summary(sub) -> None:
    p = sub.add_parser("summary", help="layer-by-layer output shapes, parameters and MACs")
    p.add_argument("--model", default="classic")
    p.add_argument("--set", dest="overrides", action="append", default=[], type=_key_value, metavar="KEY=VALUE")
    p.add_argument("--dataset", metavar="NAME_OR_PATH",
                   help="size the model for this dataset: its classes (output units) and image size, as "
                        "`lenet train --dataset` does")
    _add_data_flags(p)


def cmd_summary(args) -> int:
    from .models import create_model, resolve_config
    from .models.summary import format_table, spatial_path, trace

    overrides = dict(args.overrides)
    if args.dataset:
        overrides = _sized_for(args, overrides)
    model = create_model(args.model, **overrides)
    cfg = resolve_config(args.model, overrides)
    size = getattr(cfg, "in_size", 28)
    shape = (1, getattr(cfg, "in_channels", 1), size, size)
    rows = trace(model, shape)
    print(format_table(rows, title=f"{args.model}: input {shape}"))
    print("sizes: " + " -> ".join(map(str, spatial_path(rows, size))))
    return 0


def _sized_for(args, overrides: dict) -> dict:
    """--set overrides plus the dataset's classes and image size, where the model has those settings."""
    from .data import load_dataset
    from .models import resolve_config

    cfg = resolve_config(args.model, overrides)
    data = load_dataset(args.dataset, args.data_root, image_size=getattr(cfg, "in_size", 28), log=lambda s: None)
    sized = {"num_classes": data.num_classes, "in_size": int(data.train.images.shape[-1])}
    return {**{k: v for k, v in sized.items() if hasattr(cfg, k)}, **overrides}


def add_models(sub) -> None:
    sub.add_parser("models", help="list the model presets")


def cmd_models(args) -> int:
    from .models import MODELS, create_model, param_count

    width = max(map(len, MODELS))
    for name, entry in MODELS.items():
        print(f"{name:<{width}} {param_count(create_model(name)):>9,} params  {entry.description}")
        if entry.recipe:
            recipe = ", ".join(k.replace("_", "-") if v is True else f"no-{k.replace('_', '-')}" if v is False
                               else f"{k.replace('_', '-')} {v}" for k, v in entry.recipe.items())
            print(f"{'':<{width}} {'':>16} recipe (used when `lenet train` is not given these flags): {recipe}")
    return 0


# --------------------------------------------------------------------------------------------
# lenet data where|fetch|verify


def add_data(sub) -> None:
    from .data import DATASETS

    p = sub.add_parser("data", help="where datasets are found; fetch, verify or inspect them")
    dsub = p.add_subparsers(dest="data_command", required=True, metavar="{where,fetch,verify,inspect}")
    for name, text in (("where", "show where each dataset is looked for and found"),
                       ("fetch", "make a dataset available (download it if it is nowhere)"),
                       ("verify", "check the SHA-256 of each file of a dataset")):
        q = dsub.add_parser(name, help=text)
        q.add_argument("--dataset", choices=sorted(DATASETS), default=None,
                       help="default: all for where, fashion-mnist otherwise")
        _add_data_flags(q)
    q = dsub.add_parser("inspect", help="classes, counts per split, image size, pixel statistics, and a "
                                        "grid of sample images per class")
    q.add_argument("dataset", metavar="NAME_OR_PATH", help=DATASET_HELP)
    _add_data_flags(q)
    q.add_argument("--test-fraction", type=_typed("fraction", float), default=0.1, metavar="F",
                   help="the held-out share, for a dataset without a test split (default 0.1)")
    q.add_argument("--per-class", type=_positive_int, default=8, metavar="K", help="sample images per class (default 8)")
    q.add_argument("--out", metavar="PNG", help="the grid of samples (default <dataset>-samples.png here)")


def cmd_data(args) -> int:
    from . import data

    if args.data_command == "inspect":
        return _data_inspect(args)
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


def _data_inspect(args) -> int:
    from .data import load_dataset
    from .inspect.datasets import describe, plot_samples

    data = load_dataset(args.dataset, args.data_root, test_fraction=args.test_fraction,
                        log=lambda s: print(s, flush=True))
    out = Path(args.out) if args.out else Path(f"{data.name}-samples.png")
    if out.suffix.lower() != ".png":
        raise LenetError(f"--out {out}: give a .png file name")
    print(describe(data))
    _save(lambda o: plot_samples(data, o, per_class=args.per_class), out)
    print(f"sample grid ({args.per_class} per class) saved to {out}")
    return 0


# --------------------------------------------------------------------------------------------
# lenet compare


def add_compare(sub) -> None:
    p = sub.add_parser("compare", help="train the variants of a TOML spec and compare them in a table",
                       description="Train each variant of SPEC once per seed and write RESULTS/results.md, "
                                   "results.csv and test_acc.png. Finished runs are skipped when repeated.")
    p.add_argument("spec", metavar="SPEC.toml", help="experiment spec, e.g. experiments/exercises.toml")
    p.add_argument("--out", metavar="RESULTS_DIR", help="results folder (default results/<spec name>)")
    _add_data_flags(p)
    p.add_argument("--device", default="auto")
    _add_parallel_flags(p, "runs")


def _add_parallel_flags(p: argparse.ArgumentParser, what: str) -> None:
    """--jobs / --ray / --threads: where the runs of `lenet compare` and the trials of `lenet tune` train."""
    p.add_argument("--jobs", type=_positive_int, default=1, metavar="N",
                   help=f"train N {what} at once in worker processes on this machine, the cores split between "
                        "them (default 1: one after another in this process); with --ray: at most N at once")
    p.add_argument("--ray", nargs="?", const="", default=None, metavar="ADDRESS",
                   help=f"train the {what} as Ray tasks: on a local Ray instance, or on the cluster at ADDRESS "
                        "(auto, or ray://HOST:10001); --out must then be a folder every node sees "
                        "(needs Ray: pip install 'lenet[ray]')")
    p.add_argument("--threads", type=_positive_int, default=None, metavar="T",
                   help=f"torch threads per {what[:-1]} (default: physical cores / --jobs; 1 per Ray task; "
                        "all cores when one at a time). Results depend on it: the same T gives the same "
                        "numbers, whichever way the runs are spread")


def cmd_compare(args) -> int:
    from .experiments.compare import load_spec, run_spec

    spec = load_spec(args.spec)
    out = Path(args.out) if args.out else Path("results") / Path(args.spec).stem
    runs = sum(len(v.seeds) for v in spec.variants)
    print(f"{spec.path}: {len(spec.variants)} variants, {runs} runs -> {out}/", flush=True)
    run_spec(spec, out, data_root=args.data_root, device=args.device, log=lambda s: print(s, flush=True),
             jobs=args.jobs, ray=args.ray, threads=args.threads)
    print(f"results: {out / 'results.md'}, {out / 'results.csv'}, {out / 'test_acc.png'}")
    return 0


# --------------------------------------------------------------------------------------------
# lenet tune


def add_tune(sub) -> None:
    p = sub.add_parser("tune", help="search a space of recipes and model settings (Optuna), scored on a "
                                    "validation split",
                       description="Search the [space] of SPEC with Optuna's TPE sampler, pruning unpromising "
                                   "trials after each epoch; score trials on a validation split of the training "
                                   "set; retrain the best on the whole training set and evaluate it once on the "
                                   "test set. The study is kept in RESULTS/study.db: repeating the command "
                                   "continues it.")
    p.add_argument("spec", metavar="SPEC.toml", help="search spec, e.g. experiments/tune-classic.toml")
    p.add_argument("--trials", type=_positive_int, default=None, metavar="N",
                   help="trials in the study when done, counting those of earlier commands (default: the "
                        "spec's [tune] trials)")
    p.add_argument("--out", metavar="RESULTS_DIR", help="results folder (default results/<spec name>)")
    p.add_argument("--storage", metavar="URL",
                   help="Optuna storage URL instead of RESULTS/study.db (e.g. postgresql://... for many machines)")
    _add_data_flags(p)
    p.add_argument("--device", default="auto")
    _add_parallel_flags(p, "trials")


def cmd_tune(args) -> int:
    from .experiments.tune import load_tune_spec, run_search

    spec = load_tune_spec(args.spec)
    out = Path(args.out) if args.out else Path("results") / Path(args.spec).stem
    trials = args.trials or spec.trials
    print(f"{spec.path}: {len(spec.space)} searched settings ({', '.join(d.key for d in spec.space)}), "
          f"{trials or '?'} trials -> {out}/", flush=True)
    result = run_search(spec, out, trials=args.trials, data_root=args.data_root, device=args.device,
                        log=lambda s: print(s, flush=True), jobs=args.jobs, ray=args.ray, threads=args.threads,
                        storage=args.storage)
    print(f"best trial {result.best.number}: val acc {result.best.value:.4f}; retrained on the whole training set: "
          f"test acc {result.test_acc:.4f}")
    print(f"results: {out / 'results.md'}, {out / 'results.csv'}, {out / 'history.png'}, {out / 'importance.png'}, "
          f"{out / 'final'}/")
    return 0


# --------------------------------------------------------------------------------------------
# lenet activations / filters / mistakes: seeing inside a trained run


def _figure_out(args, default_name: str) -> Path:
    out = Path(args.out) if args.out else Path(args.run_dir) / default_name
    if out.suffix.lower() != ".png":
        raise LenetError(f"--out {out}: give a .png file name")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise LenetError(f"--out {out}: cannot create its folder ({exc.strerror or exc})") from None
    return out


def _load_run_and_data(args):
    from .training.runs import load_run

    run = load_run(args.run_dir)
    return run, run.load_data(args.data_root)


def _save(draw, out: Path) -> None:
    try:
        draw(out)
    except OSError as exc:
        raise LenetError(f"cannot write {out}: {exc.strerror or exc}; choose another --out") from None


def add_activations(sub) -> None:
    p = sub.add_parser("activations", help="feature maps of the first two conv stages for chosen test images",
                       description="Draw each chosen test image next to the feature maps of the first and "
                                   "second conv stages (after the activation). Default: test images 0 and 1.")
    p.add_argument("run_dir", metavar="RUN_DIR")
    p.add_argument("--index", type=int, nargs="+", action="extend", default=[], metavar="N",
                   help="test image index (repeatable)")
    p.add_argument("--class", dest="classes", nargs="+", action="extend", default=[], metavar="NAME",
                   help="the first test image of this class, e.g. --class Pullover --class Coat (repeatable)")
    p.add_argument("--per-class", type=_positive_int, default=1, metavar="K",
                   help="images per --class (default 1)")
    _add_data_flags(p)
    p.add_argument("--out", metavar="PNG", help="figure file (default RUN_DIR/activations.png)")


def cmd_activations(args) -> int:
    from .inspect import visualize

    run, data = _load_run_and_data(args)
    indices = args.index if args.index or args.classes else [0, 1]
    chosen = visualize.pick_images(data, indices if args.index or not args.classes else [],
                                   args.classes, args.per_class)
    if len(chosen) > 12:
        raise LenetError(f"{len(chosen)} images chosen: at most 12 fit in one figure")
    out = _figure_out(args, "activations.png")
    _save(lambda o: visualize.plot_activations(run.model, data, chosen, o), out)
    print(f"activations of test images {', '.join(map(str, chosen))} saved to {out}")
    return 0


def add_filters(sub) -> None:
    p = sub.add_parser("filters", help="the first conv layer's kernels as a grid")
    p.add_argument("run_dir", metavar="RUN_DIR")
    p.add_argument("--out", metavar="PNG", help="figure file (default RUN_DIR/filters.png)")


def cmd_filters(args) -> int:
    from .inspect import visualize
    from .training.runs import load_run

    run = load_run(args.run_dir)
    out = _figure_out(args, "filters.png")
    _save(lambda o: visualize.plot_filters(run.model, o), out)
    print(f"first-layer kernels saved to {out}")
    return 0


def add_mistakes(sub) -> None:
    p = sub.add_parser("mistakes", help="the most confidently misclassified test images",
                       description="A grid of the test images the model gets wrong with the highest "
                                   "confidence, with true and predicted labels.")
    p.add_argument("run_dir", metavar="RUN_DIR")
    p.add_argument("--count", type=_positive_int, default=18, metavar="N", help="images to show (default 18)")
    _add_data_flags(p)
    p.add_argument("--out", metavar="PNG", help="figure file (default RUN_DIR/mistakes.png)")


def cmd_mistakes(args) -> int:
    from .inspect import visualize

    run, data = _load_run_and_data(args)
    mistakes, wrong = visualize.confident_mistakes(run.model, data, args.count)
    out = _figure_out(args, "mistakes.png")
    title = (f"{run.config['model']} on {data.name}: the {len(mistakes)} most confident of {wrong:,} "
             f"misclassified test images (confidence = softmax)")
    _save(lambda o: visualize.plot_mistakes(mistakes, data, o, title=title), out)
    for m in mistakes:
        print(f"#{m.index:<6} true {data.classes[m.true]:<12} predicted {visualize.class_name(data.classes, m.pred):<12} "
              f"confidence {m.confidence:.3f}")
    print(f"{wrong:,} of {len(data.test):,} test images misclassified; figure saved to {out}")
    return 0


# --------------------------------------------------------------------------------------------
# lenet predict / export / serve


def add_predict(sub) -> None:
    p = sub.add_parser("predict", help="classify image files (PNG, JPEG, ...) with a trained run",
                       description="Top-k classes with probabilities for each image. Images are made to "
                                   "look like the dataset first (grey-scale, light-on-dark, cropped, "
                                   "scaled and centred); every image is read before any is predicted, "
                                   "so one bad file stops the command.")
    p.add_argument("run_dir", metavar="RUN_DIR")
    p.add_argument("images", metavar="IMAGE", nargs="+")
    p.add_argument("--top-k", type=_positive_int, default=3, metavar="K", help="classes to show (default 3)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    p.add_argument("--no-preprocess", action="store_true",
                   help="feed each image as is (grey-scaled and resized to 28x28 only)")
    p.add_argument("--show-preprocessed", metavar="OUT.png",
                   help="save what the network saw: a 28x28 tile per image, side by side "
                        "(--json also says what the preprocessing decided for each image)")
    p.add_argument("--device", default="cpu", help="cpu (default), auto, cuda, mps")


def cmd_predict(args) -> int:
    import json

    from .use.predict import Predictor, load_all, save_preprocessed
    from .options import resolve_device

    predictor = Predictor.from_run(args.run_dir, resolve_device(args.device))
    images = load_all(args.images)  # fail fast: a bad file stops us before any prediction
    prepared = [predictor.prepare(img, not args.no_preprocess) for img in images]
    results = predictor.predict(prepared, args.top_k, sources=[str(p) for p in args.images])
    if args.show_preprocessed:
        save_preprocessed(prepared, args.show_preprocessed)
    if args.json:
        print(json.dumps({"run": str(args.run_dir), "model": predictor.model_name,
                          "dataset": predictor.dataset, "predictions": [r.to_dict() for r in results]},
                         indent=2))
    else:
        for r in results:
            if r.blank:
                print(f"{r.source}: blank, not classified ({r.prepared.decisions.get('blank', 'no content found')})")
                continue
            tops = ", ".join(f"{name} ({prob:.1%})" for name, _, prob in r.top)
            print(f"{r.source}: {tops}")
        if args.show_preprocessed:
            print(f"network input saved to {args.show_preprocessed}")
    return 0


def add_export(sub) -> None:
    p = sub.add_parser("export", help="export a trained run to ONNX (class names in its metadata)")
    p.add_argument("run_dir", metavar="RUN_DIR")
    p.add_argument("--format", default="onnx", choices=["onnx"])
    p.add_argument("--out", metavar="FILE", help="output file (default RUN_DIR/model.onnx)")
    p.add_argument("--opset", type=_positive_int, default=None, help="ONNX opset (default: the exporter's)")


def cmd_export(args) -> int:
    from .use.export import export_onnx

    out = Path(args.out) if args.out else Path(args.run_dir) / "model.onnx"
    info = export_onnx(args.run_dir, out, opset=args.opset)
    print(f"wrote {out} ({info['bytes']:,} bytes, opset {info['opset']}): input 'image' float32 "
          f"(N, 1, 28, 28) in [0, 1], output 'scores' (N, {len(info['classes'])})")
    if info["test_flip"]:
        print("note: the run was evaluated with test-time flips; the graph scores one image: average the "
              "probabilities of the image and its mirror image for the run's accuracy (metadata test_flip)")
    return 0


def add_serve(sub) -> None:
    p = sub.add_parser("serve", help="local web page: draw or upload an image and watch the network classify it")
    p.add_argument("run_dir", metavar="RUN_DIR")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000; 0 picks a free one)")
    p.add_argument("--max-upload", type=_positive_int, default=SERVE_MAX_UPLOAD, metavar="BYTES",
                   help=f"largest accepted request body in bytes (default {SERVE_MAX_UPLOAD // 2**20} MiB)")
    p.add_argument("--max-images", type=_positive_int, default=SERVE_MAX_IMAGES, metavar="N",
                   help=f"most images in one request (default {SERVE_MAX_IMAGES})")
    p.add_argument("--max-pixels", type=_positive_int, default=MAX_PIXELS, metavar="N",
                   help=f"largest accepted image in pixels, checked before decoding (default {MAX_PIXELS:,})")
    p.add_argument("--threads", type=_positive_int, default=1,
                   help="torch intra-op threads per worker (default 1: concurrent requests are batched)")
    p.add_argument("--workers", type=_positive_int, default=1,
                   help="processes serving the same port, each with its own model (default 1)")
    p.add_argument("--log-requests", action="store_true", help="log every request to stderr")


def cmd_serve(args) -> int:
    from .use.serve import make_server, serve_workers

    if not 0 <= args.port <= 65535:
        raise LenetError(f"--port {args.port}: must be between 0 and 65535")
    server = make_server(args.run_dir, args.host, args.port, max_upload=args.max_upload,
                         max_images=args.max_images, max_pixels=args.max_pixels,
                         threads=args.threads, log_requests=args.log_requests)
    host, port = server.server_address[:2]
    shown = f"[{host}]" if ":" in host else host
    if host not in ("127.0.0.1", "::1", "localhost"):
        print(f"warning: --host {host} makes the page reachable from other machines", file=sys.stderr)
    workers = f", {args.workers} workers" if args.workers > 1 else ""
    print(f"serving {server.app.predictor.model_name} ({server.app.predictor.dataset}) on "
          f"http://{shown}:{port}/  (Ctrl-C to stop{workers})", flush=True)
    try:
        serve_workers(server, args.workers, args.run_dir, threads=args.threads)
    except KeyboardInterrupt:
        print("stopped", flush=True)
    finally:
        server.server_close()
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
    from .experiments.bench import BenchSpec

    for name, kind in (("epochs", _positive_int), ("batch_size", _positive_int), ("lr", _positive_float)):
        p.add_argument(flag(name), type=kind,
                       help=f"default {getattr(BenchSpec, name):g}; with --to-accuracy, the preset's recipe")
    p.add_argument("--seeds", type=_positive_int, default=1, help="runs per arm, seeds 0..N-1 (default 1)")
    p.add_argument("--device", default="auto")
    p.add_argument("--arms", default="plain,engine",
                   help="which loops to run: plain, engine, torchconv (the engine with PyTorch's "
                        "convolutions); default plain,engine")
    p.add_argument("--quick", action="store_true",
                   help="a few steps on synthetic data: checks that everything runs, measures nothing useful")
    p.add_argument("--json", metavar="FILE", help="also write all measurements as JSON")
    p.add_argument("--to-accuracy", type=_typed("fraction", float), metavar="ACC",
                   help="time-to-accuracy mode: train each --model with its own recipe (`lenet models`) until the "
                        "test accuracy after an epoch reaches ACC or --budget runs out; report seconds, epochs, "
                        "accuracy over --seeds")
    p.add_argument("--budget", type=_positive_float, default=60.0, metavar="SECONDS",
                   help="training-time budget for --to-accuracy (default 60)")
    _add_engine_flags(p)


def cmd_bench(args) -> int:
    import json

    import torch

    from .experiments.bench import ARMS, BenchSpec, HEADER, compare, format_summary
    from .errors import ConfigError
    from .models import MODELS, resolve_config
    from .options import TrainConfig, resolve_device

    arms = tuple(a.strip() for a in args.arms.split(",") if a.strip())
    if not arms or any(a not in ARMS for a in arms):
        raise ConfigError(f"--arms {args.arms!r}: choose from {', '.join(ARMS)} (comma-separated)")
    models = list(MODELS) if args.model == "all" else [m.strip() for m in args.model.split(",") if m.strip()]
    for name in models:
        resolve_config(name, dict(args.overrides))  # an unknown preset or setting is a user error
    TrainConfig(compile=args.compile, compile_mode=args.compile_mode, amp=args.amp).validate()
    device = resolve_device(args.device)
    recipe = _bench_recipe(args)
    if args.to_accuracy:
        return _bench_to_accuracy(args, models, recipe)
    if args.quick:
        recipe["epochs"] = min(recipe.get("epochs", BenchSpec.epochs), 1)
    results = []
    for name in models:
        spec = BenchSpec(model=name, dataset=args.dataset, data_root=args.data_root, device=args.device,
                         quick=args.quick, compile=args.compile, compile_mode=args.compile_mode, amp=args.amp,
                         fast_conv=args.fast_conv, overrides=dict(args.overrides), **recipe)
        data = "synthetic data (--quick)" if args.quick else args.dataset
        print(f"{name}, batch {spec.batch_size}, SGD lr {spec.lr:g}, {spec.epochs} epoch(s), "
              f"{args.seeds} seed(s), {data}, {_device_words(device)}, "
              f"torch {torch.__version__}", flush=True)
        print(HEADER, flush=True)
        result = compare(spec, list(range(args.seeds)), arms, log=lambda s: print(s, flush=True))
        print(format_summary(result), flush=True)
        for note in sorted({n for r in result["runs"] for n in r.get("notes", [])}):
            print(note)
        print()
        results.append(result)
        if args.json:  # after each model: what was measured stays if a later one fails
            Path(args.json).write_text(json.dumps(results if len(results) > 1 else results[0], indent=2))
    if args.json:
        print(f"measurements written to {args.json}")
    return 0


def _device_words(device) -> str:
    import torch

    if device.type == "cuda":
        return f"{device} ({torch.cuda.get_device_name(device)})"
    return f"{device} ({torch.get_num_threads()} threads)"


def _bench_recipe(args) -> dict:
    """The recipe fields given on the command line (--epochs, --batch-size, --lr)."""
    return {k: v for k in ("epochs", "batch_size", "lr") if (v := getattr(args, k)) is not None}


def _bench_to_accuracy(args, models: list[str], recipe: dict) -> int:
    import json

    from .experiments.bench import BenchSpec, format_to_accuracy, time_to_accuracy

    results = []
    changed = " ".join(f"{flag(k)} {v:g}" for k, v in recipe.items())
    for name in models:
        spec = BenchSpec(model=name, dataset=args.dataset, data_root=args.data_root, device=args.device,
                         quick=args.quick, compile=args.compile, fast_conv=args.fast_conv,
                         overrides=dict(args.overrides), recipe=recipe)
        print(f"{name} on {args.dataset}: until test acc >= {args.to_accuracy} or {args.budget:g} s of training, "
              f"{args.seeds} seed(s), its own recipe{' with ' + changed if changed else ''}", flush=True)
        result = time_to_accuracy(spec, list(range(args.seeds)), args.to_accuracy, args.budget,
                                  log=lambda s: print(s, flush=True))
        print(format_to_accuracy(result) + "\n", flush=True)
        results.append(result)
    if args.json:
        Path(args.json).write_text(json.dumps(results if len(results) > 1 else results[0], indent=2))
        print(f"measurements written to {args.json}")
    return 0


# --------------------------------------------------------------------------------------------

COMMANDS = ["train", "evaluate", "summary", "models", "data", "compare", "tune", "activations", "filters", "mistakes", "predict", "export", "serve", "bench"]


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
