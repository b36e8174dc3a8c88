"""The coordinator's pure decisions (coordinator/policy.py): no Ray, no clock, no workers."""

from __future__ import annotations

import pytest

from ray_elastic.coordinator import policy
from ray_elastic.coordinator.types import NodeGroup, OutcomeKind, WorkerOutcome

pytestmark = pytest.mark.timeout(30)


def _groups(*node_ids: str) -> list[NodeGroup]:
    return [NodeGroup(n, (f"{n}/0", f"{n}/1")) for n in node_ids]


def _outcome(worker_id: str, kind: OutcomeKind, communication: bool = False) -> WorkerOutcome:
    return WorkerOutcome(worker_id, 0, kind, message=kind.value, communication=communication)


# -- decide_form ---------------------------------------------------------------------------------------
def test_form_waits_below_min_nodes_and_says_how_many_are_missing():
    decision = policy.decide_form(1, 0, min_nodes=3, max_nodes=4, waited_s=100.0, gather_s=0.0)
    assert not decision.form and decision.reason == "waiting for 2 more node(s)"


def test_form_at_once_when_max_nodes_are_ready_even_with_others_starting():
    decision = policy.decide_form(4, 3, min_nodes=1, max_nodes=4, waited_s=0.0, gather_s=10.0)
    assert decision.form and "max_nodes=4" in decision.reason


def test_form_at_once_when_nothing_else_is_starting():
    decision = policy.decide_form(2, 0, min_nodes=1, max_nodes=4, waited_s=0.0, gather_s=10.0)
    assert decision.form and "none starting" in decision.reason


def test_form_gives_starting_nodes_the_gather_window_then_goes_without_them():
    inside = policy.decide_form(2, 1, min_nodes=1, max_nodes=4, waited_s=1.9, gather_s=2.0)
    assert not inside.form and "1 starting node(s) time" in inside.reason
    after = policy.decide_form(2, 1, min_nodes=1, max_nodes=4, waited_s=2.0, gather_s=2.0)
    assert after.form and "will join later" in after.reason


def test_form_without_gather_window_after_a_restart():
    assert policy.decide_form(2, 5, min_nodes=2, max_nodes=8, waited_s=0.0, gather_s=0.0).form


# -- choose_groups ---------------------------------------------------------------------------------------
def test_choose_keeps_survivors_in_previous_order_then_sorted_newcomers():
    ready = _groups("n-d", "n-a", "n-c", "n-b")
    chosen = policy.choose_groups(ready, previous_order=["n-c", "x-gone", "n-a"], max_nodes=8)
    assert [g.node_id for g in chosen] == ["n-c", "n-a", "n-b", "n-d"]


def test_choose_caps_at_max_nodes_preferring_survivors():
    ready = _groups("n-a", "n-b", "n-c", "n-z")
    chosen = policy.choose_groups(ready, previous_order=["n-z"], max_nodes=2)
    assert [g.node_id for g in chosen] == ["n-z", "n-a"]


def test_choose_passes_the_workers_of_each_node_through_in_local_rank_order():
    chosen = policy.choose_groups(_groups("n-a"), previous_order=[], max_nodes=1)
    assert chosen[0].workers == ("n-a/0", "n-a/1")


# -- should_scale_up ---------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "current, idle, max_nodes, since_s, expected",
    [
        (2, 1, 4, 0.5, True),  # a node waits, room left, burst settled
        (2, 0, 4, 9.0, False),  # nobody waiting
        (4, 1, 4, 9.0, False),  # already at max_nodes
        (2, 1, 4, 0.49, False),  # the burst may not be over yet
        (3, 1, 4, 0.0, True),  # the waiting node fills the room: nothing to wait for
        (2, 3, 4, 0.0, True),  # more waiting than there is room for
        (1, 2, 4, 0.49, False),  # room for one more arrival
    ],
)
def test_scale_up(current, idle, max_nodes, since_s, expected):
    assert policy.should_scale_up(current, idle, max_nodes, since_s, debounce_s=0.5) is expected


# -- at_fault ---------------------------------------------------------------------------------------
def test_at_fault_separates_causes_from_communication_victims():
    outcomes = {
        "a": _outcome("a", OutcomeKind.FAILED, communication=True),
        "b": _outcome("b", OutcomeKind.DIED),
        "c": _outcome("c", OutcomeKind.ABORTED),
        "d": _outcome("d", OutcomeKind.FAILED),
        "e": _outcome("e", OutcomeKind.HUNG),
    }
    assert [o.worker_id for o in policy.at_fault(outcomes)] == ["b", "d", "e"]


def test_at_fault_blames_the_first_victim_when_only_victims_failed():
    outcomes = {
        "a": _outcome("a", OutcomeKind.ABORTED),
        "b": _outcome("b", OutcomeKind.FAILED, communication=True),
        "c": _outcome("c", OutcomeKind.FAILED, communication=True),
    }
    assert [o.worker_id for o in policy.at_fault(outcomes)] == ["b"]


def test_at_fault_blames_stalled_workers_when_the_others_only_left_because_of_the_abort():
    stalled = [_outcome("b", OutcomeKind.HUNG)]
    echoes = {
        "a": _outcome("a", OutcomeKind.FAILED, communication=True),
        "b": _outcome("b", OutcomeKind.ABORTED),
    }
    assert policy.at_fault(echoes, stalled) == stalled
    real = {**echoes, "c": _outcome("c", OutcomeKind.DIED)}
    assert [o.worker_id for o in policy.at_fault(real, stalled)] == ["c"], "a real failure wins over a stall"


def test_at_fault_of_a_round_without_failures_is_empty():
    outcomes = {"a": _outcome("a", OutcomeKind.DONE), "b": _outcome("b", OutcomeKind.STOPPED)}
    assert policy.at_fault(outcomes) == []


# -- budget ---------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "spent, max_restarts, exhausted",
    [(0, 0, False), (1, 0, True), (3, 3, False), (4, 3, True), (10_000, -1, False)],
)
def test_budget(spent, max_restarts, exhausted):
    assert policy.budget_exhausted(spent, max_restarts) is exhausted


# -- stalled / unresponsive ---------------------------------------------------------------------------------
def test_stalled_lists_workers_silent_for_longer_than_the_hang_timeout():
    last = {"b": 100.0, "a": 89.0, "c": 90.0}
    assert policy.stalled(last, now=100.0, hang_timeout_s=10.0) == ["a"]
    assert policy.stalled(last, now=100.0, hang_timeout_s=None) == []


def test_unresponsive_only_among_the_waiting_and_never_answered_counts_as_silent():
    last = {"a": 90.0, "b": 99.0, "c": 50.0}
    assert policy.unresponsive(last, ["a", "b", "new"], now=100.0, limit_s=2.0) == ["a", "new"]
