"""State across rounds in real processes (gloo, no Ray): who holds which commit when members come and go."""

from __future__ import annotations

import multiprocessing
import os
import traceback
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from ray_elastic.context import Session, TrainContext, set_session
from ray_elastic.snapshot import SnapshotHolder
from ray_elastic.state import State

pytestmark = pytest.mark.timeout(60)


def _member(name: str, plan: dict[int, tuple[int, int]], store_dir: str, queue) -> None:
    """One worker process: `plan` maps round id -> (rank, world size) for the rounds it takes part in."""
    try:
        torch.set_num_threads(1)
        holder = SnapshotHolder("copy")
        seen = {}
        for round_id, (rank, world) in sorted(plan.items()):
            dist.init_process_group("gloo", init_method=f"file://{store_dir}/round{round_id}", rank=rank,
                                    world_size=world)
            ctx = TrainContext(rank=rank, local_rank=0, world_size=world, local_world_size=1, node_rank=rank,
                               num_nodes=world, restart_count=round_id, round_id=round_id, run_id="t",
                               node_id=name, device=torch.device("cpu"))
            set_session(Session(ctx, holder))
            torch.manual_seed(hash(name) % 1000 + round_id)  # every process starts from different weights
            model = torch.nn.parallel.DistributedDataParallel(torch.nn.Linear(4, 1))
            opt = torch.optim.SGD(model.parameters(), lr=0.1)
            state = State(model=model, optimizer=opt, step=0)
            weights = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
            gathered = [torch.empty_like(weights) for _ in range(world)]
            dist.all_gather(gathered, weights)
            seen[round_id] = {"restored_from": state.restored_from, "step": state.step,
                              "identical": all(torch.equal(g, gathered[0]) for g in gathered)}
            for _ in range(3):
                model(torch.randn(8, 4)).pow(2).mean().backward()
                opt.step()
                opt.zero_grad()
                state.step += 1
                state.commit()
            state._session.finish_agreement()
            # Free DDP (its reducer holds the group) while the group is still registered, as the worker
            # does: a reducer freed after destroy_process_group destroys the gloo group while holding the
            # GIL, which can deadlock with a gloo thread freeing a finished work's tensors.
            del model, opt, state
            dist.destroy_process_group()
            set_session(None)
            holder.end_round()
        queue.put((name, seen))
    except BaseException:  # noqa: BLE001 - reported to the test
        queue.put((name, traceback.format_exc()))


def test_a_rank_sitting_out_a_round_rejoins_holding_a_different_commit_with_the_same_number(tmp_path: Path):
    """Round 0: a and b commit 3 times. Round 1: c alone, with no holder, starts fresh and commits 3 times.
    Round 2: a and c both hold a third commit, of different runs of training: one must receive the other's
    (issue 18.5), and every rank must leave State() identical."""
    plans = {"a": {0: (0, 2), 2: (0, 2)}, "b": {0: (1, 2)}, "c": {1: (0, 1), 2: (1, 2)}}
    context = multiprocessing.get_context("spawn")  # never fork a process that runs threads
    queue = context.Queue()
    procs = [context.Process(target=_member, args=(name, plan, str(tmp_path), queue)) for name, plan in plans.items()]
    for proc in procs:
        proc.start()
    try:
        results = dict(queue.get(timeout=25) for _ in procs)
    finally:
        for proc in procs:  # within the test's timeout, whatever happened above
            proc.join(5)
            if proc.is_alive():
                os.kill(proc.pid, 9)
                proc.join(5)
    for name, seen in results.items():
        assert isinstance(seen, dict), f"{name} failed:\n{seen}"
    assert results["c"][1] == {"restored_from": "fresh", "step": 0, "identical": True}
    a, c = results["a"][2], results["c"][2]
    assert a["identical"] and c["identical"], f"round 2 left State() with different weights: a {a}, c {c}"
    assert a["step"] == c["step"] == 3
    assert {a["restored_from"], c["restored_from"]} == {"memory", "peer"}, (a, c)
