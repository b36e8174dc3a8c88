"""This process's TCP sockets read from its descriptors agree with psutil's answer from the host's table."""

from __future__ import annotations

import socket
import time

import pytest

from ray_elastic.worker.sockets import _from_psutil, tcp_sockets

pytestmark = pytest.mark.timeout(30)


def _key(sockets):
    return sorted((s.fd, s.laddr, s.raddr, s.listening, s.established) for s in sockets)


@pytest.fixture
def open_sockets():
    """Listeners on IPv4 and IPv6 loopback, a connection through each, and one whose peer has closed."""
    made: list[socket.socket] = []
    for family, host in ((socket.AF_INET, "127.0.0.1"), (socket.AF_INET6, "::1")):
        try:
            listener = socket.socket(family)
            listener.bind((host, 0))
        except OSError:  # no IPv6 here
            continue
        listener.listen()
        client = socket.create_connection(listener.getsockname()[:2])
        server, _ = listener.accept()
        made += [listener, client, server]
    closing = socket.socket()
    closing.bind(("127.0.0.1", 0))
    closing.listen()
    half = socket.create_connection(closing.getsockname())
    peer, _ = closing.accept()
    peer.close()  # `half` is now in CLOSE_WAIT: connected, not established
    made += [closing, half, socket.socket()]  # and one never bound
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and any(s.fd == half.fileno() and s.established for s in tcp_sockets()):
        time.sleep(0.01)
    yield made, half
    for sock in made:
        sock.close()


def test_the_sockets_read_from_descriptors_are_psutils(open_sockets):
    made, half = open_sockets
    mine = tcp_sockets()
    assert _key(mine) == _key(_from_psutil())
    by_fd = {s.fd: s for s in mine}
    listeners = [s for s in made if s.fileno() in by_fd and by_fd[s.fileno()].listening]
    assert len(listeners) >= 2, "both loopback listeners found"
    assert all(by_fd[s.fileno()].laddr == s.getsockname()[:2] for s in listeners)
    assert by_fd[half.fileno()].raddr is not None and not by_fd[half.fileno()].established
    assert sum(1 for s in mine if s.established and s.fd in {m.fileno() for m in made}) >= 4


def test_a_process_out_of_descriptors_reads_the_hosts_table(open_sockets, monkeypatch):
    """No descriptor to copy a socket with: the answer comes from psutil, still complete."""
    import errno
    import os

    def no_more(fd):
        raise OSError(errno.EMFILE, "Too many open files")

    monkeypatch.setattr(os, "dup", no_more)
    assert _key(tcp_sockets()) == _key(_from_psutil())
    assert any(s.listening for s in tcp_sockets())


def test_a_default_socket_timeout_leaves_every_socket_blocking_as_it_was(open_sockets):
    """With `socket.setdefaulttimeout` set, a socket object opened on a copy would make the original
    non-blocking (the flag belongs to the shared open file): the lookup must not open any."""
    import fcntl
    import os

    made, _ = open_sockets

    def nonblocking() -> dict[int, bool]:
        return {s.fileno(): bool(fcntl.fcntl(s.fileno(), fcntl.F_GETFL) & os.O_NONBLOCK) for s in made}

    before = nonblocking()
    assert not any(before.values()), "the fixture's sockets are blocking"
    socket.setdefaulttimeout(5.0)
    try:
        assert _key(tcp_sockets()) == _key(_from_psutil())
    finally:
        socket.setdefaulttimeout(None)
    assert nonblocking() == before
