"""Where the runs of ``lenet compare`` and the trials of ``lenet tune`` execute.

Three executors with one interface (:class:`Executor`): submit a job, wait for the next event:

* :class:`InlineExecutor`: in this process, one job at a time (the default; Ctrl-C and the
  Python API behave as they always have);
* :class:`ProcessExecutor` (``--jobs N``): N worker processes on this machine, started with
  ``spawn`` and kept for the whole command (torch is imported and a dataset loaded once per
  worker, not once per run), each running one job at a time with ``threads`` torch threads;
* :class:`RayExecutor` (``--ray [ADDRESS]``): Ray tasks, on a local Ray instance or a cluster,
  each reserving ``threads`` CPUs.

A job is a module-level function ``fn(shared, *args)``; ``shared`` is the one object every job of
a command may read (a dataset handed to the Python API), shipped once per worker. A job writes its
results to its run folder; what it returns is small. Events are :class:`Event`: ``ok`` (the job
returned), ``error`` (it raised a :class:`~lenet.errors.LenetError`, the message is the user's
to read), ``died`` (the worker process died under it: SIGKILL, out of memory, a lost Ray node; the
caller may submit it again, and it continues from its run folder's last checkpoint) and
``interrupted`` (Ctrl-C).

A worker process dies with the command: it is in its own process group (Ctrl-C reaches the
command, which forwards it once to each worker so that the epoch being saved is saved whole) and
is killed when the command's process goes away, even by SIGKILL (Linux: ``PR_SET_PDEATHSIG``;
elsewhere a watchdog thread), so no orphan keeps writing to a run folder.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
import traceback
import warnings
from dataclasses import dataclass
from typing import Any, Callable

from ..errors import Interrupted, LenetError

RAY_INSTALL = "pip install 'lenet[ray]'"


@dataclass
class Event:
    key: str
    kind: str  # "ok" | "error" | "died" | "interrupted"
    value: Any = None  # what the job returned (ok), or the message (error, died, interrupted)


class Executor:
    """Runs jobs; at most :attr:`slots` at once."""

    slots: int = 1
    threads: int | None = None  # torch threads of each job (None: the process's own setting)
    where: str = "in this process"

    def submit(self, key: str, fn: Callable, args: tuple) -> None:
        raise NotImplementedError

    def wait(self) -> Event:
        """Block until a submitted job ends; its event."""
        raise NotImplementedError

    def running(self) -> int:
        raise NotImplementedError

    def stop(self) -> list[Event]:
        """Interrupt the running jobs (each saves what it finished) and collect their events."""
        return []

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False


def set_threads(threads: int | None) -> None:
    """This process's torch threads (and OMP_NUM_THREADS, which lenet's engine then keeps)."""
    if threads is None:
        return
    os.environ["OMP_NUM_THREADS"] = str(threads)
    import torch

    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)


def _call(shared: Any, fn: Callable, args: tuple) -> tuple[str, Any]:
    """Run a job: ("ok", value) | ("error", message) | ("interrupted", message); a bug raises."""
    try:
        return "ok", fn(shared, *args)
    except Interrupted as exc:
        return "interrupted", str(exc)
    except KeyboardInterrupt:
        return "interrupted", "interrupted"
    except LenetError as exc:
        return "error", str(exc)


# --------------------------------------------------------------------------------------------
# In this process


class InlineExecutor(Executor):
    """One job at a time in this process; a job's exceptions propagate as they are."""

    def __init__(self, shared: Any = None, threads: int | None = None):
        self.shared, self.threads, self.slots = shared, threads, 1
        self._queued: list[tuple[str, Callable, tuple]] = []

    def submit(self, key, fn, args):
        self._queued.append((key, fn, args))

    def running(self) -> int:
        return len(self._queued)

    def wait(self) -> Event:
        key, fn, args = self._queued.pop(0)
        saved = os.environ.get("OMP_NUM_THREADS")
        before = None
        if self.threads is not None:
            import torch

            before = torch.get_num_threads()
            set_threads(self.threads)
        try:
            return Event(key, "ok", fn(self.shared, *args))
        finally:
            if before is not None:
                import torch

                torch.set_num_threads(before)
                if saved is None:
                    os.environ.pop("OMP_NUM_THREADS", None)
                else:
                    os.environ["OMP_NUM_THREADS"] = saved


# --------------------------------------------------------------------------------------------
# Worker processes on this machine


def _die_with_parent(parent: int) -> None:
    """End this process when ``parent`` goes away (even by SIGKILL)."""
    if sys.platform.startswith("linux"):
        try:
            import ctypes

            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG
        except (OSError, AttributeError):
            pass
    if os.getppid() != parent:  # the parent died before the line above
        os._exit(1)

    def watch():
        while True:
            time.sleep(1.0)
            if os.getppid() != parent:
                os._exit(1)

    threading.Thread(target=watch, daemon=True, name="lenet-parent-watch").start()


def _worker_main(conn, parent: int, threads: int | None, shared: Any) -> None:
    """A worker process: run the jobs it is sent, one at a time, until told to stop."""
    try:
        os.setpgrp()  # Ctrl-C at the terminal goes to the command, which forwards it once
    except OSError:
        pass
    _die_with_parent(parent)
    set_threads(threads)
    try:
        while True:
            message = conn.recv()
            if message is None:
                return
            key, fn, args = message
            try:
                kind, value = _call(shared, fn, args)
            except BaseException:  # noqa: BLE001 - a bug: the traceback is what to show
                kind, value = "bug", traceback.format_exc()
            conn.send((key, kind, value))
            if kind == "interrupted":
                return
    except (EOFError, KeyboardInterrupt, BrokenPipeError):
        return


def _death(exitcode: int | None) -> str:
    if exitcode is not None and exitcode < 0:
        try:
            return f"killed by {signal.Signals(-exitcode).name}"
        except ValueError:
            return f"killed by signal {-exitcode}"
    return f"exited with status {exitcode}"


class ProcessExecutor(Executor):
    """``slots`` worker processes on this machine, each with ``threads`` torch threads."""

    def __init__(self, slots: int, threads: int | None, shared: Any = None):
        import multiprocessing

        self.slots, self.threads, self.shared = slots, threads, shared
        self.where = f"{slots} worker processes"
        self._mp = multiprocessing.get_context("spawn")
        self._idle: list[tuple[Any, Any]] = []  # (process, connection)
        self._busy: dict[str, tuple[Any, Any]] = {}

    def _start(self):
        parent, child = self._mp.Pipe()
        proc = self._mp.Process(target=_worker_main, args=(child, os.getpid(), self.threads, self.shared),
                                name="lenet-worker", daemon=True)
        proc.start()
        child.close()
        return proc, parent

    def submit(self, key, fn, args):
        worker = self._idle.pop() if self._idle else self._start()
        self._busy[key] = worker
        try:
            worker[1].send((key, fn, args))
        except (BrokenPipeError, OSError):
            pass  # it died while idle: wait() reports it as died, and the job is submitted again

    def running(self) -> int:
        return len(self._busy)

    def wait(self) -> Event:
        from multiprocessing.connection import wait

        if not self._busy:
            raise RuntimeError("no job is running")
        by_handle = {}
        for key, (proc, conn) in self._busy.items():
            by_handle[conn] = key
            by_handle[proc.sentinel] = key
        while True:
            ready = wait(list(by_handle))
            for handle in ready:
                key = by_handle[handle]
                event = self._collect(key)
                if event is not None:
                    return event

    def _collect(self, key: str) -> Event | None:
        """The event of ``key``'s job if its worker answered or died; None if it is still at work."""
        proc, conn = self._busy[key]
        try:
            answered = conn.poll()
        except (OSError, EOFError):
            answered = False
        if answered:
            try:
                _, kind, value = conn.recv()
            except (EOFError, OSError):
                answered = False
        if not answered:
            if proc.is_alive():
                proc.join(0.05)
                if proc.is_alive():
                    return None
            del self._busy[key]
            conn.close()
            proc.join()
            return Event(key, "died", f"its worker process (pid {proc.pid}) {_death(proc.exitcode)}")
        del self._busy[key]
        if kind == "bug":
            self.close()
            raise RuntimeError(f"{key} failed in a worker process:\n{value}")
        if kind == "interrupted":
            proc.join(5)
            conn.close()
        else:
            self._idle.append((proc, conn))
        return Event(key, kind, value)

    def stop(self) -> list[Event]:
        events = []
        for proc, _ in self._busy.values():
            try:
                os.kill(proc.pid, signal.SIGINT)
            except (ProcessLookupError, OSError):
                pass
        deadline = time.monotonic() + 60
        while self._busy and time.monotonic() < deadline:
            for key in list(self._busy):
                event = self._collect(key)
                if event is not None:
                    events.append(event)
            time.sleep(0.05)
        for key, (proc, conn) in list(self._busy.items()):  # still at work after a minute
            proc.kill()
            proc.join()
            events.append(Event(key, "died", f"its worker process (pid {proc.pid}) did not stop and was killed"))
        self._busy.clear()
        return events

    def close(self) -> None:
        for proc, conn in self._idle:
            try:
                conn.send(None)
            except (BrokenPipeError, OSError):
                pass
        idle = {id(proc) for proc, _ in self._idle}
        for proc, conn in [*self._idle, *self._busy.values()]:
            proc.join(10 if id(proc) in idle else 0)
            if proc.is_alive():
                proc.kill()
                proc.join()
            conn.close()
        self._idle, self._busy = [], {}


# --------------------------------------------------------------------------------------------
# Ray


def import_ray():
    try:
        import ray
    except ImportError:
        raise LenetError(f"--ray needs Ray, which is not installed: {RAY_INSTALL}") from None
    return ray


def _ray_job(threads: int | None, shared: Any, fn: Callable, args: tuple) -> tuple[str, Any]:
    set_threads(threads)
    try:
        return _call(shared, fn, args)
    except BaseException:  # noqa: BLE001 - a bug: the traceback is what to show
        return "bug", traceback.format_exc()


class RayExecutor(Executor):
    """Ray tasks, each reserving ``threads`` CPUs and using as many torch threads.

    ``address`` None starts a local Ray instance (stopped again by :meth:`close`); ``"auto"`` or
    ``"ray://HOST:PORT"`` connects to a running cluster. Ray does not retry a task itself: a task
    whose worker died is reported as ``died``, and the caller decides.
    """

    def __init__(self, address: str | None, threads: int, shared: Any = None, slots: int | None = None):
        import logging

        ray = import_ray()
        self.ray, self.threads = ray, threads
        self._started = False
        if not ray.is_initialized():
            kwargs: dict[str, Any] = {"include_dashboard": False, "logging_level": logging.WARNING,
                                      "log_to_driver": False}
            if address is None:
                try:
                    kwargs["num_cpus"] = len(os.sched_getaffinity(0))
                except AttributeError:
                    kwargs["num_cpus"] = os.cpu_count() or 1
            try:
                with warnings.catch_warnings():  # e.g. a client time-out: said once, in the error below
                    warnings.simplefilter("ignore")
                    ray.init(address=address or "local", **kwargs)  # "local": a new instance, never another's
            except (ConnectionError, RuntimeError, ValueError) as exc:
                text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
                where = f"the Ray cluster at {address}" if address else "a local Ray instance"
                raise LenetError(f"--ray: cannot start or reach {where}: {text}") from None
            self._started = True
        cpus = int(ray.cluster_resources().get("CPU", 1))
        if threads > cpus:
            self.close()
            raise LenetError(f"--threads {threads}: the Ray cluster has only {cpus} CPUs")
        self.slots = slots or max(1, cpus // threads)
        self.where = f"Ray ({cpus} CPUs, {threads} per task)"
        self._task = ray.remote(_ray_job).options(num_cpus=threads, max_retries=0)
        self._shared = ray.put(shared) if shared is not None else None
        self._refs: dict[Any, str] = {}

    def submit(self, key, fn, args):
        self._refs[self._task.remote(self.threads, self._shared, fn, args)] = key

    def running(self) -> int:
        return len(self._refs)

    def wait(self) -> Event:
        ready, _ = self.ray.wait(list(self._refs), num_returns=1)
        return self._collect(ready[0])

    def _collect(self, ref) -> Event:
        key = self._refs.pop(ref)
        try:
            kind, value = self.ray.get(ref)
        except self.ray.exceptions.TaskCancelledError:
            return Event(key, "interrupted", "interrupted")
        except self.ray.exceptions.RayError as exc:  # the worker or its node died
            text = str(exc).strip().splitlines()
            return Event(key, "died", f"its Ray worker died ({type(exc).__name__}: {text[0] if text else ''})")
        if kind == "bug":
            raise RuntimeError(f"{key} failed in a Ray worker:\n{value}")
        return Event(key, kind, value)

    def stop(self) -> list[Event]:
        for ref in list(self._refs):
            try:
                self.ray.cancel(ref)
            except Exception:  # noqa: BLE001 - already finished
                pass
        events = []
        while self._refs:
            ready, _ = self.ray.wait(list(self._refs), num_returns=1, timeout=60)
            if not ready:
                break
            events.append(self._collect(ready[0]))
        return events

    def close(self) -> None:
        if self._started:
            self.ray.shutdown()
            self._started = False


def make_executor(jobs: int = 1, ray: str | bool | None = None, threads: int | None = None,
                  shared: Any = None) -> Executor:
    """The executor for ``--jobs``/``--ray``/``--threads``.

    ``ray``: None (not used), True or "" (a local instance), "auto" or "ray://..." (a cluster).
    ``threads`` per job defaults to: the process's own setting in this process; physical cores //
    jobs for worker processes (OMP_NUM_THREADS, if set, wins); 1 for Ray tasks.
    """
    if ray is not None and ray is not False:
        return RayExecutor(ray if isinstance(ray, str) and ray else None, threads or 1, shared,
                           slots=jobs if jobs > 1 else None)
    if jobs <= 1:
        return InlineExecutor(shared, threads)
    if threads is None:
        env = os.environ.get("OMP_NUM_THREADS", "")
        if env.isdigit() and int(env) > 0:
            threads = int(env)
        else:
            from ..training.engine import physical_cores

            threads = max(1, physical_cores() // jobs)
    return ProcessExecutor(jobs, threads, shared)


# --------------------------------------------------------------------------------------------
# The results folder is written by one command at a time


class FolderLock:
    """An exclusive lock on a results folder for one command (``RESULTS/.lock``, flock)."""

    def __init__(self, folder, what: str):
        self.path, self.what, self.fh = os.path.join(folder, ".lock"), what, None

    def __enter__(self):
        try:
            import fcntl
        except ImportError:  # not POSIX: no lock
            return self
        self.fh = open(self.path, "a+")
        try:
            fcntl.flock(self.fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            self.fh.close()
            self.fh = None
            raise LenetError(f"{os.path.dirname(self.path)} is in use by another {self.what} (it holds "
                             f"{self.path}); wait for it to finish or choose another --out") from None
        return self

    def __exit__(self, *exc):
        if self.fh is not None:
            self.fh.close()
        return False
