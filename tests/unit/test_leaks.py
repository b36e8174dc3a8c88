"""The leak check's port rule: a store port counts as left behind only while the run (or this process) holds it."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import pytest

from ray_elastic.testing.leaks import listening_ports, port_leaks

pytestmark = pytest.mark.timeout(60)


def _listen() -> socket.socket:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen()
    return sock


def test_a_port_this_process_still_listens_on_is_a_leak():
    with _listen() as sock:
        port = sock.getsockname()[1]
        assert listening_ports([port]) == {port: {os.getpid()}}
        assert port_leaks([port], set()) == [f"port {port} still listening (pids [{os.getpid()}])"]
    assert port_leaks([port], set()) == []


def test_an_unrelated_process_that_took_the_number_since_is_reuse_not_a_leak():
    """Ray's raylets, agents and idle workers bind ephemeral ports; one of them may get a finished store's number."""
    code = (
        "import socket, time; s = socket.socket(); s.bind(('127.0.0.1', 0)); s.listen()\n"
        "print(s.getsockname()[1], flush=True); time.sleep(60)"
    )
    other = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        port = int(other.stdout.readline())
        assert listening_ports([port]) == {port: {other.pid}}
        assert port_leaks([port], set()) == []
        assert port_leaks([port], {other.pid}) == [f"port {port} still listening (pids [{other.pid}])"]
    finally:
        other.kill()
        other.wait()
