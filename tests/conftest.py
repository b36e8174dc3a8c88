"""Fixtures shared by every test that needs Ray: one simulated cluster, leak checks scoped to it."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import Any

import pytest
import ray

from ray_elastic.api import _remove_placement_groups
from ray_elastic.testing import LocalCluster, local_cluster
from ray_elastic.testing.leaks import assert_no_leaks, live_run_actors

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")
os.environ.setdefault("RAY_metrics_report_interval_ms", "1000")  # read by the clusters' Ray processes

SHARED_CLUSTER = {"num_nodes": 4, "cpus_per_node": 2}


class Clusters:
    """The simulated cluster most tests share, plus any a test starts for itself.

    The shared one (4 nodes × 2 CPUs) starts on first use: a start costs more than
    most tests. A test that needs a cluster of its own (fake GPUs, one-CPU nodes)
    gets it from `private()`, which first shuts the shared one down so that only
    one runs at a time on 2 cores; the next `shared()` starts it again.
    """

    def __init__(self) -> None:
        self._shared_stack = contextlib.ExitStack()
        self._shared: LocalCluster | None = None
        self._raylet_pids: set[int] = set()

    def shared(self) -> LocalCluster:
        if self._shared is None:
            if ray.is_initialized():
                ray.shutdown()
            self._shared = self._shared_stack.enter_context(local_cluster(**SHARED_CLUSTER))
        elif not ray.is_initialized():
            ray.init(address=self._shared.address)
        return self._shared

    def private(self, stack: contextlib.ExitStack, num_nodes: int, **kwargs: Any) -> LocalCluster:
        self.close_shared()
        if ray.is_initialized():
            ray.shutdown()
        cluster = stack.enter_context(local_cluster(num_nodes=num_nodes, **kwargs))
        self._raylet_pids |= cluster.raylet_pids()
        return cluster

    def raylet_pids(self) -> set[int]:
        """Raylets of every cluster of the session: Ray processes carry theirs as RAY_RAYLET_PID."""
        shared = self._shared.raylet_pids() if self._shared is not None else set()
        return self._raylet_pids | shared

    def close_shared(self) -> None:
        if self._shared is not None:
            self._raylet_pids |= self._shared.raylet_pids()
            self._shared_stack.close()
            self._shared = None


@pytest.fixture(scope="session")
def clusters() -> Iterator[Clusters]:
    pool = Clusters()
    yield pool
    pool.close_shared()


@pytest.fixture
def cluster(clusters: Clusters) -> LocalCluster:
    """The shared simulated cluster; a test sets its node count first with `cluster.resize(n)`."""
    return clusters.shared()


@pytest.fixture
def make_cluster(clusters: Clusters) -> Iterator[Any]:
    """A cluster of the test's own, shut down after it: `make_cluster(num_nodes=2, gpus_per_node=2)`."""
    with contextlib.ExitStack() as stack:
        yield lambda num_nodes=2, **kwargs: clusters.private(stack, num_nodes, **kwargs)


@pytest.fixture
def no_shared_cluster(clusters: Clusters) -> None:
    """For tests that start Ray clusters of their own outside this process: nothing else runs beside them."""
    clusters.close_shared()
    if ray.is_initialized():
        ray.shutdown()


@pytest.fixture
def ray_disconnected() -> None:
    """For tests that check Ray was not contacted: this process starts without a connection."""
    if ray.is_initialized():
        ray.shutdown()  # the shared cluster keeps running; `shared()` reconnects


@pytest.fixture
def no_leaks(clusters: Clusters) -> Any:
    """Call after a run: no actors, placement groups, worker processes of the session's clusters, or ports remain."""

    def check(worker_pids: Any = (), ports: Any = (), timeout_s: float = 10.0) -> None:
        assert_no_leaks(worker_pids, timeout_s, raylet_pids=clusters.raylet_pids(), ports=ports)

    return check


@pytest.fixture(autouse=True)
def _no_run_outlives_its_test(request: pytest.FixtureRequest) -> Iterator[None]:
    """If a test on the shared cluster failed half-way, end its runs so the next test starts clean."""
    yield
    if "cluster" not in request.fixturenames or not ray.is_initialized():
        return
    for actor in live_run_actors():
        name = str(actor.get("Name") or "")
        if actor.get("ActorClassName") == "Coordinator" and name:
            try:
                ray.kill(ray.get_actor(name), no_restart=True)
            except ValueError:
                continue
            _remove_placement_groups(name.removeprefix("ray_elastic-coordinator-"))


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Unit tests first (fast answers), then tests with clusters of their own, then those on the
    shared cluster: it starts once."""
    own = ("make_cluster", "no_shared_cluster")

    def phase(item: pytest.Item) -> int:
        if item.nodeid.startswith("tests/unit/"):
            return 0
        return 1 if any(name in getattr(item, "fixturenames", ()) for name in own) else 2

    items.sort(key=phase)


@pytest.hookimpl(trylast=True)
def pytest_unconfigure(config: pytest.Config) -> None:
    """Leave with pytest's status, skipping the interpreter's teardown.

    Once every test has run, every cluster is shut down and every report written, tearing down the
    native threads that Ray, torch's TCPStores and in-process gloo groups left in this process crashed
    once (SIGSEGV after "486 passed", turning a green suite red). Nothing of ours runs after this hook.
    """
    import sys

    status = getattr(config, "_ray_elastic_exitstatus", None)
    if status is None:
        return
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(int(status))


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    session.config._ray_elastic_exitstatus = exitstatus  # type: ignore[attr-defined]
