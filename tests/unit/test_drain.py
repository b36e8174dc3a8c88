"""Node drains: the pure decisions (`coordinator/drain.py`) and the controller acting on them (fake group)."""

from __future__ import annotations

import math
from typing import Any

import pytest

from ray_elastic.config import RunConfig
from ray_elastic.coordinator.controller import Controller, Restarting, Running, Waiting
from ray_elastic.coordinator.drain import DrainNotice, StepClock, decide, time_needed_s
from ray_elastic.errors import NotEnoughNodesError
from ray_elastic.events import EventLog
from ray_elastic.testing.fake_group import FakeWorkerGroup

pytestmark = pytest.mark.timeout(60)


# -- decisions ---------------------------------------------------------------------------------------
def test_a_drain_with_time_to_spare_is_left_at_a_commit_and_a_close_one_is_a_crash():
    notices = {"a": DrainNotice("a", deadline=110.0), "b": DrainNotice("b", deadline=102.9),
               "c": DrainNotice("c", deadline=None), "x": DrainNotice("x", deadline=100.5)}
    # 1 s a step: leaving needs 2 steps + 1 s margin = 3 s.
    decision = decide(["a", "b", "c", "d"], notices, leaving=set(), now=100.0, seconds_per_step=1.0, margin_s=1.0)
    assert decision.leave == ("a", "c") and decision.crash == ("b",) and decision.withdrawn == ()
    assert "x" not in decision.leave + decision.crash, "a node outside the round is not the round's business"


def test_an_unknown_step_time_counts_only_the_margin():
    assert time_needed_s(None, 1.0) == 1.0 and time_needed_s(0.5, 1.0) == 2.0
    decision = decide(["a"], {"a": DrainNotice("a", 101.5)}, set(), 100.0, None, 1.0)
    assert decision.leave == ("a",)
    decision = decide(["a"], {"a": DrainNotice("a", 100.5)}, set(), 100.0, None, 1.0)
    assert decision.crash == ("a",)


def test_a_node_being_left_is_decided_once_then_crashes_only_at_its_deadline_or_stays_if_withdrawn():
    notices = {"a": DrainNotice("a", deadline=110.0)}
    assert not decide(["a"], notices, leaving={"a"}, now=109.9, seconds_per_step=5.0, margin_s=1.0)
    assert decide(["a"], notices, leaving={"a"}, now=110.0, seconds_per_step=5.0, margin_s=1.0).crash == ("a",)
    assert decide(["a"], {}, leaving={"a"}, now=105.0, seconds_per_step=1.0, margin_s=1.0).withdrawn == ("a",)


def test_notice_remaining_time_and_text():
    assert DrainNotice("a", None).remaining_s(5.0) == math.inf
    assert DrainNotice("a", 12.0).remaining_s(10.0) == 2.0
    assert DrainNotice("a", 12.0).describe(10.0) == "preemption, deadline in 2.0s"
    assert DrainNotice("a", None).describe(10.0) == "preemption, no deadline"


def test_step_clock_averages_over_its_window_and_ignores_repeats():
    clock = StepClock(window=3)
    assert clock.seconds_per_step() is None
    clock.observe(0.0, 1)
    clock.observe(0.5, 1)  # same step seen again
    assert clock.seconds_per_step() is None
    clock.observe(1.0, 3)
    assert clock.seconds_per_step() == 0.5
    clock.observe(2.0, 4)
    clock.observe(5.0, 5)  # window 3: (1.0, 3) .. (5.0, 5)
    assert clock.seconds_per_step() == 2.0
    clock.observe(6.0, None)
    clock.reset()
    assert clock.seconds_per_step() is None


# -- the controller, on a fake group ---------------------------------------------------------------------
def make(nodes: int, **settings: Any) -> tuple[Controller, FakeWorkerGroup]:
    settings.setdefault("max_nodes", nodes)
    config = RunConfig(run_id="unit", **settings)
    group = FakeWorkerGroup()
    for _ in range(nodes):
        group.add_node()
    return Controller(config, group, EventLog("unit"), clock=group.clock, poll_s=0.05), group


def train(controller: Controller, group: FakeWorkerGroup, steps: int, step_s: float = 0.5) -> None:
    """Members commit `steps` more steps, `step_s` apart (in fake time)."""
    for _ in range(steps):
        for worker_id in group.members:
            worker = group.workers[worker_id]
            if worker.status == "busy":
                group.progress(worker_id, step=(worker.step or 0) + 1)
        for _ in range(int(step_s / 0.05)):
            controller.step()


def until(controller: Controller, done: Any, limit: int = 5_000) -> None:
    for _ in range(limit):
        if done():
            return
        assert not controller.state.terminal, controller.state
        controller.step()
    raise AssertionError(f"not reached; state {controller.state}")


def running(controller: Controller, round_id: int) -> bool:
    return isinstance(controller.state, Running) and controller.state.plan.round_id == round_id


def drain_events(controller: Controller) -> list[Any]:
    return [e for e in controller.events.events if e.kind == "drain"]


def test_drained_node_is_left_at_a_commit_without_a_restart_and_never_chosen_again():
    controller, group = make(nodes=3, min_nodes=1)
    until(controller, lambda: running(controller, 0))
    train(controller, group, 5)
    group.drain_node("node-0002", deadline_in_s=30.0)
    controller.step()
    assert group.stops == [0], "asked to stop at the next commit, like a scale-up"
    [event] = drain_events(controller)
    assert event.data["node_id"] == "node-0002" and event.data["path"] == "commit"
    assert "preemption, deadline in 30.0s" in event.message and "next commit" in event.message
    until(controller, lambda: running(controller, 1))
    assert [g.node_id for g in group.plans[1].groups] == ["node-0001", "node-0003"]
    assert controller.restarts == 0 and controller.rounds[-1].cause == "drain"
    assert [e.data["left"] for e in controller.events.events if e.kind == "scale_down"] == [["node-0002"]]
    group.add_node()  # a newcomer joins; the drained node, still alive and ready, stays out
    until(controller, lambda: running(controller, 2))
    assert "node-0002" not in [g.node_id for g in group.plans[2].groups]
    assert len(drain_events(controller)) == 1


def test_drain_too_close_to_its_deadline_is_dropped_at_once_as_a_crash():
    controller, group = make(nodes=2, min_nodes=1)
    until(controller, lambda: running(controller, 0))
    train(controller, group, 6, step_s=2.0)  # 2 s a step: leaving at a commit needs ~5 s
    victim = group.members[1]
    group.drain_node("node-0002", deadline_in_s=3.0)
    controller.step()
    assert isinstance(controller.state, Restarting)
    [event] = drain_events(controller)
    assert event.data["path"] == "crash" and "too close" in event.message and "restart charged" in event.message
    assert group.kills[0] == ([victim], "node drained, deadline too close for a commit")
    until(controller, lambda: running(controller, 1))
    assert controller.restarts == 1 and [g.node_id for g in group.plans[1].groups] == ["node-0001"]
    [failure] = controller.failures
    assert failure.node_id == "node-0002" and "drained by Ray" in failure.message


def test_a_drain_still_in_the_round_at_its_deadline_is_dropped_then():
    controller, group = make(nodes=2, min_nodes=1)
    group.stop_on_request = False  # the ranks never reach a commit
    until(controller, lambda: running(controller, 0))
    group.drain_node("node-0002", deadline_in_s=5.0)
    controller.step()
    assert [e.data["path"] for e in drain_events(controller)] == ["commit"]
    until(controller, lambda: isinstance(controller.state, Restarting))
    assert [e.data["path"] for e in drain_events(controller)] == ["commit", "crash"]
    assert group.clock() >= 1000.0 + 5.0 - 1e-9


def test_a_withdrawn_drain_keeps_the_node():
    controller, group = make(nodes=2, min_nodes=1)
    group.stop_on_request = False
    until(controller, lambda: running(controller, 0))
    train(controller, group, 3)
    group.drain_node("node-0002", deadline_in_s=60.0)
    controller.step()
    group.withdraw_drain("node-0002")
    controller.step()
    assert [e.data["path"] for e in drain_events(controller)] == ["commit", "withdrawn"]
    for worker_id in group.members:  # the stop asked for the drain lands at the next commit
        group.stop(worker_id)
    until(controller, lambda: running(controller, 1))
    assert [g.node_id for g in group.plans[1].groups] == ["node-0001", "node-0002"], "the node stays"
    assert controller.restarts == 0 and controller.rounds[-1].cause == "drain withdrawn"


def test_two_nodes_drained_at_once_down_to_min_nodes():
    controller, group = make(nodes=4, min_nodes=2)
    until(controller, lambda: running(controller, 0))
    train(controller, group, 3)
    group.drain_node("node-0001", 30.0)
    group.drain_node("node-0003", 30.0)
    until(controller, lambda: running(controller, 1))
    assert [g.node_id for g in group.plans[1].groups] == ["node-0002", "node-0004"]
    assert group.stops == [0] and controller.restarts == 0
    assert sorted(e.data["node_id"] for e in drain_events(controller)) == ["node-0001", "node-0003"]


def test_drained_below_min_nodes_waits_then_resumes_or_fails_clearly():
    controller, group = make(nodes=2, min_nodes=2, wait_for_nodes_timeout_s=20.0)
    until(controller, lambda: running(controller, 0))
    group.drain_node("node-0002", 30.0)
    until(controller, lambda: isinstance(controller.state, Waiting))
    assert controller.state.cause == "drain" and controller.restarts == 0
    group.add_node()
    until(controller, lambda: running(controller, 1))
    assert [g.node_id for g in group.plans[1].groups] == ["node-0001", "node-0003"]

    controller, group = make(nodes=2, min_nodes=2, wait_for_nodes_timeout_s=20.0)
    until(controller, lambda: running(controller, 0))
    group.drain_node("node-0001", 30.0)
    summary = controller.run()
    assert isinstance(summary.error, NotEnoughNodesError) and summary.restarts == 0
    assert "min_nodes=2" in str(summary.error)


# -- handing the commit over when every node of the round is drained ---------------------------------------
def test_a_drained_node_with_survivors_is_released_at_once():
    controller, group = make(nodes=2, min_nodes=1)
    until(controller, lambda: running(controller, 0))
    group.drain_node("node-0002", 30.0)
    until(controller, lambda: running(controller, 1))
    assert group.handovers == [] and ["node-0002/0"] in [kill for kill, _ in group.kills]
    assert group.workers["node-0002/0"].status == "dead"


def test_a_lone_drained_node_trains_on_until_a_replacement_is_ready_then_hands_its_commit_over():
    controller, group = make(nodes=1, max_nodes=1)
    until(controller, lambda: running(controller, 0))
    train(controller, group, 3)
    group.drain_node("node-0001", deadline_in_s=60.0)
    train(controller, group, 10)
    assert group.stops == [] and isinstance(controller.state, Running), "nobody else would hold the commit"
    group.add_node()
    until(controller, lambda: running(controller, 1))
    assert [g.node_id for g in group.plans[1].groups] == ["node-0002"]
    assert group.handovers == [("node-0001/0", "node-0002/0")]
    [handover] = [e for e in drain_events(controller) if e.data["path"] == "handover"]
    assert handover.data["ok"] and handover.data["to"] == "node-0002"
    assert group.workers["node-0001/0"].status == "dead", "released once it handed over"
    assert controller.restarts == 0


def test_a_lone_drained_node_leaves_at_a_commit_near_its_deadline_and_is_kept_for_a_late_replacement():
    controller, group = make(nodes=1, max_nodes=1, wait_for_nodes_timeout_s=60.0)
    until(controller, lambda: running(controller, 0))
    train(controller, group, 4, step_s=1.0)  # leaving needs 1 + 2 x 1 = 3 s; held while 6 s or more remain
    group.drain_node("node-0001", deadline_in_s=10.0)
    drained_at = group.clock()
    until(controller, lambda: isinstance(controller.state, Waiting))
    assert 4.0 - 0.5 <= group.clock() - drained_at <= 4.0 + 1.5, "left when the deadline came within 6 s"
    assert group.workers["node-0001/0"].status == "ready", "kept: it may hold the last commit"
    group.add_node()
    until(controller, lambda: running(controller, 1))
    assert group.handovers == [("node-0001/0", "node-0002/0")] and controller.restarts == 0


def test_a_kept_drained_node_is_released_near_its_deadline_without_a_replacement():
    controller, group = make(nodes=1, max_nodes=1, wait_for_nodes_timeout_s=60.0)
    until(controller, lambda: running(controller, 0))
    group.drain_node("node-0001", deadline_in_s=10.0)
    until(controller, lambda: group.workers["node-0001/0"].status == "dead")
    assert 10.0 - 1.0 - 0.5 <= group.clock() - 1000.0 <= 10.0, "released drain_margin_s before the deadline"
    group.add_node()
    until(controller, lambda: running(controller, 1))
    assert group.handovers == []


def test_progress_shows_drains_in_a_notebook_bar_and_in_log_lines():
    import io

    from ray_elastic.events import Event
    from ray_elastic.progress import BarProgress, LogProgress

    drained = [Event("drain", "r", 0, "RUNNING", "node abc is being drained by Ray (preemption, deadline in 9.0s): "
                     "leaving it at the next commit"),
               Event("scale_down", "r", 0, "RUNNING", "members left at a commit: drained node(s) abc leave the run")]
    snapshot = {"state": "RUNNING", "round_id": 0, "world_size": 2, "num_nodes": 2, "restarts": 0,
                "metrics": {"step": 3}, "events": drained}
    for display in (BarProgress(stream=io.StringIO()), LogProgress(stream=io.StringIO())):
        stream = display.stream if isinstance(display, LogProgress) else display._stream
        display.update(snapshot)
        display.close()
        text = stream.getvalue()
        assert "being drained by Ray (preemption, deadline in 9.0s)" in text and "leave the run" in text
