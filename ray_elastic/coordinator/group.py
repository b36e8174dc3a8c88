"""The interface through which the controller acts on workers.

`RayWorkerGroup` implements it with actors and placement groups; unit tests
and the coordinator-scale benchmark implement it with plain objects.
"""

from __future__ import annotations

import abc
from collections.abc import Mapping

from ray_elastic.coordinator.drain import DrainNotice
from ray_elastic.coordinator.types import Heartbeat, NodeGroup, Pulse, RoundPlan, StackReport, WorkerOutcome


class WorkerGroup(abc.ABC):
    """Nodes, their workers, and the rounds they run."""

    @abc.abstractmethod
    def refresh(self, now: float) -> int:
        """Look for new or lost nodes; start workers on new ones and for dead ones (unless held back, see
        `hold_new_workers`); return how many it started. Never blocks for long."""

    @abc.abstractmethod
    def hold_new_workers(self, hold: bool) -> None:
        """Start no worker process (for a dead one, or on a new node) until called again with False."""

    @abc.abstractmethod
    def ready_groups(self) -> list[NodeGroup]:
        """Complete node groups whose workers are alive, warmed up, and not in a round."""

    @abc.abstractmethod
    def pending_count(self) -> int:
        """Node groups still being placed or warming up."""

    @abc.abstractmethod
    def start_round(self, plan: RoundPlan) -> None:
        """Open a fresh store for the round and start every member's part in it."""

    @abc.abstractmethod
    def wait(self, timeout_s: float) -> list[WorkerOutcome]:
        """Outcomes of the current round that arrived, waiting up to timeout_s for the first."""

    @abc.abstractmethod
    def probe(self, round_id: int) -> list[Heartbeat]:
        """Send a liveness probe to every member of the round with none outstanding; return the answers
        that arrived since the last call (so a member that answers gets its next probe at the next call)."""

    def check_pulse(self, worker_ids: list[str], timeout_s: float) -> list[Pulse]:
        """Start a native (GIL-free) liveness check of these workers unless one is in flight; return the
        results that arrived since the last call. Default: no native channel ("none" at once)."""
        return [Pulse(w, "none") for w in worker_ids]

    def stack_reports(self) -> list[StackReport]:
        """Where aborted workers were when their abort arrived (answers to `abort`), since the last call."""
        return []

    def current_stacks(self, worker_ids: list[str], timeout_s: float) -> dict[str, StackReport]:
        """Where these workers' training threads are now, for those that answer within `timeout_s`. Default: none."""
        return {}

    def outside_stacks(self, worker_ids: list[str]) -> dict[str, StackReport]:
        """Stacks of workers whose Python does not answer, read from outside their processes (the thread holding
        the GIL), for those that could be read. Default: none."""
        return {}

    @abc.abstractmethod
    def request_stop(self, round_id: int) -> None:
        """Ask the round's members to leave at their next commit (membership change)."""

    @abc.abstractmethod
    def abort(self, round_id: int, worker_ids: list[str], diagnose: bool = False) -> None:
        """Unblock and end the round on these workers now; their processes stay. Each answers with its
        stack (`stack_reports`); `diagnose` also reads scripts' stacks with py-spy (slower)."""

    @abc.abstractmethod
    def kill(self, worker_ids: list[str], reason: str) -> None:
        """Kill these workers; replacements start where their node is still alive."""

    def drains(self, now: float) -> Mapping[str, DrainNotice]:
        """Nodes Ray is draining, by node id (polled at most every drain_poll_interval_s).

        Drained nodes are never in `ready_groups()`, get no new workers, and are released once their
        workers are killed (`drained_groups()` lists those still idle). Default: none.
        """
        return {}

    def drained_groups(self) -> list[NodeGroup]:
        """Node groups of drained nodes whose workers are alive and idle (kept until `kill`ed). Default: none."""
        return []

    def hand_over(self, source: str, target: str, timeout_s: float) -> bool:
        """Copy the committed snapshot of idle worker `source` into idle worker `target`; True if it holds it."""
        return False

    def hand_over_shards(self, source: str, keepers: list[str], timeout_s: float) -> tuple[str, list[int]] | None:
        """Before `source` is killed: give the sharded commits it holds to the first of the idle `keepers` that
        lacks some of them; (that keeper, the shards it kept), or None (nothing kept). Default: none."""
        return None

    def worker_pids(self) -> list[int]:
        """Process ids of every worker the run started (for leak checks)."""
        return []

    @abc.abstractmethod
    def shutdown(self) -> None:
        """Release every worker, placement group and store of the run."""
