"""The c10d store of one round, hosted by the coordinator, never by a worker.

A brand-new TCPStore per round (port 0, published) means no key of an earlier
round can hand a rank a dead peer's address, and losing any worker, rank 0
included, loses nothing.

The store listens on one address only (see `netbind`): TCPStore's own server
binds every interface, so the listening socket is made here and handed over with
`master_listen_fd`. TCPStore has no authentication; every key a round uses lives
under that round's random secret prefix instead (`RoundSpec.store_prefix`).
"""

from __future__ import annotations

import datetime
import errno
import logging
import socket
import time

import torch.distributed as dist

from ray_elastic.netbind import listening_socket, loopback_for

logger = logging.getLogger("ray_elastic")

_REBIND_S = 10.0  # a fixed port may still be held by the previous round's store for a moment


def _bind(host: str, port: int) -> socket.socket:
    """A listening socket on (host, port); a fixed port is retried while the previous round still holds it."""
    deadline = time.monotonic() + (_REBIND_S if port else 0.0)
    while True:
        try:
            return listening_socket(host, port)
        except OSError as exc:
            if not port or exc.errno != errno.EADDRINUSE or time.monotonic() >= deadline:
                raise
            time.sleep(0.1)


class RoundStore:
    """A TCPStore server on `host` (an address of this node, never a wildcard), on an ephemeral port or on
    `port` when one is given (torchrun's --master-port: scripts that name it in `tcp://host:PORT` reach it).

    Clients connect to `host`; the one exception is a `host` that is not an address of this
    machine (a NAT'd node IP), where the store logs an error and listens on every interface.
    """

    def __init__(self, host: str, timeout_s: float = 60.0, port: int = 0):
        self.host = host
        local = host  # where this process's own client of the store connects
        try:
            sock = _bind(host, port)
        except OSError as exc:
            if exc.errno != errno.EADDRNOTAVAIL:
                raise
            # Ray's node IP is not an address of this machine (a NAT'd --node-ip-address): listening on it
            # is impossible, and refusing would stop every run here. The one case that binds every interface.
            logger.error("Ray's node IP %s is not an address of this machine; the round store listens on every "
                         "interface. Start Ray with --node-ip-address=<an address of this machine>.", host)
            sock = socket.create_server(("", port), family=socket.AF_INET6 if ":" in host else socket.AF_INET)
            local = loopback_for(host)
        try:
            self._store: dist.TCPStore | None = dist.TCPStore(
                local,
                sock.getsockname()[1],
                is_master=True,
                wait_for_workers=False,
                timeout=datetime.timedelta(seconds=timeout_s),
                master_listen_fd=sock.fileno(),
                use_libuv=True,
            )
        except BaseException:
            sock.detach()  # the store may already have taken the descriptor (and closed it): never close it twice
            raise
        sock.detach()  # the store's server owns the descriptor now and closes it when it goes away
        self.port = self._store.port

    def close(self) -> None:
        """Stop serving; the port is released when the server object goes away."""
        self._store = None
