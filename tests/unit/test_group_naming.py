"""A rank whose previous round failed inside init_process_group forms the next round's group with fresh peers.

torch names each new process group after a per-process counter and publishes gloo's addresses under that name;
only destroying a default group resets it. A rank whose group creation failed (its store closed by an abort)
would otherwise name its next default group "1" while a newcomer names it "0", and both wait for each other's
addresses until the collective timeout. Two real processes, no Ray.
"""

from __future__ import annotations

import datetime
import multiprocessing as mp
import time

import pytest
import torch.distributed as dist

pytestmark = pytest.mark.timeout(90)


def _rank(rank: int, store_port: int, out: mp.Queue) -> None:
    import torch

    from ray_elastic.worker.process_group import GroupHandle

    store = dist.TCPStore("127.0.0.1", store_port, is_master=False, timeout=datetime.timedelta(seconds=30))
    if rank == 0:  # a round in which its peer never arrives: group creation fails inside torch
        try:
            GroupHandle("gloo", dist.PrefixStore("secret/round0", store), 0, 2, 1.0)
        except RuntimeError:
            out.put((rank, "round 0 failed"))
        else:
            out.put((rank, "round 0 formed without its peer"))
            return
    started = time.monotonic()
    try:
        group = GroupHandle("gloo", dist.PrefixStore("secret/round1", store), rank, 2, 10.0)
    except RuntimeError as exc:
        out.put((rank, f"not formed after {time.monotonic() - started:.1f}s: {exc}"[:300]))
        return
    value = torch.ones(1) * (rank + 1)
    dist.all_reduce(value)
    group.destroy()
    out.put((rank, f"formed in {time.monotonic() - started:.1f}s, sum {value.item():g}"))


def test_a_rank_whose_group_creation_failed_forms_the_next_round_with_a_newcomer():
    server = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    procs = [ctx.Process(target=_rank, args=(0, server.port, out))]
    procs[0].start()
    assert out.get(timeout=30) == (0, "round 0 failed")  # rank 1 arrives only for the next round
    procs.append(ctx.Process(target=_rank, args=(1, server.port, out)))
    procs[1].start()
    results = dict(out.get(timeout=60) for _ in procs)
    for proc in procs:
        proc.join(10)
    assert all("sum 3" in results[r] for r in (0, 1)), results
