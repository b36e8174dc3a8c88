"""Fault matrix row 11: ports and stores. Ports already taken, MASTER_PORT pointing at one, two runs at once."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import ray

from ray_elastic.testing import FaultInjector
from tests.cluster.background import BackgroundRun
from tests.faults.matrix import Trace, check_run, decoy_ports, detection_s, ensure_nodes
from tests.workloads import ddp_train

pytestmark = [pytest.mark.cluster, pytest.mark.timeout(300)]

# Fault -> next committed step when survivors re-form at once: 0.04 s measured; bound for a loaded 2-core machine.
RECOVERY_BOUND_S = 5.0


@contextmanager
def job_env(cluster, env: dict[str, str]) -> Iterator[None]:
    """Reconnect the driver so that every actor of the runs (coordinators, workers) starts with `env`."""
    base = {"OMP_NUM_THREADS": "1"}
    ray.shutdown()
    ray.init(address=cluster.address, runtime_env={"env_vars": {**base, **env}})
    try:
        yield
    finally:
        ray.shutdown()
        ray.init(address=cluster.address)


def test_row11_two_runs_at_once_with_taken_ports_never_collide(cluster, no_leaks, figures, tmp_path):
    """Every process of both runs starts with MASTER_ADDR/MASTER_PORT pointing at a port that is taken by a
    listener counting its connections (as a stale torchrun environment would): nothing may connect there
    (a launcher using the inherited address would), each round gets a fresh store, and the runs never share one."""
    ensure_nodes(cluster, 4)
    names = [f"ports-{x}-{time.time_ns()}" for x in "ab"]
    traces = {name: Trace(tmp_path / name) for name in names}
    with decoy_ports(8) as decoys, job_env(cluster, {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(decoys.ports[0])}):
        taken = decoys.ports
        runs = {
            name: BackgroundRun(
                tmp_path, ddp_train, name=name, min_nodes=2, max_nodes=2, max_restarts=1,
                resources_per_worker={"CPU": 2},  # a whole node each: the two runs must not pick the same nodes
                config={"steps": 100_000, "sleep_s": 0.05, "trace_dir": str(traces[name].dir),
                        "faults": FaultInjector(log_path=traces[name].faults_log).fail_at(rank=1, step=5)},
            )
            for name in names
        }
        # Both must be training at once: only then are they told where to stop.
        deadline = time.monotonic() + 200
        while not all(1 in traces[n].ports_by_round() for n in names) and time.monotonic() < deadline:
            assert all(run.alive() for run in runs.values()), {n: r.error for n, r in runs.items()}
            time.sleep(0.1)
        assert all(1 in traces[n].ports_by_round() for n in names), "the two runs never trained at the same time"
        last = {name: traces[name].stop_at(max(c.step for c in traces[name].commits()) + 20) for name in names}
        results = {name: run.join(240) for name, run in runs.items()}
        accepted = dict(decoys.accepted)
    rounds = {name: traces[name].ports_by_round() for name in names}
    ports = [port for by_round in rounds.values() for port in by_round.values()]
    for name in names:
        trace = traces[name]
        fault = trace.fired()[0]
        figures(11, f"ports taken, two runs at once: run {name.split('-')[1]}",
                detection_s=detection_s(results[name].events, fault.wall), recovery_s=trace.recovery_s(fault),
                steps_redone=trace.redone(), restarts=results[name].restarts, budget=1, store_ports=rounds[name])
    assert not any(accepted.values()), f"something connected to a taken port (the inherited MASTER_PORT?): {accepted}"
    for name in names:
        check_run(results[name], last[name], restarts=1, trace=traces[name])
        assert sorted(rounds[name]) == [0, 1], "both rounds of each run committed steps"
        assert traces[name].redone() == 0, "the raise came before the step: nothing committed is redone"
        recovery = traces[name].recovery_s(traces[name].fired()[0])
        assert recovery is not None and recovery < RECOVERY_BOUND_S, f"recovered after {recovery}s"
    assert len(set(ports)) == len(ports) == 4, f"a fresh store port per round and per run: {rounds}"
    assert not set(ports) & set(taken), f"a store took a port that was already bound: {rounds}, taken {taken}"
    pids = [pid for result in results.values() for pid in result.worker_pids]
    assert not {v["pid"] for v in results[names[0]].return_values} & {v["pid"] for v in results[names[1]].return_values}
    no_leaks(pids, ports=ports)
