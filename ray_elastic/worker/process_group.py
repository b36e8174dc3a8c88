"""Forming and severing a worker's torch.distributed group, without leaving the process.

gloo has no working abort: a rank blocked waiting on a live peer stays blocked
until the collective timeout even after `destroy_process_group()`. Shutting
down the TCP connections that `init_process_group` opened makes the blocked
collective raise at once. We record exactly those sockets (new established
connections, not the listener, not the store) and check each one's addresses
again before shutting it down, so a reused file descriptor is never touched.
NCCL groups are aborted with the backend's own abort.
"""

from __future__ import annotations

import datetime
import logging
import socket
import threading
from dataclasses import dataclass

import psutil
import torch.distributed as dist

logger = logging.getLogger("ray_elastic")

_COMM_ERROR_MARKERS = (
    "connection closed",
    "connection reset",
    "broken pipe",
    "gloo",
    "nccl",
    "timed out",
    "socket",
    "read error",
    "write error",
)


def is_communication_error(exc: BaseException) -> bool:
    """True for errors a rank gets when a collective loses a peer (victim, not cause)."""
    if isinstance(exc, getattr(dist, "DistError", ())):
        return True
    if not isinstance(exc, RuntimeError):
        return False
    text = str(exc).lower()
    return any(marker in text for marker in _COMM_ERROR_MARKERS)


@dataclass(frozen=True)
class _Conn:
    fd: int
    laddr: tuple
    raddr: tuple


def _established(exclude_remote_port: int) -> dict[int, _Conn]:
    out = {}
    for c in psutil.Process().net_connections(kind="tcp"):
        if c.status == psutil.CONN_ESTABLISHED and c.raddr and c.fd >= 0 and c.raddr[1] != exclude_remote_port:
            out[c.fd] = _Conn(c.fd, tuple(c.laddr), tuple(c.raddr))
    return out


def _same_address(a: tuple, b: tuple) -> bool:
    return a[0] == b[0] and a[1] == b[1]


class GroupHandle:
    """The default process group of one round, with a way to break it from another thread."""

    def __init__(self, backend: str, store: dist.Store, store_port: int, rank: int, world_size: int,
                 timeout_s: float, device_id=None):
        self.backend = backend
        self._lock = threading.Lock()
        self._alive = False
        before = set(_established(store_port)) if backend == "gloo" else set()
        kwargs = {}
        if device_id is not None:
            kwargs["device_id"] = device_id
        dist.init_process_group(
            backend,
            store=store,
            rank=rank,
            world_size=world_size,
            timeout=datetime.timedelta(seconds=timeout_s),
            **kwargs,
        )
        self._alive = True
        self._conns: list[_Conn] = []
        if backend == "gloo":
            self._conns = [c for fd, c in _established(store_port).items() if fd not in before]

    def sever(self) -> int:
        """Make every blocked collective of this group fail now. Safe from any thread; idempotent.

        Returns:
            how many connections were shut down (gloo) or 1 for an NCCL abort.
        """
        with self._lock:
            if not self._alive:
                return 0
            if self.backend != "gloo":
                try:
                    dist.distributed_c10d._get_default_group().abort()  # type: ignore[attr-defined]
                    return 1
                except Exception:  # noqa: BLE001 - abort is best effort; destroy follows
                    logger.debug("process group abort failed", exc_info=True)
                    return 0
            closed = 0
            for conn in self._conns:
                try:
                    sock = socket.socket(fileno=conn.fd)
                except OSError:
                    continue
                try:
                    if _same_address(sock.getsockname(), conn.laddr) and _same_address(sock.getpeername(), conn.raddr):
                        sock.shutdown(socket.SHUT_RDWR)
                        closed += 1
                except OSError:
                    pass
                finally:
                    sock.detach()
            return closed

    def destroy(self) -> None:
        with self._lock:
            if not self._alive:
                return
            self._alive = False
        try:
            dist.destroy_process_group()
        except Exception:  # noqa: BLE001 - a broken group may complain while going away
            logger.debug("destroy_process_group failed", exc_info=True)
