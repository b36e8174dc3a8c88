"""Checks that a finished run left nothing behind: actors, placement groups, processes."""

from __future__ import annotations

import os
import time
from collections.abc import Iterable

import psutil
import ray
import ray._private.state as ray_state

_RUN_CLASSES = ("ElasticWorker", "Coordinator")


def live_run_actors() -> list[dict]:
    """ray_elastic actors (workers, coordinators) that Ray still counts as alive."""
    table = ray_state.actors() or {}
    return [
        info for info in table.values()
        if info.get("State") not in ("DEAD",) and any(c in str(info.get("ActorClassName", "")) for c in _RUN_CLASSES)
    ]


def live_run_placement_groups() -> list[dict]:
    """ray_elastic placement groups not yet removed."""
    table = ray.util.placement_group_table() or {}
    return [
        info for info in table.values()
        if str(info.get("name", "")).startswith("ray_elastic-") and info.get("state") != "REMOVED"
    ]


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _is_run_process(cmdline: str) -> bool:
    """Whether a process's command line is the title Ray gives a ray_elastic actor (`ray::ElasticWorker...`)."""
    return any(cmdline.startswith(f"ray::{name}") for name in _RUN_CLASSES)


def _titled_processes(raylet_pids: set[int] | None = None) -> list[int]:
    """Processes Ray titled after a ray_elastic actor (`ray::ElasticWorker...`).

    With `raylet_pids`, only those started by one of these raylets (other clusters
    on the same machine are not ours to judge).
    """
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        if not _is_run_process(" ".join(proc.info.get("cmdline") or [])):
            continue
        if raylet_pids is not None:
            try:
                owner = proc.environ().get("RAY_RAYLET_PID", "")
            except psutil.Error:
                continue
            if not owner.isdigit() or int(owner) not in raylet_pids:
                continue
        found.append(proc.pid)
    return found


def listening_ports(ports: Iterable[int]) -> dict[int, set[int | None]]:
    """Those of `ports` that a TCP socket on this machine still listens on, each with its owners' pids (None
    where an owner cannot be seen)."""
    wanted = set(ports)
    owners: dict[int, set[int | None]] = {}
    if wanted:
        for conn in psutil.net_connections(kind="tcp"):
            if conn.status == psutil.CONN_LISTEN and conn.laddr and conn.laddr.port in wanted:
                owners.setdefault(conn.laddr.port, set()).add(conn.pid)
    return owners


def _could_be_the_runs(pid: int | None, run_pids: set[int]) -> bool:
    """Whether a listener owned by `pid` may be one the run left: its own processes, this process (a driver-side
    store) or an owner that cannot be seen. Ray's own processes (raylets, agents, idle workers) bind ephemeral
    ports all the time, so one of them listening on a number a finished run's store once had is reuse."""
    if pid is None or pid in run_pids or pid == os.getpid():
        return True
    try:
        return _is_run_process(" ".join(psutil.Process(pid).cmdline()))
    except psutil.Error:
        return False


def port_leaks(ports: Iterable[int], run_pids: set[int]) -> list[str]:
    """Those of the run's store `ports` that the run (or this process) still listens on."""
    return [
        f"port {port} still listening (pids {sorted(owners, key=str)})"
        for port, owners in sorted(listening_ports(ports).items())
        if any(_could_be_the_runs(owner, run_pids) for owner in owners)
    ]


def find_leaks(
    worker_pids: list[int] | tuple[int, ...] = (), timeout_s: float = 10.0, raylet_pids: set[int] | None = None,
    ports: Iterable[int] = (),
) -> list[str]:
    """Wait up to timeout_s for the run's leftovers (and its store `ports`) to go; return what is still there."""
    deadline = time.monotonic() + timeout_s
    ports = tuple(ports)
    while True:
        leaks = [f"actor {a.get('ActorClassName')} {a.get('State')}" for a in live_run_actors()]
        leaks += [f"placement group {p.get('name')} {p.get('state')}" for p in live_run_placement_groups()]
        pids = set(worker_pids) | set(_titled_processes(raylet_pids))
        leaks += [f"worker process {pid}" for pid in sorted(pids) if _alive(pid)]
        leaks += port_leaks(ports, pids)
        if not leaks or time.monotonic() >= deadline:
            return leaks
        time.sleep(0.2)


def assert_no_leaks(
    worker_pids: list[int] | tuple[int, ...] = (), timeout_s: float = 10.0, raylet_pids: set[int] | None = None,
    ports: Iterable[int] = (),
) -> None:
    """Raise AssertionError naming whatever the run left behind after timeout_s."""
    leaks = find_leaks(worker_pids, timeout_s, raylet_pids, ports)
    if leaks:
        raise AssertionError("run left behind: " + ", ".join(leaks))
