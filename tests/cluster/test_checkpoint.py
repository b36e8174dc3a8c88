"""Durable checkpoints on a simulated cluster: losing the coordinator or every worker, then resuming."""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import pytest
import ray
import ray._private.state as ray_state
import torch

import ray_elastic
from ray_elastic.api import coordinator_name
from ray_elastic.checkpoint import CRASH_ENV, Checkpointer
from tests.workloads import ddp_train

pytestmark = [pytest.mark.cluster, pytest.mark.timeout(360)]


def _check_consistent(result, steps):
    values = result.return_values
    assert [v["rank"] for v in values] == list(range(len(values)))
    for v in values:
        assert v["log"] == list(range(1, steps + 1)), "every committed step exactly once, in order"
        assert v["weights"] == values[0]["weights"], "all ranks end with identical weights"


def _payload_digest(payload: dict) -> list[float]:
    """`tests.workloads.state_digest`, computed from a stored snapshot instead of live objects."""
    out = [float(t.double().sum()) for t in payload["items"]["model"].values()]
    for _, per_param in sorted(payload["items"]["optimizer"]["state"].items()):
        out += [float(v.double().sum()) for _, v in sorted(per_param.items()) if torch.is_tensor(v)]
    return out


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


def test_coordinator_lost_then_resume_continues_from_storage(make_cluster, no_leaks, tmp_path):
    make_cluster(num_nodes=2)
    name, steps = "resume-me", 40
    common = {"min_nodes": 2, "storage_path": str(tmp_path), "name": name, "checkpoint_every": 2,
              "keep_checkpoints": 2}
    thread, box = _run_in_thread(config={"steps": steps, "sleep_s": 0.1}, **common)
    _wait_for_checkpoint(tmp_path / name, min_step=6)
    with pytest.raises(ray_elastic.ConfigError, match="a run named 'resume-me' is already running"):
        ray_elastic.run(ddp_train, config={"steps": steps}, resume=True, progress="none", **common)
    coordinator = ray.get_actor(coordinator_name(name))
    worker_pids = ray.get(coordinator.worker_pids.remote())
    assert len(worker_pids) == 2
    ray.kill(coordinator, no_restart=True)
    thread.join(60)
    assert not thread.is_alive(), "run() did not return after its coordinator died"
    error = box.get("error")
    assert isinstance(error, ray_elastic.CoordinatorLostError), box
    assert f"name='{name}' and resume=True" in str(error)
    no_leaks(worker_pids)  # workers die with their coordinator; placement groups are removed

    saved = Checkpointer(tmp_path / name).load_latest()
    saved_step = saved["attrs"]["step"]
    assert 6 <= saved_step < steps and saved["attrs"]["log"] == list(range(1, saved_step + 1))
    result = ray_elastic.run(ddp_train, config={"steps": steps}, resume=True, progress="none", **common)
    _check_consistent(result, steps)
    assert {v["restored_from"] for v in result.return_values} == {"storage"}
    assert min(m["step"] for m in result.metrics_history) == saved_step + 1, "continues after the checkpoint"
    for v in result.return_values:  # model and optimizer (momentum) state are exactly the checkpoint's
        assert v["restores"][0][1:] == ("storage", _payload_digest(saved))
    final = Checkpointer(tmp_path / name)
    assert [p.name for p in final.complete_checkpoints()] == ["checkpoint_000000037", "checkpoint_000000039"]
    assert final.load_latest()["attrs"]["step"] == steps
    no_leaks(result.worker_pids)


def test_losing_every_worker_restores_from_storage(make_cluster, no_leaks, tmp_path):
    make_cluster(num_nodes=2)
    name, steps = "lose-all", 30
    thread, box = _run_in_thread(config={"steps": steps, "sleep_s": 0.1}, min_nodes=2, max_restarts=2,
                                 storage_path=str(tmp_path), name=name)
    _wait_for_checkpoint(tmp_path / name, min_step=5)
    worker_pids = ray.get(ray.get_actor(coordinator_name(name)).worker_pids.remote())
    for pid in worker_pids:
        os.kill(pid, signal.SIGKILL)
    thread.join(240)
    assert "error" not in box, box.get("error")
    result = box["result"]
    _check_consistent(result, steps)
    assert result.restarts == 1
    assert {v["restored_from"] for v in result.return_values} == {"storage"}
    assert not set(worker_pids) & {v["pid"] for v in result.return_values}, "all ranks are replacements"
    no_leaks(result.worker_pids)


def test_reusing_a_name_without_resume_is_rejected_before_any_actor(make_cluster, no_leaks, tmp_path):
    make_cluster(num_nodes=2)
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


def test_rank0_killed_between_temp_write_and_rename(make_cluster, no_leaks, tmp_path, monkeypatch):
    """Row 9: rank 0 SIGKILLs itself mid-write at commit 5; the run goes on and storage stays clean."""
    monkeypatch.setenv(CRASH_ENV, "before_rename:5")  # the cluster's raylets, hence workers, inherit it
    make_cluster(num_nodes=2)
    monkeypatch.delenv(CRASH_ENV)
    result = ray_elastic.run(ddp_train, config={"steps": 12}, min_nodes=2, max_restarts=1, progress="none",
                             storage_path=str(tmp_path), name="crash-write", keep_checkpoints=3)
    _check_consistent(result, 12)
    assert result.restarts == 1
    restart = [e for e in result.events if e.kind == "restart"]
    assert len(restart) == 1 and "rank 0" in restart[0].message and "died" in restart[0].message
    run_dir = tmp_path / "crash-write"
    assert sorted(p.name for p in run_dir.iterdir()) == [f"checkpoint_{i:09d}" for i in (9, 10, 11)], (
        "no temporary or partial checkpoint is left"
    )
    assert Checkpointer(run_dir).load_latest()["attrs"]["log"] == list(range(1, 13))
    no_leaks(result.worker_pids)
