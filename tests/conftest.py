"""Shared test fixtures.

Real data comes from ``$LENET_DATA_ROOT`` (the Makefile and CI point it at ``../shared/data``);
each test gets its own empty lenet cache so nothing leaks between tests or from the user's home.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


def _data_root() -> Path | None:
    """$LENET_DATA_ROOT, else ../shared/data beside the repo (CI), else the user's lenet cache."""
    from lenet.data import default_data_root

    candidates = [os.environ.get("LENET_DATA_ROOT"), SHARED_DATA, default_data_root()]
    for root in (Path(c) for c in candidates if c):
        if (root / "fashion-mnist").is_dir():
            return root
    return None


DATA_ROOT = _data_root()
needs_data = pytest.mark.skipif(DATA_ROOT is None, reason="set LENET_DATA_ROOT to a folder with fashion-mnist/ and mnist/")


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    """Every test gets an empty cache, never downloads, and sees the real data root (if any)."""
    cache = tmp_path_factory.mktemp("cache")
    monkeypatch.setenv("LENET_CACHE_DIR", str(cache))
    monkeypatch.setenv("LENET_NO_DOWNLOAD", "1")
    monkeypatch.setenv("LENET_NO_COMPILE", "1")  # compiling costs seconds per test; tests that want it ask
    if DATA_ROOT is not None:
        monkeypatch.setenv("LENET_DATA_ROOT", str(DATA_ROOT))
    yield


@pytest.fixture(scope="session")
def data_root() -> Path:
    if DATA_ROOT is None:
        pytest.skip("no real data: set LENET_DATA_ROOT")
    return DATA_ROOT


@pytest.fixture(scope="session")
def fashion(data_root):
    """Fashion-MNIST in memory, loaded once per test session."""
    from lenet.data import load_dataset

    return load_dataset("fashion-mnist", data_root, download=False)


@pytest.fixture(scope="session")
def mnist(data_root):
    from lenet.data import load_dataset

    if not (data_root / "mnist").is_dir():
        pytest.skip(f"no mnist/ in {data_root}")

    return load_dataset("mnist", data_root, download=False)


def run_cli(*args: str, env: dict | None = None, cwd: Path | None = None, timeout: float = 600):
    """Run ``python -m lenet ARGS`` in a subprocess; return the CompletedProcess (text)."""
    full_env = dict(os.environ)
    full_env["PYTHONPATH"] = str(REPO / "src") + os.pathsep + full_env.get("PYTHONPATH", "")
    full_env.update(env or {})
    return subprocess.run([sys.executable, "-m", "lenet", *args], capture_output=True, text=True,
                          env=full_env, cwd=cwd, timeout=timeout)


def assert_user_error(proc, *fragments: str, code: int | None = None):
    """A user error: non-zero exit, no traceback, one line on stderr containing each fragment."""
    assert proc.returncode != 0, proc.stdout + proc.stderr
    if code is not None:
        assert proc.returncode == code, (proc.returncode, proc.stderr)
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
