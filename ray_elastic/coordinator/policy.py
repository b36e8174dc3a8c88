"""Pure decisions: given what the coordinator sees, what should happen next.

Nothing here touches Ray, clocks or workers; the controller passes `now` and
views of the world in, and acts on the values that come back.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from ray_elastic.coordinator.types import NodeGroup, OutcomeKind, WorkerOutcome


@dataclass(frozen=True)
class FormDecision:
    """Whether to form a round now, and why (or why not); `missing`: nodes that do not exist yet."""

    form: bool
    reason: str
    missing: int = 0


def decide_form(
    num_ready: int,
    num_pending: int,
    min_nodes: int,
    max_nodes: int,
    waited_s: float,
    gather_s: float,
) -> FormDecision:
    """Form once min_nodes are ready, giving nodes still starting a short window to make it."""
    if num_ready + num_pending < min_nodes:
        starting = f" ({num_pending} starting)" if num_pending else ""
        missing = min_nodes - num_ready - num_pending
        return FormDecision(False, f"waiting for {missing} more node(s){starting}", missing)
    if num_ready < min_nodes:
        return FormDecision(False, f"starting workers on {min_nodes - num_ready} node(s)")
    if num_ready >= max_nodes:
        return FormDecision(True, f"{num_ready} node(s) ready (max_nodes={max_nodes})")
    if num_pending == 0:
        return FormDecision(True, f"{num_ready} node(s) ready, none starting")
    if waited_s >= gather_s:
        return FormDecision(True, f"{num_ready} node(s) ready; {num_pending} still starting will join later")
    return FormDecision(False, f"{num_ready} node(s) ready, giving {num_pending} starting node(s) time")


def choose_groups(
    ready: Sequence[NodeGroup], previous_order: Sequence[str], max_nodes: int
) -> list[NodeGroup]:
    """Keep surviving nodes in their previous order (stable ranks), then add newcomers, up to max."""
    by_node = {g.node_id: g for g in ready}
    kept = [by_node[n] for n in previous_order if n in by_node]
    previous = set(previous_order)
    newcomers = sorted((g for g in ready if g.node_id not in previous), key=lambda g: g.node_id)
    return (kept + newcomers)[:max_nodes]


def should_scale_up(
    current_nodes: int,
    idle_ready_nodes: int,
    max_nodes: int,
    since_last_ready_s: float,
    debounce_s: float,
) -> bool:
    """Grow at the next commit when a ready node waits and room remains, once the burst of arrivals has settled
    or the waiting nodes already fill the room (then no later arrival could join this re-form: a replacement
    for a lost node, or the last nodes up to max_nodes, join at once)."""
    if idle_ready_nodes <= 0 or current_nodes >= max_nodes:
        return False
    return since_last_ready_s >= debounce_s or current_nodes + idle_ready_nodes >= max_nodes


def at_fault(outcomes: Mapping[str, WorkerOutcome], stalled: Sequence[WorkerOutcome] = ()) -> list[WorkerOutcome]:
    """The failures that caused a failed round, separating causes from their echoes.

    A rank whose collective broke because a peer vanished reports a
    communication error; it is a victim, not a cause, unless nothing else failed.
    `stalled`: outcomes for the workers a hang watchdog aborted the round for; they
    are the cause when no worker failed on its own (the others only left when aborted).
    """
    failures = [o for o in outcomes.values() if o.is_failure]
    causes = [o for o in failures if not (o.kind is OutcomeKind.FAILED and o.communication)]
    return causes or list(stalled) or failures[:1]


def budget_exhausted(restarts_spent: int, max_restarts: int) -> bool:
    """True once more restarts were needed than the budget allows (-1: unlimited)."""
    return max_restarts >= 0 and restarts_spent > max_restarts


def stalled(last_progress: Mapping[str, float], now: float, hang_timeout_s: float | None) -> list[str]:
    """Workers that made no progress (commit, report, or answered probe) within the hang timeout."""
    if hang_timeout_s is None:
        return []
    return sorted(w for w, t in last_progress.items() if now - t > hang_timeout_s)


def unresponsive(last_answer: Mapping[str, float], waiting: Iterable[str], now: float, limit_s: float) -> list[str]:
    """Workers among `waiting` whose liveness probes went unanswered for longer than limit_s."""
    return sorted(w for w in waiting if now - last_answer.get(w, float("-inf")) > limit_s)


def overdue_after_abort(
    waiting: Iterable[str],
    busy: Mapping[str, str],
    busy_seen_at: Mapping[str, float],
    aborted_at: float,
    now: float,
    abort_timeout_s: float,
    busy_limit_s: float,
) -> list[str]:
    """Aborted workers that answer but have not left their round in time.

    Each gets `abort_timeout_s` from the abort, or from the last answer that said it
    was busy with a known long activity (a durable checkpoint write): busy is not
    hung. While it still says so, it may take up to `busy_limit_s` from the abort.
    """
    overdue = []
    for worker_id in waiting:
        if busy.get(worker_id):
            late = now - aborted_at > busy_limit_s
        else:
            late = now - max(aborted_at, busy_seen_at.get(worker_id, float("-inf"))) > abort_timeout_s
        if late:
            overdue.append(worker_id)
    return sorted(overdue)
