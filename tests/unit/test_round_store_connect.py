"""Connecting to a round's store gives up at once when the round is aborted (a closed store is retried otherwise)."""

from __future__ import annotations

import datetime
import os
import socket
import threading
import time

import pytest
import torch.distributed as dist

from ray_elastic.worker.process_group import RoundAborted, connect_round_store

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def closed_port():
    """A port that refuses connections (bound, not listening) and that nothing else can take meanwhile."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        yield sock


def test_connects_to_a_live_store_with_the_full_timeout():
    server = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
    client = connect_round_store("127.0.0.1", server.port, 30.0, aborted=lambda: False)
    assert client.timeout == datetime.timedelta(seconds=30)
    client.set("key", "value")
    assert server.get("key") == b"value"


def test_an_abort_ends_the_retries_on_a_closed_store_within_one_attempt(closed_port):
    aborted = threading.Event()
    threading.Timer(0.3, aborted.set).start()
    started = time.monotonic()
    with pytest.raises(RoundAborted, match="aborted while connecting"):
        connect_round_store("127.0.0.1", closed_port.getsockname()[1], 30.0, aborted=aborted.is_set)
    # TCPStore's own client would retry for the whole 30 s, and its backoff alone may sleep 2.4 s between tries
    assert time.monotonic() - started < 1.5


def test_a_store_that_starts_listening_late_is_connected_soon_after(closed_port):
    port = closed_port.getsockname()[1]
    servers: list = []

    def start_listening():  # on the port held since the start, so that no other socket can take it meanwhile
        try:
            servers.append(dist.TCPStore("127.0.0.1", port, is_master=True, wait_for_workers=False,
                                         master_listen_fd=os.dup(closed_port.fileno())))
        except Exception as exc:  # noqa: BLE001 - reported by the assertion below
            servers.append(exc)

    threading.Timer(0.4, start_listening).start()
    started = time.monotonic()
    client = connect_round_store("127.0.0.1", port, 10.0, aborted=lambda: False)
    took = time.monotonic() - started
    assert took < 1.5, (took, servers)
    client.set("key", "value")
    assert servers[0].get("key") == b"value"


def test_without_an_abort_a_closed_store_fails_after_the_timeout(closed_port):
    started = time.monotonic()
    with pytest.raises(RuntimeError) as raised:
        connect_round_store("127.0.0.1", closed_port.getsockname()[1], 2.0, aborted=lambda: False)
    assert not isinstance(raised.value, RoundAborted)
    assert 1.5 < time.monotonic() - started < 3.0  # the backoff of TCPStore's client overshot it by up to 1.4 s



@pytest.fixture
def silent_port():
    """A port that takes connections (the kernel completes them) but never answers: a frozen store host."""
    with socket.create_server(("127.0.0.1", 0)) as sock:
        yield sock.getsockname()[1]


def test_an_abort_ends_a_connect_to_a_store_that_never_answers(silent_port):
    """Where the probe's connection was taken and the client then gets no answer: TCPStore's client waits for
    one without end (or backs off for seconds when the store closed meanwhile); the rank leaves at the abort."""
    aborted = threading.Event()
    threading.Timer(0.3, aborted.set).start()
    started = time.monotonic()
    with pytest.raises(RoundAborted, match="aborted while connecting"):
        connect_round_store("127.0.0.1", silent_port, 30.0, aborted=aborted.is_set)
    assert time.monotonic() - started < 1.0


def test_without_an_abort_a_store_that_never_answers_fails_after_the_timeout(silent_port):
    started = time.monotonic()
    with pytest.raises(RuntimeError, match="accepted no connection in 2s") as raised:
        connect_round_store("127.0.0.1", silent_port, 2.0, aborted=lambda: False)
    assert not isinstance(raised.value, RoundAborted)
    assert 1.9 < time.monotonic() - started < 2.5
