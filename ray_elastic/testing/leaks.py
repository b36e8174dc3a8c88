"""Checks that a finished run left nothing behind: actors, placement groups, processes."""

from __future__ import annotations

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


def _titled_processes(raylet_pids: set[int] | None = None) -> list[int]:
    """Processes Ray titled after a ray_elastic actor (`ray::ElasticWorker...`).

    With `raylet_pids`, only those started by one of these raylets (other clusters
    on the same machine are not ours to judge).
    """
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        cmdline = " ".join(proc.info.get("cmdline") or [])
        if not any(cmdline.startswith(f"ray::{name}") for name in _RUN_CLASSES):
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


def listening_ports(ports: Iterable[int]) -> list[int]:
    """Those of `ports` that a TCP socket on this machine still listens on."""
    wanted = set(ports)
    if not wanted:
        return []
    bound = {c.laddr.port for c in psutil.net_connections(kind="tcp") if c.status == psutil.CONN_LISTEN and c.laddr}
    return sorted(wanted & bound)


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
        leaks += [f"port {port} still listening" for port in listening_ports(ports)]
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
