"""Fixtures for tests on a simulated multi-node cluster (real Ray, real kills)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import pytest
import ray

from ray_elastic.testing import LocalCluster, local_cluster
from ray_elastic.testing.leaks import assert_no_leaks


class ClusterFactory:
    """Starts simulated clusters for one test and shuts them all down after it."""

    def __init__(self, stack: contextlib.ExitStack):
        self._stack = stack
        self.clusters: list[LocalCluster] = []

    def __call__(self, num_nodes: int = 2, **kwargs: Any) -> LocalCluster:
        if ray.is_initialized():
            ray.shutdown()
        cluster = self._stack.enter_context(local_cluster(num_nodes=num_nodes, **kwargs))
        self.clusters.append(cluster)
        return cluster

    def raylet_pids(self) -> set[int]:
        return {pid for cluster in self.clusters for pid in cluster.raylet_pids()}


@pytest.fixture
def make_cluster() -> Iterator[ClusterFactory]:
    """Start a simulated cluster of N worker nodes: `make_cluster(num_nodes=3)`."""
    with contextlib.ExitStack() as stack:
        yield ClusterFactory(stack)


@pytest.fixture
def no_leaks(make_cluster: ClusterFactory):
    """Call after a run: asserts no actors, placement groups or worker processes of this test's cluster remain."""

    def check(worker_pids=(), timeout_s: float = 10.0) -> None:
        assert_no_leaks(worker_pids, timeout_s, raylet_pids=make_cluster.raylet_pids())

    return check
