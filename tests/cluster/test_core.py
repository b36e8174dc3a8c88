"""Core runtime on a simulated cluster: placement, env, failures, cleanup."""

from __future__ import annotations

import os
import signal
import threading
import time

import pytest

import ray_elastic
from ray_elastic.testing import FaultInjector
from ray_elastic.testing.leaks import _titled_processes
from tests.workloads import ddp_train

pytestmark = [pytest.mark.cluster, pytest.mark.timeout(240)]


def _check_consistent(result, steps):
    values = result.return_values
    assert [v["rank"] for v in values] == list(range(len(values)))
    for v in values:
        assert v["log"] == list(range(1, steps + 1)), "every committed step exactly once, in order"
        assert v["weights"] == values[0]["weights"], "all ranks end with identical weights"


def test_happy_path_places_one_group_per_node(make_cluster, no_leaks):
    make_cluster(num_nodes=2, cpus_per_node=2)
    result = ray_elastic.run(ddp_train, config={"steps": 5}, min_nodes=2, max_nodes=2, nproc_per_node=2)
    values = result.return_values
    assert len(values) == 4
    _check_consistent(result, 5)
    assert result.restarts == 0
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
    assert result.metrics["step"] == 5
    no_leaks(result.worker_pids)


def test_train_fn_raising_once_resumes_from_last_commit(make_cluster, no_leaks):
    make_cluster(num_nodes=2)
    faults = FaultInjector().fail_at(rank=1, step=7)
    result = ray_elastic.run(ddp_train, config={"steps": 12, "faults": faults}, min_nodes=2, max_restarts=3)
    _check_consistent(result, 12)
    assert result.restarts == 1
    assert [v["context"]["restart_count"] for v in result.return_values] == [1, 1]
    restart_events = [e for e in result.events if e.kind == "restart"]
    assert len(restart_events) == 1 and "InjectedFault" in restart_events[0].message
    no_leaks(result.worker_pids)


def test_two_ranks_failing_together_count_once(make_cluster, no_leaks):
    make_cluster(num_nodes=3)
    faults = FaultInjector().fail_at(rank=1, step=4).fail_at(rank=2, step=4)
    result = ray_elastic.run(ddp_train, config={"steps": 8, "faults": faults}, min_nodes=3, max_restarts=1)
    _check_consistent(result, 8)
    assert result.restarts == 1
    no_leaks(result.worker_pids)


def test_train_fn_always_raising_fails_with_root_cause(make_cluster, no_leaks):
    make_cluster(num_nodes=2)

    def broken(config):
        ctx = ray_elastic.get_context()
        if ctx.rank == 1:
            raise ValueError("bad batch shape")
        import torch
        import torch.distributed as dist

        dist.all_reduce(torch.ones(1))

    with pytest.raises(ray_elastic.TrainingFailedError) as info:
        ray_elastic.run(broken, min_nodes=2, max_restarts=2)
    err = info.value
    assert err.restarts == 3 and err.max_restarts == 2
    assert err.first_failure.rank == 1 and err.first_failure.kind == "exception"
    assert "ValueError: bad batch shape" in err.first_failure.message
    assert "raise ValueError" in err.first_failure.traceback
    assert "Root cause" in str(err) and "raise max_restarts" in str(err)
    no_leaks()


def test_sigkill_of_a_worker_costs_one_restart(make_cluster, no_leaks):
    make_cluster(num_nodes=4)
    box = {}

    def target():
        try:
            box["result"] = ray_elastic.run(
                ddp_train, config={"steps": 60, "sleep_s": 0.05}, min_nodes=2, max_nodes=4, max_restarts=3
            )
        except BaseException as exc:  # noqa: BLE001
            box["error"] = exc

    thread = threading.Thread(target=target)
    thread.start()
    deadline = time.monotonic() + 90
    victims = []
    while time.monotonic() < deadline and not victims:
        victims = [p for p in _titled_processes() if "run_round" in " ".join(_cmdline(p))]
        time.sleep(0.2)
    assert victims, "workers never started a round"
    time.sleep(1.0)
    os.kill(victims[-1], signal.SIGKILL)
    thread.join(180)
    assert "error" not in box, box.get("error")
    result = box["result"]
    _check_consistent(result, 60)
    assert result.restarts == 1
    assert any(e.kind == "restart" and "died" in e.message for e in result.events)
    no_leaks(result.worker_pids)


def _cmdline(pid):
    import psutil

    try:
        return psutil.Process(pid).cmdline()
    except psutil.Error:
        return []


def test_losing_a_node_continues_on_fewer_nodes(make_cluster, no_leaks):
    cluster = make_cluster(num_nodes=3)
    faults = None
    box = {}

    def target():
        try:
            box["result"] = ray_elastic.run(
                ddp_train, config={"steps": 80, "sleep_s": 0.05, "faults": faults},
                min_nodes=2, max_nodes=3, max_restarts=3,
            )
        except BaseException as exc:  # noqa: BLE001
            box["error"] = exc

    thread = threading.Thread(target=target)
    thread.start()
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        if len([p for p in _titled_processes() if "run_round" in " ".join(_cmdline(p))]) >= 3:
            break
        time.sleep(0.2)
    time.sleep(1.0)
    cluster.kill_node(cluster.nodes[-1], graceful=False)
    thread.join(180)
    assert "error" not in box, box.get("error")
    result = box["result"]
    _check_consistent(result, 80)
    assert result.restarts == 1
    assert result.rounds[-1].num_nodes == 2
    no_leaks(result.worker_pids)


_INTERRUPTED_DRIVER = """
import sys
import ray_elastic
from tests.workloads import ddp_train
try:
    ray_elastic.run(ddp_train, config={"steps": 100000, "sleep_s": 0.05}, min_nodes=2, progress="log")
except KeyboardInterrupt:
    print("INTERRUPTED", flush=True)
    sys.exit(130)
"""


def test_ctrl_c_in_the_driver_tears_everything_down(make_cluster, no_leaks):
    import subprocess
    import sys

    cluster = make_cluster(num_nodes=2)
    env = dict(os.environ, RAY_ADDRESS=cluster.address, PYTHONPATH=os.getcwd())
    driver = subprocess.Popen([sys.executable, "-c", _INTERRUPTED_DRIVER], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 120
        lines = []
        while time.monotonic() < deadline:
            line = driver.stdout.readline()
            lines.append(line)
            if "round 0:" in line:
                break
        assert any("round 0:" in line for line in lines), "".join(lines)
        time.sleep(1.0)
        driver.send_signal(signal.SIGINT)
        out, _ = driver.communicate(timeout=60)
    finally:
        if driver.poll() is None:
            driver.kill()
    assert driver.returncode == 130 and "INTERRUPTED" in out
    assert "run aborted" in out
    no_leaks()
