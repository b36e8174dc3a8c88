"""Severing a gloo group shuts down gloo's connections and nothing else (no Ray: two real processes).

Rank 0 opens a connection of its own from another thread while `init_process_group`
is still waiting for rank 1. A sever must leave that connection alone, and still
make rank 1's blocked collective fail at once.
"""

from __future__ import annotations

import datetime
import multiprocessing as mp
import queue
import socket
import threading
import time
from typing import Any

import pytest
import torch.distributed as dist

pytestmark = pytest.mark.timeout(90)


def _echo_server() -> tuple[socket.socket, threading.Thread]:
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(8)

    def serve() -> None:
        while True:
            try:
                conn, _ = server.accept()
            except OSError:
                return
            threading.Thread(target=_echo, args=(conn,), daemon=True).start()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    return server, thread


def _echo(conn: socket.socket) -> None:
    with conn:
        while data := conn.recv(1024):
            conn.sendall(data)


def _rank(rank: int, store_port: int, echo_port: int, out: mp.Queue) -> None:
    import torch

    from ray_elastic.worker.process_group import GroupHandle

    store = dist.TCPStore("127.0.0.1", store_port, is_master=False, timeout=datetime.timedelta(seconds=30))
    prefixed = dist.PrefixStore("secret/round0", store)
    result: dict = {"rank": rank}
    if rank == 1:
        time.sleep(1.5)  # rank 0 waits inside init_process_group meanwhile
        group = GroupHandle("gloo", prefixed, rank, 2, 30.0)
        store.set("rank1_formed", "1")
        started = time.monotonic()
        try:
            dist.all_reduce(torch.ones(1))  # rank 0 never joins it: only a sever can end it early
            result["error"] = None
        except Exception as exc:  # noqa: BLE001 - the point of the test
            result["error"] = str(exc)[:200]
        result["blocked_s"] = time.monotonic() - started
        group.destroy()
        out.put(result)
        return
    user: dict = {}

    def open_during_init() -> None:
        time.sleep(0.5)
        conn = socket.create_connection(("127.0.0.1", echo_port))
        user["conn"], user["at"] = conn, time.monotonic()

    opener = threading.Thread(target=open_during_init)
    opener.start()
    init_started = time.monotonic()
    group = GroupHandle("gloo", prefixed, rank, 2, 30.0)
    init_done = time.monotonic()
    opener.join()
    result["user_conn_opened_during_init"] = init_started < user["at"] < init_done
    store.wait(["rank1_formed"])
    time.sleep(0.5)  # rank 1 is blocked in its all_reduce now
    result["severed"] = group.sever()
    conn = user["conn"]
    try:
        conn.settimeout(5)
        conn.sendall(b"still here")
        result["user_conn_echo"] = conn.recv(1024).decode()
    except OSError as exc:
        result["user_conn_echo"] = f"broken: {exc}"
    conn.close()
    group.destroy()
    out.put(result)


def test_sever_shuts_gloo_connections_but_not_a_user_connection_opened_during_init():
    server, _ = _echo_server()
    store = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False,
                          timeout=datetime.timedelta(seconds=30))
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    procs = [ctx.Process(target=_rank, args=(r, store.port, server.getsockname()[1], out)) for r in (0, 1)]
    for proc in procs:
        proc.start()
    results: dict[int, dict] = {}
    deadline = time.monotonic() + 60
    try:
        while len(results) < len(procs) and time.monotonic() < deadline:
            try:
                got = out.get(timeout=0.5)
                results[got["rank"]] = got
            except queue.Empty:
                crashed = [p.exitcode for p in procs if p.exitcode not in (None, 0)]
                assert not crashed, f"a rank process crashed (exit codes {crashed}); see its stderr above"
    finally:
        for proc in procs:
            proc.join(10)
            if proc.is_alive():
                proc.kill()
        server.close()
    rank0, rank1 = results[0], results[1]
    assert rank0["user_conn_opened_during_init"], "the user connection must appear inside init_process_group"
    assert rank0["user_conn_echo"] == "still here", f"a sever shut down a connection gloo does not own: {rank0}"
    assert rank0["severed"] >= 1, rank0
    assert rank1["error"] is not None and rank1["blocked_s"] < 10, f"the blocked collective must fail at once: {rank1}"


def _run_ranks(target, world: int, timeout_s: float) -> dict[int, dict]:
    """Run `target(rank, store_port, out)` in `world` spawned processes; each rank's result dict, by rank."""
    store = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False,
                          timeout=datetime.timedelta(seconds=30))
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    procs = [ctx.Process(target=target, args=(r, store.port, out)) for r in range(world)]
    for proc in procs:
        proc.start()
    results: dict[int, dict] = {}
    try:
        for _ in procs:
            got = out.get(timeout=timeout_s)
            results[got["rank"]] = got
    finally:
        for proc in procs:
            proc.join(10)
            if proc.is_alive():
                proc.kill()
    return results


def _subgroup_rank(rank: int, store_port: int, out: mp.Queue) -> None:
    import torch
    from torch.distributed.device_mesh import init_device_mesh

    from ray_elastic.worker.process_group import GroupHandle

    store = dist.TCPStore("127.0.0.1", store_port, is_master=False, timeout=datetime.timedelta(seconds=30))
    group = GroupHandle("gloo", dist.PrefixStore("secret/round0", store), rank, 4, 60.0)
    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("replicate", "shard"))  # HSDP's sub-groups
    result: dict = {"rank": rank}
    if rank == 1:
        store.set("rank1_blocking", "1")
        threading.Timer(1.0, group.sever).start()  # the coordinator's abort reaches this rank
        started = time.monotonic()
        try:  # with rank 3, which never joins it and holds the group open
            dist.all_reduce(torch.ones(1), group=mesh.get_group("replicate"))
            result["error"] = None
        except Exception as exc:  # noqa: BLE001 - the point of the test
            result["error"] = str(exc)[:200]
        result["blocked_s"] = time.monotonic() - started
        store.set("rank1_done", "1")
    elif rank == 3:
        store.wait(["rank1_blocking"])
        time.sleep(0.5)
        result["severed"] = group.sever()  # this rank left the round (its own error): it severs too
        result["severed_again"] = group.sever()  # the abort's sever after its own: nothing left to shut
    out.put(result)
    store.wait(["rank1_done"], datetime.timedelta(seconds=60))  # the sub-groups stay alive until then
    time.sleep(1)
    group.destroy()


def test_sever_reaches_the_sub_groups_of_an_hsdp_mesh_made_after_the_round_formed():
    """Rank 1 blocks in an all-reduce of its replicate sub-group with rank 3, alive but gone from the round
    (an HSDP rank under an abort). Once both sever, it fails at once, not at the collective timeout (60 s):
    the sub-groups' connections are shut down too, though their addresses were never exchanged."""
    results = _run_ranks(_subgroup_rank, 4, timeout_s=75)
    assert results[3]["severed"] >= 1 and results[3]["severed_again"] == 0, results
    assert results[1]["error"] is not None and results[1]["blocked_s"] < 10, f"still blocked: {results}"


def _sub_group_accepted_by_rank_1(store: dist.Store, rank: int, result: dict) -> Any:
    """A new gloo sub-group of ranks 0 and 1 whose one connection rank 1 accepted (`result["attempts"]`:
    how many groups it took, None if none did)."""
    import torch

    from ray_elastic.worker.sever import gloo_connections, listening_addresses

    for attempt in range(16):
        before = listening_addresses()
        sub = dist.new_group([0, 1], backend="gloo")
        dist.all_reduce(torch.ones(1), group=sub)
        if rank == 0:
            accepted_here = bool(gloo_connections(listening_addresses() - before, set()))
            store.set(f"pick{attempt}", "next" if accepted_here else "use")
        if store.get(f"pick{attempt}") == b"use":
            result["attempts"] = attempt + 1
            return sub
    result["attempts"] = None
    return sub


def _late_op_rank(rank: int, store_port: int, out: mp.Queue) -> None:
    from ray_elastic.worker.process_group import GroupHandle

    store = dist.TCPStore("127.0.0.1", store_port, is_master=False, timeout=datetime.timedelta(seconds=30))
    group = GroupHandle("gloo", dist.PrefixStore("secret/round0", store), rank, 2, 60.0)
    result: dict = {"rank": rank}
    sub = _sub_group_accepted_by_rank_1(store, rank, result)  # rank 0's own sever cannot reach it
    if rank == 0:
        result["severed"] = group.sever()  # the coordinator's abort, while the training thread is between ops
        _all_reduce_rank_1_never_joins(sub, result)  # rank 1 is alive, has left the round and did not sever
    _finish_when_rank_0_is_done(store, group, rank, result, out)


def _all_reduce_rank_1_never_joins(sub: Any, result: dict) -> None:
    """Rank 0's all-reduce on `sub`; records how it ended ("error") and how long it took ("blocked_s")."""
    import torch

    started = time.monotonic()
    try:
        dist.all_reduce(torch.ones(1), group=sub)
        result["error"] = None
    except Exception as exc:  # noqa: BLE001 - the point of the tests
        result["error"] = str(exc)[:200]
    result["blocked_s"] = time.monotonic() - started


def _finish_when_rank_0_is_done(store: dist.Store, group: Any, rank: int, result: dict, out: mp.Queue) -> None:
    if rank == 0:
        store.set("rank0_done", "1")
    out.put(result)
    store.wait(["rank0_done"], datetime.timedelta(seconds=75))  # rank 1 keeps the sub-group open until then
    group.destroy()


def test_a_collective_started_after_a_sever_fails_at_once_even_on_a_connection_it_could_not_shut():
    """After an abort the training thread goes on to its next collective (the rest of its step). Rank 0
    starts one on a sub-group with rank 1, which is alive, has left the round and did not sever, and which
    accepted their connection (so rank 0's sever could not shut it down): it fails within a second, not at
    the collective timeout (60 s). Seen under HSDP as a survivor replaced after abort_timeout_s."""
    results = _run_ranks(_late_op_rank, 2, timeout_s=80)
    rank0 = results[0]
    assert rank0["attempts"] is not None, f"no sub-group had its connection accepted by rank 1: {results}"
    assert rank0["error"] is not None and rank0["blocked_s"] < 2, f"a collective after the sever hung: {rank0}"


def _silent_acceptor_rank(rank: int, store_port: int, out: mp.Queue) -> None:
    from ray_elastic.worker.process_group import GroupHandle

    store = dist.TCPStore("127.0.0.1", store_port, is_master=False, timeout=datetime.timedelta(seconds=30))
    group = GroupHandle("gloo", dist.PrefixStore("secret/round0", store), rank, 2, 60.0)
    result: dict = {"rank": rank}
    sub = _sub_group_accepted_by_rank_1(store, rank, result)
    group.learn_peer_listeners()  # the round's first commit: each rank publishes
    store.set(f"published{rank}", "1")
    store.wait(["published0", "published1"])
    if rank == 0:
        group.learn_peer_listeners()  # a later progress point: every rank's are there
        threading.Timer(1.0, group.sever).start()  # the coordinator's abort, while this rank is blocked
        _all_reduce_rank_1_never_joins(sub, result)  # rank 1 is frozen: it accepted this connection, never severs
    _finish_when_rank_0_is_done(store, group, rank, result, out)


def test_a_collective_blocked_on_a_sub_group_connection_accepted_by_a_frozen_peer_fails_at_the_sever():
    """HSDP with a silent node: rank 0 is blocked in an all-reduce on a sub-group with rank 1, which is
    frozen (alive, never severs) and accepted their connection. Rank 0's sever fails it at once, since the
    ranks published their sub-groups' listeners at the round's first commit; was: it waited the collective
    timeout (75 s here, until rank 1 exited), and a survivor was replaced after `abort_timeout_s`."""
    results = _run_ranks(_silent_acceptor_rank, 2, timeout_s=90)
    rank0 = results[0]
    assert rank0["attempts"] is not None, f"no sub-group had its connection accepted by rank 1: {results}"
    assert rank0["error"] is not None and rank0["blocked_s"] < 10, f"still blocked after the sever: {rank0}"


SEVER_TRIALS = 40


def _severed_mid_loop_rank(rank: int, store_port: int, out: mp.Queue) -> None:
    import random

    import torch

    from ray_elastic.worker.process_group import GroupHandle

    store = dist.TCPStore("127.0.0.1", store_port, is_master=False, timeout=datetime.timedelta(seconds=30))
    x = torch.ones(1000)
    gathered = [torch.empty_like(x) for _ in range(2)]
    slowest, slowest_error = 0.0, ""
    for trial in range(SEVER_TRIALS):
        group = GroupHandle("gloo", dist.PrefixStore(f"secret/round{trial}", store), rank, 2, 2.0)
        dist.all_gather(gathered, x)
        if rank == 0:  # the coordinator's abort lands at some point of the training thread's all-gathers
            threading.Timer(random.uniform(0.0, 0.02), group.sever).start()
        started = time.monotonic()
        error = ""
        try:
            for _ in range(100_000):
                dist.all_gather(gathered, x)
        except Exception as exc:  # noqa: BLE001 - every trial ends in the sever's error
            error = str(exc)[40:140]
        if time.monotonic() - started > slowest:
            slowest, slowest_error = time.monotonic() - started, error
        group.destroy()
        store.set(f"trial{trial}/{rank}", "1")
        store.wait([f"trial{trial}/{1 - rank}"])
    out.put({"rank": rank, "slowest_s": slowest, "error": slowest_error})


def test_a_sever_never_leaves_a_send_waiting_out_the_collective_timeout():
    """A sever lands while both ranks run all-gathers back to back, 40 times. The collective in progress must
    fail at once every time. Was: shutting down the write side as well made gloo's send to the peer fail
    with EPIPE, which gloo only queues (its pair then closes without failing a queued send), so in 2-5% of
    trials a collective waited for the whole collective timeout (here 2 s; `benchmarks/sever_race.py`)."""
    results = _run_ranks(_severed_mid_loop_rank, 2, timeout_s=80)
    assert max(r["slowest_s"] for r in results.values()) < 1.0, results


def _closed_store_rank(store_port: int, closed: Any, out: mp.Queue) -> None:
    from ray_elastic.worker.process_group import GroupHandle

    store = dist.TCPStore("127.0.0.1", store_port, is_master=False, timeout=datetime.timedelta(seconds=5))
    group = GroupHandle("gloo", dist.PrefixStore("secret/round0", store), 0, 1, 30.0)
    out.put("formed")
    closed.wait(30)  # the round is over: its store is gone before this rank's first progress point
    result: dict = {}
    started = time.monotonic()
    try:
        group.learn_peer_listeners()
        result["gave_up"] = group._peers_known
        group.learn_peer_listeners()  # given up: not tried again
        result["error"] = None
    except Exception as exc:  # noqa: BLE001 - the point of the test
        result["error"] = repr(exc)
    result["took_s"] = time.monotonic() - started
    try:
        store.set("probe", "1")
        result["store_closed"] = False
    except Exception:  # noqa: BLE001 - expected: the store is gone
        result["store_closed"] = True
    result["severed"] = group.sever()
    group.destroy()
    out.put(result)


def _store_host(out: mp.Queue) -> None:
    server = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False,
                           timeout=datetime.timedelta(seconds=30))
    out.put(server.port)
    time.sleep(120)  # until killed


def test_a_rank_that_cannot_reach_the_rounds_store_gives_up_learning_peers_and_can_still_sever():
    """The listener exchange runs at a commit: a closed round store must not fail the commit or wait on it."""
    ctx = mp.get_context("spawn")
    out, closed = ctx.Queue(), ctx.Event()
    host = ctx.Process(target=_store_host, args=(out,))
    host.start()
    proc = ctx.Process(target=_closed_store_rank, args=(out.get(timeout=60), closed, out))
    proc.start()
    try:
        assert out.get(timeout=60) == "formed"
        host.kill()
        host.join(10)
        closed.set()
        result = out.get(timeout=60)
    finally:
        for p in (proc, host):
            p.join(10)
            if p.is_alive():
                p.kill()
    assert result["store_closed"], "the test's premise: the round's store is gone"
    assert result["error"] is None and result["gave_up"] and result["took_s"] < 10, result
    assert result["severed"] == 0, result  # one rank: no connection to shut, and no error either
