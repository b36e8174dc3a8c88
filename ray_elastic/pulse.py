"""A liveness check that does not need the worker's GIL: torch's TCPStore server thread answers it.

A worker answers the coordinator's probes from a Python thread. That thread needs
the GIL, which a single C call can hold for seconds (`sum(range(n))`, a C
extension, `pickle.dumps` of a huge object): measured in
`benchmarks/probe_latency.py`, such a call delays a probe for its whole length,
while a Python loop delays it by milliseconds only. So a probe left unanswered
is not proof of a lost worker. The second opinion comes from a native thread:
every worker hosts an empty TCPStore whose libuv server thread (C++, no GIL)
answers the store's PING. The coordinator connects with a plain socket:

- the PING is answered: the process runs (perhaps busy in a GIL-holding call);
- the connection is refused: the process is gone;
- no answer within the timeout: the process is stopped, its node frozen, or cut off.

The PING is TCPStore's own wire message (a query byte, then a 32-bit nonce that the
server echoes). Each worker checks at start that its own server answers it; when a
torch version speaks otherwise, the worker publishes no pulse address and the
coordinator relies on probes alone for it.
"""

from __future__ import annotations

import datetime
import logging
import os
import socket
import struct
import time

logger = logging.getLogger("ray_elastic")

ALIVE, SILENT, GONE, NONE = "alive", "silent", "gone", "none"
_VALIDATE, _PING = 0, 13  # c10d::detail::QueryType
_MAGIC = 0x3C85F7CE  # c10d::detail::validationMagicNumber


def ping(host: str, port: int, timeout_s: float) -> str:
    """Ask a worker's pulse server whether its process runs.

    Returns:
        ALIVE (answered), GONE (connection refused: nothing listens there any more),
        or SILENT (no answer within `timeout_s`, or an answer that makes no sense).
    """
    started = time.monotonic()
    try:
        sock = socket.create_connection((host, port), timeout=max(timeout_s, 1e-3))
    except ConnectionRefusedError:
        return GONE
    except OSError:
        return SILENT
    try:
        nonce = int.from_bytes(os.urandom(4), "little")
        sock.settimeout(max(timeout_s - (time.monotonic() - started), 1e-3))
        sock.sendall(struct.pack("=BI", _VALIDATE, _MAGIC) + struct.pack("=BI", _PING, nonce))
        answer = b""
        while len(answer) < 4:
            chunk = sock.recv(4 - len(answer))
            if not chunk:
                return SILENT
            answer += chunk
        return ALIVE if struct.unpack("=I", answer)[0] == nonce else SILENT
    except ConnectionResetError:
        return GONE
    except OSError:
        return SILENT
    finally:
        sock.close()


class PulseServer:
    """An empty TCPStore in this process, bound to `host`, whose native thread answers `ping`.

    `address` is None when the server could not start or does not answer the PING
    (another torch wire format): the coordinator then relies on probes alone.
    """

    def __init__(self, host: str):
        self.host = host
        self.address: tuple[str, int] | None = None
        self._store = None
        try:
            import torch.distributed as dist

            sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                sock.bind((host, 0))
                sock.listen(16)
                port = sock.getsockname()[1]
                self._store = dist.TCPStore(
                    host, port, is_master=True, wait_for_workers=False, use_libuv=True,
                    timeout=datetime.timedelta(seconds=10), master_listen_fd=sock.fileno(),
                )
            except BaseException:
                sock.close()
                raise
            sock.detach()  # the store's server owns the descriptor now
        except Exception:  # noqa: BLE001 - the pulse is a second opinion; probes still work without it
            logger.warning("pulse server could not start on %s; probes alone will judge liveness", host,
                           exc_info=True)
            return
        state = ping(host, port, 2.0)
        if state == ALIVE:
            self.address = (host, port)
        else:
            logger.warning("pulse server on %s:%d does not answer its PING (%s); probes alone will judge "
                           "liveness", host, port, state)

    def close(self) -> None:
        self._store = None
        self.address = None
