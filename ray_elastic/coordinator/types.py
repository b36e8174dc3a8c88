"""Values passed between the coordinator, its worker group and the workers."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class NodeGroup:
    """The workers of one node, ordered by local rank."""

    node_id: str
    workers: tuple[str, ...]


@dataclass(frozen=True)
class Assignment:
    """One worker's place in a round."""

    worker_id: str
    node_id: str
    rank: int
    local_rank: int
    world_size: int
    local_world_size: int
    node_rank: int
    num_nodes: int


@dataclass(frozen=True)
class RoundPlan:
    """Who takes part in a round, in rank order."""

    round_id: int
    restart_count: int
    groups: tuple[NodeGroup, ...]

    @property
    def world_size(self) -> int:
        return sum(len(g.workers) for g in self.groups)

    @property
    def worker_ids(self) -> list[str]:
        return [w for g in self.groups for w in g.workers]

    def assignments(self) -> list[Assignment]:
        out = []
        rank = 0
        world_size = self.world_size
        for node_rank, group in enumerate(self.groups):
            for local_rank, worker_id in enumerate(group.workers):
                out.append(
                    Assignment(
                        worker_id=worker_id,
                        node_id=group.node_id,
                        rank=rank,
                        local_rank=local_rank,
                        world_size=world_size,
                        local_world_size=len(group.workers),
                        node_rank=node_rank,
                        num_nodes=len(self.groups),
                    )
                )
                rank += 1
        return out


@dataclass(frozen=True)
class RoundSpec:
    """What a worker needs to join a round."""

    assignment: Assignment
    round_id: int
    restart_count: int
    store_host: str
    store_port: int
    max_restarts: int
    node_gpu_ids: tuple[str, ...] = ()  # GPUs of every worker of this node group, for CUDA_VISIBLE_DEVICES
    gpu_ids: tuple[str, ...] = ()  # this worker's own GPUs, as Ray assigned them
    # The round's secret store-key prefix: handed over through Ray only, never logged or put in an environment.
    store_prefix: str = field(default="", repr=False)
    bind_host: str = ""  # where this worker's listeners (gloo) bind: its node IP, or loopback on a one-machine round


class OutcomeKind(str, enum.Enum):
    DONE = "done"  # train_fn returned
    STOPPED = "stopped"  # left at a commit for a membership change
    ABORTED = "aborted"  # the coordinator aborted the round
    FAILED = "failed"  # train_fn raised
    DIED = "died"  # the process or its node went away
    HUNG = "hung"  # killed for not answering or not settling
    SILENT = "silent"  # answered neither probes nor its native pulse: frozen, or its node cut off


@dataclass(frozen=True)
class WorkerOutcome:
    """How one worker's part in a round ended."""

    worker_id: str
    round_id: int
    kind: OutcomeKind
    value: Any = None
    message: str = ""
    traceback: str = ""
    communication: bool = False  # the exception came from a collective losing a peer
    unrecoverable: bool = False  # a restart would fail the same way (the newest commit is lost: SnapshotLostError)
    step: int | None = None
    reports: list[tuple[float, dict[str, Any]]] = field(default_factory=list)  # not yet acknowledged
    first_seq: int = 0  # sequence number of reports[0]
    snapshot: tuple[str, str] = ("", "")  # how this worker keeps commits, and why (SnapshotHolder.describe)

    @property
    def is_failure(self) -> bool:
        return self.kind in (OutcomeKind.FAILED, OutcomeKind.DIED, OutcomeKind.HUNG, OutcomeKind.SILENT)


@dataclass(frozen=True)
class Heartbeat:
    """A worker's answer to a liveness probe."""

    worker_id: str
    round_id: int
    progress: int
    step: int | None
    reports: list[tuple[float, dict[str, Any]]] = field(default_factory=list)
    first_seq: int = 0  # sequence number of reports[0]; reports are numbered per round
    snapshot: tuple[str, str] = ("", "")  # how this worker keeps commits, and why (SnapshotHolder.describe)
    busy: str = ""  # a known long activity in progress (e.g. "writing checkpoint 41 for 3.2s"), else ""


@dataclass(frozen=True)
class Pulse:
    """The answer of a worker's native liveness check (see `ray_elastic.pulse`).

    `state`: "alive" (its process runs), "gone" (connection refused: the process
    exited), "silent" (no answer in time: stopped, frozen, or cut off), or "none"
    (the worker has no pulse server: probes alone judge it).
    """

    worker_id: str
    state: str


@dataclass(frozen=True)
class StackReport:
    """Where a worker's training thread was, read in-process (by py-spy for a script subprocess, or from outside
    for a worker whose Python did not answer: see `outside_stacks`)."""

    worker_id: str
    round_id: int
    pid: int
    stack: str  # formatted frames, innermost last; "" if none could be read
    collective: str = ""  # the op of the last collective it issued on the default group, e.g. "gloo:all_reduce"
    note: str = ""  # why a stack is missing, or what else was seen
    collective_seq: int = -1  # how many collectives it issued on the default group (-1: unknown)
