"""Membership: nodes join and leave mid-run, hangs, below-min waits, GPU placement."""

from __future__ import annotations

import time

import pytest

import ray_elastic
from ray_elastic.testing import FaultInjector
from tests.cluster.background import BackgroundRun
from tests.workloads import ddp_train

pytestmark = [pytest.mark.cluster, pytest.mark.timeout(240)]


def _consistent(result, steps):
    for v in result.return_values:
        assert v["log"] == list(range(1, steps + 1))
        assert v["weights"] == result.return_values[0]["weights"]


def test_scale_up_at_a_commit_never_above_max_and_free(make_cluster, tmp_path, no_leaks):
    cluster = make_cluster(num_nodes=2)
    run = BackgroundRun(tmp_path, ddp_train, config={"steps": 150, "sleep_s": 0.05},
                        min_nodes=2, max_nodes=3, max_restarts=0)
    run.wait_for("round_formed")
    for _ in range(2):  # two nodes in a burst; only one fits under max_nodes=3
        cluster.add_node()
    grown = run.wait_for("round_formed", count=2)
    result = run.join()
    assert grown["data"]["cause"] == "scale-up" and grown["data"]["world_size"] == 3
    assert result.restarts == 0
    assert max(r.world_size for r in result.rounds) == 3
    _consistent(result, 150)
    worlds = result.return_values[0]["worlds"]
    assert worlds[0] == 2 and worlds[-1] == 3 and worlds == sorted(worlds), "grew once, at a commit"
    assert all(v["resets"] == [3] for v in result.return_values), "reset callbacks saw the new world"
    newcomer = [v for v in result.return_values if v["restored_from"] == "peer"]
    assert len(newcomer) == 1, "the newcomer received state from a survivor"
    final_round = result.rounds[-1].round_id
    restored = [[d for r, _, d in v["restores"] if r == final_round] for v in result.return_values]
    assert all(len(d) == 1 for d in restored)
    assert all(d == restored[0] for d in restored), "newcomer's model+optimizer state equals survivors'"
    assert any(x != 0.0 for x in restored[0])
    no_leaks(result.worker_pids)


def test_sigstopped_rank_is_killed_by_watchdog_and_counted_once(make_cluster, tmp_path, no_leaks):
    make_cluster(num_nodes=3)
    faults = FaultInjector().hang_at(rank=1, step=5)
    started = time.monotonic()
    result = ray_elastic.run(ddp_train, config={"steps": 20, "faults": faults}, min_nodes=2, max_nodes=3,
                             max_restarts=1, hang_timeout_s=8.0, progress="none")
    assert time.monotonic() - started < 120
    _consistent(result, 20)
    assert result.restarts == 1
    restart = [e for e in result.events if e.kind == "restart"]
    assert len(restart) == 1 and "(hang)" in restart[0].message
    no_leaks(result.worker_pids)


def test_below_min_waits_and_resumes_when_a_node_returns(make_cluster, tmp_path, no_leaks):
    cluster = make_cluster(num_nodes=2)
    run = BackgroundRun(tmp_path, ddp_train, config={"steps": 120, "sleep_s": 0.05},
                        min_nodes=2, max_nodes=2, max_restarts=2, wait_for_nodes_timeout_s=60)
    run.wait_for("round_formed")
    time.sleep(1.0)
    cluster.kill_node(cluster.nodes[-1], graceful=False)
    waiting = run.wait_for("waiting", count=2)  # the first 'waiting' was at start
    assert "1 more node" in waiting["message"]
    cluster.add_node()
    result = run.join()
    _consistent(result, 120)
    assert result.restarts == 1 and result.rounds[-1].world_size == 2
    no_leaks(result.worker_pids)


def test_below_min_fails_clearly_after_timeout(make_cluster, tmp_path, no_leaks):
    cluster = make_cluster(num_nodes=2)
    run = BackgroundRun(tmp_path, ddp_train, config={"steps": 500, "sleep_s": 0.05},
                        min_nodes=2, max_nodes=2, max_restarts=2, wait_for_nodes_timeout_s=3)
    run.wait_for("round_formed")
    time.sleep(1.0)
    cluster.kill_node(cluster.nodes[-1], graceful=False)
    with pytest.raises(ray_elastic.NotEnoughNodesError) as info:
        run.join()
    assert "min_nodes=2" in str(info.value) and "add nodes" in str(info.value)
    no_leaks()


def _gpu_probe(config):
    import os

    ctx = ray_elastic.get_context()
    import ray

    return {"rank": ctx.rank, "local_rank": ctx.local_rank, "device": str(ctx.device), "node": ctx.node_id,
            "visible": os.environ.get("CUDA_VISIBLE_DEVICES"), "ray_gpus": [str(g) for g in ray.get_gpu_ids()]}


def test_fake_gpu_placement_one_gpu_per_worker(make_cluster, no_leaks):
    make_cluster(num_nodes=2, cpus_per_node=2, gpus_per_node=2)
    result = ray_elastic.run(_gpu_probe, min_nodes=2, nproc_per_node=2, use_gpu=True, backend="gloo",
                             progress="none")
    values = result.return_values
    assert len(values) == 4
    for node in {v["node"] for v in values}:
        on_node = [v for v in values if v["node"] == node]
        own = sorted(g for v in on_node for g in v["ray_gpus"])
        assert len(own) == 2 and len(set(own)) == 2, "each worker holds its own GPU"
        for v in on_node:
            assert sorted(v["visible"].split(",")) == own, "local ranks see each other's GPUs"
            index = v["visible"].split(",").index(v["ray_gpus"][0])
            assert v["device"] == f"cuda:{index}"
    no_leaks(result.worker_pids)


def test_use_gpu_without_gpus_is_rejected_up_front(make_cluster):
    make_cluster(num_nodes=1)
    with pytest.raises(ray_elastic.ConfigError, match="no GPUs"):
        ray_elastic.run(_gpu_probe, use_gpu=True, progress="none")


def test_resources_no_node_can_hold_fail_fast(make_cluster):
    make_cluster(num_nodes=2, cpus_per_node=1)
    started = time.monotonic()
    with pytest.raises(ray_elastic.ConfigError, match="no node can hold nproc_per_node=2") as info:
        ray_elastic.run(_gpu_probe, nproc_per_node=2, resources_per_worker={"CPU": 1}, progress="none")
    assert "Lower nproc_per_node or resources_per_worker" in str(info.value)
    assert time.monotonic() - started < 10, "failed fast, no pending placement group"
