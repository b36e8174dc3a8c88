"""A `WorkerGroup` made of plain Python objects, for unit tests and the coordinator-scale benchmark.

The test plays the cluster and the workers: it adds and removes nodes, makes
workers finish, fail, die, hang or make progress, and reads back what the
controller asked for (`plans`, `aborts`, `kills`, `stops`). Nothing runs on
its own except two realistic reflexes, both on by default: an aborted worker
leaves the round at once (`settle_on_abort`), and asked to stop it leaves at
its next commit, here at once (`stop_on_request`). A hung (frozen), stalled or
GIL-holding worker does neither.

Liveness has two channels, as on Ray: probes (answered unless the worker is hung
or holds the GIL) and the native pulse (`check_pulse`: "alive" unless hung,
"gone" once dead, "silent" for a hung one; "none" for workers of a node added
with `pulse=False`).

With a `FakeClock`, `wait()` advances the clock instead of sleeping, so a
controller loop over minutes of simulated time runs in milliseconds.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ray_elastic.coordinator.drain import DrainNotice
from ray_elastic.coordinator.group import WorkerGroup
from ray_elastic.coordinator.types import (
    Heartbeat,
    NodeGroup,
    OutcomeKind,
    Pulse,
    RoundPlan,
    StackReport,
    WorkerOutcome,
)


class FakeClock:
    """A monotonic clock that moves only when told to."""

    def __init__(self, start: float = 1000.0):
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@dataclass
class FakeWorker:
    """One process slot. `status`: "ready" (idle), "busy" (in a round) or "dead"."""

    worker_id: str
    node_id: str
    local_rank: int
    ready_at: float
    status: str = "ready"
    hung: bool = False
    progress: int = 0
    step: int | None = None
    queued: bool = False  # an outcome is waiting to be collected by `wait()`
    reports: list[tuple[float, dict[str, Any]]] | None = None
    stalled: bool = False  # answers probes, makes no progress, never leaves a round (stuck in user code)
    gil: bool = False  # holds the GIL: answers no probe, its native pulse answers, leaves no round
    busy: str = ""  # a long activity its probe answers announce (a checkpoint write)
    pulse: bool = True  # has a native pulse server
    stack: str = ""  # what `abort` answers as its stack


class FakeWorkerGroup(WorkerGroup):
    """Nodes of `nproc_per_node` fake workers, driven by the test.

    Args:
        nproc_per_node: workers per node.
        clock: a `FakeClock` (default: a new one) or a real clock such as `time.monotonic`.
        replace_s: how long a replacement for a dead or killed worker takes to start.
        settle_on_abort: aborted workers that are not hung leave the round at once.
        stop_on_request: asked to stop, workers that are not hung leave the round at once.
    """

    def __init__(
        self,
        nproc_per_node: int = 1,
        clock: Callable[[], float] | None = None,
        replace_s: float = 0.0,
        settle_on_abort: bool = True,
        stop_on_request: bool = True,
    ):
        self.nproc_per_node = nproc_per_node
        self.clock: Callable[[], float] = clock if clock is not None else FakeClock()
        self.replace_s = replace_s
        self.settle_on_abort = settle_on_abort
        self.stop_on_request = stop_on_request
        self.nodes: dict[str, list[FakeWorker]] = {}
        self.workers: dict[str, FakeWorker] = {}
        self.round_id = -1
        self.members: list[str] = []
        self._outcomes: list[WorkerOutcome] = []
        self._node_count = 0
        # What the controller did, for assertions.
        self.plans: list[RoundPlan] = []
        self.aborts: list[tuple[int, list[str]]] = []
        self.kills: list[tuple[list[str], str]] = []
        self.stops: list[int] = []
        self.pulse_checks: list[str] = []
        self._stack_reports: list[StackReport] = []
        self.refreshes = 0
        self.replacements_started: list[tuple[str, float]] = []  # (worker id, when)
        self.holding_new = False
        self.shut_down = False
        self.draining: dict[str, DrainNotice] = {}
        self.handovers: list[tuple[str, str]] = []
        self.shards_held: dict[str, list[int]] = {}  # set by a test: the old shards a worker holds
        self.shard_handovers: list[tuple[str, str, list[int]]] = []
        self.shard_handover_asks: list[str] = []  # every worker asked to give its shards away

    # -- the test's controls ---------------------------------------------------------------------
    def add_node(self, node_id: str | None = None, start_s: float = 0.0, pulse: bool = True) -> str:
        """Add a node whose workers become ready after `start_s` (inf: only when `started()`)."""
        if node_id in self.nodes:
            raise ValueError(f"node {node_id} is already there")
        while node_id is None or node_id in self.nodes:
            self._node_count += 1
            node_id = f"node-{self._node_count:04d}"
        ready_at = self.clock() + start_s
        self.nodes[node_id] = [self._new_worker(node_id, i, ready_at) for i in range(self.nproc_per_node)]
        for worker in self.nodes[node_id]:
            worker.pulse = pulse
        return node_id

    def started(self, node_id: str) -> None:
        """Finish starting the workers of a node added with a long `start_s`."""
        for worker in self.nodes[node_id]:
            worker.ready_at = min(worker.ready_at, self.clock())

    def remove_node(self, node_id: str) -> None:
        """The node is lost: its workers die, those in the round report DIED."""
        for worker in self.nodes.pop(node_id):
            self._kill_worker(worker, report="node died")

    def drain_node(self, node_id: str, deadline_in_s: float | None = None) -> None:
        """Ray starts draining the node: its workers keep running; it is not chosen again."""
        deadline = None if deadline_in_s is None else self.clock() + deadline_in_s
        self.draining[node_id] = DrainNotice(node_id, deadline)

    def withdraw_drain(self, node_id: str) -> None:
        """The drain notice is gone while the node stays."""
        self.draining.pop(node_id, None)

    def finish(self, worker_id: str, value: Any = None) -> None:
        """train_fn returned `value`."""
        self._settle(worker_id, OutcomeKind.DONE, value=value)

    def fail(self, worker_id: str, message: str = "boom", communication: bool = False, step: int | None = None,
             unrecoverable: bool = False) -> None:
        """train_fn raised; `communication=True` for a collective that lost a peer, `unrecoverable=True` for an
        error no restart can mend (the newest commit lost)."""
        traceback = f"Traceback (most recent call last):\n  File \"train.py\"\nRuntimeError: {message}\n"
        self._settle(worker_id, OutcomeKind.FAILED, message=message, traceback=traceback,
                     communication=communication, step=step, unrecoverable=unrecoverable)

    def die(self, worker_id: str) -> None:
        """The worker's process is gone (its node stays)."""
        self._kill_worker(self.workers[worker_id], report="worker process died")

    def hang(self, worker_id: str) -> None:
        """The worker freezes (SIGSTOP): it answers no probe, nor its native pulse, and never leaves the round."""
        self.workers[worker_id].hung = True

    def freeze_node(self, node_id: str) -> None:
        """Every worker of the node freezes at once (its raylet too: nothing answers)."""
        for worker in self.nodes[node_id]:
            worker.hung = True

    def stall(self, worker_id: str, stack: str = "") -> None:
        """The worker is stuck in user code: it answers probes but makes no progress and never leaves."""
        self.workers[worker_id].stalled = True
        self.workers[worker_id].stack = stack

    def hold_gil(self, worker_id: str, holding: bool = True) -> None:
        """The worker is in a long call that holds the GIL: probes go unanswered, its native pulse answers."""
        self.workers[worker_id].gil = holding

    def release(self, worker_id: str) -> None:
        """A stalled or GIL-holding worker moves again; if its round was aborted meanwhile, it leaves it now."""
        worker = self.workers[worker_id]
        worker.stalled = worker.gil = False
        worker.busy = ""
        if self._in_round(worker) and any(r == self.round_id and worker_id in ids for r, ids in self.aborts):
            self._settle(worker_id, OutcomeKind.ABORTED)

    def vanish(self, worker_id: str) -> None:
        """The worker's process is gone, but nothing reports it (as when Ray has not noticed yet)."""
        self.workers[worker_id].status = "dead"

    def set_busy(self, worker_id: str, what: str) -> None:
        """The worker's probe answers say it is busy with `what` ("" when done)."""
        self.workers[worker_id].busy = what

    def progress(self, worker_id: str, step: int | None = None, metrics: dict[str, Any] | None = None) -> None:
        """The worker committed or reported; `metrics` is a report its next probe answer carries."""
        worker = self.workers[worker_id]
        worker.progress += 1
        if step is not None:
            worker.step = step
        if metrics is not None:
            worker.reports = worker.reports or []
            worker.reports.append((time.time(), dict(metrics)))

    def stop(self, worker_id: str) -> None:
        """The worker left the round at a commit (as after `request_stop`)."""
        self._settle(worker_id, OutcomeKind.STOPPED)

    def member(self, rank: int) -> str:
        """Worker id at `rank` in the latest round."""
        return self.members[rank]

    # -- helpers -------------------------------------------------------------------------------------
    def _new_worker(self, node_id: str, local_rank: int, ready_at: float) -> FakeWorker:
        base = worker_id = f"{node_id}/{local_rank}"
        replacement = 0
        while worker_id in self.workers:  # replacements: node-0001/0~1, ~2, ...
            replacement += 1
            worker_id = f"{base}~{replacement}"
        worker = FakeWorker(worker_id, node_id, local_rank, ready_at)
        self.workers[worker_id] = worker
        return worker

    def _in_round(self, worker: FakeWorker) -> bool:
        return worker.status == "busy" and not worker.queued

    def _settle(self, worker_id: str, kind: OutcomeKind, **fields: Any) -> None:
        worker = self.workers[worker_id]
        if not self._in_round(worker):
            raise RuntimeError(f"{worker_id} is not in round {self.round_id} (status {worker.status})")
        fields.setdefault("step", worker.step)
        self._outcomes.append(WorkerOutcome(worker_id, self.round_id, kind, **fields))
        worker.queued = True

    def _kill_worker(self, worker: FakeWorker, report: str | None) -> None:
        if report is not None and self._in_round(worker):
            self._outcomes.append(
                WorkerOutcome(worker.worker_id, self.round_id, OutcomeKind.DIED, message=report, step=worker.step)
            )
        worker.status = "dead"

    def _is_ready(self, worker: FakeWorker, now: float) -> bool:
        return worker.status == "ready" and now >= worker.ready_at

    # -- WorkerGroup -----------------------------------------------------------------------------------
    def refresh(self, now: float) -> int:
        """Start a replacement for every dead worker of a node that is still there (unless held back)."""
        self.refreshes += 1
        started = 0
        for node_id, workers in self.nodes.items():
            for index, worker in enumerate(workers):
                if not self.holding_new and worker.status == "dead" and node_id not in self.draining:
                    workers[index] = self._new_worker(node_id, index, now + self.replace_s)
                    self.replacements_started.append((workers[index].worker_id, now))
                    started += 1
        return started

    def hold_new_workers(self, hold: bool) -> None:
        self.holding_new = hold

    def ready_groups(self) -> list[NodeGroup]:
        now = self.clock()
        return [
            NodeGroup(node_id, tuple(w.worker_id for w in workers))
            for node_id, workers in self.nodes.items()
            if all(w.status == "ready" and now >= w.ready_at for w in workers) and node_id not in self.draining
        ]

    def pending_count(self) -> int:
        now = self.clock()
        starting = (any(w.status == "ready" and now < w.ready_at for w in workers) for workers in self.nodes.values())
        return sum(starting)

    def drains(self, now: float) -> dict[str, DrainNotice]:
        return self.draining

    def drained_groups(self) -> list[NodeGroup]:
        now = self.clock()
        return [
            NodeGroup(node_id, tuple(w.worker_id for w in workers))
            for node_id, workers in self.nodes.items()
            if node_id in self.draining and all(self._is_ready(w, now) for w in workers)
        ]

    def hand_over(self, source: str, target: str, timeout_s: float) -> bool:
        now = self.clock()
        if not (self._is_ready(self.workers[source], now) and self._is_ready(self.workers[target], now)):
            return False
        self.handovers.append((source, target))
        return True

    def hand_over_shards(self, source: str, keepers: list[str], timeout_s: float) -> tuple[str, list[int]] | None:
        self.shard_handover_asks.append(source)
        shards = self.shards_held.get(source)
        if not shards or self.workers[source].gil:  # a GIL holder cannot export: the ask times out
            return None
        for keeper in keepers:
            worker = self.workers.get(keeper)
            if worker is not None and worker.status != "dead" and not self._in_round(worker):
                self.shard_handovers.append((source, keeper, list(shards)))
                return keeper, list(shards)
        return None

    def start_round(self, plan: RoundPlan) -> None:
        now = self.clock()
        for worker_id in plan.worker_ids:
            worker = self.workers.get(worker_id)
            if worker is None or not self._is_ready(worker, now):
                raise RuntimeError(f"worker {worker_id} of round {plan.round_id} is not ready")
        self.plans.append(plan)
        self.round_id = plan.round_id
        self.members = plan.worker_ids
        self._outcomes.clear()
        for worker_id in self.members:
            self.workers[worker_id].status = "busy"

    def wait(self, timeout_s: float) -> list[WorkerOutcome]:
        if not self._outcomes:
            if isinstance(self.clock, FakeClock):
                self.clock.advance(timeout_s)
            else:
                time.sleep(timeout_s)
            return []
        arrived, self._outcomes = self._outcomes, []
        for outcome in arrived:
            worker = self.workers[outcome.worker_id]
            worker.queued = False
            if worker.status == "busy":
                worker.status = "ready"
        return arrived

    def probe(self, round_id: int) -> list[Heartbeat]:
        if round_id != self.round_id:
            return []
        beats = []
        for worker_id in self.members:
            worker = self.workers[worker_id]
            if worker.status == "busy" and not worker.hung and not worker.gil:
                beats.append(Heartbeat(worker_id, round_id, worker.progress, worker.step, worker.reports or [],
                                       busy=worker.busy))
                worker.reports = None
        return beats

    def check_pulse(self, worker_ids: list[str], timeout_s: float) -> list[Pulse]:
        self.pulse_checks += worker_ids
        out = []
        for worker_id in worker_ids:
            worker = self.workers[worker_id]
            state = ("none" if not worker.pulse else "gone" if worker.status == "dead"
                     else "silent" if worker.hung else "alive")
            out.append(Pulse(worker_id, state))
        return out

    def stack_reports(self) -> list[StackReport]:
        reports, self._stack_reports = self._stack_reports, []
        return reports

    def outside_stacks(self, worker_ids: list[str]) -> dict[str, StackReport]:
        """py-spy's view of a GIL holder: its stack under a thread marked as holding the GIL."""
        return {w: StackReport(w, self.round_id, 1000 + i, f'Thread {1000 + i} (active+gil): "Dummy-1"\n'
                               + self.workers[w].stack, note="read from outside")
                for i, w in enumerate(worker_ids) if self.workers[w].gil}

    def current_stacks(self, worker_ids: list[str], timeout_s: float) -> dict[str, StackReport]:
        return {w: StackReport(w, self.round_id, 1000 + i, self.workers[w].stack) for i, w in enumerate(worker_ids)
                if self.workers[w].status != "dead" and not self.workers[w].hung and not self.workers[w].gil}

    def request_stop(self, round_id: int) -> None:
        self.stops.append(round_id)
        if self.stop_on_request and round_id == self.round_id:
            for worker_id in self.members:
                worker = self.workers[worker_id]
                if self._in_round(worker) and not worker.hung:
                    self.stop(worker_id)

    def abort(self, round_id: int, worker_ids: list[str], diagnose: bool = False) -> None:
        self.aborts.append((round_id, list(worker_ids)))
        if round_id != self.round_id:
            return
        for worker_id in worker_ids:
            worker = self.workers[worker_id]
            if self._in_round(worker) and not worker.hung and not worker.gil:
                # A stalled rank has issued one collective fewer than the others, who wait in the next one.
                seq = 6 if worker.stalled else 7
                self._stack_reports.append(StackReport(worker_id, round_id, 1000 + len(self.workers), worker.stack,
                                                       "gloo:all_reduce", collective_seq=seq))
        if self.settle_on_abort:
            for worker_id in worker_ids:
                worker = self.workers[worker_id]
                if self._in_round(worker) and not (worker.hung or worker.stalled or worker.gil):
                    self._settle(worker_id, OutcomeKind.ABORTED)

    def kill(self, worker_ids: list[str], reason: str) -> None:
        self.kills.append((list(worker_ids), reason))
        killed = set(worker_ids)
        self._outcomes = [o for o in self._outcomes if o.worker_id not in killed]
        for worker_id in worker_ids:
            worker = self.workers[worker_id]
            worker.queued = False
            self._kill_worker(worker, report=None)

    def shutdown(self) -> None:
        self.shut_down = True
        for worker in self.workers.values():
            worker.status = "dead"
