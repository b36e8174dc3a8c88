"""The coordinator's state machine: one transition per `step()`.

States are objects carrying their payload; policies (see `policy.py`) decide,
the controller acts through its `WorkerGroup` and logs each transition with
its reason as an event.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ray_elastic.config import RunConfig
from ray_elastic.context import WORKER_EVENT
from ray_elastic.coordinator import drain, policy
from ray_elastic.coordinator.drain_steps import DrainSteps
from ray_elastic.coordinator.group import WorkerGroup
from ray_elastic.coordinator.liveness import Liveness
from ray_elastic.coordinator.silence import SilenceMixin
from ray_elastic.coordinator.types import OutcomeKind, RoundPlan, StackReport, WorkerOutcome
from ray_elastic.errors import (
    FailureInfo,
    NotEnoughNodesError,
    RunAbortedError,
    TrainingFailedError,
)
from ray_elastic.events import EventLog, RoundRecord


class State:
    name = "state"
    terminal = False


@dataclass
class Waiting(State):
    """Fewer ready nodes than needed; wait until `deadline`."""

    since: float
    deadline: float
    cause: str
    last_message: str = ""
    name = "WAITING"


@dataclass
class Forming(State):
    cause: str
    name = "FORMING"


@dataclass
class Running(State):
    plan: RoundPlan
    started: float
    outcomes: dict[str, WorkerOutcome] = field(default_factory=dict)
    last_progress: dict[str, float] = field(default_factory=dict)
    progress_count: dict[str, int] = field(default_factory=dict)
    stop_requested: bool = False
    liveness: Liveness = field(default_factory=Liveness)
    name = "RUNNING"


@dataclass
class Restarting(State):
    """A round failed: survivors are being unblocked; then the budget is charged."""

    plan: RoundPlan
    outcomes: dict[str, WorkerOutcome]
    since: float
    trigger: str
    stalled: list[str] = field(default_factory=list)  # aborted for making no progress
    announced: bool = True  # the worker_lost line is out (it waits for the first cause, see _announce)
    detected: float = 0.0  # wall time the failure was detected
    aborting: int = 0
    liveness: Liveness = field(default_factory=Liveness)
    diagnose: bool = False  # aborted for silence or a hang: name the stuck ranks with their stacks
    stacks: dict[str, StackReport] = field(default_factory=dict)
    name = "RESTARTING"


@dataclass
class Succeeded(State):
    return_values: list[Any]
    name = "SUCCEEDED"
    terminal = True


@dataclass
class Failed(State):
    error: Exception
    name = "FAILED"
    terminal = True


@dataclass
class Aborted(State):
    reason: str
    name = "ABORTED"
    terminal = True


@dataclass
class RunSummary:
    """What the driver gets back from the coordinator."""

    return_values: list[Any]
    metrics: dict[str, Any] | None
    restarts: int
    rounds: list[RoundRecord]
    events: list[Any]
    metrics_history: list[dict[str, Any]]
    worker_pids: list[int] = field(default_factory=list)
    error: Exception | None = None
    snapshot: str = ""  # how commits were kept at the end: "copy" or "live"


HISTORY_LIMIT = 10_000
_FAILURE_KIND = {"failed": "exception", "died": "died", "hung": "hang", "silent": "silent"}  # FailureInfo.kind


def thin_history(history: list[Any], limit: int) -> list[Any]:
    """Over `limit` entries, keep every other one: memory stays bounded, the whole run stays covered."""
    while len(history) > limit:
        history = history[::2]
    return history


class Controller(DrainSteps, SilenceMixin):
    """Drives a run through its states. Plain class: the coordinator actor wraps it."""

    def __init__(
        self,
        config: RunConfig,
        group: WorkerGroup,
        events: EventLog | None = None,
        clock: Callable[[], float] = time.monotonic,
        poll_s: float = 0.2,
        exporter: Any = None,
    ):
        self.config = config
        self.group = group
        self.events = events or EventLog(config.run_id, config.event_log_path)
        self.clock = clock
        self.poll_s = poll_s
        self.exporter = exporter  # metrics.MetricsExporter or None: on_event/on_failure_detected/on_reports
        now = clock()
        self.state: State = Waiting(since=now, deadline=now + config.wait_for_nodes_timeout_s, cause="start")
        self.restarts = 0
        self.next_round_id = 0
        self.previous_order: list[str] = []
        self.failures: list[FailureInfo] = []
        self.rounds: list[RoundRecord] = []
        self.metrics: dict[str, Any] | None = None
        self.metrics_history: list[dict[str, Any]] = []
        self.history_limit = HISTORY_LIMIT
        self._metrics_time = float("-inf")
        self._last_probe = float("-inf")
        self.last_step: dict[str, int | None] = {}
        self._abort_reason: str | None = None
        self._last_refresh = float("-inf")
        self._failed_at: float | None = None  # the failure whose survivors new workers wait for (`_release_starts`)
        self._ready_seen: set[str] = set()
        self._last_ready_change = now
        self.drain = drain.DrainTracker()
        self._drains: dict[str, drain.DrainNotice] = {}
        self.snapshot: tuple[str, str] | None = None  # rank 0's way of keeping commits, once decided

    # -- driving ---------------------------------------------------------------------------
    def request_abort(self, reason: str) -> None:
        """Ask the run to stop at the next step (thread-safe: a flag)."""
        self._abort_reason = reason

    def step(self) -> tuple[State, State]:
        """Make one transition; return (previous, next)."""
        previous = self.state
        now = self.clock()
        if self._abort_reason is not None and not previous.terminal:
            self.state = self._abort(previous, self._abort_reason)
        else:
            self._maybe_refresh(now)
            handler = getattr(self, f"_on_{previous.name.lower()}")
            self.state = handler(previous, now)
        return previous, self.state

    def run(self) -> RunSummary:
        try:
            while not self.state.terminal:
                self.step()
        finally:
            self.group.shutdown()
        return self.summary()

    def summary(self) -> RunSummary:
        state = self.state
        return RunSummary(
            return_values=state.return_values if isinstance(state, Succeeded) else [],
            metrics=self.metrics,
            restarts=self.restarts,
            rounds=list(self.rounds),
            events=list(self.events.events),
            metrics_history=sorted(self.metrics_history, key=lambda m: m["time"]),
            worker_pids=self.group.worker_pids(),
            error=state.error if isinstance(state, Failed) else (
                RunAbortedError(state.reason) if isinstance(state, Aborted) else None
            ),
            snapshot=self.snapshot[0] if self.snapshot else (
                "copy" if self.config.snapshot == "auto" else self.config.snapshot),
        )

    def _note_snapshot(self, plan: RoundPlan, worker_id: str, snapshot: tuple[str, str]) -> None:
        """Emit a `snapshot` event when rank 0 settles (or changes) how commits are kept."""
        mode, reason = snapshot
        if worker_id != plan.groups[0].workers[0] or mode not in ("copy", "live") or snapshot == self.snapshot:
            return
        self.snapshot = snapshot
        self._emit("snapshot", reason, mode=mode, requested=self.config.snapshot)

    # -- helpers ----------------------------------------------------------------------------
    def _emit(self, kind: str, message: str, **data: Any) -> None:
        round_id = self.next_round_id - 1
        event = self.events.emit(kind, round_id, self.state.name, message, **data)
        if self.exporter is not None:
            self.exporter.on_event(event, self.clock())

    def _maybe_refresh(self, now: float) -> None:
        self._drains = dict(self.group.drains(now))
        self._release_drained(now)
        released = self._release_starts(now)
        if released:
            self.group.hold_new_workers(False)
        if released or now - self._last_refresh >= self.config.node_poll_interval_s:
            self._last_refresh = now
            started = self.group.refresh(now)
            if released and started:
                why, waited_s = released
                self._emit("workers_started", f"{started} new worker(s) started {waited_s:.2f}s after the failure, "
                           f"once {why}", started=started, waited_s=waited_s)
        self._note_ready(now)

    def _release_starts(self, now: float) -> tuple[str, float] | None:
        """After a failure new worker processes wait, so that their start (Python, Ray, torch: seconds of CPU)
        does not slow the survivors' recovery on the node they share. When the wait ends now, say why and how
        long it was; else None.

        It ends when the survivors commit or report in their new round, when the run needs new workers to go
        on (below min_nodes), or `replacement_wait_s` after the failure.
        """
        if self._failed_at is None:
            return None
        state = self.state
        if isinstance(state, Running) and any(count > 0 for count in state.progress_count.values()):
            reason = f"the survivors made progress in round {state.plan.round_id}"
        elif isinstance(state, Waiting) or state.terminal:
            reason = "the run needs them to go on"
        elif now - self._failed_at >= self.config.replacement_wait_s:
            reason = f"replacement_wait_s={self.config.replacement_wait_s:g}s passed"
        else:
            return None
        waited_s, self._failed_at = now - self._failed_at, None
        return reason, waited_s

    def _note_ready(self, now: float) -> None:
        """Track the ready node groups outside the round (a `node_ready` event for each new one)."""
        ready = {g.node_id for g in self.group.ready_groups()} - set(self.previous_order)
        if ready - self._ready_seen:
            self._last_ready_change = now
            for node_id in sorted(ready - self._ready_seen):
                self._emit("node_ready", f"node {node_id[:12]} ready to join", node_id=node_id)
        self._ready_seen = ready

    def _abort(self, state: State, reason: str) -> State:
        if isinstance(state, (Running, Restarting)):
            self.group.abort(state.plan.round_id, state.plan.worker_ids)
        self._emit("aborted", f"run aborted: {reason}")
        return Aborted(reason)

    def _fail(self, error: Exception) -> Failed:
        self._emit("failed", str(error).splitlines()[0])
        return Failed(error)

    def _give_up(self, reason: str, error_type: type[TrainingFailedError] = TrainingFailedError) -> Failed:
        """Fail the run for `reason`, naming the failures seen so far and the budget spent."""
        return self._fail(error_type(reason, self.failures[0] if self.failures else None, tuple(self.failures),
                                     self.restarts, self.config.max_restarts))

    # -- states -------------------------------------------------------------------------------
    def _on_waiting(self, state: Waiting, now: float) -> State:
        ready = self.group.ready_groups()
        decision = policy.decide_form(
            len(ready),
            self.group.pending_count(),
            self.config.min_nodes,
            self.config.max_nodes,
            now - state.since,
            self.config.initial_gather_s if state.cause == "start" else 0.0,
        )
        if decision.form:
            return Forming(cause=state.cause)
        if len(ready) + self.group.pending_count() >= self.config.min_nodes:
            # Enough nodes exist and are starting workers: that is not "missing nodes";
            # allow up to worker_start_timeout_s for placement and imports.
            state.deadline = max(state.deadline, min(now + self.config.wait_for_nodes_timeout_s,
                                                     state.since + self.config.worker_start_timeout_s))
        if now >= state.deadline:
            pending = self.group.pending_count()
            starting = (
                f" ({pending} more still starting workers after worker_start_timeout_s="
                f"{self.config.worker_start_timeout_s:g}s: raise it if placement or imports are slow)"
                if pending else ""
            )
            return self._give_up(
                f"only {len(ready)} of min_nodes={self.config.min_nodes} node(s) could run "
                f"{self.config.nproc_per_node} worker(s) with {self.config.bundle} each after "
                f"waiting {now - state.since:g}s{starting}; add nodes, lower min_nodes, "
                f"or raise wait_for_nodes_timeout_s",
                NotEnoughNodesError,
            )
        if decision.reason != state.last_message:
            state.last_message = decision.reason
            self._emit("waiting", decision.reason, ready=len(ready), missing=decision.missing)
        self.group.wait(self.poll_s)
        return state

    def _on_forming(self, state: Forming, now: float) -> State:
        chosen = policy.choose_groups(self.group.ready_groups(), self.previous_order, self.config.max_nodes)
        if len(chosen) < self.config.min_nodes:
            return Waiting(since=now, deadline=now + self.config.wait_for_nodes_timeout_s, cause=state.cause)
        self._hand_over_drained(chosen, now)
        plan = RoundPlan(round_id=self.next_round_id, restart_count=self.restarts, groups=tuple(chosen))
        self.next_round_id += 1
        previous = set(self.previous_order)
        joined = [g.node_id for g in chosen if g.node_id not in previous]
        chosen_ids = {g.node_id for g in chosen}
        left = [n for n in self.previous_order if n not in chosen_ids]
        self.previous_order = [g.node_id for g in chosen]
        self.group.start_round(plan)
        self.rounds.append(RoundRecord(plan.round_id, plan.world_size, len(chosen), time.time(), state.cause))
        self._emit(
            "round_formed",
            f"round {plan.round_id}: {len(chosen)} node(s), world size {plan.world_size} ({state.cause})",
            world_size=plan.world_size,
            num_nodes=len(chosen),
            cause=state.cause,
            joined=joined,
            left=left,
        )
        self._say_if_the_commit_was_lost(plan)
        started = self.clock()
        members = plan.worker_ids
        return Running(
            plan=plan,
            started=started,
            last_progress={w: started for w in members},
            progress_count={w: -1 for w in members},
            liveness=Liveness(),  # nothing outstanding: the first probes go out with the next heartbeat
        )

    def _say_if_the_commit_was_lost(self, plan: RoundPlan) -> None:
        """A `commit_lost` event when the run committed but no member of the new round ever did: the last commit
        went with the workers that held it (all lost at once, or killed), so State loads storage or starts over."""
        committed = [step for step in self.last_step.values() if step is not None]
        if not committed or any(self.last_step.get(w) is not None for w in plan.worker_ids):
            return
        step = max(committed)
        then = ("State loads the newest durable checkpoint; the steps after it are redone" if self.config.storage_path
                else "no storage_path is set, so State starts from the initial state again (step 0); set "
                     "storage_path= to keep durable checkpoints")
        message = (f"round {plan.round_id}: no member holds a commit; the last one (step {step}) went with the "
                   f"workers that held it; {then}")
        self._emit("commit_lost", message, step=step, from_storage=bool(self.config.storage_path))

    def _record_reports(self, plan: RoundPlan, worker_id: str, reports: list[tuple[float, dict[str, Any]]]) -> None:
        """Keep rank 0's reports: the latest as `metrics`, all of them as history; events of any rank as events."""
        if any(WORKER_EVENT in metrics for _, metrics in reports):
            for _, metrics in reports:
                if WORKER_EVENT in metrics:
                    note = metrics[WORKER_EVENT]
                    self._emit(note["kind"], note["message"], worker_id=worker_id, **note.get("data", {}))
            reports = [(stamp, metrics) for stamp, metrics in reports if WORKER_EVENT not in metrics]
        if not reports or worker_id != plan.groups[0].workers[0]:
            return
        if self.exporter is not None:
            self.exporter.on_reports(reports)
        for stamp, metrics in reports:
            self.metrics_history.append(
                {"time": stamp, "round_id": plan.round_id, "world_size": plan.world_size, **metrics}
            )
        self.metrics_history = thin_history(self.metrics_history, self.history_limit)
        stamp, latest = reports[-1]
        if stamp >= self._metrics_time:  # probe answers may arrive after the final outcome
            self._metrics_time = stamp
            self.metrics = dict(latest)

    def _record_outcomes(self, state: Running | Restarting) -> None:
        for outcome in self.group.wait(self.poll_s):
            state.outcomes[outcome.worker_id] = outcome
            self._note_snapshot(state.plan, outcome.worker_id, outcome.snapshot)
            if outcome.step is not None:
                self.last_step[outcome.worker_id] = outcome.step
            self._record_reports(state.plan, outcome.worker_id, outcome.reports)

    def _record_heartbeats(self, state: Running | Restarting, now: float) -> None:
        """Probe members: every heartbeat_interval_s while running; every step while restarting, and while new
        workers wait for the survivors' first progress (`_release_starts`), which an answer a heartbeat late
        would hold back by up to twice heartbeat_interval_s (a probe's answer is read at the next probe)."""
        if isinstance(state, Running):
            held = self._failed_at is not None
            if not held and now - self._last_probe < self.config.heartbeat_interval_s:
                return
            self._last_probe = now
        beats = self._live_answers(state, self.group.probe(state.plan.round_id), now)
        for beat in beats:
            self._record_reports(state.plan, beat.worker_id, beat.reports)
            self._note_snapshot(state.plan, beat.worker_id, beat.snapshot)
            if isinstance(state, Restarting):
                continue
            if beat.progress != state.progress_count.get(beat.worker_id):
                state.progress_count[beat.worker_id] = beat.progress
                state.last_progress[beat.worker_id] = now
            if beat.step is not None:
                self.last_step[beat.worker_id] = beat.step

    def _on_running(self, state: Running, now: float) -> State:
        self._record_outcomes(state)
        now = self.clock()
        members = state.plan.worker_ids
        if any(o.is_failure for o in state.outcomes.values()):
            first = policy.at_fault(state.outcomes)[0]  # a cause rather than a victim, if one is known yet
            trigger = f"worker {first.worker_id} {first.kind.value}: {first.message}"
            return self._begin_restart(state, now, trigger=trigger)
        self._record_heartbeats(state, now)
        lost = self._judge_silence(state, now)
        if lost:
            return self._begin_restart(state, now, trigger=self._silence_trigger(state, lost), diagnose=True)
        hung = policy.stalled(
            {w: t for w, t in state.last_progress.items() if w not in state.outcomes},
            now,
            self.config.hang_timeout_s,
        )
        if hung:
            names = ", ".join(hung[:4]) + (", ..." if len(hung) > 4 else "")
            trigger = f"no progress for {self.config.hang_timeout_s:g}s from {len(hung)} worker(s): {names}"
            return self._begin_restart(state, now, trigger=trigger, stalled=hung, diagnose=True)
        if len(state.outcomes) == len(members):
            kinds = {o.kind for o in state.outcomes.values()}
            if kinds == {OutcomeKind.DONE}:
                values = [state.outcomes[w].value for w in members]
                self._emit("finished", f"run finished after {self.restarts} restart(s)")
                return Succeeded(values)
            return self._begin_resize(state)
        after_drain = self._check_drains(state, now)
        if after_drain is not None:
            return after_drain
        self._note_ready(now)  # a worker that finished starting during this step's wait counts now, not a poll later
        if not state.stop_requested and policy.should_scale_up(
            len(state.plan.groups),
            len(self._ready_seen),  # ready nodes outside the round (members that returned do not count)
            self.config.max_nodes,
            now - self._last_ready_change,
            self.config.join_debounce_s,
        ):
            state.stop_requested = True
            self.group.request_stop(state.plan.round_id)
        return state

    def _begin_resize(self, state: Running) -> State:
        # Ranks that already returned re-enter train_fn too: restored from the last
        # commit, they finish at once alongside the others.
        drained = self._left_drained_nodes(state)
        if drained is not None:
            return Forming(cause=drained)
        self._emit("scale_up", "members left at a commit to let new node(s) join")
        return Forming(cause="scale-up")

    def _begin_restart(self, state: Running, now: float, trigger: str, stalled: list[str] | None = None,
                       diagnose: bool = False) -> State:
        if self.exporter is not None:
            self.exporter.on_failure_detected(now)
        if self._failed_at is None and self.config.replacement_wait_s > 0:
            self._failed_at = now
            self.group.hold_new_workers(True)  # before the next wait(): it starts workers in dead slots too
        unsettled = [w for w in state.plan.worker_ids if w not in state.outcomes]
        self.group.abort(state.plan.round_id, unsettled, diagnose=diagnose)  # first: survivors are waiting
        restarting = Restarting(
            plan=state.plan,
            outcomes=state.outcomes,
            since=now,
            trigger=trigger,
            stalled=list(stalled or []),
            announced=False,
            detected=time.time(),
            aborting=len(unsettled),
            liveness=state.liveness,
            diagnose=diagnose,
        )
        self._announce(restarting, now)
        return restarting

    def _announce(self, state: Restarting, now: float, force: bool = False) -> None:
        """Emit the round's `worker_lost` line once it can name a cause, not only its consequences.

        A peer's collective error (a victim) often arrives a moment before the failure that caused
        it; the line waits up to `cause_wait_s` for a cause (an exception, a death, a hang).
        """
        if state.announced:
            return
        failures = [o for o in state.outcomes.values() if o.is_failure]
        causes = [o for o in failures if not (o.kind is OutcomeKind.FAILED and o.communication)]
        if not (causes or state.stalled or state.diagnose or force or now - state.since >= self.config.cause_wait_s):
            return
        state.announced = True
        ranks = {w: rank for rank, w in enumerate(state.plan.worker_ids)}
        if causes:
            first = causes[0]
            trigger = f"rank {ranks[first.worker_id]} ({first.worker_id}) {first.kind.value}: {first.message}"
        else:
            trigger = state.trigger
        echoes = [o for o in failures if o not in causes] if causes else []
        consequence = (
            "; as a consequence, the collective of rank(s) " + ", ".join(str(ranks[o.worker_id]) for o in echoes)
            + " failed" if echoes else ""
        )
        aborting = f"; aborting {state.aborting} other worker(s)" if state.aborting else ""
        self._emit("worker_lost", f"round {state.plan.round_id}: {trigger}{consequence}{aborting}",
                   trigger=trigger, stalled=list(state.stalled), detected=state.detected,
                   consequences=[o.worker_id for o in echoes])

    def _on_restarting(self, state: Restarting, now: float) -> State:
        self._record_outcomes(state)
        now = self.clock()
        self._announce(state, now)
        self._record_heartbeats(state, now)
        state.stacks.update((r.worker_id, r) for r in self.group.stack_reports())
        unsettled = [w for w in state.plan.worker_ids if w not in state.outcomes]
        if unsettled:
            if not self._settle_after_abort(state, unsettled, now):
                return state
            if len(state.outcomes) < len(state.plan.worker_ids):
                return state
        return self._finish_restart(state)

    def _stall_message(self) -> str:
        return f"made no progress (commit or report) for more than hang_timeout_s={self.config.hang_timeout_s:g}s"

    def _finish_restart(self, state: Restarting) -> State:
        self._announce(state, self.clock(), force=True)
        stalled = [
            WorkerOutcome(w, state.plan.round_id, OutcomeKind.HUNG, message=self._stall_message(),
                          step=self.last_step.get(w))
            for w in state.stalled
        ]
        causes = self._with_stacks(state, policy.at_fault(state.outcomes, stalled))
        # Not plan.assignments(): it recomputes world_size per worker, O(N x nodes).
        members = ((w, g.node_id) for g in state.plan.groups for w in g.workers)
        place = {w: (rank, node_id) for rank, (w, node_id) in enumerate(members)}
        for outcome in causes:
            rank, node_id = place[outcome.worker_id]
            self.failures.append(
                FailureInfo(
                    kind=_FAILURE_KIND[outcome.kind.value],
                    rank=rank,
                    node_id=node_id,
                    round_id=state.plan.round_id,
                    message=outcome.message,
                    step=outcome.step if outcome.step is not None else self.last_step.get(outcome.worker_id),
                    traceback=outcome.traceback,
                )
            )
        died = [o.worker_id for o in causes if o.kind is OutcomeKind.DIED]
        if died:
            self.group.kill(died, reason="died")
        hopeless = next((o for o in causes if o.unrecoverable), None)
        if hopeless is not None:  # every later round would raise it again: spend no budget on them
            return self._give_up(
                f"{hopeless.message.splitlines()[0]} (a restart cannot bring it back, so none was tried)")
        self.restarts += 1
        shown = self.failures[len(self.failures) - len(causes):][:3]
        summary = "; ".join(f.describe() for f in shown) + (f"; and {len(causes) - 3} more" if len(causes) > 3 else "")
        self._emit(
            "restart",
            f"round {state.plan.round_id} failed ({len(causes)} cause(s)): {summary}; "
            f"restarts spent {self.restarts}/{self._budget_text()}",
            restarts=self.restarts,
            causes=[o.worker_id for o in causes],
            # A rank killed for not leaving an aborted round: where its abort found it, and where it was killed.
            hung_stacks={str(f.rank): f.traceback for f in shown if f.kind == "hang" and f.traceback},
        )
        if policy.budget_exhausted(self.restarts, self.config.max_restarts):
            return self._give_up("restart budget exhausted; raise max_restarts or fix the root cause")
        return Forming(cause="restart")

    def _budget_text(self) -> str:
        return "unlimited" if self.config.max_restarts < 0 else str(self.config.max_restarts)


def progress_snapshot(controller: Controller, events_from: int) -> dict[str, Any]:
    """What progress displays show (`progress.LogProgress.update`): state, round, size, budget, metrics, new events."""
    rounds = controller.rounds
    return {
        "state": controller.state.name,
        "round_id": rounds[-1].round_id if rounds else -1,
        "world_size": rounds[-1].world_size if rounds else 0,
        "num_nodes": rounds[-1].num_nodes if rounds else 0,
        "restarts": controller.restarts,
        "metrics": controller.metrics,
        "events": controller.events.events[events_from:],
    }
