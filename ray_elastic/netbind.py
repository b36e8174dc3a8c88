"""Where the run's own listeners bind, and the per-round store secret.

A run opens two kinds of listening sockets of its own (Ray's are Ray's):

- the round's c10d TCPStore, in the coordinator (`store.RoundStore`);
- gloo's transport listener, in every worker (one per process group it forms).

Each binds to the address Ray reports for its node, never to a wildcard, and to
loopback when every process of the round is on this machine (`listen_host`). The
store binds through a socket made here and handed to torch (`master_listen_fd`,
since TCPStore's own server binds every interface); gloo takes its address from
`GLOO_SOCKET_IFNAME` (`init_process_group` passes no device options to gloo), so
a worker names the interface that holds its bind address (`pin_gloo_interface`).
"""

from __future__ import annotations

import ipaddress
import logging
import os
import secrets
import socket
from collections.abc import Iterable

import psutil

logger = logging.getLogger("ray_elastic")

GLOO_IFNAME_ENV = "GLOO_SOCKET_IFNAME"
_WILDCARDS = frozenset({"", "0.0.0.0", "::", "*"})


def _ip(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        ip = ipaddress.ip_address(text.split("%", 1)[0])
    except ValueError:
        return None
    mapped = getattr(ip, "ipv4_mapped", None)
    return mapped if mapped is not None else ip


def is_wildcard(host: str) -> bool:
    """True for an address that means 'every interface'."""
    return host in _WILDCARDS or (_ip(host) is not None and _ip(host).is_unspecified)  # type: ignore[union-attr]


def is_loopback(host: str) -> bool:
    ip = _ip(host)
    return host == "localhost" if ip is None else ip.is_loopback


def loopback_for(host: str) -> str:
    """The loopback address of the same family as `host`."""
    ip = _ip(host)
    return "::1" if ip is not None and ip.version == 6 else "127.0.0.1"


def listen_host(own_ip: str, peer_ips: Iterable[str]) -> str:
    """The address a listener on this node binds to, given who must reach it.

    Args:
        own_ip: the IP Ray reports for this node.
        peer_ips: the IPs Ray reports for the nodes of every process that connects to it
            ("" where unknown, which counts as another machine).

    Returns:
        loopback when every peer is on this machine (same node IP, or a loopback one),
        else `own_ip`.

    Raises:
        ValueError: `own_ip` is a wildcard or empty (Ray never reports one).
    """
    if is_wildcard(own_ip):
        raise ValueError(f"node IP {own_ip!r} is not a bindable address")
    if is_loopback(own_ip) or all(ip == own_ip or (ip and is_loopback(ip)) for ip in peer_ips):
        return loopback_for(own_ip)
    return own_ip


def round_secret() -> str:
    """A fresh, unguessable store-key prefix for one round (128 bits, hex)."""
    return secrets.token_hex(16)


def listening_socket(host: str, port: int = 0) -> socket.socket:
    """A TCP socket bound to (host, port; 0 for an ephemeral one) and listening; never a wildcard.

    Raises:
        ValueError: `host` is a wildcard.
        OSError: `host` is not an address of this machine.
    """
    if is_wildcard(host):
        raise ValueError(f"refusing to listen on wildcard address {host!r}")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(512)
    except OSError:
        sock.close()
        raise
    return sock


def interface_for(host: str) -> str | None:
    """The name of the local interface that holds address `host`, if any."""
    wanted = _ip(host)
    if wanted is None:
        return None
    for name, addresses in psutil.net_if_addrs().items():
        for address in addresses:
            if address.family in (socket.AF_INET, socket.AF_INET6) and _ip(address.address) == wanted:
                return name
    return None


def pin_gloo_interface(bind_host: str, pinned_before: str | None) -> str | None:
    """Make gloo groups formed in this process listen on the interface of `bind_host`.

    Sets `GLOO_SOCKET_IFNAME` unless the user set it (a value this function did not set
    earlier): an explicit choice wins. Child processes (the CLI's scripts) inherit it.

    Args:
        bind_host: the address this worker's listeners should use.
        pinned_before: what this function returned for the previous round (None at first).

    Returns:
        the interface name now pinned by us, or None when the user's setting was left alone
        or no interface holds `bind_host` (gloo then uses torch's default: the hostname's address).
    """
    current = os.environ.get(GLOO_IFNAME_ENV)
    if current and current != pinned_before:
        return None
    iface = interface_for(bind_host) if bind_host else None
    if iface is None:
        if pinned_before is not None:
            os.environ.pop(GLOO_IFNAME_ENV, None)
        if bind_host:
            logger.warning("no local interface holds %s; gloo binds where torch's default puts it", bind_host)
        return None
    os.environ[GLOO_IFNAME_ENV] = iface
    return iface
