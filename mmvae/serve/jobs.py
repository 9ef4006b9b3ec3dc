"""Workers with a deadline for the review server's slow requests, and its temporary folders.

A query that saves, unzips, loads or encodes files runs in a :class:`Job`: a daemon thread of
its own, which the app awaits up to ``serve.request_timeout_s`` (:func:`mmvae.serve.app.create_app`).
When the deadline passes the client is answered at once (504, or 503 when the job was at that
moment waiting for an upload slot or the model), the job is cancelled and the folders it owns are removed. A thread cannot be
stopped from outside: the job's code calls :func:`checkpoint` between steps (each MB copied,
each zip member, each file loaded, before it waits for the model), which raises
:class:`Cancelled` once the job is cancelled; a step that cannot be interrupted (one
loader call) ends on its own, finds its files gone, and the job's ``finally`` removes what is
left.

Why threads, not processes: the model (JAX) is loaded once per process and its jitted
encoder is shared — a process pool would hold and compile one model per worker. Calls into
JAX from threads are safe; the Retriever's own state (its cache, last notes) is guarded by
the service's model lock. The slow part of a bad upload (reading and preprocessing files) runs
outside that lock, so it holds only its own request.

Why one thread per job, not a pool: a job stuck in a loader call past its deadline must not
keep a pool slot that other requests queue for, nor hold up the interpreter's exit (pool
threads are joined at exit; these are daemon threads). How many jobs load files at once is
bounded by the service (``serve.workers``).

Temporary folders: a server's folder is ``mmvae-serve-<pid>-<random>`` in the system's
temporary folder, holding a lock file (``flock``) for the server's life. :func:`sweep` removes
the folders of dead servers (PID not alive, lock not held), e.g. after ``kill -9``.
"""
from __future__ import annotations

import concurrent.futures
import contextlib
import fcntl
import logging
import os
import re
import shutil
import tempfile
import threading
import time
from pathlib import Path

from mmvae.errors import MmvaeError

__all__ = ["Cancelled", "RequestTimeout", "ServerBusy", "Job", "Jobs", "checkpoint", "current", "acquire",
           "make_server_folder", "sweep", "FOLDER_PREFIX"]

log = logging.getLogger(__name__)

FOLDER_PREFIX = "mmvae-serve-"
LOCK_NAME = ".owner.lock"
_FOLDER_RE = re.compile(r"^mmvae-serve-(\d+)-[A-Za-z0-9_]+$")
_local = threading.local()


class Cancelled(MmvaeError):
    """The job's deadline passed or the server is stopping (raised inside the worker)."""


class RequestTimeout(MmvaeError):
    """A request ran past ``serve.request_timeout_s`` (HTTP 504)."""


class ServerBusy(MmvaeError):
    """A request waited its whole deadline for a worker slot or the model (HTTP 503)."""


class Job:
    """One request's work in a worker thread: a cancel flag and the folders it owns."""

    def __init__(self, name: str):
        self.name = name
        self.started = time.monotonic()
        self.waiting = ""                   # what it is blocked on now ("" while it works)
        self._cancelled = threading.Event()
        self._folders: list[Path] = []
        self._lock = threading.Lock()
        self.done = threading.Event()

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    def own(self, folder: Path) -> Path:
        """Register ``folder`` as this job's: removed when the job is cancelled (and by the
        job itself when it ends). Raises Cancelled when the job already is."""
        with self._lock:
            self._folders.append(Path(folder))
        if self.cancelled:
            shutil.rmtree(folder, ignore_errors=True)
            raise Cancelled(f"{self.name}: cancelled")
        return Path(folder)

    def cancel(self) -> None:
        """Flag the job and remove its folders now (its thread stops at its next checkpoint;
        files it still has open are read to their end, then gone)."""
        self._cancelled.set()
        with self._lock:
            folders = list(self._folders)
        for f in folders:
            shutil.rmtree(f, ignore_errors=True)

    def check(self) -> None:
        if self.cancelled:
            raise Cancelled(f"{self.name}: cancelled")


def current() -> Job | None:
    """The job this thread runs (None outside a worker)."""
    return getattr(_local, "job", None)


def checkpoint() -> None:
    """Raise :class:`Cancelled` when this thread's job is cancelled (no-op outside a job)."""
    job = current()
    if job is not None:
        job.check()


def acquire(lock, what: str = "") -> None:
    """Acquire ``lock`` (a Lock or Semaphore), giving up with :class:`Cancelled` when this
    thread's job is cancelled meanwhile. Outside a job: a plain blocking acquire."""
    job = current()
    if job is None:
        lock.acquire()
        return
    job.waiting = what or "a lock"
    try:
        while not lock.acquire(timeout=0.05):
            job.check()
    finally:
        job.waiting = ""


@contextlib.contextmanager
def holding(lock, what: str = ""):
    acquire(lock, what)
    try:
        yield
    finally:
        lock.release()


class Jobs:
    """Starts jobs in daemon threads and keeps the running ones (to cancel them at close).

    At most ``max_active`` threads at once, cancelled ones still running included (a thread
    stuck in one loader call keeps counting until it returns): beyond it :meth:`start` raises
    :class:`ServerBusy` at once (HTTP 503) instead of starting another thread."""

    def __init__(self, max_active: int = 32):
        self._active: set[Job] = set()
        self._lock = threading.Lock()
        self.max_active = int(max_active)

    def start(self, name: str, fn, *args, **kwargs) -> tuple[Job, concurrent.futures.Future]:
        with self._lock:
            if len(self._active) >= self.max_active:
                raise ServerBusy(f"the server is busy: {len(self._active)} queries are running (at most "
                                 f"{self.max_active}); try again shortly")
        job, fut = Job(name), concurrent.futures.Future()

        def run():
            _local.job = job
            try:
                if not fut.set_running_or_notify_cancel():
                    return
                try:
                    result = fn(*args, **kwargs)
                except BaseException as e:      # noqa: BLE001 — handed to the awaiting request
                    fut.set_exception(e)
                else:
                    fut.set_result(result)
            finally:
                _local.job = None
                job.done.set()
                with self._lock:
                    self._active.discard(job)

        with self._lock:
            self._active.add(job)
        threading.Thread(target=run, name=f"mmvae-job-{name}", daemon=True).start()
        return job, fut

    @property
    def active(self) -> list[Job]:
        with self._lock:
            return list(self._active)

    def cancel_all(self, wait: float = 0.0) -> bool:
        """Cancel every running job; wait up to ``wait`` seconds for their threads. True when
        none is left running."""
        jobs = self.active
        for j in jobs:
            j.cancel()
        end = time.monotonic() + wait
        for j in jobs:
            j.done.wait(max(0.0, end - time.monotonic()))
        return not self.active


# --------------------------------------------------------------------------- server folders
def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:          # another user's live process
        return True
    return True


def _lock_held(folder: Path) -> bool:
    """True when a live process holds the folder's owner lock."""
    path = folder / LOCK_NAME
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return True
    finally:
        os.close(fd)
    return False


def sweep(root: str | os.PathLike | None = None) -> list[Path]:
    """Remove the folders ``mmvae-serve-<pid>-*`` in ``root`` (default: the system's
    temporary folder) of servers that are gone: the PID is not alive and no process holds
    the folder's lock. Returns what was removed; what cannot be removed is left (logged)."""
    root = Path(root or tempfile.gettempdir())
    removed = []
    try:
        entries = list(root.iterdir())
    except OSError:
        return removed
    for p in entries:
        m = _FOLDER_RE.match(p.name)
        if not m or not p.is_dir() or p.is_symlink():
            continue
        if _pid_alive(int(m.group(1))) or _lock_held(p):
            continue
        shutil.rmtree(p, ignore_errors=True)
        if p.exists():
            log.warning("could not remove the leftover folder %s of a stopped server", p)
        else:
            removed.append(p)
    if removed:
        log.warning("removed %d leftover folder(s) of stopped review servers in %s", len(removed), root)
    return removed


def make_server_folder(root: str | os.PathLike | None = None) -> tuple[Path, int]:
    """A new ``mmvae-serve-<pid>-<random>`` folder in ``root`` and the fd of its held lock
    (close it after removing the folder)."""
    folder = Path(tempfile.mkdtemp(prefix=f"{FOLDER_PREFIX}{os.getpid()}-", dir=root))
    fd = os.open(folder / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o600)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    return folder, fd
