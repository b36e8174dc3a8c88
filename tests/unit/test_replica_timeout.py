"""A replica transfer whose wait times out while the peer is alive (nobody severed it) is over for good.

`ShardStore.land` recycles the buffers of such a transfer at once. That is safe only because gloo,
when a wait times out, closes every connection of the group: the late send fails, nothing is written
into the buffer afterwards, and the peer sees the connections closed as after a sever. Two real
processes hold gloo to that; should a torch release change it, this test fails and the buffers
must be kept out of reuse instead.
"""

from __future__ import annotations

import os
import time
import traceback
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from ray_elastic.testing.ports import free_port

pytestmark = pytest.mark.timeout(90)

NBYTES = (9 << 20) + 5  # three chunks, the last one short
LATE_S = 1.5  # rank 1 sends this long after posting its receives; rank 0 waits 0.3 s


def _payload(rank: int) -> torch.Tensor:
    return (torch.arange(NBYTES, dtype=torch.int64) * (rank + 3) % 251).to(torch.uint8)


def _proc(rank: int, port: int, results) -> None:
    try:
        results.put((rank, _run(rank, port)))
    except BaseException:  # noqa: BLE001 - the parent reports it
        results.put((rank, traceback.format_exc()))
    finally:
        results.close()
        results.join_thread()  # flushed before the hard exit below
        os._exit(0)  # a gloo group torn down at interpreter exit under posted work can abort the process


def _outcome(call) -> str:
    try:
        call()
    except Exception as exc:  # noqa: BLE001 - the test compares messages
        return str(exc)
    return "ok"


def _run(rank: int, port: int) -> dict:
    from ray_elastic.sharded import comm
    from ray_elastic.sharded.store import Generation, InFlight, RoundInfo, ShardStore

    store = dist.TCPStore("127.0.0.1", port, 2, rank == 0, timeout=timedelta(seconds=30))
    dist.init_process_group("gloo", store=store, rank=rank, world_size=2, timeout=timedelta(seconds=30))
    own = _payload(rank)
    spare = torch.zeros(NBYTES, dtype=torch.uint8)
    exchange = comm.ReplicaExchange(own, rank, [[1], [0]], {0: NBYTES, 1: NBYTES}, {1 - rank: spare})
    if rank == 1:
        time.sleep(LATE_S)
        finish = _outcome(exchange.finish)  # no timeout: its peer is alive
        return {"finish": finish, "received": sorted(exchange.received), "barrier": _outcome(dist.barrier)}
    shards = ShardStore(replicas=1, overlap=True)
    shards.pending = Generation(commit_id=0, world=2, rank=0, specs=[], own=own, replicas={}, rest={})
    shards.inflight = InFlight(exchange, {1: spare}, RoundInfo(0, 2, ("a", "b")))
    started = time.monotonic()
    land = _outcome(lambda: shards.land(timedelta(seconds=0.3)))
    gave_up_after = time.monotonic() - started
    time.sleep(LATE_S + 1.0)  # rank 1's late send has been tried by now
    return {
        "land": land,
        "gave_up_after": gave_up_after,
        "pending_replicas": sorted(shards.pending.replicas),
        "spare_recycled": any(buf.data_ptr() == spare.data_ptr() for buf in shards._pool),
        "spare_written": int(spare.count_nonzero()),
        "barrier": _outcome(dist.barrier),
    }


def test_a_replica_wait_that_times_out_ends_the_transfer_so_its_buffers_are_reused():
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_proc, args=(rank, port, results)) for rank in range(2)]
    for p in procs:
        p.start()
    answers = dict(results.get(timeout=75) for _ in procs)
    for p in procs:
        p.join(timeout=15)
    for rank, answer in answers.items():
        assert isinstance(answer, dict), f"rank {rank} failed:\n{answer}"
    waited, late = answers[0], answers[1]
    assert "timed out" in waited["land"].lower(), waited
    assert waited["gave_up_after"] < LATE_S, waited
    assert waited["pending_replicas"] == [] and waited["spare_recycled"], waited
    assert waited["spare_written"] == 0, f"gloo wrote into a buffer after its wait timed out: {waited}"
    assert waited["barrier"] != "ok", f"the group outlived a timed-out wait: {waited}"
    assert late["finish"] != "ok" and late["received"] == [], f"the late send went through: {late}"
    assert late["barrier"] != "ok", late
