"""Run by tests/test_speed.py under torchrun: train on a real-data subset, rank 0 writes JSON."""

import json
import sys

from lenet.data import Dataset, Split, load_dataset
from lenet.training.distributed import world
from lenet.training import TrainConfig, train


def subset(n_train: int, n_test: int) -> Dataset:
    d = load_dataset("fashion-mnist", download=False, log=lambda s: None)
    return Dataset(d.name, d.classes, Split(d.train.images[:n_train], d.train.labels[:n_train]),
                   Split(d.test.images[:n_test], d.test.labels[:n_test]))


def main(out: str, epochs: int, n_train: int, n_test: int) -> None:
    result = train(TrainConfig(epochs=epochs, compile=False), data=subset(n_train, n_test))
    if world().is_main:
        with open(out, "w") as fh:
            json.dump({"world_size": world().size, "examples": result.examples_seen,
                       "history": [vars(h) for h in result.history]}, fh)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]))
