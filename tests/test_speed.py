"""The fast engine, the benchmark and data-parallel training (no timing assertions here)."""

from __future__ import annotations

import json
import math
import os
import platform
import subprocess
import sys

import pytest
import torch

from lenet.training import engine
from lenet.data import synthetic_dataset
from lenet.models import create_model
from lenet.training import TrainConfig, train

from .conftest import REPO, assert_user_error, run_cli


def _metrics(result):
    return [(h.train_loss, h.train_acc, h.test_acc) for h in result.history]


def test_engine_step_matches_textbook_step():
    """One engine step (eager) is exactly the textbook step: same loss, same updated weights."""
    from lenet.models import create_model

    torch.manual_seed(0)
    a = create_model("classic")
    b = create_model("classic")
    b.load_state_dict(a.state_dict())
    data = synthetic_dataset(64, 8)
    x, y = data.train.images, data.train.labels
    opt_a = torch.optim.SGD(a.parameters(), lr=0.9)
    sched = torch.optim.lr_scheduler.LambdaLR(opt_a, lambda s: 1.0)
    step = engine.TrainStep(a, torch.nn.functional.cross_entropy, opt_a, sched, torch.device("cpu"),
                            engine.EngineOptions(compile=False))
    loss, correct = step(x, y)

    opt_b = torch.optim.SGD(b.parameters(), lr=0.9)
    scores = b(x.unsqueeze(1).float() / 255)
    loss_b = torch.nn.functional.cross_entropy(scores, y)
    opt_b.zero_grad()
    loss_b.backward()
    opt_b.step()
    assert loss.item() == pytest.approx(loss_b.item(), abs=1e-6)
    assert correct.item() == (scores.argmax(1) == y).sum().item()
    for pa, pb in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(pa, pb)


def test_same_seed_same_metrics_eager():
    data = synthetic_dataset(600, 200)
    cfg = TrainConfig(epochs=2, compile=False, seed=3)
    assert _metrics(train(cfg, data=data)) == _metrics(train(cfg, data=data))


@pytest.mark.slow
def test_compiled_training_is_deterministic_and_learns_like_eager():
    if engine.compiler_problem(torch.device("cpu")):
        pytest.skip("no C++ compiler for inductor here")
    data = synthetic_dataset(3 * 64 + 10, 100)
    cfg = TrainConfig(epochs=2, batch_size=64, compile=True, seed=1, fast_conv=False)
    first, second = train(cfg, data=data), train(cfg, data=data)
    assert first.engine == "compiled, PyTorch convolutions"
    assert _metrics(first) == _metrics(second)
    eager = train(TrainConfig(epochs=2, batch_size=64, compile=False, seed=1, fast_conv=False), data=data)
    for (lc, ac, tc), (le, ae, te) in zip(_metrics(first), _metrics(eager)):
        assert lc == pytest.approx(le, abs=1e-4)
        assert tc == pytest.approx(te, abs=0.02)


def test_compile_failure_falls_back_to_eager(monkeypatch):
    """If torch.compile breaks, training carries on eagerly, says so once, and learns the same."""
    def broken_compile(fn, **kwargs):
        def run(*args):
            raise RuntimeError("inductor exploded")
        return run

    monkeypatch.setattr(engine, "compiler_problem", lambda device: None)
    monkeypatch.setattr(torch, "compile", broken_compile)
    data = synthetic_dataset(300, 100)
    notes = []
    result = train(TrainConfig(epochs=2, batch_size=64, compile=True, fast_conv=False), data=data, log=notes.append)
    fallbacks = [n for n in notes if "torch.compile" in n and "failed" in n]
    assert len(fallbacks) >= 1 and "inductor exploded" in fallbacks[0]
    eager = train(TrainConfig(epochs=2, batch_size=64, compile=False, fast_conv=False), data=data)
    assert _metrics(result) == _metrics(eager)


def test_no_compiler_means_eager(monkeypatch):
    monkeypatch.setattr(engine.shutil, "which", lambda name: None)
    assert "C++ compiler" in engine.compiler_problem(torch.device("cpu"))
    assert engine.default_compile(torch.device("cpu")) is False
    notes = []
    train(TrainConfig(epochs=1, batch_size=64, compile=True, fast_conv=False), data=synthetic_dataset(128, 64),
          log=notes.append)
    assert any("cannot compile" in n for n in notes)


def test_compile_is_the_default_where_a_compiler_exists(monkeypatch):
    monkeypatch.delenv("LENET_NO_COMPILE", raising=False)
    cpu = torch.device("cpu")
    assert engine.default_compile(cpu) == (engine.compiler_problem(cpu) is None)
    monkeypatch.setenv("LENET_NO_COMPILE", "1")
    assert engine.default_compile(cpu) is False


def test_compile_cache_goes_to_lenet_cache(monkeypatch, tmp_path):
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    monkeypatch.setenv("LENET_CACHE_DIR", str(tmp_path))
    engine.use_compile_cache()
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path / "inductor")


def test_threads_one_per_physical_core(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    before = torch.get_num_threads()
    try:
        cores = engine.physical_cores()
        assert 1 <= cores <= (os.cpu_count() or cores)
        assert engine.configure_threads() == cores
        assert engine.configure_threads(local_world_size=2) == max(1, cores // 2)
    finally:
        torch.set_num_threads(before)



_HEAP_PER_STEP = """
import ctypes, json, sys
from lenet.data import synthetic_dataset
from lenet.training import TrainConfig, train
from lenet.training import engine

class MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split()]
libc = ctypes.CDLL(None)
libc.mallinfo2.restype = MallInfo2
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]

def heap():
    return libc.mallinfo2().arena

def heap_given_back():
    # 96 MB in 96 KB blocks, freed: more than glibc's largest automatic trim threshold (64 MB)
    blocks = [libc.malloc(96 << 10) for _ in range(1024)]
    grown = heap()
    for block in reversed(blocks):
        libc.free(block)
    return grown - heap()

sizes = []
if sys.argv[1] != "defaults":
    step = engine.TrainStep.__call__
    def measured(self, x, y):
        out = step(self, x, y)
        sizes.append(heap())
        return out
    engine.TrainStep.__call__ = measured
    train(TrainConfig(model=sys.argv[1], epochs=3, batch_size=256), data=synthetic_dataset(256 * 6, 64))
print(json.dumps({"kept": engine._kept_memory, "heap": sizes, "given_back": heap_given_back()}))
"""


def _heap_sizes(arm):
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k != "GLIBC_TUNABLES"}
    done = subprocess.run([sys.executable, "-c", _HEAP_PER_STEP, arm], capture_output=True, text=True,
                          env=env, cwd=REPO, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


# The heap tests read glibc's malloc statistics (and libc_ver() is ("", "") off glibc)
glibc_only = pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's malloc only")


@glibc_only
@pytest.mark.parametrize("model", ["classic", "lenet5"])
def test_cpu_training_keeps_the_memory_its_steps_free(model):
    """Training on the CPU keeps freed memory for the next step: the heap grows to the steps' working
    size and is never handed back to the kernel, which would return it as fresh pages, one page
    fault at a time (with glibc's defaults the same 18 steps shrink the heap 0-6 times here; the
    probe shrinks it every time: the next test). The page faults themselves are a benchmark's figure
    (benchmarks/malloc_ab.py; speed-notes.md 16): a step that grows the heap still touches new
    pages, and when that ends varies between machines. In fresh processes: the setting is
    process-wide."""
    kept = _heap_sizes(model)
    assert kept["kept"] is True and len(kept["heap"]) == 18
    assert all(after >= before for before, after in zip(kept["heap"], kept["heap"][1:])), kept["heap"]
    assert kept["given_back"] == 0


@glibc_only
def test_glibc_defaults_hand_the_probe_s_memory_back():
    """What keeping freed memory removes, seen by the same probe: without training (so without the
    setting) glibc gives the freed 96 MB back to the kernel."""
    defaults = _heap_sizes("defaults")
    assert defaults["kept"] is None and defaults["given_back"] > 64 << 20


def test_keep_freed_memory_leaves_the_user_s_malloc_settings_alone(monkeypatch):
    monkeypatch.setattr(engine, "_kept_memory", None)
    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "100000")
    assert engine.keep_freed_memory() is False
    monkeypatch.setattr(engine, "_kept_memory", None)

def test_evaluator_matches_plain_accuracy():
    from lenet.inspect.evaluation import accuracy
    from lenet.models import create_model

    torch.manual_seed(0)
    model = create_model("classic")
    data = synthetic_dataset(10, 300)
    ev = engine.Evaluator(model, torch.device("cpu"), engine.EngineOptions(compile=False), batch_size=128)
    assert ev.accuracy(data.test.images, data.test.labels) == accuracy(model, data.test.images, data.test.labels)


def test_custom_criterion_is_used():
    """A model's own ``criterion`` drives the engine (as the lenet5 preset's does)."""
    from lenet.models import create_model

    calls = []
    model = create_model("classic")

    def criterion(scores, labels):
        calls.append(scores.shape)
        return torch.nn.functional.cross_entropy(scores, labels) * 0.5

    model.criterion = criterion
    train(TrainConfig(epochs=1, batch_size=64, compile=False), data=synthetic_dataset(128, 64), model=model)
    assert calls and calls[0][0] == 64


def test_bad_engine_flags_are_user_errors():
    assert_user_error(run_cli("train", "--amp", "fp8"), "--amp", code=2)
    assert_user_error(run_cli("bench", "--quick", "--arms", "fast"), "--arms", "plain")
    assert_user_error(run_cli("bench", "--quick", "--model", "nope"), "unknown model")


@pytest.mark.slow
def test_bench_quick_prints_table_and_ratios(tmp_path):
    out = tmp_path / "bench.json"
    proc = run_cli("bench", "--quick", "--no-compile", "--seeds", "2", "--json", str(out))
    assert proc.returncode == 0, proc.stderr
    text = proc.stdout
    assert "train ex/s" in text and "eval img/s" in text and "peak RSS MB" in text
    assert "engine / plain: training" in text and "same learning:" in text
    result = json.loads(out.read_text())
    assert [r["arm"] for r in result["runs"]] == ["plain", "engine", "engine", "plain"]  # alternating
    assert result["ratios"]["train"] > 0 and result["ratios"]["eval"] > 0
    for arm in ("plain", "engine"):
        s = result["summary"][arm]
        assert s["train_examples_per_sec"] > 0 and s["peak_rss_mb"] > 0
        assert 0 <= s["test_acc"] <= 1
        runs = sorted(r["examples"] / r["train_time_s"] for r in result["runs"] if r["arm"] == arm)
        assert s["median_train_examples_per_sec"] == pytest.approx((runs[0] + runs[1]) / 2)  # 2 seeds
        rate = result["macs_per_example"]["train"] * s["median_train_examples_per_sec"]
        assert s["train_macs_per_sec"] == pytest.approx(rate)
        assert s["fraction_of_peak"] == pytest.approx(rate / result["practical_peak"]["macs_per_sec"])
    samples = result["practical_peak"]["samples"]  # before the first run and after each of the 4
    assert len(samples) == 5 and result["practical_peak"]["macs_per_sec"] == pytest.approx(sorted(samples)[2])
    assert "the median of 5 measurements before and between the runs" in text
    assert "multiply-accumulates per training example (3 x 416,520 forward" in text
    assert "of the practical peak" in text


@pytest.mark.slow
def test_bench_torchconv_arm_shows_what_the_kernels_add(tmp_path):
    out = tmp_path / "bench.json"
    proc = run_cli("bench", "--quick", "--no-compile", "--arms", "plain,torchconv,engine", "--json", str(out))
    assert proc.returncode == 0, proc.stderr
    assert "engine / torchconv: training" in proc.stdout and "(engine / plain: training" in proc.stdout
    assert "same learning: train loss" in proc.stdout and "vs torchconv" in proc.stdout
    result = json.loads(out.read_text())
    assert result["same_learning"]["reference"] == "torchconv"  # the same loop on PyTorch's convolutions
    assert [r["arm"] for r in result["runs"]] == ["plain", "torchconv", "engine"]
    convs = {r["arm"]: r.get("conv") for r in result["runs"]}
    assert convs["torchconv"] == engine.PYTORCH_CONV
    from lenet.kernels import ops as blconv

    if blconv._compiler() is None:
        assert convs["engine"] == engine.PYTORCH_CONV
    else:  # where the kernels can be built they must be, and be used: a broken build fails here
        assert blconv.library() is not None, blconv.problem()
        assert convs["engine"] == engine.BATCH_LAST_CONV
    # the same initial weights and batches: the two engine arms learn the same thing
    runs = {r["arm"]: r for r in result["runs"]}
    assert runs["engine"]["train_loss"] == pytest.approx(runs["torchconv"]["train_loss"], abs=1e-4)


@pytest.mark.slow
def test_bench_one_arm_and_batch_size(tmp_path):
    proc = run_cli("bench", "--quick", "--no-compile", "--arms", "engine", "--batch-size", "64")
    assert proc.returncode == 0, proc.stderr
    assert "engine" in proc.stdout and "plain " not in proc.stdout and "batch 64" in proc.stdout


def _torchrun(*args: str, env: dict | None = None, timeout: float = 300):
    full_env = dict(os.environ)
    full_env["PYTHONPATH"] = os.pathsep.join([str(REPO / "src"), str(REPO / "tests"), full_env.get("PYTHONPATH", "")])
    full_env.update(env or {})
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           *args], capture_output=True, text=True, env=full_env, timeout=timeout)


@pytest.mark.slow
def test_ddp_two_processes_learn_like_one(fashion, tmp_path):
    """2 gloo processes, each a disjoint half of every batch of 256, end with the weights one process
    gets from the same batches whole: DistributedDataParallel averages the two halves' gradients of
    a per-example mean loss, which is the gradient of the whole batch's mean (the epoch's last batch,
    6,000 % 256 = 112 examples, also splits evenly). Weights, not losses: 2 epochs of the book's
    recipe are still on the sigmoid's plateau, where the loss says little (ranks that did not
    average their gradients ended within 0.003 of one process's train loss). Measured: the weights
    agree to 1.2e-7; ranks that do not average, or that train on the same half of each batch, are
    8e-4 or more away."""
    from safetensors.torch import load_file

    from . import _ddp_train

    out = tmp_path / "ddp.json"
    proc = _torchrun(str(REPO / "tests" / "_ddp_train.py"), str(out), "2", "6000", "1000")
    assert proc.returncode == 0, proc.stderr[-3000:]
    ddp = json.loads(out.read_text())
    assert ddp["world_size"] == 2 and ddp["examples"] == 2 * 6000
    rank0, rank1 = (load_file(_ddp_train.weights_path(out, r)) for r in (0, 1))
    single = train(_ddp_train.config(2), data=_ddp_train.subset(6000, 1000))
    torch.manual_seed(single.config.seed)
    start = create_model("classic").state_dict()  # the initial weights of every run here
    want = single.model.state_dict()
    assert rank0.keys() == rank1.keys() == want.keys()
    for name, w in want.items():
        assert (w - start[name]).abs().max() > 1e-3, f"{name} barely moved: too little to compare"
        torch.testing.assert_close(rank0[name], w, rtol=0, atol=2e-6, msg=lambda m: f"{name}: {m}")
        assert torch.equal(rank0[name], rank1[name]), f"{name}: the ranks' replicas drifted apart"
    for h, s in zip(ddp["history"], single.history, strict=True):
        assert h["train_loss"] == pytest.approx(s.train_loss, abs=1e-5)
        assert h["test_acc"] == pytest.approx(s.test_acc, abs=0.002)


@pytest.mark.slow
def test_torchrun_cli_rank0_writes_the_run(data_root, tmp_path):
    run_dir = tmp_path / "run"
    proc = _torchrun("-m", "lenet", "train", "--dataset", "mnist", "--epochs", "1", "--no-compile",
                     "--no-progress", "--out", str(run_dir), env={"LENET_DATA_ROOT": str(data_root)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("examples/sec on") == 1  # rank 0 alone prints
    config = json.loads((run_dir / "config.json").read_text())
    assert config["world_size"] == 2
    assert (run_dir / "model.safetensors").is_file()
    rows = (run_dir / "metrics.csv").read_text().strip().splitlines()
    assert len(rows) == 2


def test_ddp_batch_smaller_than_the_processes_is_a_user_error(monkeypatch):
    """Under torchrun every rank needs an example per step; the check comes before joining the group."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    from lenet.errors import ConfigError

    with pytest.raises(ConfigError, match="--batch-size 1 is smaller than the 2 processes"):
        train(TrainConfig(epochs=1, batch_size=1, compile=False), data=synthetic_dataset(64, 16))


@pytest.mark.slow
def test_ddp_last_batch_too_small_for_every_process_is_left_out(fashion, tmp_path):
    """257 examples, batch 256, 2 processes: the 1-example tail would leave rank 1 with nothing."""
    out = tmp_path / "ddp.json"
    proc = _torchrun(str(REPO / "tests" / "_ddp_train.py"), str(out), "1", "257", "100")
    assert proc.returncode == 0, proc.stderr[-3000:]
    ddp = json.loads(out.read_text())
    assert ddp["world_size"] == 2 and ddp["examples"] == 256
    assert all(math.isfinite(h["train_loss"]) for h in ddp["history"])  # no NaN or infinity



def test_training_macs_count_each_layer_three_times_but_the_first_twice():
    from lenet.experiments.bench import training_macs

    m = training_macs("classic")
    assert m == {"forward": 416_520, "first_layer": 117_600, "train": 3 * 416_520 - 117_600}
    wide = training_macs("classic", {"channels": "12,32"})
    assert wide["first_layer"] == 2 * 117_600 and wide["forward"] > m["forward"]


def test_practical_peak_is_a_real_matrix_product_rate():
    from lenet.experiments.bench import practical_peak

    peak = practical_peak(n=512, repeats=2)
    assert peak["threads"] >= 1 and 1e8 < peak["macs_per_sec"] < 1e13  # 0.1 GMAC/s .. 10 TMAC/s
    assert (peak["device"], peak["precision"]) == ("cpu", "fp32")


def _time_to_accuracy(tmp_path, target: str, *flags: str):
    """`lenet bench --quick --to-accuracy TARGET --model record-mnist FLAGS`: (its stdout, its JSON)."""
    out = tmp_path / "tta.json"
    proc = run_cli("bench", "--quick", "--to-accuracy", target, "--model", "record-mnist", *flags, "--json", str(out))
    assert proc.returncode == 0, proc.stderr
    return proc.stdout, json.loads(out.read_text())


@pytest.mark.slow
def test_time_to_accuracy_mode_stops_at_the_target_and_reports_it(tmp_path):
    stdout, result = _time_to_accuracy(tmp_path, "0.6", "--budget", "60", "--seeds", "2")
    assert [r["seed"] for r in result["runs"]] == [0, 1]
    for r in result["runs"]:
        accs = [acc for _, acc, _ in r["curve"]]
        assert r["reached"] == (accs[-1] >= 0.6) and all(a < 0.6 for a in accs[:-1])  # stopped at the first hit
        assert r["epochs"] == len(accs) <= r["recipe_epochs"] == 5
        assert r["train_time_s"] == pytest.approx(sum(t for _, _, t in r["curve"]))
    assert "mean over 2 seed(s): test acc" in stdout and "target 0.600 within 60 s" in stdout


@pytest.mark.slow
def test_time_to_accuracy_mode_takes_recipe_fields_from_the_command_line(tmp_path):
    stdout, result = _time_to_accuracy(tmp_path, "0.999", "--epochs", "2", "--batch-size", "64")
    run = result["runs"][0]
    assert (run["recipe_epochs"], run["batch_size"], run["lr"]) == (2, 64, 4e-3)  # the preset's lr stays
    assert run["epochs"] <= 2 and "its own recipe with --epochs 2 --batch-size 64" in stdout
    assert "epochs" not in result["spec"] and result["spec"]["recipe"] == {"epochs": 2, "batch_size": 64}
    run = _time_to_accuracy(tmp_path, "0.999", "--lr", "0.002")[1]["runs"][0]
    assert (run["recipe_epochs"], run["batch_size"], run["lr"]) == (5, 256, 0.002)


def test_train_stop_ends_after_the_epoch_it_says_so():
    from lenet.data import synthetic_dataset

    seen = []
    result = train(TrainConfig(epochs=6, lr=0.5), data=synthetic_dataset(256, 64),
                   stop=lambda m: seen.append(m.epoch) or m.epoch == 2)
    assert seen == [1, 2] and len(result.history) == 2


@pytest.mark.parametrize("reference_acc,informative", [(0.1, False), (0.1274, False), (0.80, True)])
def test_bench_says_when_the_same_learning_check_says_nothing(monkeypatch, reference_acc, informative):
    """Both arms diverging (at chance) pass the loss/accuracy check trivially: the summary says so."""
    from lenet.experiments import bench

    def fake_arm(arm, spec, **extra):  # what a child process reports, for the summary's logic alone
        acc = reference_acc if arm == "torchconv" else reference_acc + 0.001
        return {"train_loss": 2.3, "train_acc": acc, "test_acc": acc, "classes": 10, "train_time_s": 1.0,
                "examples": 1000, "eval_images_per_sec": 1e4, "peak_rss_mb": 100.0}

    monkeypatch.setattr(bench, "run_arm", fake_arm)
    monkeypatch.setattr(bench, "practical_peak", lambda n=4096, device="cpu", amp="off": {"macs_per_sec": 1e11, "threads": 2, "n": n})
    result = bench.compare(bench.BenchSpec(), [0], ("torchconv", "engine"), log=lambda s: None)
    assert result["same_learning"]["informative"] is informative
    assert result["same_learning"]["test_acc_ok"] and result["same_learning"]["train_loss_ok"]
    assert ("not informative: torchconv ends at chance" in bench.format_summary(result)) is not informative
