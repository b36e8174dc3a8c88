"""The coordinator's state machine, driven step by step with a fake worker group and a fake clock."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from ray_elastic.config import RunConfig
from ray_elastic.coordinator.controller import (
    Aborted,
    Controller,
    Failed,
    Forming,
    Restarting,
    Running,
    Succeeded,
    Waiting,
)
from ray_elastic.errors import NotEnoughNodesError, RunAbortedError, TrainingFailedError
from ray_elastic.events import EventLog
from ray_elastic.testing.fake_group import FakeClock, FakeWorkerGroup

pytestmark = pytest.mark.timeout(60)


def make(nodes: int = 1, nproc: int = 1, **settings: Any) -> tuple[Controller, FakeWorkerGroup]:
    """A controller over `nodes` ready fake nodes; settings override RunConfig's defaults."""
    settings.setdefault("min_nodes", 1)
    settings.setdefault("max_nodes", max(nodes, settings["min_nodes"]))
    config = RunConfig(run_id="unit", nproc_per_node=nproc, **settings)
    group = FakeWorkerGroup(nproc_per_node=nproc)
    for _ in range(nodes):
        group.add_node()
    return Controller(config, group, EventLog("unit"), clock=group.clock, poll_s=0.05), group


def step_until(controller: Controller, done: Callable[[], bool], limit: int = 20_000) -> None:
    for _ in range(limit):
        if done():
            return
        if controller.state.terminal:
            raise AssertionError(f"ended in {controller.state} before the condition held")
        controller.step()
    raise AssertionError(f"condition not reached after {limit} steps; state {controller.state}")


def run_round(controller: Controller, group: FakeWorkerGroup, round_id: int) -> None:
    """Step until round `round_id` is running."""
    step_until(controller, lambda: isinstance(controller.state, Running) and controller.state.plan.round_id == round_id)


def kinds(controller: Controller) -> list[str]:
    return [e.kind for e in controller.events.events]


def events(controller: Controller, kind: str) -> list[Any]:
    return [e for e in controller.events.events if e.kind == kind]


def node_ids(group: FakeWorkerGroup, round_index: int = -1) -> list[str]:
    return [g.node_id for g in group.plans[round_index].groups]


# -- formation -----------------------------------------------------------------------------------------
def test_waits_for_min_nodes_then_forms():
    controller, group = make(nodes=1, min_nodes=2, max_nodes=2)
    for _ in range(10):
        controller.step()
    assert isinstance(controller.state, Waiting) and group.plans == []
    assert [e.message for e in events(controller, "waiting")] == ["waiting for 1 more node(s)"]
    group.add_node()
    run_round(controller, group, 0)
    assert node_ids(group) == ["node-0001", "node-0002"]
    assert group.plans[0].restart_count == 0 and controller.restarts == 0


def test_initial_gather_window_waits_for_starting_nodes_then_goes_without_the_slow_one():
    controller, group = make(nodes=1, max_nodes=3, initial_gather_s=2.0)
    t0 = group.clock()
    group.add_node(start_s=1.0)  # makes it inside the window
    slow = group.add_node(start_s=float("inf"))  # does not
    run_round(controller, group, 0)
    assert node_ids(group) == ["node-0001", "node-0002"]
    assert group.clock() - t0 >= 2.0, "formed before the gather window ended"
    assert "giving 2 starting node(s) time" in events(controller, "waiting")[0].message
    group.started(slow)  # the slow one joins later, for free
    run_round(controller, group, 1)
    assert node_ids(group) == ["node-0001", "node-0002", slow] and controller.restarts == 0


def test_forms_at_once_when_no_node_is_starting():
    controller, group = make(nodes=2, max_nodes=4, initial_gather_s=30.0)
    t0 = group.clock()
    run_round(controller, group, 0)
    assert len(group.plans[0].groups) == 2 and group.clock() - t0 < 1.0


def test_caps_the_round_at_max_nodes():
    controller, group = make(nodes=5, max_nodes=3)
    run_round(controller, group, 0)
    assert node_ids(group) == ["node-0001", "node-0002", "node-0003"]
    for _ in range(200):  # idle nodes beyond max_nodes never trigger a resize
        controller.step()
    assert len(group.plans) == 1 and group.stops == []


def test_ranks_follow_node_order_and_local_rank():
    controller, group = make(nodes=2, nproc=2)
    run_round(controller, group, 0)
    assignments = group.plans[0].assignments()
    assert [(a.worker_id, a.rank, a.node_rank, a.local_rank) for a in assignments] == [
        ("node-0001/0", 0, 0, 0), ("node-0001/1", 1, 0, 1), ("node-0002/0", 2, 1, 0), ("node-0002/1", 3, 1, 1),
    ]
    assert {(a.world_size, a.local_world_size, a.num_nodes) for a in assignments} == {(4, 2, 2)}


def test_survivors_keep_their_rank_order_and_newcomers_go_last():
    controller, group = make(nodes=3, max_nodes=3, join_debounce_s=0.0)
    run_round(controller, group, 0)
    assert node_ids(group) == ["node-0001", "node-0002", "node-0003"]
    group.remove_node("node-0001")
    run_round(controller, group, 1)
    assert node_ids(group) == ["node-0002", "node-0003"]
    group.add_node("node-0000")  # sorts first, still joins behind the survivors
    run_round(controller, group, 2)
    assert node_ids(group) == ["node-0002", "node-0003", "node-0000"]
    assert controller.restarts == 1


# -- success -------------------------------------------------------------------------------------------
def test_all_done_succeeds_with_return_values_in_rank_order():
    controller, group = make(nodes=2, nproc=2)
    run_round(controller, group, 0)
    for rank in reversed(range(4)):
        group.finish(group.member(rank), value=rank * 10)
    summary = controller.run()
    assert isinstance(controller.state, Succeeded)
    assert summary.return_values == [0, 10, 20, 30] and summary.error is None and summary.restarts == 0
    assert group.shut_down and kinds(controller)[-1] == "finished"


def test_a_round_is_not_over_while_one_rank_still_runs():
    controller, group = make(nodes=2, max_nodes=3)
    run_round(controller, group, 0)
    group.finish(group.member(0), value="a")
    for _ in range(100):
        controller.step()
    assert isinstance(controller.state, Running)
    assert group.stops == [], "a member that returned is not a node waiting to join"
    group.finish(group.member(1), value="b")
    controller.step()
    assert isinstance(controller.state, Succeeded) and controller.state.return_values == ["a", "b"]
    assert len(group.plans) == 1


# -- failures ------------------------------------------------------------------------------------------
def test_failure_aborts_the_unsettled_and_spends_one_restart():
    controller, group = make(nodes=3)
    run_round(controller, group, 0)
    r0, r1, r2 = group.members
    group.fail(r1, "boom", step=4)
    controller.step()
    assert isinstance(controller.state, Restarting)
    assert group.aborts == [(0, [r0, r2])]
    run_round(controller, group, 1)
    assert controller.restarts == 1 and group.plans[1].restart_count == 1
    [failure] = controller.failures
    assert (failure.kind, failure.rank, failure.node_id, failure.step) == ("exception", 1, "node-0002", 4)
    [restart] = events(controller, "restart")
    assert "rank 1" in restart.message and "boom" in restart.message and "restarts spent 1/3" in restart.message


def test_several_ranks_failing_in_one_round_spend_one_restart():
    controller, group = make(nodes=4)
    group.settle_on_abort = False  # survivors take a while to leave after the abort
    run_round(controller, group, 0)
    r0, r1, r2, r3 = group.members
    group.fail(r1, "first")
    group.fail(r3, "second")
    controller.step()
    assert isinstance(controller.state, Restarting) and group.aborts == [(0, [r0, r2])]
    group.fail(r2, "third, while the round is being aborted")
    group.stop(r0)
    run_round(controller, group, 1)
    assert controller.restarts == 1
    assert [(f.rank, f.message) for f in controller.failures] == [
        (1, "first"), (3, "second"), (2, "third, while the round is being aborted")
    ]
    [restart] = events(controller, "restart")
    assert restart.data["causes"] == [r1, r3, r2] and restart.data["restarts"] == 1


def test_communication_errors_of_victims_are_not_causes():
    controller, group = make(nodes=3)
    run_round(controller, group, 0)
    r0, r1, r2 = group.members
    group.die(r2)
    group.fail(r0, "Connection closed by peer", communication=True)
    group.fail(r1, "Connection closed by peer", communication=True)
    run_round(controller, group, 1)
    assert [(f.kind, f.rank) for f in controller.failures] == [("died", 2)]
    assert controller.restarts == 1


def test_the_failure_line_waits_for_the_cause_and_lists_victims_as_consequences():
    """Issue 14: a survivor's collective error arrives before the exception that caused it; the first
    line about the failure names the cause's rank and error, the victim as a consequence."""
    controller, group = make(nodes=3)
    group.settle_on_abort = False
    run_round(controller, group, 0)
    r0, r1, r2 = group.members
    group.fail(r0, "RuntimeError: Connection closed by peer", communication=True)
    controller.step()
    assert isinstance(controller.state, Restarting) and group.aborts == [(0, [r1, r2])], "aborted at once"
    assert events(controller, "worker_lost") == [], "no line yet: only a consequence is known"
    controller.step()
    group.fail(r1, "InjectedFault: injected failure on rank 1 at step 10")
    group.stop(r2)
    run_round(controller, group, 1)
    [lost] = events(controller, "worker_lost")
    assert lost.message.startswith(f"round 0: rank 1 ({r1}) failed: InjectedFault"), lost.message
    assert "as a consequence, the collective of rank(s) 0 failed" in lost.message
    assert lost.data["consequences"] == [r0] and lost.data["detected"] <= lost.time
    assert kinds(controller).index("worker_lost") < kinds(controller).index("restart")


def test_a_communication_error_alone_is_still_blamed():
    controller, group = make(nodes=2)
    run_round(controller, group, 0)
    group.fail(group.member(1), "Connection reset", communication=True)
    run_round(controller, group, 1)
    assert [(f.kind, f.rank) for f in controller.failures] == [("exception", 1)]
    [lost] = events(controller, "worker_lost")  # after cause_wait_s with no other cause: the error itself
    assert "Connection reset" in lost.message


def test_budget_exhausted_fails_naming_the_first_failure():
    controller, group = make(nodes=2, max_restarts=1)
    run_round(controller, group, 0)
    group.fail(group.member(1), "first failure", step=7)
    run_round(controller, group, 1)
    group.fail(group.member(0), "second failure", step=9)
    summary = controller.run()
    assert isinstance(controller.state, Failed)
    error = summary.error
    assert isinstance(error, TrainingFailedError) and not isinstance(error, NotEnoughNodesError)
    first = error.first_failure
    assert (first.rank, first.node_id, first.step, first.round_id) == (1, "node-0002", 7, 0)
    assert "RuntimeError: first failure" in first.traceback
    assert [f.message for f in error.failures] == ["first failure", "second failure"]
    assert (error.restarts, error.max_restarts) == (2, 1)
    text = str(error)
    assert "raise max_restarts" in text and "rank 1" in text and "step 7" in text and "first failure" in text
    assert len(group.plans) == 2 and group.shut_down and kinds(controller)[-1] == "failed"


def test_a_lost_commit_fails_the_run_at_once_without_spending_budget():
    """SnapshotLostError would be raised again by every later round (the commit's data is gone): the run fails
    on it, naming the first failure, instead of retrying until the budget (here unlimited) is spent."""
    controller, group = make(nodes=2, max_restarts=-1)
    run_round(controller, group, 0)
    group.fail(group.member(1), "first failure", step=7)
    run_round(controller, group, 1)
    lost = "SnapshotLostError: commit 3 (step 7) is lost: every rank's optimizer stepped past it"
    for rank in (0, 1):
        group.fail(group.member(rank), lost, unrecoverable=True)
    summary = controller.run()
    error = summary.error
    assert isinstance(controller.state, Failed) and isinstance(error, TrainingFailedError)
    assert error.reason.startswith(lost) and "none was tried" in error.reason
    assert error.first_failure.message == "first failure" and error.restarts == 1 == controller.restarts
    assert [f.message for f in error.failures] == ["first failure", lost, lost]
    assert len(group.plans) == 2 and group.shut_down and kinds(controller)[-1] == "failed"
    assert len(events(controller, "restart")) == 1


def test_max_restarts_zero_fails_on_the_first_failure():
    controller, group = make(nodes=1, max_restarts=0)
    run_round(controller, group, 0)
    group.fail(group.member(0))
    step_until(controller, lambda: controller.state.terminal)
    assert isinstance(controller.state, Failed) and len(group.plans) == 1


def test_max_restarts_minus_one_is_unlimited():
    controller, group = make(nodes=2, max_restarts=-1)
    for round_id in range(25):
        run_round(controller, group, round_id)
        group.fail(group.member(round_id % 2), f"failure {round_id}")
    run_round(controller, group, 25)
    assert controller.restarts == 25 and "restarts spent 25/unlimited" in events(controller, "restart")[-1].message


def test_dead_worker_is_killed_and_its_replacement_joins_later():
    controller, group = make(nodes=2, nproc=2, join_debounce_s=0.0)
    run_round(controller, group, 0)
    dead = group.member(3)
    group.die(dead)
    run_round(controller, group, 1)
    assert (([dead], "died") in group.kills) and controller.failures[0].kind == "died"
    # Survivors re-form at once without the node that lost a worker...
    assert node_ids(group) == ["node-0001"]
    # ...and the node, with a replacement worker, joins at the next commit, for free.
    run_round(controller, group, 2)
    assert node_ids(group) == ["node-0001", "node-0002"]
    assert group.plans[2].worker_ids[2:] == ["node-0002/0", "node-0002/1~1"]
    assert controller.restarts == 1 and events(controller, "scale_up")
    assert not events(controller, "commit_lost"), "the survivors hold the commit"


@pytest.mark.parametrize("storage_path", [None, "/runs"])
def test_losing_every_worker_that_held_the_commit_is_said_in_an_event(storage_path):
    controller, group = make(nodes=2, storage_path=storage_path)
    run_round(controller, group, 0)
    for worker in group.members:
        group.progress(worker, step=7)
    step_until(controller, lambda: all(controller.last_step.get(w) == 7 for w in group.plans[0].worker_ids))
    for worker in group.plans[0].worker_ids:
        group.die(worker)
    run_round(controller, group, 1)
    [lost] = events(controller, "commit_lost")
    assert lost.round_id == 1 and lost.data == {"step": 7, "from_storage": storage_path is not None}
    assert "the last one (step 7) went with the workers that held it" in lost.message
    assert ("set storage_path=" in lost.message) is (storage_path is None), lost.message


def test_stalled_worker_is_aborted_killed_and_blamed():
    controller, group = make(nodes=2, hang_timeout_s=10.0, probe_timeout_s=2.0, abort_timeout_s=5.0)
    run_round(controller, group, 0)
    healthy, stalled = group.members
    group.progress(stalled, step=3)
    controller.step()
    group.stall(stalled)  # answers probes, never commits, never leaves (stuck in user code)
    t0 = group.clock()
    step = 3
    while isinstance(controller.state, Running):
        step += 1
        group.progress(healthy, step=step)
        controller.step()
    assert isinstance(controller.state, Restarting)
    assert 10.0 < group.clock() - t0 < 11.0, "detected within one poll of hang_timeout_s"
    assert group.aborts == [(0, [healthy, stalled])]
    aborted_at = group.clock()
    step_until(controller, lambda: group.kills != [])
    assert group.kills == [([stalled], "unresponsive after abort")]
    assert 5.0 < group.clock() - aborted_at < 6.0, "killed once it had not left within abort_timeout_s"
    run_round(controller, group, 1)
    [failure] = controller.failures
    assert (failure.kind, failure.rank, failure.step) == ("hang", 1, 3)
    assert controller.restarts == 1


def test_worker_that_answers_but_never_leaves_an_aborted_round_is_killed_after_abort_timeout():
    controller, group = make(nodes=2, probe_timeout_s=2.0, abort_timeout_s=5.0)
    group.settle_on_abort = False
    run_round(controller, group, 0)
    r0, r1 = group.members
    group.workers[r1].stack = 'File "train.py", line 9, in train_fn\n    all_gather_on_a_sub_group()'
    group.fail(r0, "boom")
    controller.step()
    aborted_at = group.clock()
    group.workers[r1].stack = 'File "train.py", line 12, in train_fn\n    leave_the_round_never()'  # it moved on
    step_until(controller, lambda: group.kills != [])
    assert group.kills == [([r1], "unresponsive after abort")]
    assert 5.0 < group.clock() - aborted_at < 6.0
    run_round(controller, group, 1)
    assert [(f.kind, f.rank) for f in controller.failures] == [("exception", 0), ("hang", 1)]
    hung = controller.failures[1]
    assert hung.traceback.startswith("Stack of rank 1 (pid "), hung.traceback  # where its abort found it
    assert "all_gather_on_a_sub_group()" in hung.traceback, hung.traceback
    later = hung.traceback.split("\nStill in the round ")[1]  # and where it was when it was killed
    assert later.startswith("5.") and "leave_the_round_never()" in later, hung.traceback
    [restart] = events(controller, "restart")
    assert restart.data["hung_stacks"] == {"1": hung.traceback}  # in the event log too
    assert controller.restarts == 1


def test_a_rank_killed_for_staying_in_an_aborted_round_first_gives_its_shards_to_a_rank_on_another_node():
    controller, group = make(nodes=3, nproc=2, probe_timeout_s=2.0, abort_timeout_s=5.0)
    group.settle_on_abort = False
    run_round(controller, group, 0)
    stuck = group.member(2)  # node 2, with rank 3 beside it
    group.shards_held[stuck] = [1, 2]
    group.fail(group.member(0), "boom")
    for rank in (1, 3, 4, 5):
        group.fail(group.member(rank), "peer gone", communication=True)
    step_until(controller, lambda: group.kills != [])
    assert group.kills == [([stuck], "unresponsive after abort")]
    assert group.shard_handovers == [(stuck, group.member(0), [1, 2])], "before the kill, to another node's rank"
    [handed] = events(controller, "shards_handed_over")
    assert handed.data == {"rank": 2, "to_rank": 0, "shards": [1, 2]}
    assert "rank 2 stayed in aborted round 0" in handed.message


def test_a_rank_holding_the_gil_through_an_abort_is_read_from_outside_and_not_asked_for_its_shards():
    controller, group = make(nodes=2, probe_timeout_s=2.0, abort_timeout_s=5.0)
    group.settle_on_abort = False
    run_round(controller, group, 0)
    r0, r1 = group.members
    group.shards_held[r1] = [1]
    group.workers[r1].stack = "    hold (train.py:9)\n    sum_impl (libpython3.11.so)"
    group.hold_gil(r1)  # answers neither the abort nor a stack read: only its native pulse
    group.fail(r0, "boom")
    controller.step()
    aborted_at = group.clock()
    step_until(controller, lambda: group.kills != [])
    assert group.kills == [([r1], "unresponsive after abort")]
    assert 5.0 < group.clock() - aborted_at < 6.0
    assert group.shard_handover_asks == [], "a GIL holder cannot export its shards: asking would only wait"
    run_round(controller, group, 1)
    hung = controller.failures[1]
    assert hung.traceback.startswith("No stack of rank 1: it answered nothing when round 0 was aborted."), hung
    later = hung.traceback.split("\nStill in the round ")[1]
    assert "(read from outside), at:\nThread 1000 (active+gil)" in later and "hold (train.py:9)" in later, later


def test_stalled_worker_that_leaves_when_aborted_is_still_blamed_for_the_hang():
    controller, group = make(nodes=2, hang_timeout_s=10.0, max_restarts=0)
    run_round(controller, group, 0)
    moving, stalled = group.members
    step = 0
    while isinstance(controller.state, Running):  # `stalled` answers probes but never commits
        step += 1
        group.progress(moving, step=step)
        controller.step()
    step_until(controller, lambda: controller.state.terminal)
    assert isinstance(controller.state, Failed)
    error = controller.state.error
    assert isinstance(error, TrainingFailedError)
    assert (error.first_failure.kind, error.first_failure.rank) == ("hang", 1)
    assert "hang_timeout_s=10" in error.first_failure.message


# -- scale-up ------------------------------------------------------------------------------------------
def test_ready_idle_node_joins_at_a_commit_without_spending_budget():
    controller, group = make(nodes=1, max_nodes=2, max_restarts=0, join_debounce_s=0.5)
    run_round(controller, group, 0)
    group.add_node()
    run_round(controller, group, 1)
    assert group.stops == [0] and group.aborts == []
    assert node_ids(group) == ["node-0001", "node-0002"] and controller.restarts == 0
    formed = events(controller, "round_formed")[-1]
    assert formed.data["cause"] == "scale-up" and formed.data["joined"] == ["node-0002"]


def test_burst_of_joins_is_debounced_into_one_reform_never_above_max():
    controller, group = make(nodes=1, max_nodes=8, join_debounce_s=0.5)
    run_round(controller, group, 0)
    for _ in range(3):  # 3 nodes arrive 0.2 s apart, with room for more
        group.add_node()
        for _ in range(4):
            controller.step()
        assert group.stops == [], "stopped before the burst settled"
    run_round(controller, group, 1)
    assert group.stops == [0] and len(group.plans[1].groups) == 4
    for _ in range(200):
        controller.step()
    assert len(group.plans) == 2 and group.stops == [0] and controller.restarts == 0


def test_joins_that_fill_max_nodes_do_not_wait_out_the_debounce():
    controller, group = make(nodes=1, max_nodes=4, join_debounce_s=5.0)
    run_round(controller, group, 0)
    for _ in range(2):  # room remains for one more: the burst may go on
        group.add_node()
        for _ in range(4):
            controller.step()
    assert group.stops == []
    group.add_node()  # the room is full, and a fourth arrival would not fit
    group.add_node()
    controller.step()
    assert group.stops == [0], "waited for arrivals that could not join"
    run_round(controller, group, 1)
    assert len(group.plans[1].groups) == 4 and controller.restarts == 0


def test_a_replacement_for_a_lost_node_joins_without_the_debounce():
    controller, group = make(nodes=3, max_nodes=3, join_debounce_s=5.0)
    run_round(controller, group, 0)
    group.die(group.plans[0].worker_ids[-1])
    run_round(controller, group, 1)  # the survivors go on; the dead worker's replacement starts once they move
    assert len(group.plans[1].groups) == 2
    group.progress(group.member(0), step=1)
    started = group.clock()
    step_until(controller, lambda: group.stops == [1])
    # the replacement starts at the next probe (every 0.5 s) and is ready at once; the debounce would add 5 s
    assert group.clock() - started < 2.0, "the replacement waited out the debounce"
    run_round(controller, group, 2)
    assert len(group.plans[2].groups) == 3


def test_members_that_do_not_stop_at_once_keep_the_round_running():
    controller, group = make(nodes=1, max_nodes=2, join_debounce_s=0.0)
    group.stop_on_request = False
    run_round(controller, group, 0)
    group.add_node()
    step_until(controller, lambda: group.stops == [0])
    for _ in range(20):
        controller.step()
    assert isinstance(controller.state, Running) and group.stops == [0], "asked once"
    group.stop(group.member(0))
    run_round(controller, group, 1)
    assert len(group.plans[1].groups) == 2


# -- new workers after a failure ----------------------------------------------------------------------------
def lose_a_worker(replacement_wait_s: float = 3.0) -> tuple[Controller, FakeWorkerGroup, float]:
    """Three nodes running; the last one's worker dies; the survivors form round 1. Returns the death time."""
    controller, group = make(nodes=3, min_nodes=2, replacement_wait_s=replacement_wait_s, join_debounce_s=0.0)
    run_round(controller, group, 0)
    died_at = group.clock()
    group.die(group.plans[0].worker_ids[-1])
    run_round(controller, group, 1)
    return controller, group, died_at


def test_new_workers_wait_for_the_survivors_first_progress_after_a_failure():
    controller, group, _ = lose_a_worker()
    for _ in range(20):  # 1 s of the survivors' recovery: nothing starts beside it
        controller.step()
    assert group.replacements_started == [] and len(group.plans) == 2
    moved = group.clock()
    group.progress(group.member(1), step=5)
    step_until(controller, lambda: group.replacements_started != [])
    [(replacement, at)] = group.replacements_started
    assert replacement == "node-0003/0~1" and at - moved <= 2 * 0.05, "seen within a step: probed every step"
    [started] = events(controller, "workers_started")
    assert "the survivors made progress in round 1" in started.message and started.data["started"] == 1
    run_round(controller, group, 2)
    assert len(group.plans[2].groups) == 3 and controller.restarts == 1


def test_new_workers_start_after_replacement_wait_s_when_the_survivors_never_move():
    controller, group, died_at = lose_a_worker(replacement_wait_s=3.0)
    step_until(controller, lambda: group.replacements_started != [])
    [(_, at)] = group.replacements_started
    assert 3.0 <= at - died_at < 3.0 + 0.1
    [started] = events(controller, "workers_started")
    assert "replacement_wait_s=3s passed" in started.message and 3.0 <= started.data["waited_s"] < 3.1


def test_new_workers_start_at_once_with_replacement_wait_s_0():
    controller, group, died_at = lose_a_worker(replacement_wait_s=0.0)
    step_until(controller, lambda: group.replacements_started != [])
    assert group.replacements_started[0][1] - died_at < 1.0 + 0.1, "at the next node poll"
    assert not events(controller, "workers_started"), "nothing was held"


def test_below_min_nodes_after_a_failure_new_workers_start_at_once():
    controller, group = make(nodes=2, min_nodes=2, replacement_wait_s=30.0)
    run_round(controller, group, 0)
    died_at = group.clock()
    group.die(group.member(1))
    step_until(controller, lambda: group.replacements_started != [])
    assert group.replacements_started[0][1] - died_at < 0.5, "the run cannot go on without it"
    assert "the run needs them to go on" in events(controller, "workers_started")[0].message
    run_round(controller, group, 1)
    assert len(group.plans[1].groups) == 2


# -- below min_nodes ---------------------------------------------------------------------------------------
def test_below_min_after_a_loss_waits_and_resumes_when_a_node_returns():
    controller, group = make(nodes=2, min_nodes=2, wait_for_nodes_timeout_s=60.0)
    run_round(controller, group, 0)
    group.remove_node("node-0002")
    step_until(controller, lambda: isinstance(controller.state, Waiting))
    for _ in range(100):
        controller.step()
    assert isinstance(controller.state, Waiting)
    assert events(controller, "waiting")[-1].message == "waiting for 1 more node(s)"
    group.add_node("node-0002")
    run_round(controller, group, 1)
    assert node_ids(group) == ["node-0001", "node-0002"] and controller.restarts == 1


def test_below_min_fails_after_wait_for_nodes_timeout():
    controller, group = make(nodes=2, min_nodes=2, wait_for_nodes_timeout_s=30.0)
    run_round(controller, group, 0)
    group.remove_node("node-0002")
    step_until(controller, lambda: isinstance(controller.state, Waiting))
    since = group.clock()
    step_until(controller, lambda: controller.state.terminal)
    assert 30.0 <= group.clock() - since < 31.0
    error = controller.state.error
    assert isinstance(error, NotEnoughNodesError)
    assert "min_nodes=2" in str(error) and "wait_for_nodes_timeout_s" in str(error)
    assert (error.first_failure.kind, error.first_failure.rank, error.restarts) == ("died", 1, 1)


def test_nodes_still_starting_get_worker_start_timeout_not_the_node_timeout():
    controller, group = make(nodes=1, min_nodes=2, wait_for_nodes_timeout_s=10.0, worker_start_timeout_s=60.0)
    t0 = group.clock()
    group.add_node(start_s=float("inf"))
    step_until(controller, lambda: controller.state.terminal)
    assert 60.0 <= group.clock() - t0 < 61.0
    error = controller.state.error
    assert isinstance(error, NotEnoughNodesError) and "worker_start_timeout_s" in str(error)


def test_a_node_that_finishes_starting_in_time_is_used():
    controller, group = make(nodes=1, min_nodes=2, wait_for_nodes_timeout_s=10.0, worker_start_timeout_s=60.0)
    slow = group.add_node(start_s=40.0)
    run_round(controller, group, 0)
    assert node_ids(group) == ["node-0001", slow]


def test_no_nodes_at_all_fails_after_wait_for_nodes_timeout():
    controller, group = make(nodes=0, wait_for_nodes_timeout_s=5.0)
    step_until(controller, lambda: controller.state.terminal)
    error = controller.state.error
    assert isinstance(error, NotEnoughNodesError) and error.first_failure is None
    assert "only 0 of min_nodes=1" in str(error)


# -- abort ---------------------------------------------------------------------------------------------
def test_abort_request_while_running_aborts_the_round():
    controller, group = make(nodes=2)
    run_round(controller, group, 0)
    controller.request_abort("KeyboardInterrupt on the driver")
    summary = controller.run()
    assert isinstance(controller.state, Aborted)
    assert group.aborts == [(0, group.members)] and group.shut_down
    assert isinstance(summary.error, RunAbortedError) and "KeyboardInterrupt" in str(summary.error)
    assert events(controller, "aborted")[-1].message == "run aborted: KeyboardInterrupt on the driver"


def test_abort_request_while_waiting_ends_without_touching_workers():
    controller, group = make(nodes=0)
    controller.step()
    controller.request_abort("user")
    previous, current = controller.step()
    assert isinstance(previous, Waiting) and isinstance(current, Aborted)
    assert group.aborts == [] and group.plans == []


# -- events --------------------------------------------------------------------------------------------
def test_every_transition_is_logged_with_its_reason():
    controller, group = make(nodes=1, min_nodes=2, max_nodes=3, join_debounce_s=0.0)
    group.add_node()
    group.add_node(start_s=float("inf"))
    previous, current = controller.step()
    assert (previous.name, current.name) == ("WAITING", "WAITING"), "gives the starting node time"
    run_round(controller, group, 0)
    group.fail(group.member(1), "bad batch")
    run_round(controller, group, 1)
    group.started("node-0003")
    run_round(controller, group, 2)
    for rank in range(3):
        group.finish(group.member(rank))
    controller.run()
    assert kinds(controller) == [
        "node_ready", "node_ready", "waiting", "round_formed",
        "worker_lost", "restart", "round_formed",
        "node_ready", "scale_up", "round_formed", "finished",
    ]
    assert all(e.message for e in controller.events.events)
    lost = events(controller, "worker_lost")[0]
    assert "bad batch" in lost.message and lost.state == "RUNNING"
    assert [e.data["cause"] for e in events(controller, "round_formed")] == ["start", "restart", "scale-up"]
    assert [e.round_id for e in events(controller, "round_formed")] == [0, 1, 2]


def test_step_returns_previous_and_next_state():
    controller, group = make(nodes=1)
    previous, current = controller.step()
    assert isinstance(previous, Waiting) and isinstance(current, Forming)
    previous, current = controller.step()
    assert isinstance(previous, Forming) and isinstance(current, Running) and controller.state is current


def test_fake_clock_moves_only_when_the_group_waits():
    clock = FakeClock(start=5.0)
    group = FakeWorkerGroup(clock=clock)
    assert group.wait(0.25) == [] and clock() == 5.25


def test_metrics_history_stays_bounded_and_covers_the_whole_run():
    controller, group = make(nodes=1)
    controller.history_limit = 8
    run_round(controller, group, 0)
    worker = group.member(0)
    for step in range(1, 41):
        group.progress(worker, step=step, metrics={"step": step})
        group.clock.advance(1.0)  # past a heartbeat: the probe collects the report
        controller.step()
    steps = [m["step"] for m in controller.metrics_history]
    assert 4 <= len(steps) <= 8, steps
    assert steps == sorted(steps) and steps[0] == 1, "thinned evenly, the start kept"
    assert steps[-1] >= 33, "recent reports kept"
    assert controller.metrics == {"step": 40}, "the latest report is exact"
