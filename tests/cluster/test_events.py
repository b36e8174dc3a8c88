"""Events and metrics end to end: the JSON-lines event log and the Prometheus series of a real run."""

from __future__ import annotations

import json
import re
import threading
import time
import urllib.request

import pytest
import ray

import ray_elastic
from ray_elastic.testing import FaultInjector
from tests.faults.matrix import Trace
from tests.workloads import ddp_train

pytestmark = [pytest.mark.cluster, pytest.mark.timeout(360)]

_SAMPLE = re.compile(r"^ray_elastic_(\w+)\{([^}]*)\} (\S+)$")


def scrape_run_metrics(run_id: str) -> dict[str, float]:
    """The `ray_elastic_*` series of `run_id` from every alive node's Ray metrics endpoint."""
    found: dict[str, float] = {}
    for node in ray.nodes():
        port = node.get("MetricsExportPort")
        if not node["Alive"] or not port:
            continue
        try:
            body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
        except OSError:
            continue
        for line in body.splitlines():
            match = _SAMPLE.match(line)
            if match and f'run_id="{run_id}"' in match.group(2):
                found[match.group(1)] = float(match.group(3))
    return found


def test_event_log_file_and_exported_metrics(cluster, no_leaks, tmp_path, monkeypatch):
    # tests/conftest.py starts every cluster with RAY_metrics_report_interval_ms=1000
    monkeypatch.chdir(tmp_path)  # a relative event_log_path is the driver's, not the coordinator's
    cluster.resize(2)
    run_id = f"events-{time.time_ns()}"
    box: dict = {}
    trace = Trace(tmp_path / "trace")  # its stop_at file ends the run once every series was seen

    def target() -> None:
        try:
            box["result"] = ray_elastic.run(
                ddp_train, config={"steps": 1000, "sleep_s": 0.1, "faults": FaultInjector().fail_at(rank=1, step=5),
                                   "trace_dir": str(trace.dir)},
                min_nodes=2, max_restarts=2, name=run_id, event_log_path="events.jsonl", progress="none",
            )
        except BaseException as exc:  # noqa: BLE001 - re-raised below
            box["error"] = exc

    thread = threading.Thread(target=target)
    thread.start()
    wanted = {"world_size": 2.0, "num_nodes": 2.0, "restarts": 1.0, "restarts_total": 1.0}
    metrics: dict[str, float] = {}
    deadline = time.monotonic() + 200
    while time.monotonic() < deadline:
        metrics = scrape_run_metrics(run_id)
        if all(metrics.get(k) == v for k, v in wanted.items()) and metrics.get("step", 0) > 5 and (
            metrics.get("step_seconds", 0) > 0 and metrics.get("recovery_seconds", 0) > 0
        ):
            break
        if not thread.is_alive() and "error" in box:
            break
        time.sleep(0.5)
    if trace.commits():
        trace.stop_at(max(c.step for c in trace.commits()) + 10)
    thread.join(200)
    assert "error" not in box, box.get("error")
    result = box["result"]

    for name, value in wanted.items():
        assert metrics.get(name) == value, f"ray_elastic_{name} of {run_id}: {metrics}"
    assert 0 < metrics["recovery_seconds"] < 60, metrics
    assert 0.05 <= metrics["step_seconds"] < 30, metrics

    lines = (tmp_path / "events.jsonl").read_text().splitlines()
    logged = [json.loads(line) for line in lines]
    assert [(e["kind"], e["round_id"], e["message"]) for e in logged] == [
        (e.kind, e.round_id, e.message) for e in result.events
    ]
    assert {e["run_id"] for e in logged} == {run_id}
    kinds = [e["kind"] for e in logged]
    assert kinds.count("round_formed") == 2 and kinds.count("restart") == 1 and kinds[-1] == "finished"
    restart = next(e for e in logged if e["kind"] == "restart")
    assert restart["data"]["restarts"] == 1 and "InjectedFault" in restart["message"]
    assert all(isinstance(e["time"], float) for e in logged)
    assert result.metrics["step"] == max(c.step for c in trace.commits()) < 1000, "ended through stop_at"
    no_leaks(result.worker_pids)


def test_unwritable_event_log_path_is_rejected_before_anything_starts(tmp_path, ray_disconnected):
    missing = tmp_path / "no" / "such" / "dir" / "events.jsonl"
    with pytest.raises(ray_elastic.ConfigError, match="event_log_path .* cannot be written"):
        ray_elastic.run(ddp_train, config={"steps": 1}, event_log_path=str(missing))
    assert not ray.is_initialized(), "rejected before connecting to Ray"
