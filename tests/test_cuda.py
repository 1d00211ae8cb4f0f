"""The CUDA paths, on a real GPU: training (fp32, bf16 and fp16 autocast, CUDA graphs), a run
trained there used on the CPU, and the benchmark's GPU peak. (torchrun over NCCL needs two GPUs:
one GPU cannot hold two NCCL ranks, so it is not tested here.)

Every test here is marked ``gpu``: where there is no CUDA device (CI, the project's own
machines) they are deselected, not skipped (tests/conftest.py). On a machine with one,
``pytest -m gpu`` runs them alone.
"""

from __future__ import annotations

import json

import pytest
import torch

from lenet.training import TrainConfig, train

from .conftest import run_cli

pytestmark = [pytest.mark.gpu, pytest.mark.slow]


@pytest.fixture(autouse=True)
def _process_settings():
    """Training on CUDA sets process-wide settings (cuDNN's autotuner, TF32 matmuls): put them back
    after each test, so that no later test, on the CPU either, runs under them."""
    precision, benchmark = torch.get_float32_matmul_precision(), torch.backends.cudnn.benchmark
    yield
    torch.set_float32_matmul_precision(precision)
    torch.backends.cudnn.benchmark = benchmark


def _recipe(device: str, **fields) -> TrainConfig:
    """record-mnist's recipe (Adam, one cycle), 2 epochs of MNIST: about 0.98, a second an epoch on a GPU."""
    return TrainConfig.for_model("record-mnist", dataset="mnist", epochs=2, device=device, compile=False, **fields)


def test_training_on_cuda_learns_as_on_the_cpu(mnist):
    """The same recipe, initial weights and batches on the GPU (cuDNN, TF32) and the CPU (PyTorch's
    convolutions): the same learning, up to the rounding of TF32 and cuDNN's algorithms."""
    cpu = train(_recipe("cpu", fast_conv=False), data=mnist)  # first: before the GPU's run sets TF32
    gpu = train(_recipe("cuda"), data=mnist)
    assert gpu.device.type == "cuda" and next(gpu.model.parameters()).is_cuda
    assert gpu.test_acc > 0.97 and cpu.test_acc > 0.97
    assert gpu.test_acc == pytest.approx(cpu.test_acc, abs=0.015)
    assert gpu.final.train_loss == pytest.approx(cpu.final.train_loss, abs=0.03)


@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_mixed_precision_on_cuda_learns(mnist, amp):
    result = train(_recipe("cuda", amp=amp), data=mnist)
    assert result.test_acc > 0.97, result.history


def test_cuda_graphs_through_compile_train(mnist, monkeypatch):
    """--compile-mode reduce-overhead: the step compiled by inductor and replayed as a CUDA graph."""
    monkeypatch.delenv("LENET_NO_COMPILE", raising=False)
    notes: list[str] = []
    result = train(TrainConfig.for_model("record-mnist", dataset="mnist", epochs=1, device="cuda", compile=True,
                                         compile_mode="reduce-overhead"), data=mnist, log=notes.append)
    assert "compiled" in result.engine and not any("cannot compile" in n for n in notes), (result.engine, notes)
    assert result.test_acc > 0.9, result.history


@pytest.mark.parametrize("preset,dataset,floor", [("record-mnist", "mnist", 0.97),
                                                  ("record-fashion", "fashion-mnist", 0.80)])
def test_record_presets_learn_on_cuda(request, preset, dataset, floor):
    """The record recipes' augmentation (shifts, flips) and test-time flips run on the device too."""
    data = request.getfixturevalue("mnist" if dataset == "mnist" else "fashion")
    result = train(TrainConfig.for_model(preset, dataset=dataset, epochs=1, device="cuda", compile=False), data=data)
    assert result.test_acc > floor, result.history


def _last_test_acc(run_dir) -> float:
    """The test accuracy of the run's last epoch, as its metrics.csv recorded it."""
    header, *rows = (run_dir / "metrics.csv").read_text().strip().splitlines()
    return float(rows[-1].split(",")[header.split(",").index("test_acc")])


def test_a_run_trained_on_cuda_is_used_on_the_cpu(tmp_path):
    run_dir = tmp_path / "run"
    proc = run_cli("train", "--model", "record-mnist", "--dataset", "mnist", "--epochs", "1", "--device", "cuda",
                   "--no-compile", "--no-progress", "--out", str(run_dir))
    assert proc.returncode == 0, proc.stderr
    assert json.loads((run_dir / "config.json").read_text())["device"].startswith("cuda")
    proc = run_cli("evaluate", str(run_dir), "--device", "cpu", "--out", str(tmp_path / "confusion.png"))
    assert proc.returncode == 0, proc.stderr
    cpu_acc = float(proc.stdout.split()[2])  # "test accuracy 0.9812 on 10000 images"
    assert cpu_acc > 0.97 and cpu_acc == pytest.approx(_last_test_acc(run_dir), abs=0.002)


def test_bench_on_cuda_measures_the_gpu_s_peak(tmp_path):
    out = tmp_path / "bench.json"
    proc = run_cli("bench", "--quick", "--device", "cuda", "--no-compile", "--json", str(out))
    assert proc.returncode == 0, proc.stderr
    result = json.loads(out.read_text())
    peak = result["practical_peak"]
    assert peak["device"] == torch.cuda.get_device_name() and peak["precision"] == "tf32"
    assert peak["macs_per_sec"] > 1e12  # any CUDA GPU of the last decade: over 1 TMAC/s in TF32 or fp32
    assert all(r["device"].startswith("cuda") and r["cuda_max_allocated_mb"] > 0 for r in result["runs"])
    assert f"fp32 as TF32 on {peak['device']}" in proc.stdout
