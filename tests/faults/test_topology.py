"""Fault matrix rows 4-6: a node crashes, nodes join, the cluster drops below min_nodes."""

from __future__ import annotations

import os
import signal
import time

import pytest
import ray

import ray_elastic
from ray_elastic.api import coordinator_name
from ray_elastic.worker.process_group import GLOO_CONNECT_WAIT_FACTOR, form_timeout_s
from tests.cluster.background import BackgroundRun
from tests.faults.matrix import check_run, detection_s, ensure_nodes, timeline
from tests.workloads import ddp_train

pytestmark = [pytest.mark.cluster, pytest.mark.timeout(240)]

# Ray's node health check on the cluster (LocalCluster defaults): a node is declared dead after about this long.
HEALTH_CHECK_BOUND_S = 1.0 * 5
# How long a rank waits in gloo's connect for a peer lost mid-connect, at world size 3 (see form_timeout_s).
FORMING_BOUND_S = GLOO_CONNECT_WAIT_FACTOR * form_timeout_s(3)
# A new node's raylet and worker start, import torch and join: 7 s measured; a bound for a loaded 2-core machine.
NODE_START_BOUND_S = 45.0


def test_row4_losing_a_node_continues_on_fewer_nodes(cluster, no_leaks, trace, figures, tmp_path):
    ensure_nodes(cluster, 3)
    steps = 1000  # lowered through stop_at once the run recovered
    run = BackgroundRun(tmp_path, ddp_train, config={"steps": steps, "sleep_s": 0.05, "trace_dir": str(trace.dir)},
                        min_nodes=2, max_nodes=3, max_restarts=3)
    run.wait_for("round_formed", world_size=3)
    trace.wait_for_step(3, alive=run.alive)
    crashed_at = time.time()
    cluster.kill_node(cluster.nodes[-1], graceful=False)
    # The round after the loss; not the second round of the run, which may be a scale-up from
    # 2 to 3 nodes when the third node's worker was ready late.
    run.wait_for("round_formed", cause="restart")
    steps = trace.stop_at(trace.wait_for_step(trace.commits()[-1].step + 1, alive=run.alive).step + 10)
    result = run.join()
    detected = detection_s(result.events, crashed_at)
    figures(4, "node crash", detection_s=detected, recovery_s=trace.recovery_s(crashed_at),
            steps_redone=trace.redone(), restarts=result.restarts, budget=3)
    check_run(result, steps, restarts=1, trace=trace)
    assert result.rounds[-1].num_nodes == 2, "shrank to the surviving nodes, still >= min_nodes"
    assert detected is not None and detected < 2 * HEALTH_CHECK_BOUND_S, (
        f"node loss seen after {detected}s; the health-check bound is {HEALTH_CHECK_BOUND_S}s"
    )
    # 0.08-2.3 s measured (survivors see the loss in a collective); 10.9 s once on a loaded CI machine, with
    # detection inside its bound. The row's promise is detection; this bound catches a re-form that waits for
    # a timeout, and the message shows what the run did meanwhile.
    # A node lost as a round forms (the scale-up to 3, when its worker was ready late) leaves the survivors in gloo's
    # connect until it gives up (FORMING_BOUND_S); they say they are busy, keep the commit, and are not killed.
    recovery = trace.recovery_s(crashed_at)
    assert recovery is not None and recovery < 3 * HEALTH_CHECK_BOUND_S + FORMING_BOUND_S, (
        f"recovered after {recovery}s; events since the kill:\n{timeline(result.events, crashed_at)}"
    )
    assert trace.redone() == 0, (
        "the survivors held the last commit: nothing committed is redone\n"
        f"{trace.describe_redone()}\nevents since the kill:\n{timeline(result.events, crashed_at)}"
    )
    no_leaks(result.worker_pids, ports=trace.ports())


def test_row5_nodes_join_at_a_commit_never_above_max_and_free(cluster, no_leaks, trace, figures, tmp_path):
    ensure_nodes(cluster, 2)
    run = BackgroundRun(tmp_path, ddp_train, config={"steps": 10_000, "sleep_s": 0.05, "trace_dir": str(trace.dir)},
                        min_nodes=2, max_nodes=3, max_restarts=0)
    run.wait_for("round_formed")
    trace.wait_for_step(3, alive=run.alive)
    joined_at = time.time()
    for _ in range(2):  # two nodes in a burst; only one fits under max_nodes=3
        cluster.add_node()
    grown = run.wait_for("round_formed", count=2)
    # End the run a little after the scale-up, however long the nodes took to start.
    steps = trace.stop_at(trace.commits()[-1].step + 30)
    result = run.join()
    figures(5, "nodes join (2, room for 1)", detection_s=detection_s(result.events, joined_at, kind="node_ready"),
            recovery_s=trace.recovery_s(joined_at), steps_redone=trace.redone(), restarts=result.restarts, budget=0)
    assert grown["data"]["cause"] == "scale-up" and grown["data"]["world_size"] == 3
    check_run(result, steps, restarts=0, trace=trace)
    assert max(r.world_size for r in result.rounds) == 3
    worlds = result.return_values[0]["worlds"]
    assert worlds[0] == 2 and worlds[-1] == 3 and worlds == sorted(worlds), "grew once, at a commit"
    assert all(v["resets"] == [3] for v in result.return_values), "reset callbacks saw the new world"
    newcomer = [v for v in result.return_values if v["restored_from"] == "peer"]
    assert len(newcomer) == 1, "the newcomer received state from a survivor"
    final_round = result.rounds[-1].round_id
    restored = [[d for r, _, d in v["restores"] if r == final_round] for v in result.return_values]
    assert all(len(d) == 1 for d in restored)
    assert all(d == restored[0] for d in restored), "newcomer's model+optimizer state equals survivors'"
    assert any(x != 0.0 for x in restored[0])
    assert trace.redone() == 0, "a scale-up loses no committed step"
    no_leaks(result.worker_pids, ports=trace.ports())


def test_row5_newcomer_lost_as_its_first_round_forms_costs_the_survivors_nothing(cluster, no_leaks, trace, tmp_path):
    """Row 5's join, with the joining worker SIGKILLed as soon as it is ready: the round that admits it forms
    with a dead member and is aborted while the survivors still connect to its store (closed by the abort).
    They leave that round at once, not after the abort timeout (which kills them with the commit they hold),
    restore the commit from memory and go on; the dead newcomer's replacement joins later."""
    ensure_nodes(cluster, 2)
    name = f"doomed-join-{time.time_ns()}"
    run = BackgroundRun(tmp_path, ddp_train, config={"steps": 10_000, "sleep_s": 0.05, "trace_dir": str(trace.dir)},
                        min_nodes=2, max_nodes=3, max_restarts=1, name=name)
    run.wait_for("round_formed")
    trace.wait_for_step(3, alive=run.alive)
    coordinator = ray.get_actor(coordinator_name(name))
    survivors = set(ray.get(coordinator.worker_pids.remote()))
    cluster.add_node()
    deadline = time.monotonic() + NODE_START_BOUND_S
    while not (newcomer := set(ray.get(coordinator.worker_pids.remote())) - survivors):
        assert time.monotonic() < deadline and run.alive(), "the new node's worker never became ready"
        time.sleep(0.01)
    os.kill(newcomer.pop(), signal.SIGKILL)
    # Back at 3: the replacement joins by a later scale-up, or in the restart round itself when it is ready by then
    # (a survivor caught in TCPStore's connect back-off of the aborted round's store leaves ~2 s later).
    run.wait_for("round_formed", count=2, world_size=3, timeout_s=NODE_START_BOUND_S)
    steps = trace.stop_at(trace.commits()[-1].step + 10)
    result = run.join()
    check_run(result, steps, restarts=1, trace=trace)
    (restart,) = [e for e in result.events if e.kind == "restart"]
    assert len(restart.data["causes"]) == 1, restart.message  # the newcomer only: no survivor was killed as hung
    assert survivors <= {v["pid"] for v in result.return_values}, "the survivors kept their processes"
    after = [r for r in result.rounds if r.cause == "restart"][0].round_id
    assert all(v["restores"][-1][1] in ("memory", "peer") for v in result.return_values)
    assert all(dict((r, how) for r, how, _ in v["restores"]).get(after) == "memory"
               for v in result.return_values if v["pid"] in survivors), "the commit came back from memory"
    assert trace.redone() == 0, "the survivors left at a commit: nothing redone"
    no_leaks(result.worker_pids, ports=trace.ports())


def test_row6_below_min_waits_and_resumes_when_a_node_returns(cluster, no_leaks, trace, figures, tmp_path):
    ensure_nodes(cluster, 2)
    steps = 1000  # lowered through stop_at once the run resumed
    run = BackgroundRun(tmp_path, ddp_train, config={"steps": steps, "sleep_s": 0.05, "trace_dir": str(trace.dir)},
                        min_nodes=2, max_nodes=2, max_restarts=2, wait_for_nodes_timeout_s=60)
    run.wait_for("round_formed")
    trace.wait_for_step(3, alive=run.alive)
    crashed_at = time.time()
    cluster.kill_node(cluster.nodes[-1], graceful=False)
    waiting = run.wait_for("waiting", missing=1)
    assert "1 more node" in waiting["message"]
    returned_at = time.time()
    cluster.add_node()
    run.wait_for("round_formed", count=2)
    steps = trace.stop_at(trace.wait_for_step(trace.commits()[-1].step + 1, alive=run.alive).step + 10)
    result = run.join()
    figures(6, "below min, a node returns", detection_s=detection_s(result.events, crashed_at),
            recovery_s=trace.recovery_s(crashed_at), steps_redone=trace.redone(), restarts=result.restarts, budget=2,
            recovery_after_return_s=trace.recovery_s(returned_at))
    check_run(result, steps, restarts=1, trace=trace)
    assert result.rounds[-1].world_size == 2
    assert trace.redone() == 0, "the survivor held the last commit while it waited"
    resumed = trace.recovery_s(returned_at)
    assert resumed is not None and resumed < NODE_START_BOUND_S, f"resumed {resumed}s after the node returned"
    no_leaks(result.worker_pids, ports=trace.ports())


def test_row6_below_min_fails_clearly_after_timeout(cluster, no_leaks, trace, figures, tmp_path):
    ensure_nodes(cluster, 2)
    run = BackgroundRun(tmp_path, ddp_train, config={"steps": 500, "sleep_s": 0.05, "trace_dir": str(trace.dir)},
                        min_nodes=2, max_nodes=2, max_restarts=2, wait_for_nodes_timeout_s=3)
    run.wait_for("round_formed")
    trace.wait_for_step(3, alive=run.alive)
    crashed_at = time.time()
    cluster.kill_node(cluster.nodes[-1], graceful=False)
    with pytest.raises(ray_elastic.NotEnoughNodesError) as info:
        run.join()
    failed_after = detection_s(run.events(), crashed_at, kind="failed")
    figures(6, "below min, no node returns (wait 3 s)", detection_s=detection_s(run.events(), crashed_at),
            steps_redone=trace.redone(), restarts=info.value.restarts, budget=2, failed_after_s=failed_after)
    assert "min_nodes=2" in str(info.value) and "add nodes" in str(info.value)
    assert info.value.restarts == 1, "the node loss was counted once"
    assert failed_after is not None and 3 <= failed_after < 30
    no_leaks(ports=trace.ports())


def test_row6_a_cluster_with_no_worker_node_yet_waits_for_one(cluster, no_leaks, tmp_path):
    """The head holds no CPU and no worker node is up yet (nodes still coming, or an autoscaler about
    to add them; issue 18.4): the run waits for a node instead of failing up front. Last in the file:
    the cluster is down to one node here already."""
    cluster.resize(0)
    run = BackgroundRun(tmp_path, ddp_train, config={"steps": 3}, min_nodes=1, wait_for_nodes_timeout_s=120)
    waiting = run.wait_for("waiting", timeout_s=60)
    assert "1 more node" in waiting["message"] and waiting["data"]["missing"] == 1
    cluster.add_node()
    result = run.join()
    assert [v["log"] for v in result.return_values] == [[1, 2, 3]] and result.restarts == 0
    no_leaks(result.worker_pids)
