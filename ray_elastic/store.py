"""The c10d store of one round, hosted by the coordinator, never by a worker.

A brand-new TCPStore per round (port 0, published) means no key of an earlier
round can hand a rank a dead peer's address, and losing any worker, rank 0
included, loses nothing.
"""

from __future__ import annotations

import datetime

import torch.distributed as dist


class RoundStore:
    """A TCPStore server bound to an ephemeral port on this node."""

    def __init__(self, host: str, timeout_s: float = 60.0):
        self.host = host
        self._store: dist.TCPStore | None = dist.TCPStore(
            "0.0.0.0",
            0,
            is_master=True,
            wait_for_workers=False,
            timeout=datetime.timedelta(seconds=timeout_s),
            use_libuv=True,
        )
        self.port = self._store.port

    def close(self) -> None:
        """Stop serving; the port is released when the server object goes away."""
        self._store = None
