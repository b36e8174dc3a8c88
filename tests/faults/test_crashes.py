"""Fault matrix rows 0-3, 7 and 8: no fault, two ranks raising at once then one, a SIGKILL, a hang, budget spent."""

from __future__ import annotations

import os
import signal
import statistics
import time

import pytest

import ray_elastic
from ray_elastic.testing import FaultInjector
from ray_elastic.testing.leaks import find_leaks
from tests.cluster.background import BackgroundRun
from tests.faults.matrix import DeathWatch, check_run, detection_s, ensure_nodes, read_events
from tests.workloads import ddp_train

pytestmark = [pytest.mark.cluster, pytest.mark.timeout(240)]

# Bounds on timings that hold on this 2-core machine under load (measured figures are in the fault matrix):
# a dead process is seen by Ray within milliseconds (0.03 s measured), survivors re-form at once (0.07-0.26 s).
DETECTION_BOUND_S = 1.0  # RELIABILITY.md, row 2
RECOVERY_BOUND_S = 5.0


def test_row0_happy_path_places_one_group_per_node(cluster, no_leaks, trace, figures):
    ensure_nodes(cluster, 4)
    steps = 20
    started = time.time()
    result = ray_elastic.run(ddp_train, config={"steps": steps, "trace_dir": str(trace.dir)},
                             min_nodes=2, max_nodes=2, nproc_per_node=2, progress="none")
    commits = trace.commits()
    figures(0, "none", restarts=result.restarts, budget=3, steps_redone=trace.redone(),
            startup_s=commits[0].wall - started,
            step_s=statistics.median(b.wall - a.wall for a, b in zip(commits, commits[1:])))
    values = result.return_values
    assert len(values) == 4
    check_run(result, steps, restarts=0, trace=trace)
    assert [(r.round_id, r.world_size) for r in result.rounds] == [(0, 4)]
    for v in values:
        rank = v["rank"]
        assert v["context"] == {
            "rank": rank, "local_rank": rank % 2, "world_size": 4, "local_world_size": 2,
            "node_rank": rank // 2, "num_nodes": 2, "restart_count": 0, "round_id": 0,
        }
        env = v["env"]
        assert env["RANK"] == str(rank) and env["LOCAL_RANK"] == str(rank % 2)
        assert env["WORLD_SIZE"] == "4" and env["LOCAL_WORLD_SIZE"] == "2" and env["GROUP_RANK"] == str(rank // 2)
        assert env["TORCHELASTIC_RESTART_COUNT"] == "0" and env["TORCHELASTIC_MAX_RESTARTS"] == "3"
        assert env["TORCHELASTIC_RUN_ID"] == result.run_id
        assert int(env["MASTER_PORT"]) > 0
    assert result.metrics["step"] == steps
    assert trace.redone() == 0
    no_leaks(result.worker_pids, ports=trace.ports())


def test_rows_7_and_1_two_ranks_raising_together_count_once_then_one_raise_resumes_from_the_last_commit(
        cluster, no_leaks, trace, figures):
    """Rows 7 and 1 in one run: ranks 1 and 2 raise at the same step (one restart for both), then rank 1
    raises alone in the next round (a second restart); each time training resumes from the last commit."""
    ensure_nodes(cluster, 4)
    steps = 24
    faults = (FaultInjector(log_path=trace.faults_log).fail_at(rank=1, step=4).fail_at(rank=2, step=4)
              .fail_at(rank=1, step=17, restart_count=1))
    result = ray_elastic.run(ddp_train, config={"steps": steps, "faults": faults, "trace_dir": str(trace.dir)},
                             min_nodes=3, max_nodes=3, max_restarts=2, progress="none")
    fired = trace.fired()
    assert sorted((f.rank, f.step) for f in fired[:2]) == [(1, 4), (2, 4)] and (fired[2].rank, fired[2].step) == (1, 17)
    together, once = min(f.wall for f in fired[:2]), fired[2].wall
    figures(7, "two ranks raise together", detection_s=detection_s(result.events, together),
            recovery_s=trace.recovery_s(together), steps_redone=trace.redone(), restarts=1, budget=2)
    detected = detection_s(result.events, once)
    figures(1, "train_fn raises once", detection_s=detected, recovery_s=trace.recovery_s(once),
            steps_redone=trace.redone(), restarts=1, budget=2)
    check_run(result, steps, restarts=2, trace=trace)
    assert [v["context"]["restart_count"] for v in result.return_values] == [2, 2, 2]
    restarts = [e for e in result.events if e.kind == "restart"]
    assert [e.data["restarts"] for e in restarts] == [1, 2], "two ranks failing together counted once"
    assert len(restarts[0].data["causes"]) == 2 and all("InjectedFault" in e.message for e in restarts)
    assert trace.first_commit_after(together).step == 5, "resumed from the last commit (step 4)"
    assert trace.first_commit_after(once).step == 18, "resumed from the last commit (step 17)"
    assert trace.redone() == 0
    for fault_time in (together, once):
        recovery = trace.recovery_s(fault_time)
        assert recovery is not None and recovery < RECOVERY_BOUND_S, f"recovered after {recovery}s"
    assert detected is not None and detected < DETECTION_BOUND_S
    no_leaks(result.worker_pids, ports=trace.ports())


def test_row2_sigkill_of_a_worker_costs_one_restart(cluster, no_leaks, trace, figures, tmp_path):
    ensure_nodes(cluster, 4)
    name = f"sigkill-{time.time_ns()}"
    run = BackgroundRun(tmp_path, ddp_train, config={"steps": 10_000, "sleep_s": 0.05, "trace_dir": str(trace.dir)},
                        min_nodes=2, max_nodes=4, max_restarts=3, name=name)
    run.wait_for("round_formed", world_size=4)  # at full size: the kill does not meet a scale-up forming
    rank0 = trace.wait_for_step(trace.commits()[-1].step + 3 if trace.commits() else 3, alive=run.alive)
    victim = next(pid for pid in trace.commits_by_process() if pid != rank0.pid)  # a member: it committed
    killed_at = time.time()
    os.kill(victim, signal.SIGKILL)
    steps = trace.stop_at(trace.wait_for_commit_after(killed_at, alive=run.alive).step + 10)
    result = run.join()
    detected = detection_s(result.events, killed_at)
    figures(2, "worker SIGKILL", detection_s=detected, recovery_s=trace.recovery_s(killed_at),
            steps_redone=trace.redone(), restarts=result.restarts, budget=3)
    check_run(result, steps, restarts=1, trace=trace)
    assert any(e.kind == "restart" and "died" in e.message for e in result.events)
    assert victim not in {v["pid"] for v in result.return_values}
    assert detected is not None and detected < DETECTION_BOUND_S, f"detection took {detected}s"
    recovery = trace.recovery_s(killed_at)
    assert recovery is not None and recovery < RECOVERY_BOUND_S, f"recovered after {recovery}s"
    assert trace.redone() == 0, "the survivors held the last commit: nothing committed is redone"
    no_leaks(result.worker_pids, ports=trace.ports())


def test_a_killed_workers_replacement_starts_once_the_survivors_commit(cluster, no_leaks, trace, tmp_path):
    """A worker is SIGKILLed; in the restart round rank 0 waits at a gate before its first step. No new worker
    process starts beside the survivors' recovery: the dead one's replacement starts after their first
    commit, then joins at a commit."""
    ensure_nodes(cluster, 4)
    gate = tmp_path / "gate"
    gate.touch()
    config = {"steps": 10_000, "sleep_s": 0.05, "trace_dir": str(trace.dir),
              "gate": {"path": str(gate), "rank": 0, "restart_count": 1}}
    run = BackgroundRun(tmp_path, ddp_train, config=config, min_nodes=2, max_nodes=3, max_restarts=1,
                        replacement_wait_s=60.0, join_debounce_s=0.0)
    run.wait_for("round_formed", world_size=3)
    rank0 = trace.wait_for_step(trace.commits()[-1].step + 3 if trace.commits() else 3, alive=run.alive)
    victim = next(pid for pid in trace.commits_by_process() if pid != rank0.pid)
    full_rounds = sum(1 for e in run.events() if e["kind"] == "round_formed" and e["data"]["world_size"] == 3)
    killed_at = time.time()
    os.kill(victim, signal.SIGKILL)
    shrunk = run.wait_for("round_formed", world_size=2, cause="restart")
    time.sleep(5.0)  # a replacement's start takes ~3 s here: it would be ready by now if it had started
    early = [e["kind"] for e in run.events() if e["kind"] in ("workers_started", "node_ready")
             and e["time"] > killed_at]
    assert early == [], "a new worker started beside the survivors' recovery:\n" + "\n".join(
        f"{e['kind']} {e['message']} {e['time'] - killed_at:+.2f}s" for e in run.events())
    opened_at = time.time()
    gate.unlink()
    grown = run.wait_for("round_formed", count=full_rounds + 1, world_size=3, timeout_s=120)
    trace.stop_at(trace.wait_for_round_commits(grown["round_id"], steps=2, alive=run.alive).step + 2)
    result = run.join()
    [started] = [e for e in result.events if e.kind == "workers_started"]
    assert f"the survivors made progress in round {shrunk['round_id']}" in started.message
    assert started.data["started"] == 1 and started.time > opened_at
    assert result.restarts == 1 and trace.redone() == 0
    assert victim not in {v["pid"] for v in result.return_values}
    no_leaks(result.worker_pids, ports=trace.ports())


def test_row3_stopped_rank_is_left_behind_as_silent_and_a_woken_one_cannot_rejoin(cluster, no_leaks, trace, figures,
                                                                                   tmp_path):
    """Two hangs (SIGSTOP of the worker process): a stopped process answers neither probes nor its
    native pulse, so it is lost to silence within probe_timeout_s, long before hang_timeout_s. The first
    is woken (SIGCONT) as soon as the round is aborted and must only come back through a new round; the
    second stays stopped and is killed."""
    ensure_nodes(cluster, 4)
    steps, hang_timeout_s, probe_timeout_s = 30, 8.0, 2.0
    faults = (FaultInjector(log_path=trace.faults_log).hang_at(rank=1, step=5)
              .hang_at(rank=1, step=12, restart_count=1))
    started = time.monotonic()
    config = {"steps": steps, "faults": faults, "trace_dir": str(trace.dir), "sleep_s": 0.05}
    run = BackgroundRun(tmp_path, ddp_train, config=config, min_nodes=2, max_nodes=3, max_restarts=2,
                        hang_timeout_s=hang_timeout_s, probe_timeout_s=probe_timeout_s)
    run.wait_for("worker_lost", timeout_s=120)
    woken = trace.fired()[0]
    os.kill(woken.pid, signal.SIGCONT)  # the stale worker wakes inside the round that was just aborted
    run.wait_for("worker_lost", count=2, timeout_s=120)
    fired = trace.fired()
    assert len(fired) == 2, f"a round was lost without a hang: {[(e['kind'], e['message']) for e in run.events()]}"
    stopped = fired[1]
    watch = DeathWatch(stopped.pid)
    result = run.join()
    died_at = watch.wait(10)
    events = result.events
    detections = [detection_s(events, f.wall) for f in trace.fired()]
    figures(3, "worker hang (SIGSTOP)", detection_s=detections[1], recovery_s=trace.recovery_s(stopped),
            steps_redone=trace.redone(), restarts=result.restarts, budget=2, hang_timeout_s=hang_timeout_s,
            woken_detection_s=detections[0], killed_after_s=None if died_at is None else died_at - stopped.wall,
            woken_rejoined=woken.pid in {v["pid"] for v in result.return_values})
    assert time.monotonic() - started < 150
    check_run(result, steps, restarts=2, trace=trace)
    restart = [e for e in events if e.kind == "restart"]
    assert len(restart) == 2 and all("(silent)" in e.message for e in restart), [e.message for e in restart]
    for detected in detections:  # silence, not the hang watchdog: well within hang_timeout_s
        assert detected is not None and detected < probe_timeout_s + 0.5 + 3.0 < hang_timeout_s
    assert died_at is not None, "the rank that stayed stopped was killed"
    assert died_at - stopped.wall < probe_timeout_s + 0.5 + 5.0
    assert stopped.pid not in {v["pid"] for v in result.return_values}
    assert all(" silent: " in e.data["trigger"] for e in events if e.kind == "worker_lost")
    for v in result.return_values:  # the woken worker too, if it survived: it came back only through new rounds
        entered = [round_id for round_id, _, _ in v["restores"]]
        assert entered == sorted(set(entered)), f"pid {v['pid']} entered an old round again: {entered}"
    no_leaks(result.worker_pids, ports=trace.ports())


def test_row8_budget_exhausted_fails_naming_the_first_failure(cluster, no_leaks, trace, figures, tmp_path):
    ensure_nodes(cluster, 4)
    events_path = tmp_path / "events.jsonl"
    faults = (FaultInjector(log_path=trace.faults_log).fail_at(rank=1, step=3)
              .fail_at(rank=1, step=5, restart_count=1).fail_at(rank=1, step=7, restart_count=2))
    with pytest.raises(ray_elastic.TrainingFailedError) as info:
        ray_elastic.run(ddp_train, config={"steps": 20, "faults": faults, "trace_dir": str(trace.dir)},
                        min_nodes=2, max_restarts=2, event_log_path=str(events_path), progress="none")
    raised_at = time.time()
    leaks = find_leaks(timeout_s=10, raylet_pids=cluster.raylet_pids(), ports=trace.ports())
    cleanup_s = time.time() - raised_at
    err = info.value
    fired = trace.fired()
    figures(8, "budget exhausted (3 faults, max_restarts=2)", detection_s=detection_s(read_events(events_path),
                                                                                     fired[0].wall),
            steps_redone=trace.redone(), restarts=err.restarts, budget=2, cleanup_s=cleanup_s)
    assert [f.step for f in fired] == [3, 5, 7]
    assert err.restarts == 3 and err.max_restarts == 2
    assert err.first_failure.rank == 1 and err.first_failure.kind == "exception"
    assert err.first_failure.step == 3, "names the first failure, not the last"
    assert "InjectedFault: injected failure on rank 1 at step 3" in err.first_failure.message
    assert "raise InjectedFault" in err.first_failure.traceback
    assert "Root cause" in str(err) and "raise max_restarts" in str(err)
    assert not leaks and cleanup_s < 10, f"not cleaned up within 10 s: {leaks}"
    assert [c.step for c in trace.commits()] == list(range(1, 8)), "each failure resumed from the last commit"
    no_leaks()
