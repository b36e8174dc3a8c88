"""The coordinator actor: hosts the controller, the round stores and the worker group."""

from __future__ import annotations

import threading
from typing import Any

import ray
from ray import cloudpickle

from ray_elastic.config import RunConfig
from ray_elastic.coordinator.controller import Controller, RunSummary, progress_snapshot
from ray_elastic.coordinator.ray_group import RayWorkerGroup
from ray_elastic.diagnostics import compare_collectives
from ray_elastic.events import EventLog
from ray_elastic.metrics import MetricsExporter


class Coordinator:
    """Runs one job's state machine. Made an actor (num_cpus=0, on the driver's node) by `run`.

    Args:
        config: the run's configuration.
        train_fn_blob: cloudpickled `(train_fn, train_config)`.
        checkpointer: optional durable checkpointer shared with workers.
    """

    def __init__(self, config: RunConfig, train_fn_blob: bytes, checkpointer: Any = None):
        train_fn, train_config = cloudpickle.loads(train_fn_blob)
        self.group = RayWorkerGroup(
            config, train_fn, train_config, ray.util.get_node_ip_address(), checkpointer
        )
        self.controller = Controller(
            config, self.group, EventLog(config.run_id, config.event_log_path), exporter=MetricsExporter(config.run_id)
        )
        self._lock = threading.Lock()

    def run(self) -> RunSummary:
        return self.controller.run()

    def abort(self, reason: str) -> None:
        self.controller.request_abort(reason)

    def progress(self, events_from: int = 0) -> dict[str, Any]:
        """A snapshot for progress displays: state, round, size, budget, metrics, new events."""
        return progress_snapshot(self.controller, events_from)

    def worker_pids(self) -> list[int]:
        return self.group.worker_pids()

    def stacks(self, timeout_s: float = 10.0) -> list[dict[str, Any]]:
        """Every live worker's stack (see `ray_elastic.diagnostics.stacks`), as plain dicts."""
        plan = getattr(self.controller.state, "plan", None)
        ranks = {} if plan is None else {w: rank for rank, w in enumerate(plan.worker_ids)}
        found = self.group.collect_stacks(timeout_s)
        standing = compare_collectives(
            {f"rank {ranks[r.worker_id]}": (r.collective_seq, r.collective) for r, _ in found if r.worker_id in ranks})
        return [
            {"rank": ranks.get(r.worker_id, -1), "worker_id": r.worker_id, "node_id": node_id, "pid": r.pid,
             "round_id": r.round_id, "stack": r.stack,
             "collective": standing.get(f"rank {ranks.get(r.worker_id, -1)}", ""),
             "note": r.note, "collective_seq": r.collective_seq}
            for r, node_id in found
        ]

    def ping(self) -> bool:
        return True
