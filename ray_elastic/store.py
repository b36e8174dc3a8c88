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

import torch.distributed as dist

from ray_elastic.netbind import listening_socket, loopback_for

logger = logging.getLogger("ray_elastic")


class RoundStore:
    """A TCPStore server bound to an ephemeral port on `host` (an address of this node, never a wildcard).

    Clients connect to `host`; the one exception is a `host` that is not an address of this
    machine (a NAT'd node IP), where the store logs an error and listens on every interface.
    """

    def __init__(self, host: str, timeout_s: float = 60.0):
        self.host = host
        local = host  # where this process's own client of the store connects
        try:
            sock = listening_socket(host)
        except OSError as exc:
            if exc.errno != errno.EADDRNOTAVAIL:
                raise
            # Ray's node IP is not an address of this machine (a NAT'd --node-ip-address): listening on it
            # is impossible, and refusing would stop every run here. The one case that binds every interface.
            logger.error("Ray's node IP %s is not an address of this machine; the round store listens on every "
                         "interface. Start Ray with --node-ip-address=<an address of this machine>.", host)
            sock = socket.create_server(("", 0), family=socket.AF_INET6 if ":" in host else socket.AF_INET)
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
