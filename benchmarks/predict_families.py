"""Accuracy of `lenet predict` on pictures of digits as people have them, against the textbook
MNIST preparation on the same files; and on Fashion-MNIST items pasted onto other backgrounds.

Each family (tests/trained.py: FAMILIES) is made from MNIST *test* images (and fonts), written to
files, and classified by `lenet predict RUN_DIR FILES... --json` in a subprocess; the textbook
recipe (tests/trained.py: textbook) prepares the same files for the same model. Prints a Markdown
table.

    flock /tmp/lenet-cpu.lock python benchmarks/predict_families.py MNIST_RUN [--count 500]
        [--fashion-run FASHION_RUN] [--fashion-count 1000]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))
sys.path.insert(0, str(REPO))

from tests import trained  # noqa: E402


def lenet_predict(run_dir: str, paths: list[Path]) -> list[dict]:
    env = dict(os.environ, PYTHONPATH=str(REPO / "src") + os.pathsep + os.environ.get("PYTHONPATH", ""))
    out = subprocess.run([sys.executable, "-m", "lenet", "predict", run_dir, *map(str, paths), "--json", "--top-k", "1"],
                         capture_output=True, text=True, env=env, check=True).stdout
    return json.loads(out)["predictions"]


def accuracy(predictions: list[dict], labels: list[int], classes) -> float:
    right = [bool(p["top"]) and p["top"][0]["index"] == y for p, y in zip(predictions, labels)]
    return float(np.mean(right))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run_dir", help="a run trained on MNIST")
    ap.add_argument("--count", type=int, default=500, help="pictures per family (MNIST test images 0..count-1)")
    ap.add_argument("--fashion-run", help="a run trained on Fashion-MNIST, for the pasted-items check")
    ap.add_argument("--fashion-count", type=int, default=1000)
    args = ap.parse_args()

    import torch
    from PIL import Image

    from lenet.data import load_dataset
    from lenet.use.predict import Predictor

    torch.set_num_threads(1)
    root = os.environ.get("LENET_DATA_ROOT")
    mnist = load_dataset("mnist", root, download=False)
    images, labels = mnist.test.images[:args.count].numpy(), mnist.test.labels[:args.count].numpy()
    model = Predictor.from_run(args.run_dir)
    scores, _ = model.forward(images)
    originals = float((scores.argmax(1).numpy() == labels).mean())
    print(f"model {args.run_dir}: accuracy {originals:.3f} on the {args.count} MNIST test images themselves\n")
    print("| family | `lenet predict` | textbook recipe | difference |")
    print("|---|---:|---:|---:|")
    ours_all, book_all = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for n, name in enumerate(trained.FAMILY_NAMES):
            items = trained.make_family(name, images, labels)
            paths = trained.save_family(Path(tmp) / f"family{n}", items)
            ys = [int(y) for _, y in items]
            ours = accuracy(lenet_predict(args.run_dir, paths), ys, mnist.classes)
            book_scores, _ = model.forward(np.stack([trained.textbook(Image.open(p)) for p in paths]))
            book = float((book_scores.argmax(1).numpy() == np.array(ys)).mean())
            ours_all.append(ours)
            book_all.append(book)
            print(f"| {name} | {ours:.3f} | {book:.3f} | {100 * (ours - book):+.1f} |", flush=True)
        mean_ours, mean_book = float(np.mean(ours_all)), float(np.mean(book_all))
        print(f"| **mean of the {len(ours_all)} families** | **{mean_ours:.3f}** | **{mean_book:.3f}** | "
              f"**{100 * (mean_ours - mean_book):+.1f}** |")
        worse = [n for n, o, b in zip(trained.FAMILY_NAMES, ours_all, book_all) if o < b]
        print(f"\nfamilies where lenet predict is worse than the textbook recipe: {worse or 'none'}")

        if args.fashion_run:
            fashion = load_dataset("fashion-mnist", root, download=False)
            f_images = fashion.test.images[:args.fashion_count].numpy()
            f_labels = fashion.test.labels[:args.fashion_count].numpy()
            f_model = Predictor.from_run(args.fashion_run)
            f_scores, _ = f_model.forward(f_images)
            on_originals = float((f_scores.argmax(1).numpy() == f_labels).mean())
            pictures = [trained.fashion_picture(x, np.random.default_rng([7, i])) for i, x in enumerate(f_images)]
            paths = trained.save_family(Path(tmp) / "fashion", list(zip(pictures, f_labels.tolist())))
            through = accuracy(lenet_predict(args.fashion_run, paths), f_labels.tolist(), fashion.classes)
            print(f"\nFashion-MNIST ({args.fashion_run}): accuracy {on_originals:.3f} on {args.fashion_count} test "
                  f"images as they are, {through:.3f} through `lenet predict` on the same items pasted onto larger "
                  f"backgrounds ({100 * (through - on_originals):+.1f} points)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
