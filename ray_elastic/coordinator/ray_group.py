"""`WorkerGroup` on Ray: one pinned placement group per node, one threaded actor per slot.

Runs inside the coordinator actor. Detection is by outstanding calls: every
member has a `run_round` call in flight, and a dead actor fails it at once.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import wait as wait_futures
from dataclasses import dataclass, field
from typing import Any

import ray
from ray.autoscaler.sdk import request_resources
from ray.exceptions import RayActorError, RayError
from ray.util.placement_group import PlacementGroup, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from ray_elastic.config import RunConfig
from ray_elastic.coordinator.drain import DrainNotice, read_draining_nodes
from ray_elastic.coordinator.group import WorkerGroup
from ray_elastic.coordinator.outside_stacks import read_from_outside
from ray_elastic.coordinator.types import (
    Heartbeat,
    NodeGroup,
    OutcomeKind,
    Pulse,
    RoundPlan,
    RoundSpec,
    StackReport,
    WorkerOutcome,
)
from ray_elastic.netbind import listen_host, round_secret
from ray_elastic.placement import cluster_nodes, fits, pinned_group
from ray_elastic.pulse import NONE, ping
from ray_elastic.store import RoundStore
from ray_elastic.worker.actor import ElasticWorker

logger = logging.getLogger("ray_elastic")

STARTING, READY, BUSY, DEAD = "starting", "ready", "busy", "dead"
# How long `check_pulse` waits for the checks it just started: a refused or answered one takes a millisecond.
PULSE_GRACE_S = 0.05
STACKS_FIRST_S = 0.5  # how long an abort for a diagnosis waits for stacks read before any rank is severed
# A node group not placed within PLACEMENT_PATIENCE_S (its node is taken, e.g. by another run) is
# moved to a node that could hold it; the node passed over is not tried again for PASSED_OVER_S.
PLACEMENT_PATIENCE_S = 5.0
PASSED_OVER_S = 10.0


def _gpu_order(gpu_id: str) -> tuple[int, str]:
    return (int(gpu_id), "") if gpu_id.isdigit() else (1 << 30, gpu_id)


@dataclass
class _Slot:
    worker_id: str
    local_rank: int
    actor: Any
    ready_ref: Any
    status: str = STARTING
    pid: int | None = None
    gpu_ids: tuple[str, ...] = ()
    pulse: tuple[str, int] | None = None  # address of its native liveness server (see ray_elastic.pulse)


@dataclass
class _Node:
    node_id: str
    pg: PlacementGroup
    pg_ready: Any
    placed: bool = False
    slots: list[_Slot | None] = field(default_factory=list)
    generation: int = 0
    created: float = 0.0
    ip: str = ""  # the node IP Ray reports


class RayWorkerGroup(WorkerGroup):
    """Places, starts, drives and kills the run's worker actors.

    Args:
        config: the run's configuration.
        train_fn: the user's function (already unpickled here).
        train_config: the value handed to train_fn.
        store_host: address of this (the coordinator's) node, where round stores listen.
        checkpointer: optional durable checkpointer handed to each worker.
    """

    def __init__(self, config: RunConfig, train_fn: Any, train_config: Any, store_host: str, checkpointer: Any = None):
        self.config = config
        self.train_fn = train_fn
        self.train_config = train_config
        self.store_host = store_host
        self.checkpointer = checkpointer
        self.nodes: dict[str, _Node] = {}
        self.store: RoundStore | None = None
        self.round_id = -1
        self._round_refs: dict[Any, str] = {}
        self._probe_refs: dict[Any, str] = {}
        self._members: list[str] = []
        self._worker_cls = ray.remote(ElasticWorker)
        self._pids: set[int] = set()
        self._slots: dict[str, _Slot] = {}  # every slot ever started, by worker id
        self._demand = 0
        self._passed_over: dict[str, float] = {}  # node id -> when a group pending there was moved
        self._acked: dict[str, int] = {}  # worker id -> highest report sequence number passed on
        self._drains: dict[str, DrainNotice] = {}  # nodes Ray is draining (see coordinator/drain.py)
        self._drains_polled = float("-inf")
        self._slot_seq = 0
        self._hold_new = False  # start no worker processes (see hold_new_workers)
        self._pulse_pool: ThreadPoolExecutor | None = None
        self._pulses: dict[str, Future[str]] = {}  # worker id -> native check in flight
        self._abort_refs: dict[Any, str] = {}  # abort calls whose answers (stacks) are still to collect
        self._early_stacks: list[StackReport] = []  # read just before an abort for a diagnosis, not yet passed on
        self._read_first: set[str] = set()  # workers of this round whose stack was read before the abort

    # -- lookup --------------------------------------------------------------------------------
    def _slot(self, worker_id: str) -> _Slot | None:
        return self._slots.get(worker_id)

    # -- nodes ---------------------------------------------------------------------------------
    def refresh(self, now: float) -> int:
        infos = {n.node_id: n for n in cluster_nodes()}
        for node_id in list(self.nodes):
            info = infos.get(node_id)
            if info is None or not info.alive:
                self._drop_node(node_id)
        free = [  # nodes that could hold a node group of this run, not passed over lately
            node_id for node_id, info in sorted(infos.items())
            if node_id not in self.nodes and info.alive and node_id not in self._drains
            and now - self._passed_over.get(node_id, float("-inf")) >= PASSED_OVER_S
            and fits(info.resources, self.config.bundle, self.config.nproc_per_node)
        ]
        stuck = [n.node_id for n in self.nodes.values() if not n.placed and now - n.created >= PLACEMENT_PATIENCE_S]
        for node_id in stuck[:len(free)]:
            logger.info("node group on %s not placed after %gs; trying another node", node_id[:12],
                        PLACEMENT_PATIENCE_S)
            self._drop_node(node_id)
            self._passed_over[node_id] = now
        staying = sum(1 for n in self.nodes if n not in self._drains)  # drained ones are on their way out
        for node_id in free[:max(0, self.config.max_nodes - staying)]:
            pg = pinned_group(node_id, self.config.bundle, self.config.nproc_per_node,
                              name=f"ray_elastic-{self.config.run_id}-{node_id}")
            self.nodes[node_id] = _Node(node_id, pg, pg.ready(), slots=[None] * self.config.nproc_per_node,
                                        created=now, ip=infos[node_id].address)
        self._release_drained()
        staying = sum(1 for n in self.nodes if n not in self._drains)
        self._express_demand(self.config.max_nodes if staying < self.config.max_nodes else 0)
        return self._advance_startups()

    def drains(self, now: float) -> dict[str, DrainNotice]:
        if now - self._drains_polled >= self.config.drain_poll_interval_s:
            self._drains_polled = now
            polled = read_draining_nodes(now)
            if polled is not None:
                self._drains = polled
            self._release_drained()
        return self._drains

    def _release_drained(self) -> None:
        """Let drained nodes go: drop every drained node group with no worker in a round or kept idle
        (the controller keeps idle ones that may hold the last commit, and kills them when done)."""
        for node_id in [n for n in self.nodes if n in self._drains]:
            if not any(s is not None and s.status in (BUSY, READY) for s in self.nodes[node_id].slots):
                logger.info("releasing drained node %s", node_id[:12])
                self._drop_node(node_id)

    def drained_groups(self) -> list[NodeGroup]:
        return [
            NodeGroup(node.node_id, tuple(s.worker_id for s in node.slots if s is not None))
            for node in self.nodes.values()
            if node.node_id in self._drains and all(s is not None and s.status == READY for s in node.slots)
        ]

    def hand_over(self, source: str, target: str, timeout_s: float) -> bool:
        src, dst = self._slot(source), self._slot(target)
        if src is None or dst is None or src.status != READY or dst.status != READY:
            return False
        try:  # the payload goes from one worker to the other through the object store, not through here
            held = ray.get(dst.actor.import_snapshot.remote(src.actor.export_snapshot.remote()), timeout=timeout_s)
        except (RayError, ray.exceptions.GetTimeoutError):
            logger.warning("handing the snapshot of %s over to %s failed", source, target, exc_info=True)
            return False
        return bool(held >= 0)

    def hand_over_shards(self, source: str, keepers: list[str], timeout_s: float) -> tuple[str, list[int]] | None:
        src = self._slot(source)
        if src is None or src.status == DEAD:  # BUSY: still in its round, which is the point
            return None
        held = src.actor.export_shards.remote()  # stays in the object store: keepers fetch it, not the coordinator
        deadline = time.monotonic() + timeout_s
        for keeper in keepers:
            dst = self._slot(keeper)
            if dst is None or dst.status != READY:
                continue
            try:
                kept = ray.get(dst.actor.adopt_shards.remote(held), timeout=max(0.1, deadline - time.monotonic()))
            except ray.exceptions.GetTimeoutError:
                logger.warning("handing the shards of %s over to %s took longer than %ss", source, keeper, timeout_s)
                return None
            except RayError:  # the keeper (or the source, while exporting) is gone: try the next keeper
                logger.warning("handing the shards of %s over to %s failed", source, keeper, exc_info=True)
                continue
            if kept is None:  # nothing was offered: no sharded state
                return None
            if kept:
                return keeper, kept
        return None

    def _express_demand(self, wanted: int) -> None:
        """Ask the autoscaler (if any) for room for `wanted` node groups; a no-op on fixed clusters.

        One bundle per node group (all its workers' resources), as a group must fit on one node.
        """
        if wanted == self._demand:
            return
        self._demand = wanted
        group = {name: amount * self.config.nproc_per_node for name, amount in self.config.bundle.items()}
        bundles = [group] * wanted
        try:
            request_resources(bundles=bundles)
        except Exception:  # noqa: BLE001 - demand is advisory
            logger.debug("request_resources failed", exc_info=True)

    def hold_new_workers(self, hold: bool) -> None:
        self._hold_new = hold

    def _advance_startups(self) -> int:
        """Note placed node groups and workers done starting; start workers in empty or dead slots (unless
        held back); return how many were started."""
        started = 0
        for node in self.nodes.values():
            if node.node_id in self._drains:  # no new workers on a node that is going away
                continue
            if not node.placed:
                ready, _ = ray.wait([node.pg_ready], timeout=0)
                if not ready:
                    continue
                node.placed = True
            for index, slot in enumerate(node.slots):
                if not self._hold_new and (slot is None or slot.status == DEAD):
                    node.slots[index] = self._start_slot(node, index)
                    started += 1
            starting = {s.ready_ref: s for s in node.slots if s is not None and s.status == STARTING}
            if starting:
                done, _ = ray.wait(list(starting), num_returns=len(starting), timeout=0)
                for ref in done:
                    slot = starting[ref]
                    try:
                        info = ray.get(ref)
                        slot.pid = info["pid"]
                        slot.gpu_ids = tuple(info["gpu_ids"])
                        slot.pulse = tuple(info["pulse"]) if info.get("pulse") else None  # type: ignore[assignment]
                        self._pids.add(info["pid"])
                        slot.status = READY
                    except RayError:
                        logger.warning("worker %s failed to start", slot.worker_id, exc_info=True)
                        slot.status = DEAD
        return started

    def _start_slot(self, node: _Node, index: int) -> _Slot:
        # Numbered across the whole group: node ids may share their first characters (the autoscaler's
        # fake provider numbers them at the end), and a node may leave and come back.
        node.generation += 1
        self._slot_seq += 1
        worker_id = f"{node.node_id[:8]}-{index}-{self._slot_seq}"
        options: dict[str, Any] = {  # no runtime_env: see RunConfig.omp_num_threads
            "max_concurrency": 4,
            "num_cpus": self.config.bundle.get("CPU", 0),
            "resources": {k: v for k, v in self.config.bundle.items() if k not in ("CPU", "GPU")},
            "scheduling_strategy": PlacementGroupSchedulingStrategy(node.pg, placement_group_bundle_index=index),
        }
        if self.config.bundle.get("GPU"):
            options["num_gpus"] = self.config.bundle["GPU"]
        actor: Any = self._worker_cls.options(**options).remote(
            self.config, self.train_fn, self.train_config, worker_id, node.node_id, self.checkpointer,
            prober_ip=self.store_host,
        )
        slot = _Slot(worker_id, index, actor, actor.ready.remote())
        self._slots[worker_id] = slot
        return slot

    def _drop_node(self, node_id: str) -> None:
        node = self.nodes.pop(node_id)
        for slot in node.slots:
            if slot is not None and slot.status != DEAD:
                ray.kill(slot.actor, no_restart=True)
                slot.status = DEAD
        try:
            remove_placement_group(node.pg)
        except Exception:  # noqa: BLE001 - the node may already be gone
            logger.debug("remove_placement_group failed", exc_info=True)

    def ready_groups(self) -> list[NodeGroup]:
        return [
            NodeGroup(node.node_id, tuple(s.worker_id for s in node.slots if s is not None))
            for node in self.nodes.values()
            if node.placed and all(s is not None and s.status == READY for s in node.slots)
            and node.node_id not in self._drains
        ]

    def pending_count(self) -> int:
        return sum(
            1 for node in self.nodes.values()
            if (not node.placed or any(s is None or s.status == STARTING for s in node.slots))
            and node.node_id not in self._drains
        )

    # -- rounds --------------------------------------------------------------------------------
    def start_round(self, plan: RoundPlan) -> None:
        if self.store is not None:
            self.store.close()
        assignments = plan.assignments()
        worker_ips = [self.nodes[a.node_id].ip if a.node_id in self.nodes else "" for a in assignments]
        self.store = RoundStore(listen_host(self.store_host, worker_ips), port=self.config.store_port)
        secret = round_secret()  # every key of the round lives under it; it travels only in Ray calls
        self.round_id = plan.round_id
        self._round_refs.clear()
        self._probe_refs.clear()
        self._abort_refs.clear()
        self._early_stacks.clear()
        self._read_first.clear()
        self._acked.clear()  # reports are numbered per round
        self._members = plan.worker_ids
        for a, ip in zip(assignments, worker_ips):
            slot = self._slot(a.worker_id)
            node = self.nodes.get(a.node_id)
            if slot is None or node is None:
                raise RuntimeError(f"worker {a.worker_id} of round {plan.round_id} is unknown")
            slot.status = BUSY
            node_gpus = sorted({g for s in node.slots if s is not None for g in s.gpu_ids}, key=_gpu_order)
            spec = RoundSpec(a, plan.round_id, plan.restart_count, self.store.host, self.store.port,
                             self.config.max_restarts, tuple(node_gpus), slot.gpu_ids, store_prefix=secret,
                             bind_host=listen_host(ip, worker_ips) if ip else "")
            self._round_refs[slot.actor.run_round.remote(spec)] = a.worker_id

    def wait(self, timeout_s: float) -> list[WorkerOutcome]:
        watched = list(self._round_refs)
        watched += [s.ready_ref for n in self.nodes.values() for s in n.slots if s is not None and s.status == STARTING]
        watched += [n.pg_ready for n in self.nodes.values() if not n.placed]
        if not watched:
            time.sleep(timeout_s)
            return []
        ray.wait(watched, num_returns=1, timeout=timeout_s)
        self._advance_startups()  # a group placed or a worker ready: act now, not at the next node poll
        pending = list(self._round_refs)
        done = ray.wait(pending, num_returns=len(pending), timeout=0)[0] if pending else []
        outcomes = []
        for ref in done:
            worker_id = self._round_refs.pop(ref)
            slot = self._slot(worker_id)
            try:
                outcome: WorkerOutcome = ray.get(ref)
            except RayActorError as exc:
                outcome = WorkerOutcome(worker_id, self.round_id, OutcomeKind.DIED,
                                        message=f"worker process died: {str(exc).splitlines()[0]}")
            except RayError as exc:
                outcome = WorkerOutcome(worker_id, self.round_id, OutcomeKind.DIED, message=str(exc)[:500])
            if slot is not None:
                slot.status = DEAD if outcome.kind is OutcomeKind.DIED else READY
            outcomes.append(self._new_reports_only(outcome))
        return outcomes

    def probe(self, round_id: int) -> list[Heartbeat]:
        beats = []
        if self._probe_refs:
            done, _ = ray.wait(list(self._probe_refs), num_returns=len(self._probe_refs), timeout=0)
            for ref in done:
                self._probe_refs.pop(ref)
                try:
                    beats.append(ray.get(ref))
                except RayError:
                    pass
        outstanding = set(self._probe_refs.values())
        for worker_id in self._members:
            slot = self._slot(worker_id)
            if slot is not None and slot.status == BUSY and worker_id not in outstanding:
                acked = self._acked.get(worker_id, -1)
                self._probe_refs[slot.actor.probe.remote(round_id, acked)] = worker_id
        return [self._new_reports_only(beat) for beat in beats]

    def _new_reports_only(self, answer: Any) -> Any:
        """Drop reports already passed on (answers overlap until acknowledged); advance the ack."""
        seen = self._acked.get(answer.worker_id, -1)
        skip = max(0, seen + 1 - answer.first_seq)
        if answer.reports:
            self._acked[answer.worker_id] = max(seen, answer.first_seq + len(answer.reports) - 1)
        return dataclasses.replace(answer, reports=answer.reports[skip:], first_seq=answer.first_seq + skip)

    def request_stop(self, round_id: int) -> None:
        for worker_id in self._members:
            slot = self._slot(worker_id)
            if slot is not None and slot.status == BUSY:
                slot.actor.request_stop.remote(round_id)

    def abort(self, round_id: int, worker_ids: list[str], diagnose: bool = False) -> None:
        slots = [(w, s) for w in worker_ids if (s := self._slot(w)) is not None and s.status != DEAD]
        if diagnose:
            self._read_stacks_first(round_id, slots)
        if round_id == self.round_id and self.store is not None:
            # Ranks still forming the group wait on the store: closing it frees them.
            self.store.close()
            self.store = None
        for worker_id, slot in slots:
            read = worker_id in self._read_first
            self._abort_refs[slot.actor.abort.remote(round_id, diagnose and not read)] = worker_id

    def _read_stacks_first(self, round_id: int, slots: list[tuple[str, _Slot]]) -> None:
        """Every stack before any rank is severed: a severed peer's collective fails at once, and its
        training thread would leave the user's frames before its own abort could read them. Workers that
        do not answer within STACKS_FIRST_S (a GIL-holding loop), and scripts (read with py-spy, slower),
        answer in their abort."""
        for report in _read_stacks(slots, STACKS_FIRST_S):
            if report.round_id == round_id and report.stack:
                self._early_stacks.append(report)
                self._read_first.add(report.worker_id)

    def current_stacks(self, worker_ids: list[str], timeout_s: float) -> dict[str, StackReport]:
        slots = [(w, s) for w in worker_ids if (s := self._slot(w)) is not None and s.status != DEAD]
        return {report.worker_id: report for report in _read_stacks(slots, timeout_s)}

    def outside_stacks(self, worker_ids: list[str]) -> dict[str, StackReport]:
        return read_from_outside(self._node_and_pid(worker_ids), self.round_id)

    def _node_and_pid(self, worker_ids: list[str]) -> dict[str, tuple[str, int]]:
        """Where each of these workers' processes runs: worker id -> (node id, pid)."""
        node_of = {s.worker_id: n.node_id for n in list(self.nodes.values()) for s in list(n.slots) if s is not None}
        return {w: (node_of.get(w, ""), slot.pid or -1) for w in worker_ids if (slot := self._slot(w)) is not None}

    def stack_reports(self) -> list[StackReport]:
        reports, self._early_stacks = self._early_stacks, []
        if not self._abort_refs:
            return reports
        done, _ = ray.wait(list(self._abort_refs), num_returns=len(self._abort_refs), timeout=0)
        for ref in done:
            worker_id = self._abort_refs.pop(ref)
            try:
                report = ray.get(ref)
            except RayError:
                continue
            if report is not None and worker_id not in self._read_first:  # the stack read first is kept
                reports.append(report)
        return reports

    def check_pulse(self, worker_ids: list[str], timeout_s: float) -> list[Pulse]:
        answers = []
        started = []
        for worker_id in worker_ids:
            slot = self._slot(worker_id)
            if worker_id in self._pulses or slot is None or slot.status == DEAD:
                continue
            if slot.pulse is None:
                answers.append(Pulse(worker_id, NONE))
                continue
            if self._pulse_pool is None:
                self._pulse_pool = ThreadPoolExecutor(max_workers=8, thread_name_prefix="ray_elastic-pulse")
            self._pulses[worker_id] = self._pulse_pool.submit(ping, *slot.pulse, timeout_s)
            started.append(self._pulses[worker_id])
        if started:
            wait_futures(started, timeout=PULSE_GRACE_S)
        for worker_id, future in list(self._pulses.items()):
            if future.done():
                del self._pulses[worker_id]
                answers.append(Pulse(worker_id, future.result()))
        return answers

    def collect_stacks(self, timeout_s: float) -> list[tuple[StackReport, str]]:
        """(stack, node id) of every live worker; safe beside the controller's thread (reads copies). A worker
        whose Python does not answer while its native pulse does is read from outside (`outside_stacks`)."""
        slots = [s for s in list(self._slots.values()) if s.status in (READY, BUSY)]
        where = self._node_and_pid([s.worker_id for s in slots])
        refs = {slot.actor.stacks.remote(): slot for slot in slots}
        done, _ = ray.wait(list(refs), num_returns=len(refs), timeout=timeout_s) if refs else ([], [])
        reports: dict[str, StackReport] = {}
        holding_gil = []
        for ref, slot in refs.items():
            if ref in done:
                try:
                    reports[slot.worker_id] = ray.get(ref)
                    continue
                except RayError as exc:
                    note = f"its process is gone ({str(exc).splitlines()[0][:200]})"
            else:
                state = ping(*slot.pulse, 1.0) if slot.pulse else NONE
                note = f"no answer within {timeout_s:g}s; native pulse: {state}" + (
                    " (busy in a call that holds the GIL)" if state == "alive" else " (frozen, or cut off)")
                if state == "alive":
                    holding_gil.append(slot.worker_id)
            reports[slot.worker_id] = StackReport(slot.worker_id, -1, slot.pid or -1, "", note=note)
        for worker_id, read in self.outside_stacks(holding_gil).items():
            reports[worker_id] = dataclasses.replace(read, note=f"{reports[worker_id].note}; {read.note}")
        return [(r, where[w][0]) for w, r in reports.items()]

    def kill(self, worker_ids: list[str], reason: str) -> None:
        killed = set()
        for worker_id in worker_ids:
            slot = self._slot(worker_id)
            if slot is None:
                continue
            logger.info("killing worker %s: %s", worker_id, reason)
            if slot.status != DEAD:
                ray.kill(slot.actor, no_restart=True)
            slot.status = DEAD
            killed.add(worker_id)
        # Their round calls will fail with the kill; the controller already has their outcome. A probe
        # answered by a killed worker that wakes up later must not pass on its reports either.
        self._round_refs = {ref: w for ref, w in self._round_refs.items() if w not in killed}
        self._probe_refs = {ref: w for ref, w in self._probe_refs.items() if w not in killed}

    def worker_pids(self) -> list[int]:
        return sorted(self._pids)

    def shutdown(self) -> None:
        if self._round_refs:  # an aborted run: members leave their round first (the CLI's scripts: their grace)
            ray.wait(list(self._round_refs), num_returns=len(self._round_refs), timeout=self.config.abort_timeout_s)
        for node_id in list(self.nodes):
            self._drop_node(node_id)
        self._express_demand(0)
        if self.store is not None:
            self.store.close()
            self.store = None
        if self._pulse_pool is not None:
            self._pulse_pool.shutdown(wait=False, cancel_futures=True)
            self._pulse_pool = None


def _read_stacks(slots: list[tuple[str, Any]], timeout_s: float) -> list[StackReport]:
    """The answers of these workers' `stacks()` (scripts not read with py-spy) that came within `timeout_s`."""
    refs = [slot.actor.stacks.remote(False) for _, slot in slots]
    done, _ = ray.wait(refs, num_returns=len(refs), timeout=timeout_s) if refs else ([], [])
    reports = []
    for ref in done:
        try:
            reports.append(ray.get(ref))
        except RayError:
            continue
    return reports
