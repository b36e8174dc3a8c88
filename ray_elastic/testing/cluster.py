"""A simulated multi-node Ray cluster on one machine, with handles to break it."""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time
from collections.abc import Iterator
from typing import Any

import psutil
import ray
from ray.cluster_utils import Cluster

WORKER_NODE_RESOURCE = "ray_elastic_node"
_signal_lock = threading.Lock()


@contextlib.contextmanager
def _signals_allowed_off_main_thread() -> Iterator[None]:
    """`Cluster.add_node` installs a SIGTERM handler, which only the main thread may do."""
    if threading.current_thread() is threading.main_thread():
        yield
        return
    with _signal_lock:
        original = signal.signal
        signal.signal = lambda *args, **kwargs: None  # type: ignore[assignment]
        try:
            yield
        finally:
            signal.signal = original


class LocalCluster:
    """Handles over a `ray.cluster_utils.Cluster`: a CPU-less head and N worker nodes.

    Args:
        num_nodes: worker nodes to start.
        cpus_per_node: CPUs each worker node advertises.
        gpus_per_node: fake GPUs per node (for placement tests; nothing uses them).
        object_store_mb: object store per node.
        health_check_period_ms, health_check_failure_threshold: Ray's node health
            check on the head; a node is declared dead after about period × threshold.
    """

    def __init__(
        self,
        num_nodes: int = 4,
        cpus_per_node: int = 1,
        gpus_per_node: int = 0,
        object_store_mb: int = 80,
        health_check_period_ms: int = 1000,
        health_check_failure_threshold: int = 5,
    ):
        self.cpus_per_node = cpus_per_node
        self.gpus_per_node = gpus_per_node
        self.object_store_mb = object_store_mb
        self.cluster = Cluster(
            initialize_head=True,
            head_node_args={
                "num_cpus": 0,
                "object_store_memory": object_store_mb * 1024 * 1024,
                "_system_config": {
                    "health_check_period_ms": health_check_period_ms,
                    "health_check_failure_threshold": health_check_failure_threshold,
                },
            },
        )
        self.nodes: list[Any] = []
        self._started: list[Any] = []  # every node ever added, removed ones included
        self._frozen: dict[int, list[psutil.Process]] = {}  # id(node) -> processes stopped by freeze_node
        for _ in range(num_nodes):
            self.add_node()

    @property
    def address(self) -> str:
        return self.cluster.address

    def add_node(self, cpus: int | None = None, gpus: int | None = None, wait: bool = True) -> Any:
        """Start one more worker node; safe to call from any thread."""
        with _signals_allowed_off_main_thread():
            node = self.cluster.add_node(
                num_cpus=self.cpus_per_node if cpus is None else cpus,
                num_gpus=self.gpus_per_node if gpus is None else gpus,
                resources={WORKER_NODE_RESOURCE: 1},
                object_store_memory=self.object_store_mb * 1024 * 1024,
                wait=wait,
            )
        self.nodes.append(node)
        self._started.append(node)
        return node

    @staticmethod
    def node_id(node: Any) -> str:
        return node.node_id

    def processes_of(self, node: Any) -> list[psutil.Process]:
        """Every process the node's raylet started (its workers included)."""
        pids = []
        for info in node.all_processes.get("raylet", []):
            with contextlib.suppress(psutil.Error):
                pids.extend(psutil.Process(info.process.pid).children(recursive=True))
        return pids

    def freeze_node(self, node: Any) -> list[psutil.Process]:
        """SIGSTOP the node's raylet and every process under it: a silent node (no connection is reset).

        Returns:
            the stopped processes (raylet first); `thaw_node` continues them.
        """
        procs = []
        for info in node.all_processes.get("raylet", []):
            with contextlib.suppress(psutil.Error):
                procs.append(psutil.Process(info.process.pid))
        procs += self.processes_of(node)
        for proc in procs:
            with contextlib.suppress(psutil.Error):
                proc.send_signal(signal.SIGSTOP)
        self._frozen.setdefault(id(node), []).extend(procs)
        return procs

    def thaw_node(self, node: Any) -> None:
        """SIGCONT every process `freeze_node` stopped on this node."""
        for proc in self._frozen.pop(id(node), []):
            with contextlib.suppress(psutil.Error):
                proc.send_signal(signal.SIGCONT)

    def raylet_pids(self) -> set[int]:
        """Raylet pids of every node this cluster ever started; Ray workers carry theirs as RAY_RAYLET_PID."""
        return {
            info.process.pid
            for node in [self.cluster.head_node, *self._started] if node is not None
            for info in node.all_processes.get("raylet", [])
        }

    def kill_node(self, node: Any, graceful: bool = False) -> None:
        """Remove a node; ungraceful kills its raylet and then any process it left behind."""
        self.thaw_node(node)
        leftovers = self.processes_of(node)
        self.cluster.remove_node(node, allow_graceful=graceful)
        for proc in leftovers:
            with contextlib.suppress(psutil.Error):
                proc.kill()
        if node in self.nodes:
            self.nodes.remove(node)

    def resize(self, num_nodes: int, timeout_s: float = 60.0) -> None:
        """Add worker nodes, or remove the newest gracefully, until exactly `num_nodes` are alive in Ray."""
        while len(self.nodes) < num_nodes:
            self.add_node()
        while len(self.nodes) > num_nodes:
            self.kill_node(self.nodes[-1], graceful=True)
        deadline = time.monotonic() + timeout_s
        alive = -1
        while time.monotonic() < deadline:
            alive = sum(1 for n in ray.nodes() if n["Alive"] and n["Resources"].get(WORKER_NODE_RESOURCE))
            if alive == num_nodes:
                return
            time.sleep(0.1)
        raise TimeoutError(f"{alive} worker nodes alive after {timeout_s}s, wanted {num_nodes}")

    def drain_node(
        self, node: Any, deadline_s: float | None = None, reason: str = "DRAIN_NODE_REASON_PREEMPTION",
        message: str = "drained by ray_elastic.testing",
    ) -> tuple[bool, str]:
        """Ask Ray to drain a node: the GCS `DrainNode` call of `ray drain-node`, autoscaler v2 and KubeRay.

        Ray does not kill the node at the deadline (the caller does: `kill_node`); it lets it exit
        once idle. Returns (accepted, Ray's reason when it rejected the request).
        """
        from ray._raylet import GcsClient  # type: ignore[attr-defined]
        from ray.core.generated import autoscaler_pb2

        deadline_ms = 0 if deadline_s is None else int((time.time() + deadline_s) * 1000)
        gcs = GcsClient(address=self.address)
        accepted, rejection = gcs.drain_node(
            node.node_id, autoscaler_pb2.DrainNodeReason.Value(reason),  # type: ignore[attr-defined]
            message, deadline_ms, timeout=30,
        )
        return bool(accepted), str(rejection)

    @staticmethod
    def kill_pid(pid: int, sig: int = signal.SIGKILL) -> None:
        os.kill(pid, sig)

    def shutdown(self) -> None:
        for node in list(self._started):
            self.thaw_node(node)
        leftovers = [p for node in self.nodes for p in self.processes_of(node)]
        if ray.is_initialized():
            ray.shutdown()
        self.cluster.shutdown()
        for proc in leftovers:
            with contextlib.suppress(psutil.Error):
                proc.kill()


@contextlib.contextmanager
def local_cluster(
    num_nodes: int = 4, cpus_per_node: int = 1, connect: bool = True, **kwargs: Any
) -> Iterator[LocalCluster]:
    """A simulated cluster for tests, examples and laptops; connects this process to it.

    Yields:
        LocalCluster with `add_node()`, `kill_node(node, graceful=False)` and `nodes`.
    """
    cluster = LocalCluster(num_nodes=num_nodes, cpus_per_node=cpus_per_node, **kwargs)
    try:
        if connect:
            ray.init(address=cluster.address)
        deadline = time.monotonic() + 30
        while connect and time.monotonic() < deadline:
            alive = [n for n in ray.nodes() if n["Alive"] and n["Resources"].get(WORKER_NODE_RESOURCE)]
            if len(alive) >= num_nodes:
                break
            time.sleep(0.1)
        yield cluster
    finally:
        cluster.shutdown()
