"""``lenet bench``: the textbook training loop and lenet's engine, side by side, in one run.

Two "arms" train the same model with the same recipe from the same initial weights:

* ``plain``: the loop as a textbook writes it (d2l ``train_ch6``), written here and not using
  anything of lenet's engine: a ``DataLoader`` over a ``TensorDataset`` of float images, an
  eager model, and per-batch host syncs for the metrics (the book's ``Accumulator`` of
  ``loss * n``, ``accuracy`` and ``n`` as Python floats); its evaluation loops over a test
  ``DataLoader`` the same way.
* ``engine``: :func:`lenet.training.train`, exactly what ``lenet train`` runs, and its evaluator.
* ``torchconv`` (on request: ``--arms plain,torchconv,engine``): the engine with PyTorch's own
  convolutions instead of the batch-last kernels (``--no-fast-conv``), to show what each part buys.

Each (arm, seed) runs in a fresh Python process, so the peak memory of each is its own and
nothing one arm compiled or cached in memory helps the other; the arms alternate (ABBA over
seeds) so a change in machine load hits both. Training examples/sec count only the training
loops (the first epoch, with any compilation, included); evaluation images/sec is the best of
a few passes over the test set with the trained model.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

ARMS = ("plain", "torchconv", "engine")
DEFAULT_ARMS = ("plain", "engine")


@dataclass
class BenchSpec:
    model: str = "classic"
    dataset: str = "fashion-mnist"
    data_root: str | None = None
    epochs: int = 10
    batch_size: int = 256
    lr: float = 0.9
    seed: int = 0
    device: str = "auto"
    eval_batch_size: int = 256  # the textbook evaluates with its training batch size
    quick: bool = False  # synthetic data, a few steps: checks the machinery, not the speed
    compile: bool | None = None
    compile_mode: str = "default"
    amp: str = "off"
    fast_conv: bool | None = None
    overrides: dict[str, Any] = field(default_factory=dict)
    recipe: dict[str, Any] = field(default_factory=dict)  # time to accuracy: fields that replace the preset's recipe


# The fields only the side-by-side arms read: time to accuracy trains with the preset's recipe.
SIDE_BY_SIDE_ONLY = ("epochs", "batch_size", "lr", "eval_batch_size")


def _data(spec: BenchSpec):
    from ..data import load_dataset, synthetic_dataset

    if spec.quick:
        return synthetic_dataset(n_train=4 * spec.batch_size + 17, n_test=512, seed=spec.seed)
    return load_dataset(spec.dataset, spec.data_root, log=lambda s: None)


def _peak_memory(device) -> dict[str, float]:
    import resource

    import torch

    out = {"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    if device.type == "cuda":
        out["cuda_max_allocated_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
    return out


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def _book_accuracy(y_hat, y) -> float:
    """d2l.accuracy: correct predictions of a batch, as a Python float (a host sync per batch)."""
    return float((y_hat.argmax(axis=1).type(y.dtype) == y).type(y.dtype).sum())


def _book_evaluate(net, test_iter, device) -> float:
    """d2l.evaluate_accuracy_gpu: the test accuracy, batch by batch."""
    import torch

    net.eval()
    metric = [0.0, 0.0]
    with torch.no_grad():
        for X, y in test_iter:
            X, y = X.to(device), y.to(device)
            metric[0] += _book_accuracy(net(X), y)
            metric[1] += y.numel()
    return metric[0] / metric[1]


def _book_epoch(net, train_iter, loss, optimizer, device) -> tuple[list[float], float]:
    """One epoch of d2l's train_ch6: ([sum of loss, correct, examples], seconds)."""
    import torch

    net.train()
    metric = [0.0, 0.0, 0]
    _sync(device)
    t0 = time.perf_counter()
    for X, y in train_iter:
        optimizer.zero_grad()
        X, y = X.to(device), y.to(device)
        y_hat = net(X)
        l = loss(y_hat, y)
        l.backward()
        optimizer.step()
        with torch.no_grad():
            metric[0] += float(l) * X.shape[0]
            metric[1] += _book_accuracy(y_hat, y)
            metric[2] += X.shape[0]
    _sync(device)
    return metric, time.perf_counter() - t0


def run_plain(spec: BenchSpec) -> dict[str, Any]:
    """The textbook loop (d2l 7.6 ``train_ch6``), with the model built as ``lenet`` builds it."""
    import torch
    from torch import nn
    from torch.utils.data import DataLoader, TensorDataset

    from .._util import to_float
    from ..models import get_entry, resolve_config
    from ..options import resolve_device
    from ..training.engine import configure_threads

    configure_threads()
    device = resolve_device(spec.device)
    data = _data(spec)
    torch.manual_seed(spec.seed)  # the same initial weights as the engine arm
    net = get_entry(spec.model).build(resolve_config(spec.model, spec.overrides)).to(device)
    loss = getattr(net, "criterion", None) or nn.CrossEntropyLoss()
    optimizer = torch.optim.SGD(net.parameters(), lr=spec.lr)
    train_iter = DataLoader(TensorDataset(to_float(data.train.images), data.train.labels),
                            batch_size=spec.batch_size, shuffle=True,
                            generator=torch.Generator().manual_seed(spec.seed))
    test_iter = DataLoader(TensorDataset(to_float(data.test.images), data.test.labels),
                           batch_size=spec.eval_batch_size, shuffle=False)
    epochs = []
    for _ in range(spec.epochs):
        metric, seconds = _book_epoch(net, train_iter, loss, optimizer, device)
        epochs.append(seconds)
        test_acc = _book_evaluate(net, test_iter, device)
    rate = _best_rate(lambda: _book_evaluate(net, test_iter, device), len(data.test), device)
    return {"train_loss": metric[0] / metric[2], "train_acc": metric[1] / metric[2], "test_acc": test_acc,
            "classes": data.num_classes,
            "train_time_s": sum(epochs), "examples": metric[2] * spec.epochs, "epoch_times_s": epochs,
            "eval_images_per_sec": rate, "threads": torch.get_num_threads(), "device": str(device),
            **_peak_memory(device)}


def run_engine(spec: BenchSpec) -> dict[str, Any]:
    """lenet's engine: :func:`lenet.training.train` (what ``lenet train`` runs) and its evaluator."""
    import torch

    from ..training.engine import EngineOptions, Evaluator
    from ..training import TrainConfig, train

    data = _data(spec)
    cfg = TrainConfig(model=spec.model, overrides=dict(spec.overrides), dataset=data.name,
                      epochs=spec.epochs, lr=spec.lr, batch_size=spec.batch_size, seed=spec.seed,
                      device=spec.device, compile=spec.compile, compile_mode=spec.compile_mode,
                      amp=spec.amp, fast_conv=spec.fast_conv)
    notes: list[str] = []
    result = train(cfg, data=data, log=notes.append)
    f = result.final
    device = result.device
    evaluator = Evaluator(result.model, device, EngineOptions(spec.compile, spec.compile_mode, spec.amp,
                                                              spec.fast_conv),
                          batch_size=cfg.eval_batch_size)
    test_x, test_y = data.test.images.to(device), data.test.labels.to(device)
    rate = _best_rate(lambda: evaluator.correct(test_x, test_y).item(), len(data.test), device)
    return {"train_loss": f.train_loss, "train_acc": f.train_acc, "test_acc": f.test_acc, "classes": data.num_classes,
            "train_time_s": result.train_time_s, "examples": result.examples_seen,
            "epoch_times_s": [h.epoch_time_s for h in result.history], "eval_images_per_sec": rate,
            "threads": torch.get_num_threads(), "device": str(device), "conv": evaluator.conv,
            "notes": [n for n in notes if n.startswith("note")], **_peak_memory(device)}


def run_to_accuracy(spec: BenchSpec, target: float, budget_s: float) -> dict[str, Any]:
    """The preset's own recipe (``lenet models``; ``spec.recipe`` replaces some of its fields), trained
    until the test accuracy after an epoch reaches ``target`` or the training time passes ``budget_s``:
    how long it took, and where it got."""
    from ..training import TrainConfig, train

    data = _data(spec)
    cfg = TrainConfig.for_model(spec.model, overrides=dict(spec.overrides), dataset=data.name, seed=spec.seed,
                                device=spec.device, compile=spec.compile, fast_conv=spec.fast_conv, **spec.recipe)
    clock = {"seconds": 0.0}

    def done(m) -> bool:
        clock["seconds"] += m.epoch_time_s
        return m.test_acc >= target or clock["seconds"] >= budget_s

    result = train(cfg, data=data, stop=done, log=lambda s: None)
    return {"test_acc": result.test_acc, "train_time_s": result.train_time_s, "epochs": len(result.history),
            "reached": result.test_acc >= target, "recipe_epochs": cfg.epochs, "batch_size": cfg.batch_size,
            "lr": cfg.lr, "engine": result.engine,
            "curve": [(h.epoch, h.test_acc, h.epoch_time_s) for h in result.history]}


def time_to_accuracy(spec: BenchSpec, seeds: list[int], target: float, budget_s: float,
                     log: Callable[[str], None] = print) -> dict[str, Any]:
    """:func:`run_to_accuracy` for each seed, each in a fresh process; the mean over seeds."""
    rows = []
    for seed in seeds:
        r = run_arm("to-accuracy", BenchSpec(**{**spec.__dict__, "seed": seed}), target=target, budget_s=budget_s)
        r["seed"] = seed
        rows.append(r)
        log(f"seed {seed}: test acc {r['test_acc']:.4f} after {r['epochs']} epoch(s), {r['train_time_s']:.1f} s of "
            f"training ({'reached' if r['reached'] else 'not reached'}; {r['engine']})")
    mean_acc, mean_time = _mean(rows, "test_acc"), _mean(rows, "train_time_s")
    used = {k: v for k, v in spec.__dict__.items() if k not in SIDE_BY_SIDE_ONLY}
    return {"spec": used, "target": target, "budget_s": budget_s, "runs": rows,
            "mean_test_acc": mean_acc, "mean_train_time_s": mean_time,
            "met": mean_acc >= target and max(r["train_time_s"] for r in rows) <= budget_s}


def format_to_accuracy(result: dict[str, Any]) -> str:
    acc, t = result["mean_test_acc"], result["mean_train_time_s"]
    slowest = max(r["train_time_s"] for r in result["runs"])
    verdict = "met" if result["met"] else (
        f"not met: {result['target'] - acc:+.4f} accuracy short" if acc < result["target"]
        else f"not met: {slowest - result['budget_s']:.1f} s over the budget")
    return (f"mean over {len(result['runs'])} seed(s): test acc {acc:.4f} in {t:.1f} s of training (slowest "
            f"{slowest:.1f} s); target {result['target']:.3f} within {result['budget_s']:g} s: {verdict}")


def _best_rate(fn: Callable[[], Any], n: int, device, repeats: int = 3) -> float:
    fn()  # warm-up (and compilation)
    best = float("inf")
    for _ in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        best = min(best, time.perf_counter() - t0)
    return n / max(best, 1e-9)


# --------------------------------------------------------------------------------------------
# The parent: runs the arms as child processes and prints the comparison


def _child_env() -> dict[str, str]:
    env = dict(os.environ)
    src = str(Path(__file__).resolve().parents[2])  # the folder holding the lenet package
    env["PYTHONPATH"] = src + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


def run_arm(arm: str, spec: BenchSpec, **extra: Any) -> dict[str, Any]:
    """Run one arm in a fresh Python process and return its measurements."""
    from ..errors import LenetError

    payload = json.dumps({"arm": arm, "spec": spec.__dict__, **extra})
    proc = subprocess.run([sys.executable, "-m", "lenet.experiments.bench", payload], capture_output=True, text=True,
                          env=_child_env())
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        err = [line for line in proc.stderr.strip().splitlines() if line.strip()]
        raise LenetError(f"bench: the {arm} arm (seed {spec.seed}) failed: {err[-1] if err else 'no output'}")
    out = json.loads(lines[-1])
    if "error" in out:
        raise LenetError(out["error"])
    return out


# --------------------------------------------------------------------------------------------
# Arithmetic: multiply-accumulates per training example, and the cores' practical peak


def training_macs(model: str, overrides: dict[str, Any] | None = None) -> dict[str, int]:
    """Multiply-accumulates one training example costs, from ``lenet summary``'s count per layer.

    Every layer's forward MACs count three times (forward, weight gradient, input gradient) except
    for the first layer with MACs, whose input is the image: no gradient is computed for it, so it
    counts twice. ``{"forward": ..., "first_layer": ..., "train": 3 * forward - first_layer}``.
    """
    from ..models import create_model, resolve_config
    from ..models.summary import trace

    cfg = resolve_config(model, overrides or {})
    size = getattr(cfg, "in_size", 28)
    rows = trace(create_model(model, **(overrides or {})), (1, getattr(cfg, "in_channels", 1), size, size))
    forward = sum(r.macs for r in rows)
    first = next((r.macs for r in rows if r.macs), 0)
    return {"forward": forward, "first_layer": first, "train": 3 * forward - first}


def practical_peak(n: int = 4096, repeats: int = 3, device: str = "cpu", amp: str = "off") -> dict[str, Any]:
    """The multiply-accumulate rate of ``torch.mm`` on large n x n matrices: the practical peak of
    the hardware training runs on. On the CPU: fp32, with the thread count training uses here (one
    per physical core). On a CUDA device: on that device, in the precision training computes in
    there: fp32 as TF32 (:func:`~lenet.training.engine.cuda_training_settings`), or bf16/fp16
    under ``--amp``."""
    import torch

    from ..training.engine import amp_dtype, configure_threads, cuda_training_settings

    device = torch.device(device)
    threads = configure_threads()
    dtype, precision, name = torch.float32, "fp32", device.type
    if device.type == "cuda":
        cuda_training_settings()  # the peak under the settings training runs with there
        dtype, precision = amp_dtype(amp), amp if amp != "off" else "tf32"
        name = torch.cuda.get_device_name(device)
        repeats = max(repeats, 10)  # milliseconds each: more samples, for the clocks to settle
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    torch.mm(a, b)  # warm-up
    best = float("inf")
    for _ in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        torch.mm(a, b)
        _sync(device)
        best = min(best, time.perf_counter() - t0)
    return {"macs_per_sec": n ** 3 / best, "threads": threads, "n": n, "device": name, "precision": precision}


def _peak_size(device, quick: bool) -> int:
    """Matrices large enough to reach the peak: 4096 on a CPU, 8192 on a GPU (1024 for --quick)."""
    return 1024 if quick else 8192 if device.type == "cuda" else 4096


def _mean(rows: list[dict[str, Any]], key: str) -> float:
    return statistics.fmean(r[key] for r in rows)


def compare(spec: BenchSpec, seeds: list[int], arms: tuple[str, ...] = DEFAULT_ARMS,
            log: Callable[[str], None] = print) -> dict[str, Any]:
    """Run every arm for every seed (alternating) and return per-run rows and per-arm summaries,
    with each arm's multiply-accumulate rate against the practical peak measured in this run."""
    # The peak is measured before the first run and after each one, and its median used: the
    # machine's speed drifts during a benchmark, and a single measurement would catch one moment.
    from ..options import resolve_device

    device = resolve_device(spec.device)
    size = _peak_size(device, spec.quick)  # --quick checks the machinery, nothing more
    peaks = [practical_peak(n=size, device=device, amp=spec.amp)]
    macs = training_macs(spec.model, spec.overrides)
    rows: list[dict[str, Any]] = []
    for k, seed in enumerate(seeds):
        order = arms if k % 2 == 0 else tuple(reversed(arms))
        for arm in order:
            s = BenchSpec(**{**spec.__dict__, "seed": seed})
            r = run_arm(arm, s)
            r.update(arm=arm, seed=seed)
            rows.append(r)
            log(_row_line(r))
            peaks.append(practical_peak(n=size, device=device, amp=spec.amp))
    samples = [p["macs_per_sec"] for p in peaks]
    peak = {**peaks[0], "macs_per_sec": statistics.median(samples), "samples": samples}
    summary = {}
    for arm in arms:
        mine = [r for r in rows if r["arm"] == arm]
        summary[arm] = {
            "train_examples_per_sec": sum(r["examples"] for r in mine) / sum(r["train_time_s"] for r in mine),
            "median_train_examples_per_sec": statistics.median(r["examples"] / r["train_time_s"] for r in mine),
            "eval_images_per_sec": _mean(mine, "eval_images_per_sec"),
            "train_loss": _mean(mine, "train_loss"), "train_acc": _mean(mine, "train_acc"),
            "test_acc": _mean(mine, "test_acc"), "peak_rss_mb": max(r["peak_rss_mb"] for r in mine),
        }
        rate = macs["train"] * summary[arm]["median_train_examples_per_sec"]  # the median run's rate
        summary[arm].update(train_macs_per_sec=rate, fraction_of_peak=rate / peak["macs_per_sec"])
        if any("cuda_max_allocated_mb" in r for r in mine):
            summary[arm]["cuda_max_allocated_mb"] = max(r.get("cuda_max_allocated_mb", 0) for r in mine)
    out: dict[str, Any] = {"spec": spec.__dict__, "seeds": seeds, "runs": rows, "summary": summary,
                           "macs_per_example": macs, "practical_peak": peak}
    # The engine must learn as PyTorch's convolutions do (the same loop), else as the textbook loop does.
    reference = next((arm for arm in ("torchconv", "plain") if arm in summary), None)
    if reference and "engine" in summary:
        p, e = summary[reference], summary["engine"]
        chance = 1.0 / rows[0]["classes"]
        out["same_learning"] = {"reference": reference, "train_loss_ok": e["train_loss"] <= p["train_loss"] + 0.02,
                                "test_acc_ok": e["test_acc"] >= p["test_acc"] - 0.01,
                                # Two arms that both diverged (at chance) agree, and that says nothing.
                                "informative": p["test_acc"] > chance + 0.05, "chance": chance}
        out["ratios"] = {"train": e["train_examples_per_sec"] / p["train_examples_per_sec"],
                         "eval": e["eval_images_per_sec"] / p["eval_images_per_sec"], "reference": reference}
        if "plain" in summary:
            out["ratios"]["train_plain"] = e["train_examples_per_sec"] / summary["plain"]["train_examples_per_sec"]
    return out


HEADER = (f"{'arm':<9} {'seed':>4} {'train ex/s':>11} {'eval img/s':>11} {'train loss':>10} "
          f"{'train acc':>9} {'test acc':>8} {'peak RSS MB':>11}")


def _row_line(r: dict[str, Any]) -> str:
    rate = r["examples"] / max(r["train_time_s"], 1e-9)
    mem = f"{r['peak_rss_mb']:>11,.0f}"
    if "cuda_max_allocated_mb" in r:
        mem += f"  (CUDA {r['cuda_max_allocated_mb']:,.0f} MB)"
    return (f"{r['arm']:<9} {r['seed']:>4} {rate:>11,.0f} {r['eval_images_per_sec']:>11,.0f} "
            f"{r['train_loss']:>10.4f} {r['train_acc']:>9.4f} {r['test_acc']:>8.4f} {mem}")


def _spread(samples: list[float]) -> str:
    if len(samples) < 2:
        return ""
    return (f" (the median of {len(samples)} measurements before and between the runs, "
            f"{min(samples) / 1e9:.1f}-{max(samples) / 1e9:.1f})")


def _peak_where(peak: dict[str, Any]) -> str:
    where, precision = peak.get("device", "cpu"), peak.get("precision", "fp32")
    if where == "cpu":
        return f"fp32 on {peak['threads']} threads"
    return f"{'fp32 as TF32' if precision == 'tf32' else precision} on {where}"


def format_summary(result: dict[str, Any]) -> str:
    lines = ["", f"{'mean':<9} {'':>4} {'train ex/s':>11} {'eval img/s':>11} {'train loss':>10} "
                 f"{'train acc':>9} {'test acc':>8} {'peak RSS MB':>11}"]
    for arm, s in result["summary"].items():
        lines.append(f"{arm:<9} {'':>4} {s['train_examples_per_sec']:>11,.0f} {s['eval_images_per_sec']:>11,.0f} "
                     f"{s['train_loss']:>10.4f} {s['train_acc']:>9.4f} {s['test_acc']:>8.4f} "
                     f"{s['peak_rss_mb']:>11,.0f}")
    if "practical_peak" in result:
        m, peak = result["macs_per_example"], result["practical_peak"]
        lines += ["", f"arithmetic: {m['train']:,} multiply-accumulates per training example (3 x {m['forward']:,} "
                      f"forward, less the first layer's input gradient, {m['first_layer']:,}); practical peak: "
                      f"torch.mm {peak['n']}x{peak['n']} {_peak_where(peak)}, "
                      f"{peak['macs_per_sec'] / 1e9:.1f} GMAC/s" + _spread(peak.get("samples", []))]
        lines += [f"{arm:<9} {s['train_macs_per_sec'] / 1e9:6.1f} GMAC/s in training (the median run) = "
                  f"{s['fraction_of_peak']:.0%} of the practical peak" for arm, s in result["summary"].items()]
    if "ratios" in result:
        r, ok = result["ratios"], result["same_learning"]
        ref = r.get("reference", "plain")
        p, e = result["summary"][ref], result["summary"]["engine"]
        lines += ["",
                  f"engine / {ref}: training {r['train']:.2f}x, evaluation {r['eval']:.2f}x"
                  + (f" (engine / plain: training {r['train_plain']:.2f}x)" if ref != "plain" and "train_plain" in r
                     else ""),
                  f"same learning: train loss {e['train_loss']:.4f} vs {ref} {p['train_loss']:.4f} "
                  f"(allowed <= +0.02: {'yes' if ok['train_loss_ok'] else 'NO'}), test acc "
                  f"{e['test_acc']:.4f} vs {ref} {p['test_acc']:.4f} "
                  f"(allowed >= -0.01: {'yes' if ok['test_acc_ok'] else 'NO'})"]
        if not ok.get("informative", True):
            lines.append(f"  not informative: {ref} ends at chance ({p['test_acc']:.4f}, chance {ok['chance']:.4f}): "
                         f"this recipe diverges for this model; check with a smaller --lr (e.g. 0.05)")
    return "\n".join(lines)


def _child(payload: str) -> int:
    from ..errors import LenetError

    msg = json.loads(payload)
    spec = BenchSpec(**msg["spec"])
    try:
        if msg["arm"] == "plain":
            out = run_plain(spec)
        elif msg["arm"] == "to-accuracy":
            out = run_to_accuracy(spec, msg["target"], msg["budget_s"])
        else:
            if msg["arm"] == "torchconv":
                spec.fast_conv = False
            out = run_engine(spec)
    except LenetError as exc:
        out = {"error": str(exc)}
    print(json.dumps(out), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(_child(sys.argv[1]))
