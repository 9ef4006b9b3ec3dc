"""Kill a command at a chosen point of its work (the crash-safety tests)."""
from __future__ import annotations

import signal
import subprocess
import time
from typing import Callable


def kill_when(argv: list[str], ready: Callable[[], bool], *, timeout: float = 240.0, poll: float = 0.02) -> int:
    """Start ``argv``; SIGKILL it as soon as ``ready()`` holds. Fails the test when the command ends
    first (its stderr shown) or ``timeout`` seconds pass. Returns its exit status (``-SIGKILL``)."""
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    t0 = time.time()
    try:
        while not ready():
            assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
            assert time.time() - t0 < timeout, f"{argv[:4]}: not ready after {timeout} s"
            time.sleep(poll)
        proc.send_signal(signal.SIGKILL)
        return proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stderr.close()
