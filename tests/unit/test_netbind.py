"""Where the run's own listeners bind (no Ray): the decision, the store's socket, gloo's interface."""

from __future__ import annotations

import datetime
import os
import socket

import psutil
import pytest
import torch.distributed as dist

from ray_elastic.netbind import GLOO_IFNAME_ENV, interface_for, listen_host, pin_gloo_interface, round_secret
from ray_elastic.store import RoundStore

pytestmark = pytest.mark.timeout(60)


def _external_ipv4() -> str | None:
    for addresses in psutil.net_if_addrs().values():
        for address in addresses:
            if address.family == socket.AF_INET and not address.address.startswith("127."):
                return address.address
    return None


EXTERNAL = _external_ipv4()
needs_external = pytest.mark.skipif(EXTERNAL is None, reason="this host has no interface besides loopback")


@pytest.mark.parametrize(
    ("own", "peers", "expected"),
    [
        ("10.0.0.5", ["10.0.0.5", "10.0.0.5"], "127.0.0.1"),  # everyone on this machine
        ("10.0.0.5", ["10.0.0.5", "127.0.0.1"], "127.0.0.1"),  # a node that reports loopback is local too
        ("10.0.0.5", ["10.0.0.5", "10.0.0.6"], "10.0.0.5"),  # another machine: the node IP, never a wildcard
        ("10.0.0.5", ["10.0.0.5", ""], "10.0.0.5"),  # unknown counts as another machine
        ("127.0.0.1", ["10.0.0.6"], "127.0.0.1"),  # a loopback node cannot be reached from elsewhere anyway
        ("fd00::2", ["fd00::2"], "::1"),
        ("fd00::2", ["fd00::3"], "fd00::2"),
    ],
)
def test_listen_host(own, peers, expected):
    assert listen_host(own, peers) == expected


@pytest.mark.parametrize("own", ["0.0.0.0", "::", ""])
def test_listen_host_refuses_a_wildcard(own):
    with pytest.raises(ValueError, match="not a bindable address"):
        listen_host(own, [])


def test_round_secrets_are_fresh_and_long():
    secrets = {round_secret() for _ in range(100)}
    assert len(secrets) == 100 and all(len(s) == 32 for s in secrets)


def _listening(port: int) -> list[str]:
    return [c.laddr.ip for c in psutil.Process().net_connections("tcp")
            if c.status == psutil.CONN_LISTEN and c.laddr.port == port]


def _reachable(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as sock:
        sock.settimeout(2)
        return sock.connect_ex((host, port)) == 0


def test_round_store_listens_on_loopback_only():
    store = RoundStore("127.0.0.1", timeout_s=5)
    assert _listening(store.port) == ["127.0.0.1"], "one listener, on the given address"
    client = dist.TCPStore("127.0.0.1", store.port, is_master=False, timeout=datetime.timedelta(seconds=5))
    client.set("k", "v")
    if EXTERNAL is not None:
        assert not _reachable(EXTERNAL, store.port), f"the store answered on {EXTERNAL}"
    del client
    store.close()


@needs_external
def test_round_store_listens_on_the_node_ip_only():
    store = RoundStore(EXTERNAL, timeout_s=5)
    assert _listening(store.port) == [EXTERNAL]
    assert not _reachable("127.0.0.1", store.port), "the store answered on loopback"
    client = dist.TCPStore(EXTERNAL, store.port, is_master=False, timeout=datetime.timedelta(seconds=5))
    client.set("k", "v")
    del client
    store.close()


@pytest.mark.parametrize("host", ["127.0.0.1", EXTERNAL], ids=["loopback", "node-ip"])
def test_gloo_listens_on_the_interface_of_the_bind_address(host, monkeypatch):
    if host is None:
        pytest.skip("this host has no interface besides loopback")
    monkeypatch.delenv(GLOO_IFNAME_ENV, raising=False)
    pinned = pin_gloo_interface(host, None)
    assert pinned == interface_for(host) and os.environ[GLOO_IFNAME_ENV] == pinned
    before = {c.laddr for c in psutil.Process().net_connections("tcp") if c.status == psutil.CONN_LISTEN}
    group = dist.ProcessGroupGloo(dist.HashStore(), 0, 1, datetime.timedelta(seconds=10))
    new = [c.laddr.ip for c in psutil.Process().net_connections("tcp")
           if c.status == psutil.CONN_LISTEN and c.laddr not in before]
    assert new == [host], f"gloo's listener: {new}"
    del group


def test_a_users_gloo_interface_is_left_alone(monkeypatch):
    monkeypatch.setenv(GLOO_IFNAME_ENV, "eth7")
    assert pin_gloo_interface("127.0.0.1", None) is None and os.environ[GLOO_IFNAME_ENV] == "eth7"
    # ...but a value this worker pinned itself follows the next round's address.
    monkeypatch.setenv(GLOO_IFNAME_ENV, "lo")
    assert pin_gloo_interface("127.0.0.1", "lo") == "lo"


def test_round_store_on_a_node_ip_this_machine_lacks_listens_everywhere_and_says_so(caplog):
    """A NAT'd --node-ip-address cannot be bound: the one case of a wildcard, logged as an error."""
    store = RoundStore("198.51.100.7", timeout_s=5)  # TEST-NET-2: never an address of this machine
    assert _listening(store.port) == ["0.0.0.0"]
    assert "is not an address of this machine" in caplog.text and "--node-ip-address" in caplog.text
    client = dist.TCPStore("127.0.0.1", store.port, is_master=False, timeout=datetime.timedelta(seconds=5))
    client.set("k", "v")
    del client
    store.close()
