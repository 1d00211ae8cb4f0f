"""Time `load_dataset` on the three kinds of your own data, built from the whole of MNIST.

    python benchmarks/load_datasets.py [DATA_ROOT]

Writes MNIST (60,000 + 10,000 images) into a temporary folder as a tree of PNG files, as two
Kaggle-style CSV files and as a folder of IDX files, then loads each twice with an empty lenet
cache: the first load decodes and fills the cache, the second reads the files, hashes them and
takes the decoded arrays from the cache. The built-in loader is timed the same way.
"""

from __future__ import annotations

import gzip
import os
import struct
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))


def write_all(root: Path, data) -> dict[str, Path]:
    from PIL import Image

    for split, part in (("train", data.train), ("test", data.test)):
        for i, (x, y) in enumerate(zip(part.images.numpy(), part.labels.numpy())):
            f = root / "png" / split / str(y) / f"{i:05d}.png"
            f.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(x).save(f)
        rows = ["label," + ",".join(f"pixel{i + 1}" for i in range(784))]
        rows += [f"{y}," + ",".join(map(str, x.ravel())) for x, y in zip(part.images.numpy(), part.labels.numpy())]
        (root / "csv").mkdir(exist_ok=True)
        (root / "csv" / f"mnist_{split}.csv").write_text("\n".join(rows) + "\n")
        (root / "idx").mkdir(exist_ok=True)
        prefix = "train" if split == "train" else "t10k"
        for kind, arr in (("images-idx3", part.images.numpy()), ("labels-idx1", part.labels.numpy().astype(np.uint8))):
            head = struct.pack(">HBB", 0, 8, arr.ndim) + struct.pack(f">{arr.ndim}I", *arr.shape)
            (root / "idx" / f"{prefix}-{kind}-ubyte.gz").write_bytes(gzip.compress(head + arr.tobytes(), 6))
    return {k: root / k for k in ("png", "csv", "idx")}


def timed(name: str, root=None) -> tuple[float, int]:
    from lenet.data import load_dataset

    t = time.perf_counter()
    data = load_dataset(name, root, log=lambda s: None)
    return time.perf_counter() - t, len(data.train) + len(data.test)


def main() -> int:
    data_root = sys.argv[1] if len(sys.argv) > 1 else None
    with tempfile.TemporaryDirectory() as tmp:
        os.environ["LENET_CACHE_DIR"] = str(Path(tmp) / "cache")
        from lenet.data import load_dataset

        mnist = load_dataset("mnist", data_root, log=lambda s: None)
        os.environ["LENET_CACHE_DIR"] = str(Path(tmp) / "cache2")
        paths = write_all(Path(tmp), mnist)
        rows = [("mnist (built in)", *timed("mnist", data_root), timed("mnist", data_root)[0])]
        for kind, path in paths.items():
            first, n = timed(str(path))
            rows.append((f"{kind} folder", first, n, timed(str(path))[0]))
    print(f"{'dataset':<18} {'images':>7} {'first load (s)':>15} {'second load (s)':>16}")
    for name, first, n, second in rows:
        print(f"{name:<18} {n:>7,} {first:>15.2f} {second:>16.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
