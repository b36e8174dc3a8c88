"""Silence, busy workers and stuck ranks in the controller, with a fake worker group and a fake clock."""

from __future__ import annotations

import pytest

from ray_elastic.coordinator import policy
from ray_elastic.coordinator.controller import Failed, Forming, Restarting, Running
from ray_elastic.coordinator.liveness import CHECK, GONE, LOST, OK, verdict
from ray_elastic.errors import TrainingFailedError
from tests.unit.test_controller import events, make, node_ids, run_round, step_until

pytestmark = pytest.mark.timeout(60)


def train(controller, group, until, step: int = 0) -> int:
    """Step the controller while every healthy member commits, until `until()` holds."""
    for _ in range(20_000):
        if until():
            return step
        step += 1
        for worker_id in group.members:
            worker = group.workers[worker_id]
            if worker.status == "busy" and not (worker.hung or worker.stalled or worker.gil):
                group.progress(worker_id, step=step)
        controller.step()
    raise AssertionError(f"never happened; state {controller.state}")


# -- the rule ------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("pending", "alive", "failed", "gone", "now", "expected"),
    [
        (None, -1, -1, False, 100.0, OK),  # no probe outstanding
        (99.5, -1, -1, False, 100.0, OK),  # waited 0.5 s of 2
        (98.5, -1, -1, False, 100.0, CHECK),  # past half the bound: ask the native pulse
        (97.0, -1, -1, False, 100.0, CHECK),  # past the bound, but no native check failed since
        (97.0, -1, 97.5, False, 100.0, LOST),  # past the bound and a native check failed since
        (97.0, 98.9, 99.5, False, 100.0, CHECK),  # the pulse answered 1.1 s ago: counts as heard
        (97.0, -1, 96.0, False, 100.0, CHECK),  # a failure from before the probe does not count
        (99.9, -1, -1, True, 100.0, GONE),  # the process is gone: no need to wait
    ],
)
def test_verdict(pending, alive, failed, gone, now, expected):
    assert verdict(pending, alive, failed, gone, now, probe_timeout_s=2.0) == expected


def test_overdue_after_abort_spares_a_busy_writer_until_the_hang_bound():
    args = dict(aborted_at=100.0, abort_timeout_s=5.0, busy_limit_s=60.0)
    assert policy.overdue_after_abort(["a", "b"], {}, {}, now=106.0, **args) == ["a", "b"]
    busy = {"a": "writing durable checkpoint of commit 3"}
    assert policy.overdue_after_abort(["a", "b"], busy, {"a": 105.0}, now=106.0, **args) == ["b"]
    assert policy.overdue_after_abort(["a"], busy, {"a": 159.0}, now=161.0, **args) == ["a"]
    # Done writing at 150: it gets abort_timeout_s from the last answer that said it was busy.
    assert policy.overdue_after_abort(["a"], {"a": ""}, {"a": 150.0}, now=154.0, **args) == []
    assert policy.overdue_after_abort(["a"], {"a": ""}, {"a": 150.0}, now=155.5, **args) == ["a"]


# -- silence while running -----------------------------------------------------------------------------
def test_frozen_worker_is_lost_within_probe_timeout_not_hang_timeout():
    controller, group = make(nodes=3, min_nodes=2, hang_timeout_s=300.0, probe_timeout_s=2.0)
    run_round(controller, group, 0)
    frozen = group.member(1)
    step = train(controller, group, lambda: group.clock() > 1003.0)
    group.hang(frozen)
    t0 = group.clock()
    train(controller, group, lambda: not isinstance(controller.state, Running), step)
    detected = group.clock() - t0
    # Judged from the probe it left unanswered, sent at most one heartbeat (0.5 s) before the freeze here.
    assert 1.5 <= detected <= 2.0 + 0.5 + 0.3, f"lost after {detected:.2f}s (probe_timeout_s 2, heartbeat 0.5)"
    assert group.kills[0] == ([frozen], "silent")
    assert frozen in group.pulse_checks, "the native pulse was asked before declaring it lost"
    run_round(controller, group, 1)
    assert frozen not in group.plans[1].worker_ids and group.plans[1].world_size == 2
    [failure] = controller.failures
    assert (failure.kind, failure.rank) == ("silent", 1)
    assert "probe_timeout_s=2" in failure.message and "native pulse did not answer" in failure.message
    assert controller.restarts == 1
    [lost] = events(controller, "worker_lost")
    assert lost.data["trigger"].startswith("rank 1 (") and " silent: " in lost.data["trigger"]


def test_frozen_node_loses_both_its_workers_in_one_restart():
    controller, group = make(nodes=3, nproc=2, min_nodes=2, probe_timeout_s=2.0)
    run_round(controller, group, 0)
    frozen_node = node_ids(group)[2]
    step = train(controller, group, lambda: group.clock() > 1002.0)
    group.freeze_node(frozen_node)
    train(controller, group, lambda: isinstance(controller.state, Forming), step)
    run_round(controller, group, 1)
    assert node_ids(group) == node_ids(group, 0)[:2]
    assert sorted(f.rank for f in controller.failures) == [4, 5] and controller.restarts == 1
    assert {f.kind for f in controller.failures} == {"silent"}


def test_gil_holding_worker_is_busy_not_lost():
    controller, group = make(nodes=2, min_nodes=2, probe_timeout_s=2.0, hang_timeout_s=60.0)
    run_round(controller, group, 0)
    busy = group.member(1)
    step = train(controller, group, lambda: group.clock() > 1002.0)
    group.hold_gil(busy)  # a C call holding the GIL: probes go unanswered, the native pulse answers
    t0 = group.clock()
    step = train(controller, group, lambda: group.clock() - t0 > 20.0, step)
    assert isinstance(controller.state, Running) and controller.restarts == 0 and group.kills == []
    assert busy in group.pulse_checks
    [announced] = events(controller, "worker_busy")
    assert announced.data["worker_id"] == busy and "holds the GIL" in announced.message
    group.release(busy)
    train(controller, group, lambda: group.clock() - t0 > 25.0, step)
    assert isinstance(controller.state, Running) and controller.restarts == 0


def test_without_a_native_pulse_probes_alone_judge():
    controller, group = make(nodes=1, min_nodes=1, max_nodes=2, probe_timeout_s=2.0)
    group.add_node(pulse=False)
    run_round(controller, group, 0)
    frozen = group.member(1)
    step = train(controller, group, lambda: group.clock() > 1002.0)
    group.hang(frozen)
    t0 = group.clock()
    train(controller, group, lambda: not isinstance(controller.state, Running), step)
    assert group.clock() - t0 <= 2.8
    assert "no native pulse to ask" in controller.state.outcomes[frozen].message


def test_a_stalled_coordinator_does_not_blame_its_workers():
    controller, group = make(nodes=2, min_nodes=2, probe_timeout_s=2.0)
    run_round(controller, group, 0)
    step = train(controller, group, lambda: group.clock() > 1002.0)
    group.clock.advance(30.0)  # the coordinator itself did not run for 30 s; the workers were fine
    train(controller, group, lambda: group.clock() > 1040.0, step)
    assert isinstance(controller.state, Running) and controller.restarts == 0 and group.kills == []


# -- after an abort ------------------------------------------------------------------------------------
def test_dead_process_is_found_by_its_pulse_before_ray_reports_it():
    controller, group = make(nodes=3, min_nodes=2, probe_timeout_s=2.0, abort_timeout_s=5.0)
    run_round(controller, group, 0)
    r0, r1, r2 = group.members
    step = train(controller, group, lambda: group.clock() > 1002.0)
    group.vanish(r2)  # its node died; Ray has not said so yet
    group.fail(r1, "Connection reset by peer", communication=True, step=step)
    t0 = group.clock()
    step_until(controller, lambda: isinstance(controller.state, Forming))
    assert group.clock() - t0 < 0.5, "the native pulse found the dead process at once"
    run_round(controller, group, 1)
    assert group.plans[1].worker_ids == [r0, r1]
    assert [(f.kind, f.rank) for f in controller.failures] == [("died", 2)], "the dead rank is the cause"
    assert "refused" in controller.failures[0].message


def test_busy_checkpoint_writer_is_not_killed_when_a_peer_fails():
    controller, group = make(nodes=2, min_nodes=1, probe_timeout_s=2.0, abort_timeout_s=1.0,
                             hang_timeout_s=60.0)
    run_round(controller, group, 0)
    writer, peer = group.members
    step = train(controller, group, lambda: group.clock() > 1002.0)
    group.stall(writer)  # inside a long synchronous checkpoint write: it answers, it cannot leave yet
    group.set_busy(writer, "writing durable checkpoint of commit 40 for 0.1s")
    group.fail(peer, "boom", step=step)
    controller.step()
    assert isinstance(controller.state, Restarting)
    aborted_at = group.clock()
    step_until(controller, lambda: group.clock() - aborted_at > 10.0)
    assert group.kills == [] and isinstance(controller.state, Restarting), "busy, not hung"
    group.release(writer)  # the write finished; the severed group makes it leave
    run_round(controller, group, 1)
    assert [(f.kind, f.rank) for f in controller.failures] == [("exception", 1)]
    assert writer in group.plans[1].worker_ids and controller.restarts == 1


def test_busy_writer_past_the_hang_bound_is_killed_and_says_why():
    controller, group = make(nodes=2, min_nodes=1, probe_timeout_s=2.0, abort_timeout_s=1.0,
                             hang_timeout_s=20.0)
    run_round(controller, group, 0)
    writer, peer = group.members
    step = train(controller, group, lambda: group.clock() > 1002.0)
    group.stall(writer)
    group.set_busy(writer, "writing durable checkpoint of commit 40")
    group.fail(peer, "boom", step=step)
    controller.step()
    aborted_at = group.clock()
    step_until(controller, lambda: group.kills != [])
    assert 20.0 < group.clock() - aborted_at < 21.0
    run_round(controller, group, 1)
    hang = next(f for f in controller.failures if f.kind == "hang")
    assert "was still busy (writing durable checkpoint" in hang.message


# -- diagnosis -----------------------------------------------------------------------------------------
def test_hang_failure_names_the_stuck_rank_with_its_stack_and_where_the_others_wait():
    controller, group = make(nodes=3, min_nodes=3, hang_timeout_s=10.0, abort_timeout_s=2.0, max_restarts=0)
    run_round(controller, group, 0)
    stuck = group.member(1)
    stack = '  File "train.py", line 41, in stuck_in_user_code\n    time.sleep(1000)\n'
    step = train(controller, group, lambda: group.clock() > 1002.0)
    group.stall(stuck, stack=stack)
    train(controller, group, lambda: controller.state.terminal, step)
    assert isinstance(controller.state, Failed)
    error = controller.state.error
    assert isinstance(error, TrainingFailedError)
    first = error.first_failure
    assert (first.kind, first.rank) == ("hang", 1)
    assert "stuck_in_user_code" in first.traceback and "Stack of rank 1" in first.traceback
    assert "rank 0 waiting in gloo:all_reduce #7 (behind: rank 1 at #6)" in first.traceback
    assert "rank 2 waiting in gloo:all_reduce #7" in first.traceback
    assert "stuck_in_user_code" in str(error)
    [stuck_event] = events(controller, "stuck_ranks")
    assert "rank 1 (stuck) at train.py:41 in stuck_in_user_code, behind: issued #6, others #7" in stuck_event.message
    assert set(stuck_event.data["stacks"]) == {"0", "1", "2"}


def test_silent_failure_says_no_stack_and_where_the_others_wait():
    controller, group = make(nodes=2, min_nodes=2, probe_timeout_s=2.0, max_restarts=0)
    run_round(controller, group, 0)
    frozen = group.member(0)
    step = train(controller, group, lambda: group.clock() > 1002.0)
    group.hang(frozen)
    train(controller, group, lambda: controller.state.terminal, step)
    first = controller.state.error.first_failure
    assert first.kind == "silent" and first.rank == 0
    assert "No stack of rank 0" in first.traceback and "rank 1 at gloo:all_reduce #7" in first.traceback
    assert controller.state.error.failures[0].kind == "silent"
