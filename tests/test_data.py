"""IDX parsing, dataset discovery, checksums and loading."""

from __future__ import annotations

import gzip
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lenet import data
from lenet.data import builtin
from lenet.errors import DataError, IdxFormatError

from .conftest import assert_user_error, needs_data, run_cli


def idx_bytes(arr: np.ndarray, type_code: int = 0x08) -> bytes:
    return struct.pack(">HBB", 0, type_code, arr.ndim) + struct.pack(f">{arr.ndim}I", *arr.shape) + arr.tobytes()


# ------------------------------------------------------------------ IDX reader


def test_parse_valid_images_and_labels():
    imgs = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    out = data.parse_idx(idx_bytes(imgs))
    assert out.shape == (2, 3, 4) and out.dtype == np.uint8
    np.testing.assert_array_equal(out, imgs)
    labels = np.array([1, 2, 3], dtype=np.uint8)
    np.testing.assert_array_equal(data.parse_idx(idx_bytes(labels)), labels)


def test_parse_big_endian_int32():
    arr = np.array([1, -2, 70000], dtype=">i4")
    out = data.parse_idx(idx_bytes(arr, 0x0C))
    assert out.tolist() == [1, -2, 70000]


@pytest.mark.parametrize("blob, message", [
    (b"", "file is empty"),
    (b"\x00\x00", "too short for an IDX header"),
    (b"\x12\x34\x08\x01" + b"\x00" * 8, "bad IDX magic"),
    (b"\x00\x00\x07\x01\x00\x00\x00\x01\x05", "unknown IDX element type 0x07"),
    (b"\x00\x00\x08\x00", "zero dimensions"),
    (b"\x00\x00\x08\x03\x00\x00\x00\x02", "truncated header"),
    (idx_bytes(np.zeros((2, 3, 3), np.uint8))[:-1], "truncated: header declares 2x3x3 = 18 bytes of data, file has 17"),
    (idx_bytes(np.zeros((2,), np.uint8)) + b"\x00", "has trailing bytes"),
])
def test_parse_malformed(blob, message):
    with pytest.raises(IdxFormatError, match="x.idx: .*" if message else None) as exc:
        data.parse_idx(blob, "x.idx")
    assert message in str(exc.value)


def test_read_idx_gzip_raw_and_corrupt(tmp_path):
    arr = np.arange(10, dtype=np.uint8)
    (tmp_path / "a").write_bytes(idx_bytes(arr))
    (tmp_path / "a.gz").write_bytes(gzip.compress(idx_bytes(arr)))
    np.testing.assert_array_equal(data.read_idx(tmp_path / "a"), arr)
    np.testing.assert_array_equal(data.read_idx(tmp_path / "a.gz"), arr)
    blob = gzip.compress(idx_bytes(np.zeros(5000, np.uint8)))
    (tmp_path / "trunc.gz").write_bytes(blob[: len(blob) // 2])
    with pytest.raises(IdxFormatError, match="trunc.gz: corrupt or truncated gzip"):
        data.read_idx(tmp_path / "trunc.gz")
    (tmp_path / "bad.gz").write_bytes(b"\x1f\x8b" + b"garbage" * 10)
    with pytest.raises(IdxFormatError, match="bad.gz: corrupt or truncated gzip"):
        data.read_idx(tmp_path / "bad.gz")
    with pytest.raises(DataError, match="missing.gz: file not found"):
        data.read_idx(tmp_path / "missing.gz")


def test_check_pair_counts_and_label_range():
    imgs = np.zeros((3, 28, 28), np.uint8)
    with pytest.raises(IdxFormatError, match="2 labels for 3 images"):
        data.check_pair(imgs, np.zeros(2, np.uint8), 10)
    with pytest.raises(IdxFormatError, match="label 12 outside the class range 0..9"):
        data.check_pair(imgs, np.array([0, 12, 3], np.uint8), 10)
    with pytest.raises(IdxFormatError, match="expected 3 dimensions"):
        data.check_pair(np.zeros((3, 784), np.uint8), np.zeros(3, np.uint8), 10)
    data.check_pair(imgs, np.array([0, 9, 3], np.uint8), 10)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=64))
def test_fuzz_any_bytes_give_array_or_idx_error(blob):
    try:
        arr = data.parse_idx(blob, "fuzz")
    except IdxFormatError:
        return
    assert isinstance(arr, np.ndarray)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(0, 4), min_size=1, max_size=3), st.integers(-3, 3), st.binary(max_size=8))
def test_fuzz_near_valid_headers(dims, size_delta, tail):
    """Headers that are almost right: declared sizes off by a few bytes, random trailing bytes."""
    arr = np.zeros(dims, np.uint8)
    blob = idx_bytes(arr)
    blob = blob[: max(0, len(blob) + size_delta)] if size_delta < 0 else blob + b"\x00" * size_delta
    blob += tail
    try:
        out = data.parse_idx(blob, "fuzz")
    except IdxFormatError:
        assert size_delta != 0 or tail, "an exact IDX file must parse"
        return
    assert 4 + 4 * out.ndim + out.nbytes == len(blob)  # whatever parsed accounts for every byte
    if size_delta == 0 and not tail:
        assert out.shape == tuple(dims)


# ------------------------------------------------------------------ discovery


def make_fake_dataset(folder: Path, name: str = "mnist", corrupt: str | None = None) -> None:
    """Write a dataset folder whose files have the right names but tiny (wrong-checksum) content."""
    folder = folder / name
    folder.mkdir(parents=True, exist_ok=True)
    spec = data.get_spec(name)
    for f in spec.files:
        arr = np.zeros((4, 28, 28), np.uint8) if "images" in f.name else np.zeros(4, np.uint8)
        (folder / (f.name + ".gz")).write_bytes(gzip.compress(idx_bytes(arr)))


def test_discovery_order(tmp_path, monkeypatch):
    explicit, cache, debian = tmp_path / "explicit", tmp_path / "cache", tmp_path / "debian"
    monkeypatch.setenv("LENET_CACHE_DIR", str(cache))
    monkeypatch.delenv("LENET_DATA_ROOT", raising=False)
    monkeypatch.setattr(builtin, "DEBIAN_ROOT", debian)
    assert data.locate("mnist") is None
    make_fake_dataset(debian)
    assert data.locate("mnist") == debian / "mnist"
    make_fake_dataset(cache / "data")
    assert data.locate("mnist") == cache / "data" / "mnist"
    explicit.mkdir()
    assert data.locate("mnist", explicit) == cache / "data" / "mnist"  # explicit root lacks it: fall through
    make_fake_dataset(explicit)
    assert data.locate("mnist", explicit) == explicit / "mnist"
    monkeypatch.setenv("LENET_DATA_ROOT", str(explicit))
    assert data.locate("mnist") == explicit / "mnist"
    origins = [origin for _, origin in data.candidate_dirs("mnist")]
    assert origins == ["data root", "cache", "Debian package"]


def test_missing_data_message_names_places_and_ways(tmp_path, monkeypatch):
    monkeypatch.setattr(builtin, "DEBIAN_ROOT", tmp_path / "debian")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError) as exc:
        data.load_dataset("fashion-mnist", empty, download=False)
    msg = str(exc.value)
    assert str(empty / "fashion-mnist") in msg and str(tmp_path / "debian" / "fashion-mnist") in msg
    assert "lenet data fetch" in msg and "--data-root" in msg and "apt-get install dataset-fashion-mnist" in msg


def test_data_root_that_is_not_a_folder(tmp_path):
    with pytest.raises(DataError, match=f"data root {tmp_path / 'nope'} \\(from --data-root\\) is not a folder"):
        data.locate("mnist", tmp_path / "nope")


def test_unknown_dataset():
    with pytest.raises(DataError, match="unknown dataset 'cifar'"):
        data.get_spec("cifar")


def test_checksum_mismatch(tmp_path):
    make_fake_dataset(tmp_path)
    with pytest.raises(DataError, match="checksum mismatch"):
        data.verify("mnist", tmp_path)
    with pytest.raises(DataError, match="train-images-idx3-ubyte.gz: checksum mismatch"):
        data.load_dataset("mnist", tmp_path, download=False)


def test_download_is_verified_and_atomic(tmp_path, monkeypatch):
    """A mirror serving wrong content is refused and leaves no file behind."""
    bad = gzip.compress(idx_bytes(np.zeros(4, np.uint8)))
    calls = []

    def fake_download(url, timeout):
        calls.append(url)
        return bad

    monkeypatch.setattr(builtin, "_download", fake_download)
    monkeypatch.setattr(builtin.time, "sleep", lambda s: None)
    monkeypatch.setattr(builtin, "DEBIAN_ROOT", tmp_path / "debian")
    root = tmp_path / "root"
    root.mkdir()
    with pytest.raises(DataError, match="checksum mismatch after download"):
        data.fetch("mnist", root, log=lambda s: None)
    assert calls and all(u.endswith("train-images-idx3-ubyte.gz") for u in calls)
    assert not any((root / "mnist").glob("*.gz"))


@needs_data
def test_download_path_with_real_files(tmp_path, monkeypatch, data_root):
    """The download path writes verified files atomically; served from the real files here."""
    monkeypatch.setattr(builtin, "_download", lambda url, timeout: (data_root / "mnist" / url.rsplit("/", 1)[1]).read_bytes())
    monkeypatch.setattr(builtin, "DEBIAN_ROOT", tmp_path / "debian")
    root = tmp_path / "root"
    root.mkdir()
    folder = data.fetch("mnist", root, log=lambda s: None)
    assert folder == root / "mnist"
    assert len(data.verify("mnist", root)) == 4
    assert not list(folder.glob("*.part"))


# ------------------------------------------------------------------ real data


@needs_data
def test_real_fashion_mnist(fashion):
    assert fashion.train.images.shape == (60000, 28, 28) and fashion.train.images.dtype.is_floating_point is False
    assert fashion.test.images.shape == (10000, 28, 28)
    assert fashion.train.labels.bincount().tolist() == [6000] * 10
    assert fashion.classes[2] == "Pullover" and fashion.classes[9] == "Ankle boot"
    x = data.to_float(fashion.test.images[:8])
    assert x.shape == (8, 1, 28, 28) and 0.0 <= float(x.min()) and float(x.max()) <= 1.0


@needs_data
def test_real_mnist_and_decoded_cache(mnist, data_root, tmp_path, monkeypatch):
    assert mnist.train.images.shape == (60000, 28, 28)
    assert mnist.classes == tuple("0123456789")
    monkeypatch.setenv("LENET_CACHE_DIR", str(tmp_path))
    first = data.load_dataset("mnist", data_root, download=False)
    entries = list((tmp_path / "decoded").glob("builtin-*.npz"))
    assert len(entries) == 1
    verified = []
    monkeypatch.setattr(builtin, "verify_file", lambda path, spec: verified.append(path) or builtin._read_bytes(path))
    second = data.load_dataset("mnist", data_root, download=False)
    assert verified == []  # the warm cache skipped gzip and the checksums
    assert torch.equal(first.test.images, second.test.images) and torch.equal(first.train.labels, second.train.labels)


@needs_data
def test_corrupt_file_is_reported_even_with_a_warm_cache(tmp_path, data_root, monkeypatch):
    """The cache is keyed by the files' content: a file corrupted after a good start is read and
    reported at the next one, not hidden behind the decoded copy."""
    monkeypatch.setenv("LENET_CACHE_DIR", str(tmp_path / "cache"))
    shutil.copytree(data_root / "mnist", tmp_path / "mnist")
    data.load_dataset("mnist", tmp_path, download=False)  # warms the cache
    target = tmp_path / "mnist" / "train-labels-idx1-ubyte.gz"
    raw = bytearray(gzip.decompress(target.read_bytes()))
    raw[100] = (raw[100] + 1) % 10  # a wrong label: a valid file with the wrong content
    target.write_bytes(gzip.compress(bytes(raw)))
    with pytest.raises(DataError, match="train-labels-idx1-ubyte.gz: checksum mismatch"):
        data.load_dataset("mnist", tmp_path, download=False)
    proc = run_cli("train", "--dataset", "mnist", "--data-root", str(tmp_path), "--out", str(tmp_path / "run"))
    assert_user_error(proc, "train-labels-idx1-ubyte.gz: checksum mismatch", code=2)
    assert len(list((tmp_path / "cache" / "decoded").glob("builtin-*.npz"))) == 1  # the good entry, not a new one


@needs_data
def test_verify_real_files(data_root):
    report = data.verify("fashion-mnist", data_root)
    assert len(report) == 4 and set(report.values()) == {"ok"}


@needs_data
def test_corrupt_copy_of_real_data(tmp_path, data_root):
    shutil.copytree(data_root / "mnist", tmp_path / "mnist")
    target = tmp_path / "mnist" / "t10k-labels-idx1-ubyte.gz"
    blob = bytearray(target.read_bytes())
    blob[len(blob) // 2] ^= 0xFF
    target.write_bytes(bytes(blob))
    with pytest.raises(DataError, match="t10k-labels-idx1-ubyte.gz: (corrupt or truncated gzip|checksum mismatch)"):
        data.load_dataset("mnist", tmp_path, download=False)
