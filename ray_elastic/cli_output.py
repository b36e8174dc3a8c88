"""Where a script's output goes: the console (prefixed, filtered as torchrun's flags say) and log files.

A local run (no Ray) prints each rank's lines from the launcher's own pump threads.
On a Ray cluster, each rank's lines travel over a TCP connection of their own to an
`OutputServer` in the CLI process (not through Ray's log forwarding, which may drop
the last lines of a process), and a rank's part ends only once the CLI has printed
every line it sent: no line is lost when the run ends or moves to the next round.
"""

from __future__ import annotations

import contextlib
import logging
import secrets
import selectors
import socket
import sys
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from string import Template
from typing import Any

logger = logging.getLogger("ray_elastic")

STDOUT, STDERR = 1, 2  # torchrun's Std bits: OUT=1, ERR=2 (ALL=3)
DEFAULT_PREFIX = "[rank${rank}]:"
_ACK_TIMEOUT_S = 10.0
_CONNECT_TIMEOUT_S = 5.0


@dataclass(frozen=True)
class OutputSpec:
    """torchrun's console and log settings, for every rank of a run.

    Attributes:
        prefix_template: prefix of each console line, a `string.Template` over
            ``${rank}``, ``${local_rank}`` and ``${role_name}`` (torchrun's
            TORCHELASTIC_LOG_LINE_PREFIX_TEMPLATE); the default is ``[rank${rank}]:``.
        redirects: Std bits per local rank (or one value for all) that go to the log file only.
        tee: Std bits per local rank (or one value for all) that go to the file and the console.
        local_ranks_filter: local ranks shown on the console (None: all).
        duplicate_stdout_filters, duplicate_stderr_filters: lines containing any of these
            are also copied to ``attempt_<round>/filtered_std{out,err}.log``.
        channel: (host, port, token) of the CLI's `OutputServer`; None prints in this process.
    """

    prefix_template: str = DEFAULT_PREFIX
    redirects: int | Mapping[int, int] = 0
    tee: int | Mapping[int, int] = 0
    local_ranks_filter: frozenset[int] | None = None
    duplicate_stdout_filters: tuple[str, ...] = ()
    duplicate_stderr_filters: tuple[str, ...] = ()
    channel: tuple[str, int, str] | None = field(default=None, compare=False)

    def prefix(self, rank: int, local_rank: int, role: str) -> str:
        return Template(self.prefix_template).safe_substitute(rank=rank, local_rank=local_rank, role_name=role)

    def shown(self, local_rank: int, stream: int) -> bool:
        """On the console? Not if redirected (unless also tee'd), nor if filtered out (torchrun's rules)."""
        if self.local_ranks_filter is not None and local_rank not in self.local_ranks_filter:
            return False
        redirected = _bits(self.redirects, local_rank) & stream
        teed = _bits(self.tee, local_rank) & stream
        return not redirected or bool(teed)

    def filters(self, stream: int) -> tuple[str, ...]:
        return self.duplicate_stdout_filters if stream == STDOUT else self.duplicate_stderr_filters

    @property
    def needs_files(self) -> bool:
        """Redirects, tees and duplicate filters write files: torchrun makes a log dir for them."""
        return bool(self.redirects or self.tee or self.duplicate_stdout_filters or self.duplicate_stderr_filters)


def _bits(value: int | Mapping[int, int], local_rank: int) -> int:
    return value.get(local_rank, 0) if isinstance(value, Mapping) else value


class ConsoleSink:
    """Writes whole lines to this process's stdout/stderr, one lock for both so lines never mix."""

    def __init__(self, lock: threading.Lock | None = None, streams: tuple[Any, Any] | None = None):
        self._lock = lock or threading.Lock()
        self._streams = streams

    def write(self, stream: int, line: str) -> None:
        out = (self._streams[0] if stream == STDOUT else self._streams[1]) if self._streams else (
            sys.stdout if stream == STDOUT else sys.stderr)
        with self._lock:
            out.write(line + "\n")
            out.flush()

    def close(self) -> None:
        pass


class LineLockedStream:
    """A text stream that writes whole lines only, under a lock shared with a `ConsoleSink`.

    Installed as sys.stdout/sys.stderr while the CLI runs, so that its own messages (progress
    lines, Ray's forwarded logs) never land in the middle of a script's line: `print` writes
    the text and the newline separately. Partial lines are kept per thread until completed.
    """

    def __init__(self, raw: Any, lock: threading.Lock):
        self._raw = raw
        self._lock = lock
        self._local = threading.local()

    def write(self, text: str) -> int:
        pending = getattr(self._local, "pending", "") + text
        head, newline, tail = pending.rpartition("\n")
        if newline:
            with self._lock:
                self._raw.write(head + newline)
                self._raw.flush()
        self._local.pending = tail
        return len(text)

    def flush(self) -> None:
        pending = getattr(self._local, "pending", "")
        self._local.pending = ""
        with self._lock:
            if pending:
                self._raw.write(pending)
            self._raw.flush()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._raw, name)


@contextlib.contextmanager
def shared_console() -> Any:
    """While the CLI runs: sys.stdout/sys.stderr write whole lines under one lock; yields the scripts' sink."""
    lock = threading.Lock()
    raw = (sys.stdout, sys.stderr)
    sys.stdout, sys.stderr = LineLockedStream(raw[0], lock), LineLockedStream(raw[1], lock)  # type: ignore[assignment]
    try:
        yield ConsoleSink(lock, raw)
    finally:
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):
                stream.flush()
        sys.stdout, sys.stderr = raw


class ChannelSink:
    """Sends lines to the CLI's `OutputServer`; `close()` returns once the CLI has printed them all.

    Falls back to printing here (Ray forwards a worker's output) when the CLI cannot be reached.
    """

    def __init__(self, channel: tuple[str, int, str], fallback: ConsoleSink):
        host, port, token = channel
        self._fallback: ConsoleSink | None = None
        self._lock = threading.Lock()
        self._sock: socket.socket | None = None
        try:
            sock = socket.create_connection((host, port), timeout=_CONNECT_TIMEOUT_S)
            sock.settimeout(None)
            sock.sendall(token.encode() + b"\n")
            self._sock = sock
        except OSError as exc:
            logger.warning("output channel to %s:%s unavailable (%s); printing here", host, port, exc)
            self._fallback = fallback

    def write(self, stream: int, line: str) -> None:
        if self._fallback is not None:
            self._fallback.write(stream, line)
            return
        data = (b"O" if stream == STDOUT else b"E") + line.replace("\n", " ").encode(errors="replace") + b"\n"
        with self._lock:
            try:
                assert self._sock is not None
                self._sock.sendall(data)
            except OSError:
                self._fallback = ConsoleSink()
                self._fallback.write(stream, line)

    def close(self) -> None:
        """Tell the CLI this rank is done and wait (bounded) until it has printed every line."""
        with self._lock:
            sock, self._sock = self._sock, None
        if sock is None:
            return
        try:
            sock.sendall(b"Z\n")
            sock.settimeout(_ACK_TIMEOUT_S)
            sock.recv(1)
        except OSError:
            pass
        finally:
            sock.close()


class OutputServer:
    """The CLI's end of the output channel: prints the lines every rank sends, as they arrive.

    Args:
        host: address of this node, as the workers will reach it.
        sink: where lines are printed.
    """

    def __init__(self, host: str, sink: ConsoleSink | None = None):
        self.sink = sink or ConsoleSink()
        self.token = secrets.token_hex(16)
        self._listener = socket.create_server(("", 0))
        self._listener.setblocking(False)
        self.channel = (host, self._listener.getsockname()[1], self.token)
        self._selector = selectors.DefaultSelector()
        self._selector.register(self._listener, selectors.EVENT_READ, None)
        self._buffers: dict[socket.socket, bytearray] = {}
        self._authed: set[socket.socket] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, name="ray_elastic-output", daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            self._poll(0.1)

    def _poll(self, timeout_s: float) -> int:
        events = self._selector.select(timeout_s)
        for key, _ in events:
            if key.data is None:
                self._accept()
            else:
                self._read(key.fileobj)  # type: ignore[arg-type]
        return len(events)

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self._listener.accept()
            except (BlockingIOError, OSError):
                return
            conn.setblocking(False)
            self._buffers[conn] = bytearray()
            self._selector.register(conn, selectors.EVENT_READ, "conn")

    def _read(self, conn: socket.socket) -> None:
        try:
            data = conn.recv(65536)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        buffer = self._buffers[conn]
        buffer += data
        while b"\n" in buffer:
            line, _, rest = bytes(buffer).partition(b"\n")
            buffer[:] = rest
            if not self._handle(conn, line):
                data = b""
                break
        if not data:
            self._drop(conn)

    def _handle(self, conn: socket.socket, line: bytes) -> bool:
        """Act on one message; False closes the connection."""
        if conn not in self._authed:
            if not secrets.compare_digest(line, self.token.encode()):
                return False
            self._authed.add(conn)
            return True
        kind, text = line[:1], line[1:].decode(errors="replace")
        if kind == b"O":
            self.sink.write(STDOUT, text)
        elif kind == b"E":
            self.sink.write(STDERR, text)
        elif kind == b"Z":
            with contextlib.suppress(OSError):
                conn.setblocking(True)
                conn.sendall(b"K")
            return False
        return True

    def _drop(self, conn: socket.socket) -> None:
        with contextlib.suppress(KeyError, ValueError):
            self._selector.unregister(conn)
        self._buffers.pop(conn, None)
        self._authed.discard(conn)
        conn.close()

    def close(self) -> None:
        """Print what is still buffered in open connections, then stop."""
        self._stop.set()
        self._thread.join(timeout=5)
        while self._poll(0):  # whatever arrived after the last loop
            pass
        for conn in list(self._buffers):
            self._drop(conn)
        with contextlib.suppress(KeyError, ValueError):
            self._selector.unregister(self._listener)
        self._listener.close()
        self._selector.close()
