"""Shared test fixtures.

Real data comes from ``$LENET_DATA_ROOT`` (the Makefile and CI point it at ``../shared/data``);
each test gets its own empty lenet cache so nothing leaks between tests or from the user's home.
"""

from __future__ import annotations

import contextlib
import io
import os
import shutil
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


@pytest.fixture(scope="session")
def _built_kernels(tmp_path_factory) -> list[Path]:
    """The batch-last kernels, built from source once per test session (where there is a compiler)."""
    from lenet.kernels import ops

    cache = tmp_path_factory.mktemp("kernel-cache")
    saved = os.environ.get("LENET_CACHE_DIR")
    os.environ["LENET_CACHE_DIR"] = str(cache)
    try:
        ops.library()
    finally:
        os.environ.pop("LENET_CACHE_DIR") if saved is None else os.environ.__setitem__("LENET_CACHE_DIR", saved)
    return sorted((cache / "kernels").glob("*.so"))


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch, _built_kernels):
    """Every test gets an empty cache (but for the session's kernel build, so that a `lenet`
    subprocess does not compile them again), never downloads, and sees the real data root (if any)."""
    cache = tmp_path_factory.mktemp("cache")
    for so in _built_kernels:
        (cache / "kernels").mkdir(exist_ok=True)
        shutil.copy2(so, cache / "kernels" / so.name)
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


def run_cli(*args: str, env: dict | None = None, cwd: Path | None = None, timeout: float | None = None):
    """Run ``lenet ARGS`` in this process (``lenet.cli.main``) with stdout and stderr captured.

    Returns a CompletedProcess (text), as :func:`run_cli_subprocess` does: the same command, without
    starting Python and importing torch again. A bug (an exception that is not a LenetError)
    propagates with its traceback, failing the test as a traceback in a subprocess would.
    """
    from lenet.cli import main

    out, err = io.StringIO(), io.StringIO()
    with _environment(env or {}), _working_dir(cwd), contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(list(args))
        except SystemExit as exc:  # argparse's --help, --version and usage errors
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    return subprocess.CompletedProcess(["lenet", *args], code, out.getvalue(), err.getvalue())


def run_cli_subprocess(*args: str, env: dict | None = None, cwd: Path | None = None, timeout: float = 600):
    """Run ``python -m lenet ARGS`` in a subprocess: for what needs a process of its own (a fresh
    interpreter, exit codes of an uncaught signal, torch's thread settings)."""
    full_env = dict(os.environ)
    full_env["PYTHONPATH"] = str(REPO / "src") + os.pathsep + full_env.get("PYTHONPATH", "")
    full_env.update(env or {})
    return subprocess.run([sys.executable, "-m", "lenet", *args], capture_output=True, text=True,
                          env=full_env, cwd=cwd, timeout=timeout)


@contextlib.contextmanager
def _environment(changes: dict):
    saved = {k: os.environ.get(k) for k in changes}
    os.environ.update({k: str(v) for k, v in changes.items()})
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@contextlib.contextmanager
def _working_dir(cwd: Path | None):
    before = os.getcwd()
    if cwd is not None:
        os.chdir(cwd)
    try:
        yield
    finally:
        os.chdir(before)


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


def pytest_collection_modifyitems(config, items):
    """Tests marked ``gpu`` need a CUDA device. Where there is none (CI, the project's own machines)
    they are deselected, and counted as such, rather than skipped: a skip fails CI (below), and
    these tests cannot run there by design."""
    import torch

    if torch.cuda.is_available():
        return
    gpu = [item for item in items if item.get_closest_marker("gpu")]
    if gpu:
        config.hook.pytest_deselected(items=gpu)
        items[:] = [item for item in items if not item.get_closest_marker("gpu")]


def pytest_sessionfinish(session, exitstatus):
    """With LENET_TEST_NO_SKIPS=1 (CI sets it), a skipped test fails the run: CI must not pass by
    skipping (a browser that could not be installed, kernels that did not build, data not found)."""
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    skipped = reporter.stats.get("skipped", []) if reporter is not None else []
    if os.environ.get("LENET_TEST_NO_SKIPS") and skipped and exitstatus == 0:
        reporter.write_line(f"LENET_TEST_NO_SKIPS is set and {len(skipped)} test(s) were skipped:", red=True)
        for report in skipped:
            reporter.write_line(f"  {report.nodeid}: {report.longrepr[-1] if isinstance(report.longrepr, tuple) else report.longrepr}")
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
