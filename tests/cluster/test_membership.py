"""Placement and up-front checks: GPU placement, GPUs or resources the cluster lacks.

Nodes joining and leaving, hangs and below-min waits (a cluster with no worker node yet included) are
fault-matrix rows (tests/faults/).
"""

from __future__ import annotations

import time

import pytest

import ray_elastic

pytestmark = [pytest.mark.cluster, pytest.mark.timeout(240)]


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


def test_use_gpu_without_gpus_is_rejected_up_front(cluster):
    with pytest.raises(ray_elastic.ConfigError, match="no GPUs"):
        ray_elastic.run(_gpu_probe, use_gpu=True, progress="none")


def test_resources_no_node_can_hold_fail_fast(cluster):
    assert cluster.cpus_per_node == 2
    started = time.monotonic()
    with pytest.raises(ray_elastic.ConfigError, match="no node can hold nproc_per_node=2") as info:
        ray_elastic.run(_gpu_probe, nproc_per_node=2, resources_per_worker={"CPU": 2}, progress="none")
    assert "Lower nproc_per_node or resources_per_worker" in str(info.value)
    assert time.monotonic() - started < 10, "failed fast, no pending placement group"

