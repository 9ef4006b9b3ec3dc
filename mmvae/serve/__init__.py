"""A local review web application for query by example with relevance feedback.

``mmvae serve --workdir RUN --index IDX`` (:func:`serve`) loads the model and index into a
:class:`~mmvae.serve.service.ReviewService` and serves :func:`~mmvae.serve.app.create_app`
with uvicorn on the loopback interface. See docs/serve.md.

The listening socket is bound here with ``SO_REUSEADDR`` (a restart right after a crash or
``kill -9`` binds while the old connections linger) and handed to uvicorn. SIGTERM and SIGINT
stop the server gracefully (requests in flight end within ``serve.request_timeout_s``), then
the service's temporary folder is removed before the process ends; a server killed outright
leaves its folder, which the next server sweeps (:func:`mmvae.serve.jobs.sweep`).
"""
from __future__ import annotations

import ipaddress
import logging
import signal
import socket
import threading
import time

from mmvae.errors import InputError, MmvaeError

__all__ = ["serve", "is_loopback", "free_port", "bind_socket", "BackgroundServer"]

log = logging.getLogger(__name__)


def is_loopback(host: str) -> bool:
    """True when ``host`` names only this machine (127.0.0.0/8, ::1 or 'localhost')."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free on ``host`` now (the OS picks it)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


class BackgroundServer:
    """uvicorn serving an ASGI ``app`` on ``host``:``port`` (a free one by default) in a
    daemon thread of this process, e.g. from a notebook or a test. :meth:`stop` ends it.

    Raises:
      InputError: the server did not start within ``timeout`` seconds.
    """

    def __init__(self, app, host: str = "127.0.0.1", port: int | None = None, timeout: float = 30.0):
        import uvicorn
        self.port = int(port or free_port(host))
        self.url = f"http://{host}:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(app, host=host, port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        t0 = time.time()
        while not self.server.started:
            if time.time() - t0 > timeout or not self.thread.is_alive():
                raise InputError(f"the server did not start on {host}:{self.port}")
            time.sleep(0.05)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(10)


def bind_socket(host: str, port: int) -> socket.socket:
    """A TCP socket bound to ``host``:``port`` with SO_REUSEADDR (not yet listening).

    Raises:
      InputError: the port is taken (another server listens on it) or not ours to bind."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    s = socket.socket(family, socket.SOCK_STREAM)
    try:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind((host, int(port)))
    except OSError as e:
        s.close()
        raise InputError(f"cannot listen on {host}:{port} ({e.strerror})") from None
    return s


class _Terminated(BaseException):
    """SIGTERM, turned into an exception so that the service's folder is removed."""


def _on_sigterm(signum, frame):
    raise _Terminated()


def serve(workdir, index_dir, *, manifest=None, host: str = "127.0.0.1", port: int = 8765,
          allow_remote: bool = False, settings=None, log_level: str = "warning", pacs: str | None = None,
          pacs_username: str | None = None, pacs_password: str | None = None) -> None:
    """Load the run and index, then serve the review page until interrupted.

    Raises:
      InputError: ``host`` is not a loopback address and ``allow_remote`` is False (the page
        shows patient images), or the port is taken.
    """
    if not is_loopback(host) and not allow_remote:
        raise InputError(f"--host {host} would let other machines see patient images: pass --allow-remote "
                         "to bind beyond the loopback interface")
    sock = bind_socket(host, port)
    try:
        _serve(sock, workdir, index_dir, manifest=manifest, host=host, port=port, settings=settings,
               log_level=log_level, pacs=pacs, pacs_username=pacs_username, pacs_password=pacs_password)
    finally:
        sock.close()


def _serve(sock, workdir, index_dir, *, manifest, host, port, settings, log_level, pacs, pacs_username,
           pacs_password) -> None:
    import uvicorn

    from mmvae.serve.app import create_app
    from mmvae.serve.service import ReviewService

    archive = None
    if pacs:
        from mmvae.pacs.archive import Archive
        archive = Archive(pacs, username=pacs_username, password=pacs_password)
        try:                                  # tell now, not at the first query, when the archive is down
            archive.studies(since="99991231")
        except MmvaeError as e:
            print(f"WARNING: --pacs {pacs}: {e}", flush=True)
    in_main = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _on_sigterm) if in_main else None
    terminated = False
    service = None
    try:
        service = ReviewService.load(workdir, index_dir, manifest, settings=settings, archive=archive)
        if not is_loopback(host):
            print(f"WARNING: serving on {host}:{port}: any machine that reaches it sees the cases' images and "
                  "reports; there is no authentication.", flush=True)
        print(f"mmvae review page: http://{'[' + host + ']' if ':' in host else host}:{port}/  "
              f"({service.retriever.index.size} indexed cases; API docs at /docs; Ctrl-C stops)", flush=True)
        hosts = None if is_loopback(host) else ["*"]     # remote: the operator chose to expose it
        grace = float(service.settings["request_timeout_s"]) + 5.0
        server = uvicorn.Server(uvicorn.Config(create_app(service, allowed_hosts=hosts), host=host, port=int(port),
                                               log_level=log_level, timeout_graceful_shutdown=grace))
        # uvicorn handles SIGINT/SIGTERM while it runs, then raises them again: SIGINT as
        # KeyboardInterrupt, SIGTERM as _Terminated (our handler); both reach the finally.
        server.run(sockets=[sock])
    except _Terminated:
        terminated = True
    finally:
        if in_main:                # a second SIGTERM during the clean-up must not interrupt it
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
        try:
            if service is not None:
                service.close()
        finally:
            if in_main:
                signal.signal(signal.SIGTERM, previous)
    if terminated:
        print("mmvae review page: stopped (SIGTERM); temporary files removed", flush=True)
