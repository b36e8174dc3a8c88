"""Severing a round's groups from any thread: gloo's connections shut down, NCCL's communicators aborted.

gloo has no working abort: a rank blocked waiting on a live peer stays blocked
until the collective timeout even after `destroy_process_group()`. Shutting
down gloo's TCP connections makes the blocked collective raise at once.

Exactly gloo's connections are shut down, found by address, not by when they
appeared (`process_group` records the listening addresses gloo opened in every
rank). A gloo connection is one this process accepted on its own gloo listener,
or one it opened to a peer's. Connections of user threads or Ray, even ones
opened while the group formed, match neither; they are listed when the sever
happens, so a gloo socket on a reused file descriptor is found too, and each
one's addresses are checked again on its descriptor before it is shut down.
"""

from __future__ import annotations

import datetime
import logging
import os
import socket
import threading
import time
from dataclasses import dataclass
from typing import Any

import torch.distributed as dist

from ray_elastic.netbind import is_wildcard
from ray_elastic.worker.sockets import Address, TcpSocket, norm, tcp_sockets

logger = logging.getLogger("ray_elastic")

FIN_DELAY_S = 0.02  # a sever tells peers this long after it failed its own side: a peer's send in flight lands
FIN_WAIT_S = 0.2  # ... or longer, up to this, until gloo let go of every connection (see shutdown_gloo_connections)
FIN_LINGER_S = 2.0  # then keeps its own descriptors this long before closing them
_SEVERING: set[int] = set()  # socket inodes a sever is still finishing (see _tell_peers)
_SEVERING_LOCK = threading.Lock()
ABORTED_OP_TIMEOUT_S = 0.2  # a collective started after a sever fails within this (see fail_later_gloo_ops)


def listening_addresses(sockets: list[TcpSocket] | None = None) -> set[Address]:
    """The addresses this process listens on (from `sockets` if already read)."""
    return {s.laddr for s in (tcp_sockets() if sockets is None else sockets) if s.listening}


@dataclass(frozen=True)
class _Conn:
    fd: int
    laddr: Address
    raddr: Address


def gloo_connections(own: set[Address], peers: set[Address],
                     sockets: list[TcpSocket] | None = None) -> list[_Conn]:
    """This process's established TCP connections that belong to gloo.

    Args:
        own: the listening addresses gloo opened in this process.
        peers: the listening addresses every rank of the group published (own included).
        sockets: this process's sockets, if already read (`tcp_sockets()`).
    """
    own_ports = {port for host, port in own if is_wildcard(host)}
    out = []
    for s in tcp_sockets() if sockets is None else sockets:
        if not s.established or s.raddr is None or s.fd < 0:
            continue
        if s.laddr in own or s.laddr[1] in own_ports or s.raddr in peers:
            out.append(_Conn(s.fd, s.laddr, s.raddr))
    return out


def shutdown_gloo_connections(own: set[Address], peers: set[Address],
                              sockets: list[TcpSocket] | None = None) -> int:
    """Shut down every gloo connection of this process (arguments as for `gloo_connections`); how many.

    A rank blocked in a collective on one of them raises at once, and so does the peer. In two steps,
    because gloo never fails a send it had to queue (a write that met a closed or reset connection) when
    the connection then closes: such a collective waits out the collective timeout.

    1. Here, the read side: gloo's thread reads end-of-file and fails the connection, so every op on
       it raises and no later send is tried on it. gloo then closes its descriptor.
    2. In the background (`_tell_peers`), `FIN_DELAY_S` later and once gloo has let go (at most
       `FIN_WAIT_S`), the write side, through a descriptor of this process's own: the peer reads
       end-of-file. Had gloo's close ended the connection, the unread bytes in it would reset it under
       a send the peer is making; and data that arrives after this side's end-of-file resets it too, so
       the peer gets the delay to finish the send it is in (it then waits to receive, which end-of-file
       fails).

    Measured (`benchmarks/sever_race.py`: two processes severed in the middle of back-to-back all-gathers):
    both sides at once left a collective waiting out its timeout in 22 of 600 severs, on either side; the
    read side alone in 47 (on the peer); this in none.
    """
    severed: list[tuple[socket.socket, int]] = []
    for conn in gloo_connections(own, peers, sockets):
        try:
            sock = socket.socket(fileno=os.dup(conn.fd))
        except OSError:
            continue
        try:
            inode = os.fstat(sock.fileno()).st_ino
            with _SEVERING_LOCK:  # a second sever (the abort's, then the training thread's) finds it again
                fresh = inode not in _SEVERING
                _SEVERING.add(inode)
            if fresh and norm(sock.getsockname()) == conn.laddr and norm(sock.getpeername()) == conn.raddr:
                sock.shutdown(socket.SHUT_RD)
                severed.append((sock, conn.fd))
                continue
            if fresh:
                _forget_severing([sock])
        except OSError:
            pass
        sock.close()
    if severed:
        threading.Thread(target=_tell_peers, args=(severed,), name="ray_elastic-sever", daemon=True).start()
    return len(severed)


def _tell_peers(severed: list[tuple[socket.socket, int]]) -> None:
    """Step 2 of `shutdown_gloo_connections`: end-of-file to the peers, then (`FIN_LINGER_S` later) close."""
    started = time.monotonic()
    time.sleep(FIN_DELAY_S)
    while any(_same_socket(fd, sock) for sock, fd in severed) and time.monotonic() < started + FIN_WAIT_S:
        time.sleep(0.001)
    for sock, _ in severed:
        try:
            sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass
    time.sleep(FIN_LINGER_S)  # the peer closes its end on reading end-of-file: closing ours then resets nothing
    _forget_severing([sock for sock, _ in severed])
    for sock, _ in severed:
        sock.close()


def _forget_severing(socks: list[socket.socket]) -> None:
    with _SEVERING_LOCK:
        for sock in socks:
            try:
                _SEVERING.discard(os.fstat(sock.fileno()).st_ino)
            except OSError:
                pass


def _same_socket(fd: int, sock: socket.socket) -> bool:
    """Whether descriptor `fd` still refers to `sock`'s connection (gloo has not closed it)."""
    try:
        return os.fstat(fd).st_ino == os.fstat(sock.fileno()).st_ino
    except OSError:
        return False


def fail_later_gloo_ops(timeout_s: float = ABORTED_OP_TIMEOUT_S) -> None:
    """Give every gloo group of this process a collective timeout of `timeout_s`.

    A sever frees the collectives blocked at that moment. One the training thread starts after it (the
    rest of its step) can find its connection to a peer that already left the round closed, or still open
    with nobody sending: gloo then waits the whole collective timeout (seen under HSDP: a survivor in the
    backward's all-gather on its shard sub-group with no gloo connection left, until it was killed). The
    round is over, so every later collective should fail, and with this timeout it does within it.
    """
    c10d: Any = dist.distributed_c10d
    timeout = datetime.timedelta(seconds=timeout_s)
    for pg in list(c10d._world.pg_names):
        for device in list(getattr(pg, "_device_types", [])):
            try:
                backend = pg._get_backend(device)
            except Exception:  # noqa: BLE001 - a group without a backend for this device
                continue
            if isinstance(backend, dist.ProcessGroupGloo):
                backend._set_default_timeout(timeout)


def abort_every_nccl_group() -> int:
    """Abort the default group and every NCCL group made beside it (HSDP's sub-groups) as torch aborts them all:
    newest first, inside one NCCL group call so that communicators' aborts do not wait on each other.
    Returns how many were aborted."""
    import torch

    c10d: Any = dist.distributed_c10d
    groups = [pg for pg in sorted(c10d._world.pg_names, key=lambda pg: c10d._world.pg_names[pg], reverse=True)
              if "nccl" in str(dist.get_backend(pg))]  # gloo side groups are severed by their own handlers
    backend: Any = None
    try:
        backend = c10d._get_default_group()._get_backend(torch.device("cuda"))
    except Exception:  # noqa: BLE001 - no CUDA backend: abort group by group
        backend = None
    grouped = hasattr(backend, "_group_start") and hasattr(backend, "_group_end")
    aborted = 0
    if grouped:
        backend._group_start()
    try:
        for pg in groups:
            try:
                pg.abort()
                aborted += 1
            except Exception:  # noqa: BLE001 - abort is best effort; destroy follows
                logger.debug("process group abort failed", exc_info=True)
    finally:
        if grouped:
            backend._group_end()
    return aborted
