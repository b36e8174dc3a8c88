"""Finding the processes a test started by a marker in their environment, with their descendants."""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable

import psutil


def marked_processes(key: str, value: str) -> list[psutil.Process]:
    """Live processes whose environment holds `key=value`, and every process below them.

    The descendants matter: Ray's dashboard and runtime-env agents rename themselves in a way
    that leaves /proc/<pid>/environ empty, so only their parent (a raylet, which carries the
    marker) finds them. Orphaned by a killed raylet, an agent spins on a core for about a
    minute; so collect before killing anything.
    """
    me = os.getpid()
    marked = []
    for proc in psutil.process_iter(["pid"]):
        if proc.pid == me:
            continue
        with contextlib.suppress(psutil.Error, OSError):
            if proc.environ().get(key) == value and proc.status() != psutil.STATUS_ZOMBIE:
                marked.append(proc)
    return with_descendants(marked)


def with_descendants(procs: list[psutil.Process]) -> list[psutil.Process]:
    """`procs` and every process below them (this one left out), each once."""
    me = os.getpid()
    found = {proc.pid: proc for proc in procs}
    for proc in procs:
        with contextlib.suppress(psutil.Error):
            for child in proc.children(recursive=True):
                if child.pid != me:
                    found.setdefault(child.pid, child)
    return list(found.values())


def still_running(find: Callable[[], list[psutil.Process]], wait_s: float, poll_s: float = 0.5) -> list[psutil.Process]:
    """Poll `find()` until it comes back empty or `wait_s` passed; what it found last: the processes left."""
    deadline = time.monotonic() + wait_s
    while (found := find()) and time.monotonic() < deadline:
        time.sleep(poll_s)
    return found


def kill_and_name(procs: list[psutil.Process]) -> list[str]:
    """Kill these processes; "pid command line" of each still running, for a failure message."""
    named = []
    for proc in procs:
        with contextlib.suppress(psutil.Error):
            named.append(f"{proc.pid} {' '.join(proc.cmdline())[:120]}")
            proc.kill()
    return named
