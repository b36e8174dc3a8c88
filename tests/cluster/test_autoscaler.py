"""Ray's own autoscaler (v2, the one KubeRay runs; fake multi-node provider) grows a run and replaces a drained node.

No node is added by hand: the cluster starts with a CPU-less head only, and every worker node
is one the autoscaler started because of the demand the run expresses (`request_resources`:
one bundle per node group, up to max_nodes).
"""

from __future__ import annotations

import time

import pytest

from ray_elastic.testing.autoscaling import FAKE_HEAD_NODE_ID, local_autoscaling_cluster
from ray_elastic.testing.leaks import assert_no_leaks
from tests.cluster.background import BackgroundRun
from tests.faults.matrix import Trace, check_run
from tests.workloads import ddp_train

pytestmark = [pytest.mark.cluster, pytest.mark.timeout(300)]

NODE_TYPES = {"cpu1": {"resources": {"CPU": 1, "object_store_memory": 80 * 1024 * 1024},
                       "min_workers": 0, "max_workers": 4}}


def _drain(address: str, node_id: str, deadline_s: float) -> None:
    from ray._raylet import GcsClient
    from ray.core.generated import autoscaler_pb2

    accepted, why = GcsClient(address=address).drain_node(
        node_id, autoscaler_pb2.DrainNodeReason.Value("DRAIN_NODE_REASON_PREEMPTION"), "spot preemption",
        int((time.time() + deadline_s) * 1000), timeout=30)
    assert accepted, why


def test_autoscaler_v2_grows_the_run_to_max_nodes_and_replaces_a_drained_node(no_shared_cluster, tmp_path):
    trace = Trace(tmp_path / "trace")
    system_config = {"health_check_period_ms": 1000, "health_check_failure_threshold": 5}
    with local_autoscaling_cluster(NODE_TYPES, autoscaler_v2=True, system_config=system_config) as auto:
        assert auto.worker_nodes() == [], "the cluster starts with no worker node"
        run = BackgroundRun(tmp_path, ddp_train,
                            config={"steps": 10_000, "sleep_s": 0.05, "trace_dir": str(trace.dir)},
                            min_nodes=1, max_nodes=3, max_restarts=0, wait_for_nodes_timeout_s=120)
        full = run.wait_for("round_formed", num_nodes=3, timeout_s=150)
        trace.wait_for_step(trace.commits()[-1].step + 3 if trace.commits() else 3, alive=run.alive)
        started = {n["NodeID"] for n in auto.worker_nodes()}
        assert len(started) == 3 and all(n.startswith("f" * 51) and n != FAKE_HEAD_NODE_ID for n in started), \
            "every node is one the fake provider started"
        victim = sorted(started)[0]
        drained_at = time.time()
        _drain(auto.address, victim, deadline_s=30)
        left = run.wait_for("scale_down", timeout_s=60)
        regrown = _wait_regrown(run, drained_at)
        auto.kill_node(victim)  # its deadline: whatever is left of it (nothing, it exited when idle)
        steps = trace.stop_at(trace.commits()[-1].step + 10)
        result = run.join()
        check_run(result, steps, restarts=0)
        assert trace.redone() == 0
        assert left["data"]["left"] == [victim]
        [newcomer] = regrown["data"]["joined"]
        assert newcomer not in started and newcomer.startswith("f" * 51), "a node the autoscaler started anew"
        sizes = [r.num_nodes for r in result.rounds]
        assert sizes[-2:] == [2, 3] and 3 in sizes[:-2], sizes
        assert [r.cause for r in result.rounds][-2:] == ["drain", "scale-up"]
        assert full["data"]["cause"] in ("start", "scale-up")
        assert_no_leaks(result.worker_pids, raylet_pids=auto.raylet_pids())


def test_autoscaler_v1_grows_the_run_to_max_nodes(no_shared_cluster, tmp_path):
    """Autoscaler v1 starts the nodes the run asks for too. (It does not replace a drained node here: the
    fake provider keeps listing a node that exited on its own, so v1 counts it as still there.)"""
    trace = Trace(tmp_path / "trace")
    with local_autoscaling_cluster(NODE_TYPES, autoscaler_v2=False) as auto:
        assert auto.worker_nodes() == []
        run = BackgroundRun(tmp_path, ddp_train,
                            config={"steps": 10_000, "sleep_s": 0.05, "trace_dir": str(trace.dir)},
                            min_nodes=1, max_nodes=2, max_restarts=0, wait_for_nodes_timeout_s=120)
        run.wait_for("round_formed", num_nodes=2, timeout_s=150)
        trace.wait_for_step(trace.commits()[-1].step + 3 if trace.commits() else 3, alive=run.alive)
        steps = trace.stop_at(trace.commits()[-1].step + 5)
        result = run.join()
        check_run(result, steps, restarts=0)
        assert result.rounds[-1].num_nodes == 2 and len(auto.worker_nodes()) == 2
        assert_no_leaks(result.worker_pids, raylet_pids=auto.raylet_pids())


def _wait_regrown(run: BackgroundRun, since: float, timeout_s: float = 120.0) -> dict:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        found = [e for e in run.events() if e["kind"] == "round_formed" and e["time"] > since
                 and e["data"]["num_nodes"] == 3]
        if found:
            return found[0]
        assert run.alive(), run.error
        time.sleep(0.1)
    raise AssertionError(f"the run did not grow back to 3 nodes: {[e['message'] for e in run.events()]}")
