"""Datasets as CSV, in the common Kaggle layout: ``label,pixel1,...,pixel784`` per row.

With or without a header row. A header names the label column ``label`` (anywhere); without
one, the first column is the label when a row has 1 + side x side values. A file whose rows have
exactly side x side values has no labels (Kaggle's competition ``test.csv``): it cannot be a test
split, and is reported and left out. Pixels must be integers 0-255, labels integers >= 0.
"""

from __future__ import annotations

import io
import math
from pathlib import Path

import numpy as np

from ..errors import DataError


def _square(n: int) -> int | None:
    side = math.isqrt(n)
    return side if side * side == n and side > 0 else None


def _layout(path: Path, header: list[str] | None, n: int) -> tuple[int | None, int]:
    """(label column or None, image side) for rows of ``n`` values."""
    if header is not None and "label" in [h.strip().lower() for h in header]:
        column = [h.strip().lower() for h in header].index("label")
        side = _square(n - 1)
    elif _square(n - 1) is not None and _square(n) is None:
        column, side = 0, _square(n - 1)
    else:
        column, side = None, _square(n)
    if side is None:
        raise DataError(f"{path}: rows have {n} values: expected a label and side x side pixels "
                        f"(e.g. label + 784 for 28x28 images)")
    return column, side


def _lines(path: Path) -> tuple[list[str] | None, list[str], int]:
    """(header fields or None, data lines, line number of the first data line)."""
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: cannot read it as text ({exc})") from None
    lines = text.splitlines()
    while lines and not lines[-1].strip():
        lines.pop()
    if not lines:
        raise DataError(f"{path}: empty file, no rows")
    first = lines[0].split(",")[0].strip()
    if first.lstrip("-").isdigit():
        return None, lines, 1
    return lines[0].split(","), lines[1:], 2


def _parse(path: Path, lines: list[str], first_line: int, n: int) -> np.ndarray:
    """The values as an int64 (rows, n) array; a malformed row is named by its line number."""
    for i, line in enumerate(lines):
        if line.count(",") != n - 1:
            raise DataError(f"{path}, line {first_line + i}: {line.count(',') + 1} values, expected {n} "
                            f"like the first row")
    try:
        return np.loadtxt(io.StringIO("\n".join(lines)), delimiter=",", dtype=np.int64, ndmin=2)
    except ValueError:
        for i, line in enumerate(lines):
            for j, token in enumerate(line.split(",")):
                if not token.strip().lstrip("-").isdigit():
                    raise DataError(f"{path}, line {first_line + i}, column {j + 1}: {token.strip()!r} "
                                    f"is not an integer") from None
        raise


def read_csv(path: Path) -> tuple[np.ndarray, np.ndarray | None]:
    """(images uint8 (N, side, side), labels (N,) or None when the file has no label column)."""
    header, lines, first_line = _lines(path)
    if not lines:
        raise DataError(f"{path}: a header but no rows")
    n = lines[0].count(",") + 1
    column, side = _layout(path, header, n)
    values = _parse(path, lines, first_line, n)
    labels = values[:, column] if column is not None else None
    pixels = np.delete(values, column, axis=1) if column is not None else values
    bad = np.argwhere((pixels < 0) | (pixels > 255))
    if len(bad):
        row, col = bad[0]
        col = col + (col >= column) if column is not None else col  # back to the file's column
        raise DataError(f"{path}, line {first_line + row}, column {col + 1}: pixel "
                        f"{values[row, col]} outside 0-255")
    if labels is not None and labels.min() < 0:
        row = int(np.argmin(labels))
        raise DataError(f"{path}, line {first_line + row}: label {labels[row]} is negative")
    return pixels.astype(np.uint8).reshape(-1, side, side), labels


def csv_files(folder: Path) -> tuple[Path, Path | None]:
    """(train CSV, test CSV or None) in ``folder``: the files whose names say train and test, or
    its only CSV file."""
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() == ".csv")
    train = [p for p in files if "train" in p.stem.lower()]
    test = [p for p in files if "test" in p.stem.lower()]
    if len(train) == 1:
        return train[0], (test[0] if len(test) == 1 else None)
    if len(files) == 1:
        return files[0], None
    names = ", ".join(p.name for p in files)
    raise DataError(f"{folder}: cannot tell which CSV file is the training set ({names}); name one "
                    f"*train*.csv and one *test*.csv")
