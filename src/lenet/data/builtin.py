"""The built-in datasets (Fashion-MNIST, MNIST): discovery, verified download, loading.

Where a dataset is looked for, in order (the first folder holding all four files wins):

1. ``data_root`` argument / ``--data-root DIR`` / env ``LENET_DATA_ROOT``: ``DIR/<name>/``
2. the user's cache (the default data root): ``$LENET_CACHE_DIR/data/<name>/``, else
   ``$XDG_CACHE_HOME/lenet/data/<name>/``, else ``~/.cache/lenet/data/<name>/``
3. Debian's packaged copy: ``/usr/share/datasets/<name>/`` (package ``dataset-fashion-mnist``)
4. a download from the dataset's official mirrors into the first data root above.

Integrity is checked on the *decompressed* bytes (SHA-256 and size), because Debian recompresses
the .gz files. Decoded, verified arrays are cached (:mod:`.cache`) under the hash of the files as
stored, so a later start reads and hashes the files but skips gzip and the checksums, and a
file that changed since is verified again.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import time
import urllib.error
import urllib.request
import zlib
from dataclasses import dataclass
from pathlib import Path


from .._util import atomic_write_bytes, cache_dir
from ..errors import DataError
from .cache import Entry, file_digest
from .dataset import Dataset, from_arrays
from .idx import _read_bytes, check_pair, parse_idx

DEBIAN_ROOT = Path("/usr/share/datasets")

@dataclass(frozen=True)
class FileSpec:
    """One IDX file of a dataset: its name and the checksum of its decompressed content."""

    name: str  # e.g. "train-images-idx3-ubyte" (stored with or without .gz)
    sha256: str
    size: int


@dataclass(frozen=True)
class DatasetSpec:
    name: str
    classes: tuple[str, ...]
    train_images: FileSpec
    train_labels: FileSpec
    test_images: FileSpec
    test_labels: FileSpec
    mirrors: tuple[str, ...]
    debian_package: str | None = None
    licence: str = ""

    @property
    def files(self) -> tuple[FileSpec, ...]:
        return (self.train_images, self.train_labels, self.test_images, self.test_labels)


def _files(sha: dict[str, tuple[str, int]]) -> dict[str, FileSpec]:
    return {key: FileSpec(name, *sha[name]) for key, name in (
        ("train_images", "train-images-idx3-ubyte"),
        ("train_labels", "train-labels-idx1-ubyte"),
        ("test_images", "t10k-images-idx3-ubyte"),
        ("test_labels", "t10k-labels-idx1-ubyte"),
    )}


DATASETS: dict[str, DatasetSpec] = {
    "fashion-mnist": DatasetSpec(
        name="fashion-mnist",
        classes=("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                 "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"),
        mirrors=("http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",),
        debian_package="dataset-fashion-mnist",
        licence="Zalando Research, MIT licence",
        **_files({
            "train-images-idx3-ubyte": ("c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888", 47040016),
            "train-labels-idx1-ubyte": ("bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9", 60008),
            "t10k-images-idx3-ubyte": ("5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b", 7840016),
            "t10k-labels-idx1-ubyte": ("0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34", 10008),
        }),
    ),
    "mnist": DatasetSpec(
        name="mnist",
        classes=tuple(str(d) for d in range(10)),
        mirrors=("https://ossci-datasets.s3.amazonaws.com/mnist/",
                 "http://yann.lecun.com/exdb/mnist/"),
        licence="LeCun, Cortes, Burges; CC BY-SA 3.0",
        **_files({
            "train-images-idx3-ubyte": ("ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db", 47040016),
            "train-labels-idx1-ubyte": ("65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5", 60008),
            "t10k-images-idx3-ubyte": ("0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7", 7840016),
            "t10k-labels-idx1-ubyte": ("ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2", 10008),
        }),
    ),
}


def get_spec(name: str) -> DatasetSpec:
    try:
        return DATASETS[name]
    except KeyError:
        raise DataError(f"unknown dataset {name!r}: choose one of {', '.join(DATASETS)}") from None


# --------------------------------------------------------------------------------------------
# Where data lives


def default_data_root() -> Path:
    return cache_dir() / "data"


def _explicit_root(data_root: str | os.PathLike | None) -> Path | None:
    if data_root is not None:
        root, origin = Path(data_root).expanduser(), "--data-root"
    elif os.environ.get("LENET_DATA_ROOT"):
        root, origin = Path(os.environ["LENET_DATA_ROOT"]).expanduser(), "LENET_DATA_ROOT"
    else:
        return None
    if not root.is_dir():
        raise DataError(f"data root {root} (from {origin}) is not a folder: create it, or point "
                        f"{origin} at a folder holding <dataset>/train-images-idx3-ubyte.gz etc.")
    return root


def candidate_dirs(name: str, data_root: str | os.PathLike | None = None) -> list[tuple[Path, str]]:
    """Folders searched for dataset ``name``, in order, each with a word on where it comes from."""
    out = []
    explicit = _explicit_root(data_root)
    if explicit is not None:
        out.append((explicit / name, "data root"))
    out.append((default_data_root() / name, "cache"))
    out.append((DEBIAN_ROOT / name, "Debian package"))
    return out


def _file_in(folder: Path, spec: FileSpec) -> Path | None:
    for candidate in (folder / (spec.name + ".gz"), folder / spec.name):
        if candidate.is_file():
            return candidate
    return None


def locate(name: str, data_root: str | os.PathLike | None = None) -> Path | None:
    """The first folder that holds all four files of dataset ``name``, or None."""
    spec = get_spec(name)
    for folder, _ in candidate_dirs(name, data_root):
        if all(_file_in(folder, f) for f in spec.files):
            return folder
    return None


def download_root(data_root: str | os.PathLike | None = None) -> Path:
    """Where a download goes: the explicit data root if one was given, else the cache."""
    return _explicit_root(data_root) or default_data_root()


def _not_found_message(name: str, data_root) -> str:
    spec = get_spec(name)
    looked = "; ".join(str(d) for d, _ in candidate_dirs(name, data_root))
    ways = [f"run `lenet data fetch --dataset {name}` with network access",
            f"put the four IDX files in a folder DIR/{name}/ and pass --data-root DIR (or set LENET_DATA_ROOT)"]
    if spec.debian_package:
        ways.append(f"on Debian/Ubuntu: `apt-get install {spec.debian_package}`")
    else:
        ways.append(f"copy the files into {default_data_root() / name}")
    return f"{name} data not found (looked in {looked}); get it by one of: " + "; or ".join(ways)


# --------------------------------------------------------------------------------------------
# Verification and download


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def verify_file(path: Path, spec: FileSpec) -> bytes:
    """Decompressed content of ``path`` after checking its size and SHA-256 against ``spec``."""
    data = _read_bytes(path)
    if len(data) != spec.size or _sha256(data) != spec.sha256:
        raise DataError(
            f"{path}: checksum mismatch (decompressed {len(data)} bytes, expected {spec.size} bytes "
            f"with sha256 {spec.sha256[:12]}...); the file is corrupt or not {spec.name}: delete it "
            "and fetch again (lenet data fetch)")
    return data


def verify(name: str, data_root=None) -> dict[str, str]:
    """Check every file of dataset ``name`` where it is found; return {file name: 'ok'}."""
    spec = get_spec(name)
    folder = locate(name, data_root)
    if folder is None:
        raise DataError(_not_found_message(name, data_root))
    report = {}
    for f in spec.files:
        path = _file_in(folder, f)
        verify_file(path, f)
        report[str(path)] = "ok"
    return report


def _download(url: str, timeout: float) -> bytes:
    with urllib.request.urlopen(url, timeout=timeout) as resp:  # noqa: S310 (fixed https/http mirrors)
        return resp.read()


def fetch(name: str, data_root=None, *, timeout: float = 10.0, retries: int = 3,
          log=print) -> Path:
    """Make dataset ``name`` available; download what is missing from its mirrors. Returns its folder."""
    spec = get_spec(name)
    found = locate(name, data_root)
    if found is not None:
        return found
    target = download_root(data_root) / name
    for f in spec.files:
        dest = target / (f.name + ".gz")
        if dest.is_file():
            try:
                verify_file(dest, f)
                continue
            except DataError:
                dest.unlink()
        errors = []
        for mirror in spec.mirrors:
            url = mirror + f.name + ".gz"
            for attempt in range(1, retries + 1):
                try:
                    log(f"downloading {url} (try {attempt}/{retries})")
                    blob = _download(url, timeout)
                    break
                except (urllib.error.URLError, OSError, TimeoutError) as exc:
                    errors.append(f"{url}: {getattr(exc, 'reason', exc)}")
                    blob = None
                    time.sleep(min(2 ** attempt * 0.25, 2.0))
            if blob is None:
                continue
            try:
                data = gzip.decompress(blob)
            except (OSError, EOFError, zlib.error):
                errors.append(f"{url}: not a valid gzip file")
                continue
            if len(data) != f.size or _sha256(data) != f.sha256:
                errors.append(f"{url}: checksum mismatch after download")
                continue
            atomic_write_bytes(dest, blob)
            break
        else:
            reason = errors[-1] if errors else "no mirror"
            raise DataError(f"could not download {f.name}.gz ({reason}). " + _not_found_message(name, data_root))
    return target


# --------------------------------------------------------------------------------------------
# Loading


KEYS = ("train_images", "train_labels", "test_images", "test_labels")


def load_builtin(name: str, data_root=None, *, download: bool | None = None, verify_checksums: bool = True,
                 log=print) -> Dataset:
    """Load built-in dataset ``name`` into memory, finding (or downloading) it as the module doc says.

    ``download=None`` means: download unless the environment variable ``LENET_NO_DOWNLOAD`` is set.
    """
    spec = get_spec(name)
    folder = locate(name, data_root)
    if folder is None:
        if download is None:
            download = not os.environ.get("LENET_NO_DOWNLOAD")
        if not download:
            raise DataError(_not_found_message(name, data_root))
        folder = fetch(name, data_root, log=log)
    paths = {key: _file_in(folder, getattr(spec, key)) for key in KEYS}
    entry = Entry("builtin", str(folder.resolve()), {"name": name, "verified": verify_checksums},
                  [(p.name, file_digest(p)) for p in paths.values()])
    arrays = entry.load() if verify_checksums else None
    if arrays is None:
        arrays = {key: parse_idx(verify_file(path, getattr(spec, key)) if verify_checksums else _read_bytes(path),
                                 str(path)) for key, path in paths.items()}
        for split in ("train", "test"):
            check_pair(arrays[f"{split}_images"], arrays[f"{split}_labels"], len(spec.classes),
                       str(paths[f"{split}_images"]), str(paths[f"{split}_labels"]))
        if verify_checksums:  # only verified content is cached
            entry.save(arrays)
    return from_arrays(name, spec.classes, (arrays["train_images"], arrays["train_labels"]),
                       (arrays["test_images"], arrays["test_labels"]), folder=folder, source=name)
