"""Fault matrix rows 9 and 10: a crash mid checkpoint write, and losing the coordinator.

Name reuse and losing every worker are in tests/cluster/test_checkpoint.py,
checksums and crash points in tests/unit/test_checkpoint.py.
"""

from __future__ import annotations

import time

import pytest
import ray

import ray_elastic
from ray_elastic.api import coordinator_name
from ray_elastic.checkpoint import CRASH_ENV, Checkpointer
from ray_elastic.testing.leaks import find_leaks
from tests.cluster.background import BackgroundRun
from tests.faults.matrix import DeathWatch, check_run, detection_s, ensure_nodes
from tests.workloads import ddp_train, payload_digest

pytestmark = [pytest.mark.cluster, pytest.mark.timeout(240)]


def test_row9_crash_mid_checkpoint_write_restores_the_previous_complete_one(cluster, no_leaks, trace, figures,
                                                                             tmp_path):
    """One worker, so nothing survives in memory: the replacement must load from storage.

    The worker SIGKILLs itself between writing commit 5's temporary file and renaming it;
    the newest complete checkpoint is then commit 4 (step 5).
    """
    ensure_nodes(cluster, 4)
    steps = 12
    config = {"steps": steps, "sleep_s": 0.2, "trace_dir": str(trace.dir),
              "first_attempt_env": {CRASH_ENV: "before_rename:5"}}
    name = f"crash-write-{time.time_ns()}"
    run = BackgroundRun(tmp_path, ddp_train, config=config, min_nodes=1, max_restarts=1,
                        storage_path=str(tmp_path / "storage"), name=name)
    watch = DeathWatch(trace.wait_for_step(1, alive=run.alive).pid)
    result = run.join()
    crashed_at = watch.wait(5)
    assert crashed_at is not None, "the worker was not killed mid-write"
    resumed = trace.first_commit_after(crashed_at)
    figures(9, "crash mid checkpoint write", detection_s=detection_s(result.events, crashed_at),
            recovery_s=trace.recovery_s(crashed_at), steps_redone=trace.redone(), restarts=result.restarts, budget=1)
    check_run(result, steps, restarts=1, trace=trace)
    assert max(c.step for c in trace.commits() if c.wall < crashed_at) == 5, "crashed while committing step 6"
    assert result.return_values[0]["restored_from"] == "storage"
    assert resumed.step == 6, "restored the previous complete checkpoint (step 5), not the partial one"
    restart = [e for e in result.events if e.kind == "restart"]
    assert len(restart) == 1 and "rank 0" in restart[0].message and "died" in restart[0].message
    run_dir = tmp_path / "storage" / name
    assert sorted(p.name for p in run_dir.iterdir()) == [f"checkpoint_{i:09d}" for i in (10, 11)], (
        "pruned to keep_checkpoints=2; no temporary or partial checkpoint is left"
    )
    no_leaks(result.worker_pids, ports=trace.ports())


def test_row10_coordinator_lost_tears_down_then_resume_continues(cluster, no_leaks, trace, figures, tmp_path):
    ensure_nodes(cluster, 4)
    steps, name = 40, f"coordinator-lost-{time.time_ns()}"
    common = {"min_nodes": 2, "storage_path": str(tmp_path / "storage"), "name": name, "checkpoint_every": 3,
              "progress": "none"}
    config = {"steps": steps, "sleep_s": 0.1, "trace_dir": str(trace.dir)}
    run = BackgroundRun(tmp_path, ddp_train, config=config, **common)
    trace.wait_for_step(10, alive=run.alive)
    with pytest.raises(ray_elastic.ConfigError, match=f"a run named {name!r} is already running"):
        ray_elastic.run(ddp_train, config=config, resume=True, **common)
    coordinator = ray.get_actor(coordinator_name(name))
    worker_pids = ray.get(coordinator.worker_pids.remote())
    killed_at = time.time()
    ray.kill(coordinator, no_restart=True)
    with pytest.raises(ray_elastic.CoordinatorLostError) as info:
        run.join(60)
    lost_at = run.ended_at
    leaks = find_leaks(worker_pids, 10, raylet_pids=cluster.raylet_pids(), ports=trace.ports())
    torn_down_s = time.time() - killed_at
    assert not leaks, f"the lost run left behind: {leaks}"
    assert f"name={name!r} and resume=True" in str(info.value), "the error says how to continue"
    last_before = max(c.step for c in trace.commits())  # the lost run's workers may commit until torn down
    stored = Checkpointer(tmp_path / "storage" / name).load_latest()
    assert stored is not None, "the lost run wrote no checkpoint"
    # a worker torn down between a durable write and its trace line leaves a checkpoint one step past the trace
    stored_step = stored["attrs"]["step"]
    assert last_before - 3 <= stored_step <= last_before + 1

    result = ray_elastic.run(ddp_train, config=config, resume=True, **common)
    resumed = next(c for c in trace.commits() if c.pid not in worker_pids)
    figures(10, "coordinator killed, then resume=True", detection_s=lost_at - killed_at,
            recovery_s=resumed.wall - killed_at, steps_redone=trace.redone(), restarts=result.restarts, budget=3,
            torn_down_s=torn_down_s, resumed_from_step=resumed.step - 1)
    check_run(result, steps, restarts=0, trace=trace)
    assert resumed.step == stored_step + 1, "continued from the newest stored checkpoint, not from scratch"
    for v in result.return_values:  # model and optimizer (momentum) state are exactly the checkpoint's
        assert v["restored_from"] == "storage"
        assert v["restores"][0][1:] == ("storage", payload_digest(stored))
    assert trace.redone() == max(0, last_before - stored_step), "only steps after the checkpoint were redone"
    no_leaks(result.worker_pids, ports=trace.ports())
