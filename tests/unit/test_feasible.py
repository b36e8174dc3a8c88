"""`check_feasible`: reject only what no node could ever hold; a cluster still to grow is waited for."""

from __future__ import annotations

import pytest

from ray_elastic.config import RunConfig
from ray_elastic.errors import ConfigError
from ray_elastic.placement import NodeInfo, check_feasible

HEAD = NodeInfo("head", {"node:__internal_head__": 1.0, "memory": 1e9}, True)
CPU_HEAD = NodeInfo("head", {"node:__internal_head__": 1.0, "CPU": 2.0}, True)


def config(**kwargs) -> RunConfig:
    return RunConfig(run_id="unit", **kwargs)


def test_a_cpu_less_head_with_no_worker_node_yet_is_waited_for():
    """An autoscaling cluster, or a head started with --num-cpus=0 whose workers are still coming."""
    assert check_feasible(config(nproc_per_node=2), [HEAD]) == 0
    assert check_feasible(config(use_gpu=True), [HEAD]) == 0


def test_a_node_type_the_autoscaler_can_start_is_waited_for():
    worker = NodeInfo("w1", {"CPU": 1.0}, True)
    assert check_feasible(config(resources_per_worker={"CPU": 4}), [HEAD, worker], node_types=[{"CPU": 8.0}]) == 0
    with pytest.raises(ConfigError, match="no node can hold"):
        check_feasible(config(resources_per_worker={"CPU": 16}), [HEAD, worker], node_types=[{"CPU": 8.0}])


def test_what_no_node_can_hold_is_still_rejected_at_once():
    worker = NodeInfo("w1", {"CPU": 2.0}, True)
    assert check_feasible(config(nproc_per_node=2), [HEAD, worker]) == 1
    with pytest.raises(ConfigError, match="nproc_per_node=3"):
        check_feasible(config(nproc_per_node=3), [HEAD, worker])
    with pytest.raises(ConfigError, match="no node can hold"):  # a laptop's local Ray: the head works
        check_feasible(config(resources_per_worker={"CPU": 64}), [CPU_HEAD])
    with pytest.raises(ConfigError, match="use_gpu=True"):
        check_feasible(config(use_gpu=True), [HEAD, worker])
