"""Run by tests/test_speed.py under torchrun: train on a real-data subset; rank 0 writes JSON, and
every rank writes its final weights beside it (``rank<r>.safetensors``)."""

import json
import sys
from pathlib import Path

from lenet.data import Dataset, load_dataset
from lenet.training.distributed import world
from lenet.training import TrainConfig, train


def subset(n_train: int, n_test: int) -> Dataset:
    return load_dataset("fashion-mnist", download=False, log=lambda s: None).head(n_train, n_test)


def config(epochs: int) -> TrainConfig:
    """The recipe of both sides of the comparison: the book's, with PyTorch's convolutions (torchrun
    never uses lenet's CPU kernels, so the single process does not either)."""
    return TrainConfig(epochs=epochs, compile=False, fast_conv=False)


def weights_path(out: str | Path, rank: int) -> Path:
    return Path(out).with_name(f"rank{rank}.safetensors")


def main(out: str, epochs: int, n_train: int, n_test: int) -> None:
    from safetensors.torch import save_file

    result = train(config(epochs), data=subset(n_train, n_test))
    save_file({k: v.detach().contiguous() for k, v in result.model.state_dict().items()},
              str(weights_path(out, world().rank)))
    if world().is_main:
        with open(out, "w") as fh:
            json.dump({"world_size": world().size, "examples": result.examples_seen,
                       "history": [vars(h) for h in result.history]}, fh)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]))
