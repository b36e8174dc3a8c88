"""Forming a worker's torch.distributed group for a round, and breaking it without leaving the process.

A round's gloo group is formed so that a peer lost meanwhile frees the others within seconds
(`form_gloo_group`); after it forms, each rank publishes the listening addresses gloo opened in it
(under the round's secret store prefix) and reads its peers', which is how `sever` later finds exactly
gloo's connections (see `ray_elastic.worker.sever`). NCCL groups are aborted with the backend's own abort.
"""

from __future__ import annotations

import datetime
import functools
import gc
import json
import logging
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

import torch.distributed as dist

from ray_elastic.netbind import is_wildcard
from ray_elastic.worker.sever import (
    abort_every_nccl_group,
    fail_later_gloo_ops,
    listening_addresses,
    shutdown_gloo_connections,
)
from ray_elastic.worker.sockets import Address, TcpSocket, tcp_sockets

logger = logging.getLogger("ray_elastic")

STORE_CONNECT_ATTEMPT_S = 0.5  # how long one connection attempt to a round's store may retry
STORE_PROBE_PAUSE_S = 0.05  # between probes of a round's store that refused a connection
FORM_TIMEOUT_S = 3.0  # gloo's timeout while the ranks of a round, all arrived, connect (see form_timeout_s)
GLOO_CONNECT_WAIT_FACTOR = 5  # a rank waits ~5x gloo's timeout for a peer lost mid-connect (torch 2.13, measured)
_ARRIVAL_KEYS = "ray_elastic/{}arrived"  # a count of the ranks that arrived at a group's forming
_ALL_ARRIVED_KEYS = "ray_elastic/{}all_arrived"


def form_timeout_s(world_size: int) -> float:
    """The timeout a round's gloo group is formed under, once every rank is known to be there.

    gloo connects a group's ranks under the group's timeout: a rank waiting for a peer that froze or died after
    publishing its address waits about `GLOO_CONNECT_WAIT_FACTOR` times that, and an abort cannot cut the wait
    short (there is no connection to shut down, and closing the round's store does not reach it). Formed under
    the collective timeout, such a rank would stay past the abort timeout and be killed with the commit it
    holds; formed under this one it leaves in seconds. The group gets the collective timeout once formed.
    """
    return FORM_TIMEOUT_S + 0.01 * world_size  # connecting is ~N-1 connections and store reads per rank


def wait_for_every_rank(store: dist.Store, world_size: int, timeout_s: float, group: str = "") -> None:
    """Return once every rank of the round has called this for `group` (raises at once if the round's store
    closes)."""
    if store.add(_ARRIVAL_KEYS.format(group), 1) >= world_size:
        store.set(_ALL_ARRIVED_KEYS.format(group), "1")
    store.wait([_ALL_ARRIVED_KEYS.format(group)], datetime.timedelta(seconds=timeout_s))


def can_set_group_timeout() -> bool:
    return hasattr(dist.distributed_c10d, "_set_pg_timeout")


def set_group_timeout(timeout_s: float, group: Any = None) -> None:
    """Give a formed group (default: the default group) a new timeout for its collectives."""
    dist.distributed_c10d._set_pg_timeout(datetime.timedelta(seconds=timeout_s), group)  # type: ignore[attr-defined]


def _restart_group_names() -> None:
    """Make this round's default group the process's first group, named as on every other rank.

    torch names a new group after a per-process counter (gloo publishes its addresses under that name) and resets
    the counter only when a default group is destroyed. After a round whose group creation failed (its store
    closed by an abort) the counter stays raised: this rank would name the next default group "1", a newcomer
    "0", and both would wait for the other's addresses until the collective timeout.
    """
    world = dist.distributed_c10d._world  # type: ignore[attr-defined]
    if not dist.is_initialized() and hasattr(world, "group_count"):
        world.group_count = 0


def forget_cached_dtensor_specs() -> None:
    """Drop DTensor's caches, which hold device meshes (and through them the process groups) of earlier rounds.

    Device meshes compare equal across process groups (same shape, same dim names), so a cache hands a
    parameter that `fully_shard` builds on this round's mesh a spec with an earlier round's mesh: that
    round's coordinates and sub-groups. Seen with torch 2.13 on a 2-D (HSDP) mesh re-formed with the ranks
    in another order: `full_tensor()` and state dicts failed on sub-groups that no longer exist. The same
    caches kept every earlier round's groups alive, each with its gloo listener and threads (a survivor held
    ten after seven rounds). Every `functools` cache of torch's DTensor modules goes, and the redistribute
    planners; the sharding propagator's cache is per thread: call this on the thread that runs train_fn.
    """
    import sys

    if "torch.distributed.tensor" not in sys.modules:  # nothing was ever cached
        return
    import torch
    from torch.distributed.tensor import DTensor

    clear_native = getattr(torch._C, "_clear_DTensor_sharding_propagator_cache", None)
    if clear_native is not None:
        clear_native()
    propagate: Any = getattr(DTensor._op_dispatcher.sharding_propagator, "propagate_op_sharding", None)
    if hasattr(propagate, "cache_clear"):
        propagate.cache_clear()
    for name, module in list(sys.modules.items()):
        if module is not None and name.startswith("torch.distributed.tensor"):
            _clear_module_caches(module)


def _clear_module_caches(module: Any) -> None:
    """Clear every `functools` cache a module defines: its functions' and its classes' methods'."""
    for value in list(vars(module).values()):
        members = vars(value).values() if isinstance(value, type) and value.__module__ == module.__name__ else ()
        for candidate in (value, *(getattr(member, "__func__", member) for member in members)):
            if isinstance(candidate, functools._lru_cache_wrapper):
                candidate.cache_clear()
    clear_planners = getattr(module, "clear_redistribute_planner_cache", None)
    if callable(clear_planners):
        clear_planners()


def release_round_objects() -> None:
    """Free an ended round's objects now, on the thread that ran train_fn, after its groups are destroyed.

    DTensor's caches hold the round's device meshes, and FSDP modules and the traceback of a round that
    failed form reference cycles, which Python's collector reaches only at a rare full collection. Until
    then every group of the round stays alive with its connections' listener and threads (NCCL: its
    communicators), and so do the round's model and optimizer. The worker freezes the objects of its imports
    (`gc.freeze`), so this collection scans only what rounds made: tens of milliseconds.
    """
    forget_cached_dtensor_specs()
    gc.collect()


class RoundAborted(RuntimeError):
    """The round was aborted before this rank reached it."""


def connect_round_store(host: str, port: int, timeout_s: float, aborted: Callable[[], bool]) -> dist.TCPStore:
    """A client of the round's store (with `timeout_s` for its operations) that stops trying once `aborted()`.

    TCPStore's client retries a refused or reset connection for its whole timeout, and between tries backs off
    for a random delay that may exceed the try's own timeout (seen: 2.4 s after a 0.5 s try). An abort closes
    the round's store; a rank still connecting to it would otherwise stay there past the abort timeout and be
    killed with the commit it holds. So it first waits for the port to accept a plain socket, checking
    `aborted()` between short tries, and only then builds the client, on a helper thread it stops waiting for
    at an abort: the store may close between the probe and the client (the back-off again, ~2 s seen), and a
    listener that never answers (a frozen host) holds TCPStore's client without end.
    """
    deadline = time.monotonic() + timeout_s
    while True:
        if aborted():
            raise RoundAborted(f"round aborted while connecting to its store at {host}:{port}")
        attempt = max(0.05, min(STORE_CONNECT_ATTEMPT_S, deadline - time.monotonic()))
        try:
            if not _accepts_connections(host, port, attempt):
                time.sleep(min(STORE_PROBE_PAUSE_S, max(0.0, deadline - time.monotonic())))
            elif (client := _client_unless_aborted(host, port, attempt, aborted, deadline)) is not None:
                break
        except RuntimeError:  # DistNetworkError, DistStoreError: closed, reset, timed out between probe and client
            pass
        if time.monotonic() >= deadline:
            raise dist.DistNetworkError(f"the round's store at {host}:{port} accepted no connection in {timeout_s:g}s")
    client.set_timeout(datetime.timedelta(seconds=timeout_s))
    return client


def _client_unless_aborted(host: str, port: int, timeout_s: float, aborted: Callable[[], bool],
                           deadline: float) -> dist.TCPStore | None:
    """TCPStore's client of (host, port), built on a helper thread; None once `aborted()` or past `deadline`
    while it is still connecting (the caller says which). A build given up on ends by itself later (or never,
    on a silent listener: one daemon thread and one socket), and its client is dropped."""
    built: list[Any] = []

    def build() -> None:
        try:
            built.append(dist.TCPStore(host, port, is_master=False, timeout=datetime.timedelta(seconds=timeout_s)))
        except BaseException as exc:  # noqa: BLE001 - handed to the caller's thread
            built.append(exc)

    thread = threading.Thread(target=build, name="ray_elastic-round-store-client", daemon=True)
    thread.start()
    while not built:
        thread.join(STORE_PROBE_PAUSE_S)
        if not built and (aborted() or time.monotonic() >= deadline):
            return None
    if isinstance(built[0], BaseException):
        raise built[0]
    return built[0]


def _accepts_connections(host: str, port: int, timeout_s: float) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            return True
    except OSError:
        return False


_COMM_ERROR_MARKERS = (
    "connection closed",
    "connection reset",
    "broken pipe",
    "gloo",
    "nccl",
    "timed out",
    "socket",
    "read error",
    "write error",
)


def is_communication_error(exc: BaseException) -> bool:
    """True for errors a rank gets when a collective loses a peer (victim, not cause)."""
    if isinstance(exc, getattr(dist, "DistError", ())):
        return True
    if not isinstance(exc, RuntimeError):
        return False
    text = str(exc).lower()
    return any(marker in text for marker in _COMM_ERROR_MARKERS)


_LISTENERS_KEY = "ray_elastic/gloo_listeners/"


class GroupHandle:
    """The default process group of one round, with a way to break it from another thread.

    Args:
        backend: "gloo" or "nccl".
        store: the round's store, already under the round's secret prefix.
        rank, world_size: this rank's place.
        timeout_s: the collective timeout.
        device_id: the rank's device (NCCL).

    gloo: formed by `form_gloo_group` (a peer lost while it connects frees the others within seconds).
    """

    def __init__(self, backend: str, store: dist.Store, rank: int, world_size: int, timeout_s: float,
                 device_id=None):
        self.backend = backend
        self._lock = threading.Lock()
        self._alive = False
        self._own: set[Address] = set()
        self._peers: set[Address] = set()
        self._store, self._rank, self._world_size = store, rank, world_size
        self._published = False
        self._peers_known = backend != "gloo"  # NCCL groups are aborted, not severed by address
        kwargs = {}
        if device_id is not None:
            kwargs["device_id"] = device_id
        _restart_group_names()
        forget_cached_dtensor_specs()

        def create(timeout: datetime.timedelta) -> None:
            dist.init_process_group(backend, store=store, rank=rank, world_size=world_size, timeout=timeout, **kwargs)
            self._alive = True

        self._listening_before = listening_addresses() if backend == "gloo" else set()
        if backend == "gloo":
            _, (self._own, self._peers) = form_gloo_group(store, rank, world_size, timeout_s, create,
                                                         lambda _: self.destroy())
        else:
            create(datetime.timedelta(seconds=timeout_s))

    def _round_listeners(self, sockets: list[TcpSocket] | None = None) -> set[Address]:
        """gloo's listeners of this round: the default group's and those of groups made since (HSDP's sub-groups).

        Groups that train_fn creates (`new_group`, `init_device_mesh`) listen on the same interface as the
        default group. Their peers' addresses are exchanged at the round's first progress point
        (`learn_peer_listeners`); before that only the connections this process accepted are found.
        """
        hosts = {host for host, _ in self._own}
        later = {a for a in listening_addresses(sockets) - self._listening_before
                 if a[0] in hosts or is_wildcard(a[0])}
        return self._own | later

    def learn_peer_listeners(self) -> None:
        """Make every rank's gloo listeners of this round (sub-groups included) known to this rank's sever.

        Called at each progress point of the round (a commit, a report) until done, once train_fn has made
        its groups: the first call publishes this rank's listeners on the round's store, a later one reads
        every rank's once all are there (a check, never a wait). Until then a sever reaches a sub-group's
        connection only from the rank that accepted it, so a collective blocked on a connection this rank
        opened to a peer that never severs (frozen, cut off) waited the collective timeout. Groups made
        after the first commit are not covered.
        """
        if self._peers_known:
            return
        key = f"{_LISTENERS_KEY}round/"
        keys = [f"{key}{r}" for r in range(self._world_size)]
        try:
            if not self._published:
                self._store.set(keys[self._rank], json.dumps(sorted(self._round_listeners())))
                self._published = True
            if not self._store.check(keys):
                return
            learned = _read_listeners(self._store, keys)
        except Exception:  # noqa: BLE001 - the round's store is closed: the round is over
            logger.debug("could not learn the peers' gloo listeners", exc_info=True)
            self._peers_known = True
            return
        with self._lock:
            self._peers |= learned
        self._peers_known = True

    def sever(self) -> int:
        """Make every blocked collective of this round's groups fail now, and any started later within
        `sever.ABORTED_OP_TIMEOUT_S` (gloo). Safe from any thread; idempotent.

        Returns:
            how many connections were shut down (gloo) or groups aborted (NCCL).
        """
        with self._lock:
            if not self._alive:
                return 0
            fail_later_gloo_ops()
            if self.backend != "gloo":
                return abort_every_nccl_group()
            sockets = tcp_sockets()  # read once: the round's listeners and gloo's connections both come from it
            return shutdown_gloo_connections(self._round_listeners(sockets), self._peers, sockets)

    def destroy(self) -> None:
        with self._lock:
            if not self._alive:
                return
            self._alive = False
        try:
            dist.destroy_process_group()
        except Exception:  # noqa: BLE001 - a broken group may complain while going away
            logger.debug("destroy_process_group failed", exc_info=True)


def exchange_listeners(store: dist.Store, rank: int, world_size: int, own: set[Address],
                       key: str) -> tuple[set[Address], set[Address]]:
    """Publish this rank's gloo listening addresses under `key`; read every rank's (a closed store ends the wait)."""
    store.set(f"{key}{rank}", json.dumps(sorted(own)))
    return own, _read_listeners(store, [f"{key}{r}" for r in range(world_size)]) | own


def _read_listeners(store: dist.Store, keys: list[str]) -> set[Address]:
    return {(str(host), int(port)) for value in store.multi_get(keys) for host, port in json.loads(value)}


def form_gloo_group(store: dist.Store, rank: int, world_size: int, timeout_s: float,
                    create: Callable[[datetime.timedelta], Any], destroy: Callable[[Any], None],
                    name: str = "") -> tuple[Any, tuple[set[Address], set[Address]]]:
    """Form a gloo group with `create(timeout)` so that a peer lost meanwhile frees the others within seconds.

    The ranks meet on the round's store (an abort closes it and ends that wait), connect under
    `form_timeout_s`, and exchange the listening addresses gloo opened on the store (not over the new group,
    where a peer lost now would hold them for the collective timeout); the group then gets `timeout_s`.
    `name` keeps the store keys of different groups of a round apart. A failure after `create` calls
    `destroy(group)` and raises.

    Returns:
        the group, and (this rank's gloo listeners, every rank's) for `shutdown_gloo_connections`.
    """
    forming = timeout_s
    if can_set_group_timeout():
        wait_for_every_rank(store, world_size, timeout_s, group=name)
        forming = min(timeout_s, form_timeout_s(world_size))
    before = listening_addresses()
    group = create(datetime.timedelta(seconds=forming))
    try:
        if forming < timeout_s:
            set_group_timeout(timeout_s, group)
        own = listening_addresses() - before
        return group, exchange_listeners(store, rank, world_size, own, key=_LISTENERS_KEY + name)
    except BaseException:
        destroy(group)  # a peer vanished before publishing: leave no half-formed group behind
        raise


def new_gloo_group(rank: int, world_size: int, timeout_s: float) -> tuple[Any, tuple[set[Address], set[Address]]]:
    """A gloo group of every rank beside the default one (NCCL training's host-memory collectives), formed on
    the default group's store (the round's) as `GroupHandle` forms a gloo default group."""
    return form_gloo_group(
        dist.distributed_c10d._get_default_store(),  # type: ignore[attr-defined]
        rank, world_size, timeout_s,
        create=lambda timeout: dist.new_group(backend="gloo", timeout=timeout),
        destroy=dist.destroy_process_group,
        name="host/",
    )
