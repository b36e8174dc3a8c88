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
import logging

import torch.distributed as dist

from ray_elastic.netbind import listening_socket

logger = logging.getLogger("ray_elastic")


class RoundStore:
    """A TCPStore server bound to an ephemeral port on `host` (an address of this node, never a wildcard).

    Raises:
        OSError: `host` is not an address of this machine.
    """

    def __init__(self, host: str, timeout_s: float = 60.0):
        self.host = host
        sock = listening_socket(host)
        try:
            self._store: dist.TCPStore | None = dist.TCPStore(
                host,
                sock.getsockname()[1],
                is_master=True,
                wait_for_workers=False,
                timeout=datetime.timedelta(seconds=timeout_s),
                master_listen_fd=sock.fileno(),
                use_libuv=True,
            )
        except BaseException:
            sock.close()
            raise
        sock.detach()  # the store's server owns the descriptor now and closes it when it goes away
        self.port = self._store.port

    def close(self) -> None:
        """Stop serving; the port is released when the server object goes away."""
        self._store = None
