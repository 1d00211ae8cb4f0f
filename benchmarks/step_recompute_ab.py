"""Training-step time with conv activations kept or recomputed, side by side in one process.

`lenet.kernels.ops.RECOMPUTE_FAN_IN` decides which conv blocks recompute their activation in the
backward pass (fan-in at most this) and which keep it from the forward pass. This script trains
one preset on random batches (batch 256, the engine's step, a constant learning rate) and
alternates blocks of 10 steps between the given limits, then prints the median step time of each
(docs/speed-notes.md, section 12).

    flock /tmp/lenet-cpu.lock python benchmarks/step_recompute_ab.py classic --limits 100000,25,0 --rounds 20
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from lenet.kernels import ops
from lenet.models import create_model
from lenet.options import TrainConfig
from lenet.training.engine import EngineOptions, TrainStep, configure_threads
from lenet.training.loop import model_criterion
from lenet.training.optim import make_optimizer, make_schedule


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("model", nargs="?", default="classic")
    ap.add_argument("--optimizer", default="sgd")
    ap.add_argument("--limits", default="100000,25", help="RECOMPUTE_FAN_IN values to alternate")
    ap.add_argument("--rounds", type=int, default=6)
    args = ap.parse_args()
    configure_threads()
    torch.manual_seed(0)
    model = create_model(args.model)
    cfg = TrainConfig.for_model(args.model, optimizer=args.optimizer, lr=0.01, schedule="constant")
    optimizer = make_optimizer(cfg, model.parameters())
    step = TrainStep(model, model_criterion(model), optimizer, make_schedule(cfg, optimizer, 100),
                     torch.device("cpu"), EngineOptions(), log=print)
    x = torch.randint(0, 255, (256, 28, 28), dtype=torch.uint8)
    y = torch.randint(0, 10, (256,))
    for _ in range(10):  # warm-up (and the kernels' build)
        step(x, y)
    limits = [int(v) for v in args.limits.split(",")]
    times: dict[int, list[float]] = {v: [] for v in limits}
    for _ in range(args.rounds):
        for v in limits:
            ops.RECOMPUTE_FAN_IN = v
            step(x, y)
            t0 = time.perf_counter()
            for _ in range(10):
                step(x, y)
            times[v].append((time.perf_counter() - t0) / 10 * 1e3)
    for v in limits:
        print(f"{args.model}: fan-in <= {v} recomputed: median {statistics.median(times[v]):.2f} ms/step, "
              f"min {min(times[v]):.2f} ({args.rounds} rounds)")


if __name__ == "__main__":
    main()
