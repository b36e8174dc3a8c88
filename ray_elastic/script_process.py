"""One script subprocess: started unless its round was interrupted first, its output streamed line by
line (log file, duplicate filters, console sink), signalled as a tree, and killed on every path.

It dies with the process that started it (``PR_SET_PDEATHSIG`` on Linux) and its process
group is killed when it exits, so nothing it started outlives it.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import psutil

from ray_elastic.cli_output import STDERR, STDOUT, ConsoleSink

STDERR_TAIL_LINES = 60
_PR_SET_PDEATHSIG = 1
_POLL_S = 0.05
_DRAIN_S = 30.0


def _die_with_parent(parent_pid: int) -> Callable[[], None]:
    """A preexec_fn: SIGKILL the child when the thread that started it (the actor) dies."""
    libc = ctypes.CDLL(None, use_errno=True) if sys.platform.startswith("linux") else None

    def preexec() -> None:
        if libc is not None:
            libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
        if os.getppid() != parent_pid:  # the parent died before prctl took effect
            os._exit(1)

    return preexec


def signal_tree(pid: int, sig: int) -> None:
    """Send `sig` to a process and all its descendants, children first."""
    try:
        root = psutil.Process(pid)
        procs = root.children(recursive=True)[::-1] + [root]
    except psutil.Error:
        return
    for proc in procs:
        with contextlib.suppress(psutil.Error):
            proc.send_signal(sig)


@dataclass(frozen=True)
class StreamRoute:
    """Where one of a script's streams goes besides its log file."""

    prefix: str = ""
    shown: bool = True
    filters: tuple[str, ...] = ()
    filtered_path: Path | None = None


def _pump(stream: IO[bytes], which: int, sink: Any, route: StreamRoute, log_path: Path | None,
          tail: deque[str] | None) -> None:
    """Copy a pipe line by line to a per-rank file and, prefixed, to the console sink."""
    with contextlib.ExitStack() as files:
        log = files.enter_context(open(log_path, "ab")) if log_path else None
        filtered = files.enter_context(open(route.filtered_path, "ab")) if route.filters and route.filtered_path \
            else None
        for raw in iter(stream.readline, b""):
            if log is not None:
                log.write(raw)
                log.flush()
            line = raw.decode(errors="replace").rstrip("\r\n")
            if tail is not None:
                tail.append(line)
            if filtered is not None and any(needle in line for needle in route.filters):
                filtered.write(line.encode(errors="replace") + b"\n")
                filtered.flush()
            if route.shown:
                prefix = route.prefix
                sink.write(which, line if line.startswith(prefix) else f"{prefix}{line}")  # torch prefixes some
    stream.close()


class ScriptProcess:
    """One script subprocess: started unless already interrupted, streamed, killed on every path.

    Args:
        argv, env, cwd: the command to run.
        prefix: prefix of its console lines (used when `routes` is not given).
        log_dir: where stdout.log/stderr.log go (None: no files).
        kill_grace_s: after the interrupt signal, SIGKILL follows this much later.
        sink: console sink (default: this process's stdout/stderr).
        routes: (stdout route, stderr route): prefix, console or not, duplicate filters.
    """

    def __init__(self, argv: list[str], env: dict[str, str], cwd: str | None, prefix: str,
                 log_dir: Path | None, kill_grace_s: float, sink: Any = None,
                 routes: tuple[StreamRoute, StreamRoute] | None = None):
        self.argv = argv
        self.env = env
        self.cwd = cwd
        self.log_dir = log_dir
        self.kill_grace_s = kill_grace_s
        self.sink = sink or ConsoleSink()
        self.routes = routes or (StreamRoute(prefix), StreamRoute(prefix))
        self.stderr_tail: deque[str] = deque(maxlen=STDERR_TAIL_LINES)
        self.interrupted: str | None = None
        self._interrupted_at = 0.0
        self._lock = threading.Lock()
        self._popen: subprocess.Popen[bytes] | None = None
        self._pumps: list[threading.Thread] = []

    @property
    def pid(self) -> int | None:
        return self._popen.pid if self._popen is not None else None

    def start(self) -> bool:
        """Start the script; False if the round was interrupted first."""
        with self._lock:
            if self.interrupted is not None:
                return False
            self._popen = subprocess.Popen(
                self.argv, env=self.env, cwd=self.cwd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                stderr=subprocess.PIPE, start_new_session=True, preexec_fn=_die_with_parent(os.getpid()),
            )
        assert self._popen.stdout is not None and self._popen.stderr is not None
        for stream, which, name, tail in ((self._popen.stdout, STDOUT, "stdout.log", None),
                                          (self._popen.stderr, STDERR, "stderr.log", self.stderr_tail)):
            log_path = self.log_dir / name if self.log_dir else None
            route = self.routes[0] if which == STDOUT else self.routes[1]
            thread = threading.Thread(target=_pump, args=(stream, which, self.sink, route, log_path, tail),
                                      daemon=True)
            thread.start()
            self._pumps.append(thread)
        return True

    def _exited(self) -> bool:
        """The script has already exited (reaped or not)."""
        popen = self._popen
        if popen is None or popen.returncode is not None:
            return popen is not None
        try:
            return os.waitid(os.P_PID, popen.pid, os.WEXITED | os.WNOWAIT | os.WNOHANG) is not None
        except ChildProcessError:
            return True

    def interrupt(self, reason: str, sig: int = signal.SIGTERM) -> None:
        """Session interrupt handler ("abort" or "stop"): signal the tree now, SIGKILL after the grace.

        A script that had already exited on its own is not interrupted: how it ended stands.
        """
        with self._lock:
            if self.interrupted is not None or self._exited():
                return
            self.interrupted = reason
            self._interrupted_at = time.monotonic()
            popen = self._popen
        if popen is not None:
            signal_tree(popen.pid, sig)

    def wait(self) -> int:
        """Wait for the script to exit, then kill whatever it left in its process group; the exit code."""
        popen = self._popen
        assert popen is not None
        try:
            # WNOWAIT keeps the exited script unreaped, so its pid (= its group id) cannot be reused
            # before its group is killed below.
            while os.waitid(os.P_PID, popen.pid, os.WEXITED | os.WNOWAIT | os.WNOHANG) is None:
                if self.interrupted is not None and time.monotonic() - self._interrupted_at > self.kill_grace_s:
                    signal_tree(popen.pid, signal.SIGKILL)
                time.sleep(_POLL_S)
        finally:
            self.kill()
        # Every line reaches its sink before the outcome is reported: the pipes end once the script's
        # tree is gone (a descendant that left its process group could hold them: wait boundedly).
        deadline = time.monotonic() + _DRAIN_S
        for thread in self._pumps:
            thread.join(timeout=max(0.0, deadline - time.monotonic()))
        return popen.returncode

    def kill(self) -> None:
        """SIGKILL the script's tree and process group, then reap it (idempotent)."""
        popen = self._popen
        if popen is None:
            return
        if popen.returncode is None:
            signal_tree(popen.pid, signal.SIGKILL)
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(popen.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            popen.wait(timeout=10)
