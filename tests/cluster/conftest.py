"""Fixtures for tests on a simulated multi-node cluster (real Ray, real kills)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import pytest
import ray

from ray_elastic.testing import LocalCluster, local_cluster
from ray_elastic.testing.leaks import assert_no_leaks


@pytest.fixture
def make_cluster() -> Iterator:
    """Start a simulated cluster of N worker nodes; shut it down (and check leaks) after."""
    stack = contextlib.ExitStack()

    def start(num_nodes: int = 2, **kwargs) -> LocalCluster:
        if ray.is_initialized():
            ray.shutdown()
        return stack.enter_context(local_cluster(num_nodes=num_nodes, **kwargs))

    with stack:
        yield start


@pytest.fixture
def no_leaks():
    """Call after a run: asserts no actors, placement groups or worker processes remain."""
    return assert_no_leaks
