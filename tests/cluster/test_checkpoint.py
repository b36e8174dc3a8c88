"""Durable checkpoints on a simulated cluster: losing every worker (with and without storage), reusing a run name.

A crash mid-write and losing the coordinator are fault-matrix rows 9 and 10 (tests/faults/test_durable.py)."""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import pytest
import ray
import ray._private.state as ray_state

import ray_elastic
from ray_elastic.api import coordinator_name
from ray_elastic.checkpoint import Checkpointer
from tests.workloads import ddp_train

pytestmark = [pytest.mark.cluster, pytest.mark.timeout(360)]


def _check_consistent(result, steps):
    values = result.return_values
    assert [v["rank"] for v in values] == list(range(len(values)))
    for v in values:
        assert v["log"] == list(range(1, steps + 1)), "every committed step exactly once, in order"
        assert v["weights"] == values[0]["weights"], "all ranks end with identical weights"


def _run_in_thread(**kwargs) -> tuple[threading.Thread, dict]:
    box: dict = {}

    def target():
        try:
            box["result"] = ray_elastic.run(ddp_train, progress="none", **kwargs)
        except BaseException as exc:  # noqa: BLE001 - inspected by the test
            box["error"] = exc

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    return thread, box


def _wait_for_checkpoint(run_dir: Path, min_step: int, timeout_s: float = 120) -> None:
    reader = Checkpointer(run_dir)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        complete = reader.complete_checkpoints()
        if complete and int(complete[-1].name.split("_")[1]) + 1 >= min_step:
            return
        time.sleep(0.2)
    raise AssertionError(f"no checkpoint of step >= {min_step} appeared in {run_dir}")


def _kill_every_worker_once_step_heard(name: str, thread: threading.Thread, step: int) -> list[int]:
    """SIGKILL every worker of run `name` once its coordinator has heard of commit `step` (heartbeats carry it)."""
    deadline = time.monotonic() + 60
    while True:
        try:
            coordinator = ray.get_actor(coordinator_name(name))
            break
        except ValueError:  # not created yet
            assert time.monotonic() < deadline and thread.is_alive(), "no coordinator"
            time.sleep(0.1)
    while (ray.get(coordinator.progress.remote())["metrics"] or {}).get("step", 0) < step:
        assert time.monotonic() < deadline and thread.is_alive(), "no step reported"
        time.sleep(0.1)
    worker_pids = ray.get(coordinator.worker_pids.remote())
    for pid in worker_pids:
        os.kill(pid, signal.SIGKILL)
    return worker_pids


def test_losing_every_worker_restores_from_storage(cluster, no_leaks, tmp_path):
    cluster.resize(2)
    name, steps = "lose-all", 30
    thread, box = _run_in_thread(config={"steps": steps, "sleep_s": 0.1}, min_nodes=2, max_restarts=2,
                                 storage_path=str(tmp_path), name=name)
    _wait_for_checkpoint(tmp_path / name, min_step=5)
    worker_pids = _kill_every_worker_once_step_heard(name, thread, 5)
    thread.join(240)
    assert "error" not in box, box.get("error")
    result = box["result"]
    _check_consistent(result, steps)
    assert result.restarts == 1
    assert {v["restored_from"] for v in result.return_values} == {"storage"}
    assert not set(worker_pids) & {v["pid"] for v in result.return_values}, "all ranks are replacements"
    [lost] = [e for e in result.events if e.kind == "commit_lost"]
    assert lost.data["from_storage"] and lost.data["step"] >= 5, lost.message
    no_leaks(result.worker_pids)


def test_losing_every_worker_without_storage_starts_over_and_says_so(cluster, no_leaks):
    cluster.resize(2)
    name, steps = "lose-all-no-storage", 16
    thread, box = _run_in_thread(config={"steps": steps, "sleep_s": 0.1}, min_nodes=2, max_restarts=2, name=name)
    worker_pids = _kill_every_worker_once_step_heard(name, thread, 4)
    thread.join(240)
    assert "error" not in box, box.get("error")
    result = box["result"]
    _check_consistent(result, steps)  # the log starts again at step 1: nothing of the first attempt is kept
    assert result.restarts == 1
    assert {v["restored_from"] for v in result.return_values} == {"fresh"}
    assert not set(worker_pids) & {v["pid"] for v in result.return_values}, "all ranks are replacements"
    [lost] = [e for e in result.events if e.kind == "commit_lost"]
    assert not lost.data["from_storage"] and lost.data["step"] >= 4, lost.message
    assert "storage_path=" in lost.message and "step 0" in lost.message, lost.message
    no_leaks(result.worker_pids)


def test_reusing_a_name_without_resume_is_rejected_before_any_actor(cluster, no_leaks, tmp_path):
    cluster.resize(2)
    common = {"min_nodes": 2, "storage_path": str(tmp_path), "name": "taken", "progress": "none"}
    first = ray_elastic.run(ddp_train, config={"steps": 4}, **common)
    no_leaks(first.worker_pids)
    actors_before = len(ray_state.actors())
    with pytest.raises(ray_elastic.RunNameInUseError, match="pass resume=True to continue it or choose another name"):
        ray_elastic.run(ddp_train, config={"steps": 4}, **common)
    assert len(ray_state.actors()) == actors_before, "no actor was started"
    # Resuming a finished run restores its last checkpoint and returns at once.
    resumed = ray_elastic.run(ddp_train, config={"steps": 4}, resume=True, **common)
    _check_consistent(resumed, 4)
    assert {v["restored_from"] for v in resumed.return_values} == {"storage"}
    assert resumed.return_values[0]["weights"] == first.return_values[0]["weights"]
    no_leaks(resumed.worker_pids)
