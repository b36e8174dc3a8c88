"""What a run exposes to other processes: its listeners, and its store to a stranger who writes into it.

Simulated nodes share this machine's IP, so every listener the run opens must be on
loopback, and none on a wildcard. A stranger process (like any other user of the
machine) finds each round's store port, connects, and keeps writing fake peer
addresses (pointing at a socket it listens on) under every key name it can guess
from the code; the run must train through two restarts with the right peers: the
stranger's socket is never dialled, and the ranks end with the same weights.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import psutil
import pytest
import ray._private.state as ray_state

from ray_elastic.api import coordinator_name
from ray_elastic.testing import FaultInjector, request_fault
from tests.cluster.background import BackgroundRun
from tests.workloads import ddp_train

pytestmark = [pytest.mark.cluster, pytest.mark.timeout(240)]
REPO = Path(__file__).resolve().parents[2]
WILDCARDS = ("0.0.0.0", "::", "")

STRANGER = textwrap.dedent(
    r"""
    import datetime, json, os, socket, struct, sys, threading, time
    import psutil, torch.distributed as dist

    pid_file, out_file, stop_file, hits_file, external_ip = sys.argv[1:6]
    trap = socket.socket(); trap.bind(("127.0.0.1", 0)); trap.listen(64)
    trap_port = trap.getsockname()[1]
    dialled = []
    def accept():
        while True:
            try:
                conn, peer = trap.accept()
            except OSError:
                return
            dialled.append(list(peer)); conn.close()
    threading.Thread(target=accept, daemon=True).start()

    def fake_gloo_address(host="vm"):
        # torch 2.13 gloo's published address: host name, then a sockaddr_storage, then its sequence fields
        sockaddr = struct.pack("<H", socket.AF_INET) + struct.pack("!H", trap_port) + socket.inet_aton("127.0.0.1")
        sockaddr += bytes(128 - len(sockaddr))
        return (struct.pack("<Q", len(host)) + host.encode() + struct.pack("<Q", 136) + sockaddr
                + struct.pack("<q", -1) + struct.pack("<Q", 0) + struct.pack("<Q", 1))
    keys, values = [], []
    for r in range(12):
        for prefix in (f"round{r}/", f"/round{r}/", "", f"/worker/attempt_{r}/"):
            for rank in range(4):
                keys += [f"{prefix}0//cpu//0/{rank}", f"{prefix}ray_elastic/gloo_listeners/{rank}"]
                values += [fake_gloo_address(), json.dumps([["127.0.0.1", trap_port]]).encode()]
    print("stranger ready", flush=True)
    while not os.path.exists(pid_file):
        time.sleep(0.01)
    coord_pid, ray_port = (int(x) for x in open(pid_file).read().split())
    coordinator = psutil.Process(coord_pid)
    stores, writes, external, listeners, tries = {}, {}, {}, set(), {}
    while not os.path.exists(stop_file):
        try:
            found = [c.laddr for c in coordinator.net_connections("tcp") if c.status == psutil.CONN_LISTEN]
        except psutil.NoSuchProcess:
            print("the coordinator is gone", flush=True)
            break
        except psutil.Error as exc:  # a descriptor closed while it was read: look again
            tries["psutil"] = tries.get("psutil", 0) + 1
            if tries["psutil"] <= 3:
                print(f"reading the coordinator's listeners: {exc!r}", flush=True)
            time.sleep(0.05)
            continue
        for ip, port in found:
            listeners.add((ip, port))
            if port == ray_port or stores.get(port) is not None or tries.get(port, 0) >= 5:
                continue
            tries[port] = tries.get(port, 0) + 1  # not a store, or a store not answering yet: a few tries
            try:
                stores[port] = dist.TCPStore(ip, port, is_master=False, timeout=datetime.timedelta(seconds=2))
            except Exception as exc:
                print(f"no store client on {ip}:{port} (try {tries[port]}): {exc!r}"[:300], flush=True)
                stores[port] = None
                continue
            if external_ip:
                probe = socket.socket()
                probe.settimeout(2)
                external[port] = probe.connect_ex((external_ip, port))
                probe.close()
        for port, store in list(stores.items()):
            if store is None:
                continue
            try:
                store.multi_set(keys, values)
                if port not in writes:
                    with open(hits_file, "a") as hits:  # the harness waits for this before ending the round
                        hits.write(f"{port}\n")
                writes[port] = writes.get(port, 0) + 1
            except Exception:
                stores[port] = None  # the round ended and its store closed
                tries[port] = 5
        time.sleep(0.002)
    json.dump({"trap_port": trap_port, "dialled": dialled, "writes": writes, "external": external,
               "listeners": sorted(listeners), "ray_port": ray_port}, open(out_file, "w"))
    """
)


def _external_ipv4() -> str:
    for addresses in psutil.net_if_addrs().values():
        for address in addresses:
            if address.family == socket.AF_INET and not address.address.startswith("127."):
                return address.address
    return ""


def _run_actors(cls_name: str) -> list[dict]:
    return [a for a in (ray_state.actors() or {}).values()
            if a.get("ActorClassName") == cls_name and a.get("State") == "ALIVE"]


def _listeners(pid: int) -> list[tuple[str, int]]:
    return sorted((c.laddr.ip, c.laddr.port) for c in psutil.Process(pid).net_connections("tcp")
                  if c.status == psutil.CONN_LISTEN)


def _steps_in_round(trace_dir: Path, round_id: int) -> int:
    log = trace_dir / "steps.log"
    if not log.exists():
        return 0
    return sum(1 for line in log.read_text().splitlines() if line.split()[3:4] == [str(round_id)])


def _stores_hit(hits: Path) -> int:
    return len(hits.read_text().split()) if hits.exists() else 0


def _wait(condition, what: str, run: BackgroundRun, timeout_s: float = 90.0,
          stranger: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert run.alive(), f"run ended while waiting for {what}: {run.error!r}"
        if stranger is not None and stranger.poll() is not None:
            raise AssertionError(f"the stranger exited ({stranger.returncode}) before {what}: {stranger.stdout.read()}")
        assert time.monotonic() < deadline, f"no {what} within {timeout_s}s"
        time.sleep(0.05)


def test_no_wildcard_listener_and_a_stranger_on_the_store_changes_nothing(cluster, no_leaks, tmp_path):
    cluster.resize(2)
    files = {name: tmp_path / name for name in ("pid", "out", "stop", "hits")}
    external_ip = _external_ipv4()
    stranger = subprocess.Popen(
        [sys.executable, "-c", STRANGER, *(str(files[n]) for n in ("pid", "out", "stop", "hits")), external_ip],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    try:
        assert stranger.stdout is not None and "stranger ready" in stranger.stdout.readline()
        trace = tmp_path / "trace"
        trace.mkdir()
        triggers = tmp_path / "triggers"
        triggers.mkdir()
        name = f"exposure-{time.time_ns()}"
        run = BackgroundRun(
            tmp_path, ddp_train, name=name, min_nodes=2, max_nodes=2, max_restarts=2,
            config={"steps": 100_000, "sleep_s": 0.05, "trace_dir": str(trace),
                    "faults": FaultInjector(trigger_dir=str(triggers))},
        )
        _wait(lambda: _run_actors("Coordinator") and any(
            a.get("Name") == coordinator_name(name) for a in _run_actors("Coordinator")), "coordinator", run)
        coordinator = next(a for a in _run_actors("Coordinator") if a.get("Name") == coordinator_name(name))
        files["pid"].write_text(f"{coordinator['Pid']} {coordinator['Address']['Port']}")
        _wait(lambda: _steps_in_round(trace, 0) >= 3, "steps in round 0", run)
        for round_id in (1, 2):  # two more fresh stores, each attacked from its first moment
            _wait(lambda r=round_id: _stores_hit(files["hits"]) >= r, f"the stranger in store {round_id}", run,
                  stranger=stranger)
            request_fault(str(triggers), "raise", 1)
            _wait(lambda r=round_id: _steps_in_round(trace, r) >= 3, f"steps in round {round_id}", run)
        _wait(lambda: _stores_hit(files["hits"]) >= 3, "the stranger in store 3", run, stranger=stranger)
        workers = _run_actors("ElasticWorker")
        assert len(workers) == 2, workers
        seen = {f"worker pid {a['Pid']}": (a["Address"]["Port"], _listeners(a["Pid"])) for a in workers}
        seen["coordinator"] = (coordinator["Address"]["Port"], _listeners(coordinator["Pid"]))
        (trace / "stop_at").write_text(str(max(int(line.split()[0]) for line in
                                               (trace / "steps.log").read_text().splitlines()) + 10))
        result = run.join(120)
    finally:
        files["stop"].write_text("")
        stranger.wait(30)
        print("the stranger said:", stranger.stdout.read() if stranger.stdout is not None else "")
    report = json.loads(files["out"].read_text())
    print("listeners (Ray's core-worker port, listening addresses):", seen)
    print("stranger:", report)

    ours = {who: [addr for addr in addrs if addr[1] != ray_port] for who, (ray_port, addrs) in seen.items()}
    rays = {who: [addr for addr in addrs if addr[1] == ray_port] for who, (ray_port, addrs) in seen.items()}
    assert all(ours.values()), f"each process holds a listener of ours (store, gloo): {seen}"
    assert all(rays.values()), f"each actor process also holds Ray's core-worker listener: {seen}"
    for who, addrs in ours.items():
        for ip, port in addrs:
            assert ip not in WILDCARDS, f"{who} listens on a wildcard {ip}:{port} (Ray's own: {rays[who]})"
            assert ip.startswith("127.") or ip == "::1", f"{who}: {ip}:{port} is not loopback on a one-machine run"

    store_ports = [port for port in map(int, report["writes"]) if report["writes"][str(port)] > 0]
    assert len(store_ports) >= 3, f"the stranger wrote into every round's store: {report}"
    assert report["dialled"] == [], f"a rank dialled the stranger's fake peer address: {report['dialled']}"
    if external_ip:
        refused = {int(p): code for p, code in report["external"].items()}
        assert refused and all(code != 0 for code in refused.values()), (
            f"a store port answered on {external_ip}, not only on loopback: {refused}")
    assert result.restarts == 2 and [r.world_size for r in result.rounds] == [2, 2, 2], result.rounds
    logs = [v["log"] for v in result.return_values]
    assert logs[0] == logs[1] == list(range(1, len(logs[0]) + 1)), "every committed step once, in order"
    assert result.return_values[0]["weights"] == result.return_values[1]["weights"], "the ranks trained together"
    no_leaks(result.worker_pids, ports=store_ports)
