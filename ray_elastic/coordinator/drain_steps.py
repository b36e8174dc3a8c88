"""The controller's part in node drains: acts on `drain.decide`'s decisions (see `drain.py`).

A mixin of `Controller`, kept apart so the state machine stays one idea per file:
- a drained member node with time to spare is left at the next commit: the round is
  asked to stop, exactly as for a scale-up; when every member has left, the round is
  re-formed without the node (cause "drain"): no step redone, no restart charged;
- a drained node whose deadline is too close has its ranks dropped at once, as a crash
  (cause: the drain, one restart charged), instead of waiting for the kill;
- a withdrawn drain (the notice is gone before the node left) keeps the node.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ray_elastic.coordinator.drain import DrainNotice, DrainTracker, decide, time_needed_s
from ray_elastic.coordinator.types import OutcomeKind, WorkerOutcome

if TYPE_CHECKING:
    from ray_elastic.config import RunConfig
    from ray_elastic.coordinator.group import WorkerGroup


class DrainSteps:
    """Drain handling for `Controller` (uses its group, events, config, last steps and restarts)."""

    config: RunConfig
    group: WorkerGroup
    drain: DrainTracker
    _drains: dict[str, DrainNotice]
    last_step: dict[str, int | None]

    if TYPE_CHECKING:  # Controller's
        def _emit(self, kind: str, message: str, **data: Any) -> None: ...

        def _begin_restart(self, state: Any, now: float, trigger: str, stalled: list[str] | None = None) -> Any: ...

    def _left_drained_nodes(self, state: Any) -> str | None:
        """At a re-form after a stop: the cause if the stop was for a drain ("drain"), else None."""
        drained = [g.node_id for g in state.plan.groups if g.node_id in self.drain.leaving]
        if not drained:
            return "drain withdrawn" if self.drain.stopped_round == state.plan.round_id else None
        self.drain.leaving -= set(drained)
        names = ", ".join(n[:12] for n in drained)
        self._emit("scale_down", f"members left at a commit: drained node(s) {names} leave the run; "
                   f"no step redone, no restart charged", left=drained)
        return "drain"

    def _check_drains(self, state: Any, now: float) -> Any:
        """Act on Ray's drain notices for the running round's nodes; a new state, or None to stay."""
        tracker = self.drain
        if tracker.round_id != state.plan.round_id:
            tracker.round_id = state.plan.round_id
            tracker.clock.reset()
        steps = [s for s in (self.last_step.get(w) for w in state.plan.worker_ids) if s is not None]
        tracker.clock.observe(now, max(steps, default=None))
        per_step = tracker.clock.seconds_per_step()
        decision = decide([g.node_id for g in state.plan.groups], self._drains, tracker.leaving, now,
                                per_step, self.config.drain_margin_s)
        if not decision:
            return None
        for node_id in decision.withdrawn:
            tracker.leaving.discard(node_id)
            self._emit("drain", f"node {node_id[:12]}: its drain was withdrawn; it stays in the run",
                       node_id=node_id, path="withdrawn")
        for node_id in decision.leave:
            notice = self._drains[node_id]
            tracker.leaving.add(node_id)
            self._emit("drain", f"node {node_id[:12]} is being drained by Ray ({notice.describe(now)}): "
                       f"leaving it at the next commit", node_id=node_id, reason=notice.reason,
                       deadline=notice.deadline_wall, path="commit")
        if decision.leave and not state.stop_requested:
            state.stop_requested = True
            tracker.stopped_round = state.plan.round_id
            self.group.request_stop(state.plan.round_id)
        if not decision.crash:
            return None
        return self._drop_drained_now(state, now, decision.crash, per_step)

    def _drop_drained_now(self, state: Any, now: float, nodes: tuple[str, ...], per_step: float | None) -> Any:
        """The crash path: the nodes' ranks are marked dead and killed, and the round restarts."""
        needed = time_needed_s(per_step, self.config.drain_margin_s)
        step_text = f"a step takes ~{per_step:.2f}s" if per_step is not None else "step time not known yet"
        victims = []
        for node_id in nodes:
            notice = self._drains[node_id]
            self.drain.leaving.discard(node_id)
            self._emit("drain", f"node {node_id[:12]} is being drained by Ray ({notice.describe(now)}): too close "
                       f"to its deadline to leave at a commit ({step_text}, {needed:.1f}s needed); dropping its "
                       f"ranks now as if it crashed (restart charged)", node_id=node_id, reason=notice.reason,
                       deadline=notice.deadline_wall, path="crash")
            group = next(g for g in state.plan.groups if g.node_id == node_id)
            for worker_id in group.workers:
                if worker_id not in state.outcomes:
                    victims.append(worker_id)
                    state.outcomes[worker_id] = WorkerOutcome(
                        worker_id, state.plan.round_id, OutcomeKind.DIED,
                        message=f"its node was drained by Ray ({notice.describe(now)}), too close to the "
                                f"deadline to leave at a commit", step=self.last_step.get(worker_id))
        self.group.kill(victims, reason="node drained, deadline too close for a commit")
        names = ", ".join(n[:12] for n in nodes)
        return self._begin_restart(state, now, trigger=f"node(s) {names} drained with too little time left")
