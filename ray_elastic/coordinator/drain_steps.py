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
    previous_order: list[str]
    state: Any

    if TYPE_CHECKING:  # Controller's
        def _emit(self, kind: str, message: str, **data: Any) -> None: ...

        def _begin_restart(self, state: Any, now: float, trigger: str, stalled: list[str] | None = None) -> Any: ...

    def _release_drained(self, now: float) -> None:
        """Kill the idle workers of drained nodes, so Ray can let the nodes go, except those that may hold
        the last commit (no node of the last round survives): they are kept for a handover to the next
        round's first node, until their deadline comes within drain_margin_s."""
        held = self.group.drained_groups()
        if not held:
            return
        plan = getattr(self.state, "plan", None)
        in_round = {g.node_id for g in plan.groups} if plan is not None else set()
        alive = {g.node_id for g in self.group.ready_groups()} | in_round
        survivors = any(n not in self._drains and n in alive for n in self.previous_order)
        for group in held:
            if group.node_id in in_round:
                continue
            notice = self._drains.get(group.node_id)
            if (not survivors and group.node_id in self.previous_order and notice is not None
                    and notice.remaining_s(now) > self.config.drain_margin_s):
                continue
            self.group.kill(list(group.workers), reason="node drained: released")

    def _hand_over_drained(self, chosen: list[Any], now: float) -> None:
        """Before a round with no survivor of the last one: hand the commit a drained member kept over to the
        new round's first worker (State restores it there and broadcasts it to the others)."""
        previous = set(self.previous_order)
        if not chosen or any(g.node_id in previous for g in chosen):
            return
        held = [g for g in self.group.drained_groups() if g.node_id in previous]
        if not held:
            return
        source, target = held[0].workers[0], chosen[0].workers[0]
        notice = self._drains.get(held[0].node_id)
        left = notice.remaining_s(now) if notice is not None else 0.0
        timeout = max(1.0, min(left, 600.0) - self.config.drain_margin_s)
        done = self.group.hand_over(source, target, timeout)
        if done:  # the target holds the commit now (see `_say_if_the_commit_was_lost`)
            self.last_step[target] = self.last_step.get(source)
        self._emit("drain", f"node {held[0].node_id[:12]} (drained) handed the last commit over to node "
                   f"{chosen[0].node_id[:12]}" + ("" if done else ": failed; the new round starts without it"),
                   node_id=held[0].node_id, to=chosen[0].node_id, path="handover", ok=done)
        for group in held:
            self.group.kill(list(group.workers), reason="node drained: handed over")

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
        replacement = any(g.node_id not in self._drains for g in self.group.ready_groups())
        decision = decide([g.node_id for g in state.plan.groups], self._drains, tracker.leaving, now,
                          per_step, self.config.drain_margin_s, replacement_ready=replacement)
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
