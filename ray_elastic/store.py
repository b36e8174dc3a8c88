"""The c10d store of one round, hosted by the coordinator, never by a worker.

A brand-new TCPStore per round (port 0, published) means no key of an earlier
round can hand a rank a dead peer's address, and losing any worker, rank 0
included, loses nothing.
"""

from __future__ import annotations

import datetime
import time

import torch.distributed as dist

_REBIND_S = 10.0  # a fixed port may still be held by the previous round's store for a moment


class RoundStore:
    """A TCPStore server bound to an ephemeral port on this node, or to `port` when one is given
    (torchrun's --master-port: scripts that name it in `tcp://host:PORT` reach the store)."""

    def __init__(self, host: str, timeout_s: float = 60.0, port: int = 0):
        self.host = host
        deadline = time.monotonic() + (_REBIND_S if port else 0.0)
        while True:
            try:
                self._store: dist.TCPStore | None = dist.TCPStore(
                    "0.0.0.0",
                    port,
                    is_master=True,
                    wait_for_workers=False,
                    timeout=datetime.timedelta(seconds=timeout_s),
                    use_libuv=True,
                )
                break
            except (RuntimeError, OSError) as exc:  # DistNetworkError: the port is taken
                if not port or time.monotonic() >= deadline or "in use" not in str(exc).lower():
                    raise
                time.sleep(0.1)
        self.port = self._store.port

    def close(self) -> None:
        """Stop serving; the port is released when the server object goes away."""
        self._store = None
