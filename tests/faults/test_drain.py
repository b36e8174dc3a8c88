"""Fault matrix rows 17-18: Ray drains a node of the run (preemption), too late for a commit, or not at all.

Drains go through the GCS `DrainNode` call (`ray drain-node`, the call autoscaler v2 and KubeRay
make). Ray does not kill a drained node at its deadline: it lets it exit once idle, and the test
kills whatever is left at the deadline, as a cloud provider would.
"""

from __future__ import annotations

import contextlib
import subprocess
import sys
import time

import pytest

from tests.cluster.background import BackgroundRun
from tests.faults.matrix import DeathWatch, check_run, ensure_nodes
from tests.workloads import ddp_train

pytestmark = [pytest.mark.cluster, pytest.mark.timeout(240)]


def _raylet_pid(node) -> int:
    return node.all_processes["raylet"][0].process.pid


def _drain_events(events) -> list[dict]:
    return [e for e in events if e["kind"] == "drain"]


def _kill_at(cluster, node, deadline: float, watch: DeathWatch | None = None) -> None:
    """Kill the node at its deadline, as the provider that preempts it would; at once if it already exited."""
    if watch is None or watch.died_at is None:
        time.sleep(max(0.0, deadline - time.time()))
    cluster.kill_node(node, graceful=False)


def _longest_pause(trace, since: float) -> float:
    walls = [c.wall for c in trace.commits()]
    before = [w for w in walls if w <= since][-1:]
    window = before + [w for w in walls if w > since]
    return max((b - a for a, b in zip(window, window[1:])), default=float("nan"))


def test_row17_preemption_drain_leaves_at_a_commit_before_the_deadline(cluster, no_leaks, trace, figures, tmp_path):
    ensure_nodes(cluster, 3)
    run = BackgroundRun(tmp_path, ddp_train, config={"steps": 10_000, "sleep_s": 0.05, "trace_dir": str(trace.dir)},
                        min_nodes=2, max_nodes=3, max_restarts=0)
    run.wait_for("round_formed", world_size=3)
    trace.wait_for_step(5, alive=run.alive)
    victim = cluster.nodes[-1]
    watch = DeathWatch(_raylet_pid(victim))
    deadline_s = 8
    drained_at = time.time()
    subprocess.run(  # the operator's command; the same GCS call as the autoscaler's
        [sys.executable, "-m", "ray.scripts.scripts", "drain-node", "--address", cluster.address, "--node-id",
         victim.node_id, "--reason", "DRAIN_NODE_REASON_PREEMPTION", "--reason-message", "spot preemption",
         "--deadline-remaining-seconds", str(deadline_s)],
        check=True, capture_output=True, timeout=60,
    )
    deadline = drained_at + deadline_s
    left = run.wait_for("scale_down")
    gone_at = watch.wait(timeout_s=max(0.0, deadline - time.time()))
    _kill_at(cluster, victim, deadline, watch)
    steps = trace.stop_at(trace.commits()[-1].step + 20)
    result = run.join()
    [notice] = _drain_events(run.events())
    requested_at = notice["data"]["deadline"] - deadline_s  # the command computes the deadline when it asks
    figures(17, f"preemption drain, deadline {deadline_s} s", detection_s=notice["time"] - requested_at,
            recovery_s=trace.recovery_s(drained_at), steps_redone=trace.redone(), restarts=result.restarts, budget=0,
            longest_pause_s=_longest_pause(trace, drained_at),
            node_gone_before_deadline_s=None if gone_at is None else deadline - gone_at)
    check_run(result, steps, restarts=0)
    assert trace.redone() == 0, "leaving at a commit redoes no step"
    assert notice["data"]["node_id"] == victim.node_id and notice["data"]["path"] == "commit"
    assert notice["data"]["reason"] == "preemption"
    assert drained_at < requested_at < time.time(), "the event carries Ray's deadline"
    assert "deadline in" in notice["message"]
    assert left["data"]["left"] == [victim.node_id]
    assert gone_at is not None and gone_at < deadline, "the drained node exited (idle) before its deadline"
    assert [(r.num_nodes, r.cause) for r in result.rounds][-2:] == [(3, result.rounds[-2].cause), (2, "drain")]
    assert result.return_values[0]["worlds"][-1] == 2
    no_leaks(result.worker_pids, ports=trace.ports())


def test_row18_drain_shorter_than_a_step_takes_the_crash_path(cluster, no_leaks, trace, figures, tmp_path):
    ensure_nodes(cluster, 2)
    step_s = 1.5
    run = BackgroundRun(tmp_path, ddp_train, config={"steps": 10_000, "sleep_s": step_s, "trace_dir": str(trace.dir)},
                        min_nodes=1, max_nodes=2, max_restarts=1)
    run.wait_for("round_formed", world_size=2)
    trace.wait_for_step(4, alive=run.alive)  # the coordinator has seen a few steps: it knows the step time
    victim = cluster.nodes[-1]
    drained_at = time.time()
    accepted, _ = cluster.drain_node(victim, deadline_s=1.0, message="spot preemption, short notice")
    assert accepted
    notice = run.wait_for("drain", timeout_s=60)
    _kill_at(cluster, victim, drained_at + 1.0)
    run.wait_for("round_formed", cause="restart")
    steps = trace.stop_at(trace.commits()[-1].step + 3)
    result = run.join()
    figures(18, "drain deadline (1 s) shorter than a step (1.5 s)", detection_s=notice["time"] - drained_at,
            recovery_s=trace.recovery_s(drained_at), steps_redone=trace.redone(), restarts=result.restarts, budget=1)
    check_run(result, steps, restarts=1)
    assert notice["data"]["path"] == "crash" and notice["data"]["node_id"] == victim.node_id
    assert "too close to its deadline" in notice["message"] and "restart charged" in notice["message"]
    [restart] = [e for e in run.events() if e["kind"] == "restart"]
    assert "drained by Ray" in restart["message"], "the restart names the drain as its cause"
    assert trace.redone() <= 1
    assert (result.rounds[-1].num_nodes, result.rounds[-1].cause) == (1, "restart")
    no_leaks(result.worker_pids, ports=trace.ports())


def test_row18_withdrawn_drain_the_node_stays(cluster, no_leaks, trace, figures, tmp_path):
    """Ray 2.60 cannot withdraw an accepted drain; a drain is withdrawn by being rejected: an idle-termination
    drain (what autoscaler v2 sends an idle node) of a node that holds work. The node stays in the run."""
    ensure_nodes(cluster, 2)
    run = BackgroundRun(tmp_path, ddp_train, config={"steps": 10_000, "sleep_s": 0.05, "trace_dir": str(trace.dir)},
                        min_nodes=2, max_nodes=2, max_restarts=0)
    run.wait_for("round_formed", world_size=2)
    trace.wait_for_step(3, alive=run.alive)
    drained_at = time.time()
    accepted, rejection = cluster.drain_node(cluster.nodes[-1], deadline_s=5.0,
                                             reason="DRAIN_NODE_REASON_IDLE_TERMINATION", message="idle")
    assert not accepted and "no longer idle" in rejection
    time.sleep(2.0)  # several drain polls (every 0.25 s)
    steps = trace.stop_at(trace.commits()[-1].step + 10)
    result = run.join()
    figures(18, "drain withdrawn (rejected: the node is busy)", steps_redone=trace.redone(),
            restarts=result.restarts, budget=0, longest_pause_s=_longest_pause(trace, drained_at))
    check_run(result, steps, restarts=0)
    assert _drain_events(run.events()) == [] and len(result.rounds) == 1, "the node stayed; nothing re-formed"
    assert all(n.node_id in {a["NodeID"] for a in _alive_nodes()} for n in cluster.nodes)
    no_leaks(result.worker_pids, ports=trace.ports())


def test_row17_lone_drained_node_hands_its_commit_over_to_its_replacement(cluster, no_leaks, trace, figures,
                                                                           tmp_path):
    """Every node of the round drained (here the only one): the round trains on until a replacement is ready,
    then the drained worker hands the commit over to it; nothing is lost, nothing redone, nothing charged."""
    ensure_nodes(cluster, 1)
    run = BackgroundRun(tmp_path, ddp_train, config={"steps": 10_000, "sleep_s": 0.05, "trace_dir": str(trace.dir)},
                        min_nodes=1, max_nodes=1, max_restarts=0)
    run.wait_for("round_formed")
    trace.wait_for_step(5, alive=run.alive)
    victim = cluster.nodes[0]
    watch = DeathWatch(_raylet_pid(victim))
    drained_at = time.time()
    assert cluster.drain_node(victim, deadline_s=40)[0]
    time.sleep(1.5)
    assert [e["kind"] for e in run.events()].count("round_formed") == 1, "trains on: it holds the only commit"
    cluster.add_node()
    handover = _wait_for_message(run, "drain", "handed the last commit over")
    gone_at = watch.wait(timeout_s=max(0.0, drained_at + 40 - time.time()))
    _kill_at(cluster, victim, drained_at + 40, watch)
    steps = trace.stop_at(trace.commits()[-1].step + 10)
    result = run.join()
    figures(17, "lone node drained, commit handed over to its replacement", steps_redone=trace.redone(),
            restarts=result.restarts, budget=0, longest_pause_s=_longest_pause(trace, handover["time"] - 5))
    check_run(result, steps, restarts=0)  # the log in the State runs on unbroken: the commit was handed over
    assert trace.redone() == 0 and handover["data"]["ok"]
    assert [(r.num_nodes, r.cause) for r in result.rounds][-1] == (1, "drain")
    assert gone_at is not None and gone_at < drained_at + 40
    no_leaks(result.worker_pids, ports=trace.ports())


def _wait_for_message(run, kind: str, text: str, timeout_s: float = 90.0) -> dict:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        found = [e for e in run.events() if e["kind"] == kind and text in e["message"]]
        if found:
            return found[0]
        assert run.alive(), f"the run ended before a {kind!r} event saying {text!r}"
        time.sleep(0.05)
    raise AssertionError(f"no {kind!r} event saying {text!r}: {[e['message'] for e in run.events()]}")


def _alive_nodes() -> list[dict]:
    import ray

    return [n for n in ray.nodes() if n["Alive"]]


def test_row17_two_nodes_drained_at_once_down_to_min_then_below_min_waits(cluster, no_leaks, trace, figures,
                                                                          tmp_path):
    ensure_nodes(cluster, 4)
    run = BackgroundRun(tmp_path, ddp_train, config={"steps": 10_000, "sleep_s": 0.05, "trace_dir": str(trace.dir)},
                        min_nodes=2, max_nodes=4, max_restarts=0, wait_for_nodes_timeout_s=90)
    run.wait_for("round_formed", world_size=4)
    trace.wait_for_step(5, alive=run.alive)
    first, second, third = cluster.nodes[1], cluster.nodes[3], cluster.nodes[0]
    watches = [DeathWatch(_raylet_pid(n)) for n in (first, second)]
    drained_at = time.time()
    deadline = drained_at + 10
    for node in (first, second):
        assert cluster.drain_node(node, deadline_s=10)[0]
    run.wait_for("scale_down")
    gone = [w.wait(timeout_s=max(0.0, deadline - time.time())) for w in watches]
    for node, watch in zip((first, second), watches):
        _kill_at(cluster, node, deadline, watch)
    noticed = max(e["time"] for e in _drain_events(run.events()))
    figures(17, "two nodes drained at once, down to min_nodes", detection_s=noticed - drained_at,
            recovery_s=trace.recovery_s(drained_at), steps_redone=trace.redone(), restarts=0, budget=0,
            longest_pause_s=_longest_pause(trace, drained_at))
    assert trace.redone() == 0
    assert all(t is not None and t < deadline for t in gone), "both left before the deadline"

    below_at = time.time()
    watch = DeathWatch(_raylet_pid(third))
    assert cluster.drain_node(third, deadline_s=10)[0]
    _wait_for_message(run, "waiting", "waiting for 1 more node")
    assert watch.wait(timeout_s=max(0.0, below_at + 10 - time.time())) is not None, "left before its deadline"
    _kill_at(cluster, third, below_at + 10, watch)
    returned_at = time.time()
    cluster.add_node()
    run.wait_for("round_formed", count=3)
    steps = trace.stop_at(trace.commits()[-1].step + 10)
    result = run.join()
    figures(17, "drained below min_nodes: waits, resumes when a node returns", restarts=result.restarts, budget=0,
            steps_redone=trace.redone(), recovery_s=trace.recovery_s(below_at),
            recovery_after_return_s=trace.recovery_s(returned_at))
    check_run(result, steps, restarts=0)
    assert trace.redone() == 0
    drained = sorted(e["data"]["node_id"] for e in _drain_events(run.events()))
    assert drained == sorted(n.node_id for n in (first, second, third))
    full = max(i for i, r in enumerate(result.rounds) if r.num_nodes == 4)
    after = [(r.num_nodes, r.cause) for r in result.rounds[full + 1:]]
    # Both notices normally land in one poll: 4 -> 2 at one commit; a poll between them adds a round of 3.
    assert after in ([(2, "drain"), (2, "drain")], [(3, "drain"), (2, "drain"), (2, "drain")]), after
    no_leaks(result.worker_pids, ports=trace.ports())


DRAIN_SCRIPT = """
import json, os, signal, sys, time
import torch, torch.distributed as dist

out, steps = sys.argv[1], int(sys.argv[2])
limit = os.path.join(out, "stop_at")  # lowers `steps`: the test writes it well ahead of every rank

def step_limit():
    return min(steps, int(open(limit).read())) if os.path.exists(limit) else steps

def log(name, **record):
    with open(os.path.join(out, name), "a") as fp:
        fp.write(json.dumps(record) + "\\n")

def on_sigterm(signum, frame):
    log("sigterms.jsonl", rank=int(os.environ["RANK"]), world=int(os.environ["WORLD_SIZE"]), pid=os.getpid())
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    os.kill(os.getpid(), signal.SIGTERM)

signal.signal(signal.SIGTERM, on_sigterm)
dist.init_process_group("gloo", init_method="env://")
rank, world = dist.get_rank(), dist.get_world_size()
saved = os.path.join(out, "step")
step = int(open(saved).read()) if os.path.exists(saved) else 0
log("starts.jsonl", rank=rank, world=world, pid=os.getpid(), step=step,
    restart_count=int(os.environ["TORCHELASTIC_RESTART_COUNT"]))
while step < step_limit():
    total = torch.ones(1)
    dist.all_reduce(total)
    step += 1
    if rank == 0:
        with open(saved + ".tmp", "w") as fp:
            fp.write(str(step))
        os.replace(saved + ".tmp", saved)
        log("steps.jsonl", step=step, world=int(total.item()))
    dist.barrier()
    time.sleep(0.1)
dist.destroy_process_group()
"""


def _jsonl(path) -> list[dict]:
    import json

    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def _wait_for_free_cpus(cpus: float, timeout_s: float = 60.0) -> None:
    """Until the scheduler's view has `cpus` CPUs free (a new node's and a previous run's are not at once)."""
    import ray

    deadline = time.monotonic() + timeout_s
    while ray.available_resources().get("CPU", 0) < cpus:
        assert time.monotonic() < deadline, f"{cpus} CPUs not free within {timeout_s}s: {ray.available_resources()}"
        time.sleep(0.2)


def _back_at_world_size_2(out) -> bool:
    starts, logged = _jsonl(out / "starts.jsonl"), _jsonl(out / "steps.jsonl")
    return bool(starts and logged) and starts[-1]["world"] == 2 and logged[-1]["world"] == 2


@contextlib.contextmanager
def _ray_start_node(address: str, drain_timeout_s: float, cpus: int = 2):
    """A worker node started the way KubeRay starts one: `ray start --block` (the pod's main process).

    On SIGTERM (Kubernetes deleting the pod: node drain, spot reclaim, scale-in), Ray 2.60's
    `ray start` drains its own node (reason preemption, deadline RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S)
    and exits once the node is idle. Yields (process, node id).
    """
    import os

    import psutil
    import ray

    marker = f"sigterm_node_{os.getpid()}_{time.monotonic_ns()}"
    env = dict(os.environ, RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S=str(drain_timeout_s))
    proc = subprocess.Popen(
        [os.path.join(os.path.dirname(sys.executable), "ray"), "start", "--address", address, "--block",
         f"--num-cpus={cpus}", "--resources", f'{{"{marker}": 1}}', "--disable-usage-stats"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 90
        node_id = None
        while node_id is None:
            assert proc.poll() is None and time.monotonic() < deadline, "the `ray start` node did not come up"
            node_id = next((n["NodeID"] for n in ray.nodes() if n["Alive"] and n["Resources"].get(marker)), None)
            time.sleep(0.2)
        yield proc, node_id
    finally:
        if proc.poll() is None:
            for child in psutil.Process(proc.pid).children(recursive=True):
                with contextlib.suppress(psutil.Error):
                    child.kill()
            proc.kill()
        proc.wait(timeout=30)


def test_row17_cli_pod_deleted_its_scripts_get_sigterm_and_restart_in_the_smaller_world(cluster, no_leaks,
                                                                                        tmp_path):
    """`ray-elastic run` on a node started like a KubeRay pod, which Kubernetes then deletes (SIGTERM to
    `ray start --block`): Ray drains the node itself; every script gets SIGTERM (torchrun's way on a
    membership change) and restarts in the world without the node; no restart is charged
    (--max-restarts=0); the node exits once the run let it go, before its drain deadline."""
    import signal
    import threading

    from ray_elastic.cli import main

    ensure_nodes(cluster, 1)
    script, out = tmp_path / "train.py", tmp_path / "out"
    script.write_text(DRAIN_SCRIPT)
    out.mkdir()
    steps, drain_timeout_s = 100_000, 20  # lowered through stop_at once the run is back at world size 2
    with _ray_start_node(cluster.address, drain_timeout_s) as (pod, node_id):
        _wait_for_free_cpus(4)  # both nodes schedulable, so the run starts at world size 4
        argv = ["run", "--nnodes=1:2", "--nproc-per-node=2", "--max-restarts=0", str(script), str(out), str(steps)]
        box: dict = {}
        thread = threading.Thread(target=lambda: box.update(rc=main(argv)), daemon=True)
        thread.start()
        deadline = time.monotonic() + 180
        while len([s for s in _jsonl(out / "steps.jsonl") if s["world"] == 4]) < 5:
            assert thread.is_alive() and time.monotonic() < deadline, "the scripts did not train at world size 4"
            time.sleep(0.1)
        deleted_at = time.monotonic()
        pod.send_signal(signal.SIGTERM)  # Kubernetes deletes the pod
        pod.wait(timeout=drain_timeout_s + 30)
        exited_after = time.monotonic() - deleted_at
        # The run may have started on the first node alone and grown later (a new node's workers can be ready
        # seconds after the first's): it runs until the test has what it needs, not for a fixed step count.
        while not _back_at_world_size_2(out):
            assert thread.is_alive() and time.monotonic() < deadline, "the scripts did not go on at world size 2"
            time.sleep(0.1)
        steps = _jsonl(out / "steps.jsonl")[-1]["step"] + 10
        (out / "stop_at").write_text(str(steps))
        thread.join(300)
    assert box.get("rc") == 0, "a drain spends no restart (--max-restarts=0)"
    starts = _jsonl(out / "starts.jsonl")  # in the order the scripts started
    full = [i for i, s in enumerate(starts) if s["world"] == 4]
    assert sorted(starts[i]["rank"] for i in full) == [0, 1, 2, 3], starts
    # The run may start on the first node alone and grow once the second joins its rendezvous: that is a
    # membership change too (every script restarts), but not the one under test.
    grew_from = starts[:full[0]]
    assert all(s["world"] == 2 for s in grew_from) and len(grew_from) in (0, 2), starts
    again = starts[full[-1] + 1:]
    assert [s["world"] for s in again] == [2, 2], starts
    assert all(s["restart_count"] == 0 for s in starts), "TORCHELASTIC_RESTART_COUNT unchanged: not a restart"
    terms = _jsonl(out / "sigterms.jsonl")
    assert sorted((t["world"], t["rank"]) for t in terms if t["world"] == 4) == [(4, 0), (4, 1), (4, 2), (4, 3)], \
        "every script of the old world got SIGTERM, the drained node's included"
    assert len([t for t in terms if t["world"] == 2]) == len(grew_from), terms
    assert len({s["step"] for s in again}) == 1 and again[0]["step"] >= 5, "resumed from the script's own save"
    assert _jsonl(out / "steps.jsonl")[-1] == {"step": steps, "world": 2}
    assert exited_after < drain_timeout_s, f"the pod exited {exited_after:.1f}s after SIGTERM: not let go early"
    assert pod.returncode is not None
    no_leaks([s["pid"] for s in starts])
