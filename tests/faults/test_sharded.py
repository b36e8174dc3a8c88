"""Fault matrix rows 19-21 and a resharded resume: FSDP2 state (gloo, CPU) across losses and joins.

Every restore is checked bitwise: rank 0 logs a digest of the gathered (full) model and
optimizer state right after each commit and right after each restore (`tests.sharded_workload`).
"""

from __future__ import annotations

import os
import signal
import time

import pytest

import ray_elastic
from ray_elastic.checkpoint import Checkpointer
from ray_elastic.testing import FaultInjector
from ray_elastic.testing.faults import request_fault
from tests.cluster.background import BackgroundRun
from tests.faults.matrix import detection_s, ensure_nodes
from tests.sharded_workload import (
    checkpoint_digest,
    fsdp_train,
    initial_digest,
    read_inits,
    read_members,
    read_restores,
)

pytestmark = [pytest.mark.cluster, pytest.mark.timeout(240)]


def _check_log(result, steps: int) -> None:
    for value in result.return_values:
        assert value["log"] == list(range(1, steps + 1)), "(a) every committed step exactly once, in order"
        assert value["digest"] == result.return_values[0]["digest"], "(b) every rank ends with the same full state"


def _exact(restores: list[dict]) -> None:
    for restore in restores:
        assert restore["committed"] is not None, f"restored step {restore['step']} was never committed: {restore}"
        assert restore["digest"] == restore["committed"], f"restored state differs from its commit: {restore}"


def _trained_at(run, trace, world_size: int, steps: int) -> dict:
    """The first round of `world_size` (at start, or once the last node is ready: a node just added may not
    be schedulable when the run starts), after `steps` more committed steps; its round_formed event."""
    formed = run.wait_for("round_formed", world_size=world_size, timeout_s=120)
    trace.wait_for_step(max((c.step for c in trace.commits()), default=0) + steps, alive=run.alive)
    return formed


def _kill_ready_run(cluster, trace, tmp_path, nodes: int, victim: int, hsdp: bool = False, meta_init: bool = False,
                    **run_kwargs):
    """A run of fsdp_train on `nodes` nodes (min one less), trained 2 steps at full size, and rank `victim` told
    to SIGKILL itself at its next fault check (right after a commit returned). Returns the run, the full-size
    round_formed event, and how many scale-ups to full size came before the kill (it may start one node short)."""
    ensure_nodes(cluster, nodes)
    triggers = trace.dir / "triggers"
    triggers.mkdir()
    faults = FaultInjector(log_path=trace.faults_log, trigger_dir=str(triggers))
    run = BackgroundRun(tmp_path, fsdp_train, config={"steps": 10_000, "sleep_s": 0.05, "trace_dir": str(trace.dir),
                                                      "faults": faults, "hsdp": hsdp, "meta_init": meta_init},
                        min_nodes=nodes - 1, max_nodes=nodes, max_restarts=1, **run_kwargs)
    formed = _trained_at(run, trace, world_size=nodes, steps=2)
    grown_before = sum(1 for e in run.events() if e["kind"] == "round_formed" and e["data"]["world_size"] == nodes
                       and e["data"]["cause"] == "scale-up")
    request_fault(str(triggers), "kill", victim)
    return run, formed, grown_before


@pytest.mark.parametrize("hsdp", [False, True], ids=["fsdp", "hsdp"])
def test_rows_19_and_21_sigkill_then_node_join_resharded_in_memory(cluster, no_leaks, trace, figures, tmp_path, hsdp):
    """4 nodes; rank 2 SIGKILLs itself right after a commit returned (the worst moment: that commit's shard
    of rank 2 exists only in the replica it sent inside commit()). The 3 survivors rebuild that commit
    resharded 4 -> 3 from their shards and rank 2's replica; 0 steps redone. Its replacement then joins
    (3 -> 4), resharded from memory, the survivors not restarted. HSDP: a 2 x 2 mesh, where rank 2's shard
    is held by rank 0 (the other replica group) and no replica is sent; 1 x 3 after the loss, 2 x 2 again.
    FSDP2 builds the model on the meta device (allocated uninitialised, initialised only when State restored
    nothing), so every restore loads into shards that held no weights."""
    run, formed, grown_before = _kill_ready_run(cluster, trace, tmp_path, 4, victim=2, hsdp=hsdp, meta_init=not hsdp)
    shrunk = run.wait_for("round_formed", world_size=3, cause="restart")
    grown = run.wait_for("round_formed", count=grown_before + 1, world_size=4, cause="scale-up", timeout_s=120)
    steps = trace.stop_at(trace.commits()[-1].step + 8)
    result = run.join()
    kill = trace.fired()[0]
    first_after = trace.first_commit_after(kill)
    restores = read_restores(str(trace.dir))
    kind = "HSDP" if hsdp else "FSDP2"
    figures(19, f"{kind} rank SIGKILL (4 -> 3)", detection_s=detection_s(result.events, kill.wall),
            recovery_s=trace.recovery_s(kill), steps_redone=trace.redone(), restarts=result.restarts, budget=1)
    figures(21, f"{kind} rank joins (3 -> 4)", steps_redone=trace.redone(), restarts=result.restarts, budget=1)
    timeline = [(e.kind, round(e.time - kill.wall, 3), e.message) for e in result.events]
    assert kill.rank == 2 and formed["time"] < kill.wall < shrunk["time"] < grown["time"], timeline
    assert first_after is not None and first_after.step == kill.step + 1, "the last commit survived: 0 redone"
    shrink_round, grow_round = shrunk["round_id"], grown["round_id"]
    assert [(r["round"], r["source"], r["step"]) for r in restores if r["round"] >= shrink_round][:1] == [
        (shrink_round, "memory", kill.step)], restores
    assert grow_round in [r["round"] for r in restores], "the scale-up round restored too"
    _exact(restores)
    if not hsdp:
        assert read_inits(str(trace.dir)) == [initial_digest(9)], "initialised once, as an eager build"
    members = read_members(str(trace.dir))
    assert all(m["source"] == "memory" for m in members if m["round"] == shrink_round), ("3 survivors, from memory",
                                                                                          members)
    newcomers = [m for m in members if m["round"] == grow_round and m["source"] == "peer"]
    assert len(newcomers) == 1 and newcomers[0]["pid"] != kill.pid, "the replacement received its shards"
    before = {m["pid"] for m in members if m["round"] == formed["round_id"]} - {kill.pid}
    assert before <= {v["pid"] for v in result.return_values}, "survivors were never restarted"
    assert trace.redone() == 0
    _check_log(result, steps)
    no_leaks(result.worker_pids, ports=trace.ports())


def test_row20_shard_and_its_only_replica_lost_resumes_from_durable_checkpoint(cluster, no_leaks, trace, figures,
                                                                                tmp_path):
    """Ranks 1 and 2 (rank 1's shard and its only replica) die at the same step and their nodes go:
    the 2 survivors load the newest sharded checkpoint, resharded 4 -> 2, and an event says why."""
    ensure_nodes(cluster, 4)
    name = f"sharded-row20-{time.time_ns()}"
    run = BackgroundRun(tmp_path, fsdp_train, config={"steps": 10_000, "sleep_s": 0.05, "trace_dir": str(trace.dir)},
                        min_nodes=2, max_nodes=4, max_restarts=1, storage_path=str(tmp_path / "storage"),
                        name=name, keep_checkpoints=100)
    formed = _trained_at(run, trace, world_size=4, steps=3)
    first = {m["rank"]: m for m in read_members(str(trace.dir)) if m["round"] == formed["round_id"]}
    doomed = [n for n in cluster.nodes if cluster.node_id(n) in (first[1]["node_id"], first[2]["node_id"])]
    assert len(doomed) == 2
    killed_at = time.time()
    for rank in (1, 2):  # both workers at once, then their nodes (no replacement can come back there)
        os.kill(first[rank]["pid"], signal.SIGKILL)
    for node in doomed:
        cluster.kill_node(node, graceful=False)
    event = run.wait_for("restored_from_storage")
    steps = trace.stop_at(trace.commits()[-1].step + 6)
    result = run.join()
    restores = [r for r in read_restores(str(trace.dir)) if r["round"] > formed["round_id"]]
    figures(20, "FSDP2 shard + only replica lost (2 nodes)", detection_s=detection_s(result.events, killed_at),
            recovery_s=trace.recovery_s(killed_at), steps_redone=trace.redone(), restarts=result.restarts, budget=1)
    assert result.restarts == 1 and result.rounds[-1].world_size == 2
    assert event["data"]["lost_ranks"] == [1], "old rank 1's shard was lost with its replica on old rank 2"
    assert "rank 1" in event["message"] and "every replica" in event["message"] and "durable checkpoint" in \
        event["message"]
    assert [r["source"] for r in restores] == ["storage"]
    assert restores[0]["step"] == event["data"]["commit_id"] + 1, "the checkpoint named in the event"
    loaded = tmp_path / "storage" / name / f"checkpoint_{event['data']['commit_id']:09d}"
    assert restores[0]["digest"] == checkpoint_digest(str(loaded)), "restored exactly the checkpoint's state"
    assert restores[0]["committed"] in (None, restores[0]["digest"]), "which is that step's commit"
    assert restores[0]["step"] >= max(c.step for c in trace.commits() if c.wall < killed_at) - 1, (
        "the checkpoint written in the background was at most one commit behind")
    assert all(m["source"] == "storage" for m in read_members(str(trace.dir)) if m["round"] == formed["round_id"] + 1)
    assert trace.redone() <= 2, "only the steps after the newest complete checkpoint (at most 1 behind) are redone"
    _check_log(result, steps)
    no_leaks(result.worker_pids, ports=trace.ports())


def test_a_rank_killed_for_staying_in_an_aborted_round_gives_its_shards_to_a_survivor_first(cluster, no_leaks, trace,
                                                                                            figures, tmp_path):
    """4 nodes, one replica per shard: rank 2, which holds rank 1's only replica, stalls in its training thread
    right after a commit (it answers, but no abort frees it, as a rank stuck in a gloo send to a dead peer), and
    rank 1 is SIGKILLed. Before rank 2 is killed for staying in the aborted round, it gives the shards it holds
    to a rank that left, and the survivors rebuild the last commit from memory, 0 redone. Was: rank 1's shard
    went with rank 2 and, with no durable checkpoint, the run failed (SnapshotLostError)."""
    ensure_nodes(cluster, 4)
    triggers = trace.dir / "triggers"
    triggers.mkdir()
    faults = FaultInjector(log_path=trace.faults_log, trigger_dir=str(triggers))
    run = BackgroundRun(tmp_path, fsdp_train, config={"steps": 10_000, "sleep_s": 0.05, "trace_dir": str(trace.dir),
                                                      "faults": faults},
                        min_nodes=2, max_nodes=4, max_restarts=1, abort_timeout_s=2.0)
    formed = _trained_at(run, trace, world_size=4, steps=2)
    first = {m["rank"]: m for m in read_members(str(trace.dir)) if m["round"] == formed["round_id"]}
    request_fault(str(triggers), "stall", 2)
    deadline = time.monotonic() + 60
    while not trace.fired() and time.monotonic() < deadline:
        time.sleep(0.05)
    stall = trace.fired()[0]
    os.kill(first[1]["pid"], signal.SIGKILL)  # the others now wait on rank 2 in the next step, rank 1 vanishes
    handed = run.wait_for("shards_handed_over", timeout_s=60)
    restarted = run.wait_for("round_formed", cause="restart", timeout_s=60)
    trace.wait_for_round_commits(restarted["round_id"], steps=2, alive=run.alive)
    steps = trace.stop_at(trace.commits()[-1].step + 4)
    result = run.join()
    figures(19, "FSDP2 rank SIGKILL + its replica holder stuck past the abort", steps_redone=trace.redone(),
            recovery_s=trace.recovery_s(stall), restarts=result.restarts, budget=1)
    assert (stall.kind, stall.rank) == ("stall", 2)
    assert handed["data"]["rank"] == 2 and handed["data"]["to_rank"] in (0, 3), handed
    assert 1 in handed["data"]["shards"], "rank 1's only replica was handed over"
    assert result.restarts == 1, [e.message for e in result.events]
    restores = [r for r in read_restores(str(trace.dir)) if r["round"] >= restarted["round_id"]]
    assert [(r["source"], r["step"]) for r in restores[:1]] == [("memory", stall.step)], restores
    _exact(read_restores(str(trace.dir)))
    members = read_members(str(trace.dir))
    assert {m["pid"] for m in members if m["round"] == restarted["round_id"] and m["source"] == "memory"} >= {
        first[0]["pid"], first[3]["pid"]}, members
    assert not any(e.kind == "restored_from_storage" for e in result.events)
    assert trace.redone() == 0
    _check_log(result, steps)
    no_leaks(result.worker_pids, ports=trace.ports())


def test_resume_at_a_different_world_size_loads_the_sharded_checkpoint_resharded(cluster, no_leaks, trace, tmp_path):
    ensure_nodes(cluster, 3)
    storage, name = str(tmp_path / "storage"), f"sharded-resume-{time.time_ns()}"
    config = {"trace_dir": str(trace.dir), "meta_init": True}  # built on the meta device, initialised when fresh
    first = ray_elastic.run(fsdp_train, config={**config, "steps": 5}, min_nodes=2,
                            storage_path=storage, name=name, checkpoint_every=1, progress="none")
    assert [v["world_size"] for v in first.return_values] == [2, 2]
    newest = Checkpointer(tmp_path / "storage" / name).complete_checkpoints()[-1]
    assert newest.name == "checkpoint_000000004", "the last commit was written before the run returned"
    second = ray_elastic.run(fsdp_train, config={**config, "steps": 8}, min_nodes=3,
                             storage_path=storage, name=name, resume=True, progress="none")
    restores = read_restores(str(trace.dir))
    assert [(r["step"], r["source"]) for r in restores] == [(5, "storage")]
    _exact(restores)
    assert read_inits(str(trace.dir)) == [initial_digest(9)], "the first run initialised its meta-built model once"
    assert [v["world_size"] for v in second.return_values] == [3, 3, 3]
    assert all(v["restored_from"] == "storage" for v in second.return_values)
    _check_log(second, 8)
    no_leaks([*first.worker_pids, *second.worker_pids], ports=trace.ports())


def test_row17_drained_node_of_a_sharded_run_leaves_its_shards_in_memory(cluster, no_leaks, trace, figures, tmp_path):
    """FSDP2 on 3 nodes, replicas refreshed only every 50th commit: a preemption drain of rank 1's node is
    left at a commit, and that commit refreshes the replicas whatever the cadence, so the 2 survivors
    rebuild its shards from memory (resharded 3 -> 2): 0 steps redone, no restart charged."""
    ensure_nodes(cluster, 3)
    run = BackgroundRun(tmp_path, fsdp_train, config={"steps": 10_000, "sleep_s": 0.05, "trace_dir": str(trace.dir)},
                        min_nodes=2, max_nodes=3, max_restarts=0, shard_replica_every=50)
    formed = _trained_at(run, trace, world_size=3, steps=3)
    members = {m["rank"]: m for m in read_members(str(trace.dir)) if m["round"] == formed["round_id"]}
    [victim] = [n for n in cluster.nodes if cluster.node_id(n) == members[1]["node_id"]]
    drained_at = time.time()
    accepted, rejection = cluster.drain_node(victim, deadline_s=60.0, message="spot preemption")
    assert accepted, rejection
    left = run.wait_for("scale_down")
    steps = trace.stop_at(trace.commits()[-1].step + 6)
    result = run.join()
    cluster.kill_node(victim, graceful=False)  # its deadline, as the provider would
    restores = [r for r in read_restores(str(trace.dir)) if r["round"] > formed["round_id"]]
    figures(17, "FSDP2 node drained (3 -> 2)", recovery_s=trace.recovery_s(drained_at), steps_redone=trace.redone(),
            restarts=result.restarts, budget=0)
    assert left["data"]["left"] == [members[1]["node_id"]]
    assert result.restarts == 0 and result.rounds[-1].world_size == 2
    assert [r["source"] for r in restores] == ["memory"], restores
    _exact(restores)
    assert all(m["source"] == "memory" for m in read_members(str(trace.dir)) if m["round"] > formed["round_id"])
    assert trace.redone() == 0, "the drained rank's shards of the last commit were in its neighbour's replica"
    _check_log(result, steps)
    no_leaks(result.worker_pids, ports=trace.ports())


def test_overlapped_replicas_cost_at_most_the_last_commit_and_resizes_none(cluster, no_leaks, trace, tmp_path):
    """shard_replica_overlap=True on 3 nodes: rank 1 SIGKILLs itself right after a commit returned, its replica
    possibly still in flight. The survivors rebuild that commit or the one before (at most 1 step redone), bitwise,
    from memory; its replacement then joins at a commit whose replicas went synchronously: 0 redone there."""
    run, formed, grown_before = _kill_ready_run(cluster, trace, tmp_path, 3, victim=1, shard_replica_overlap=True)
    shrunk = run.wait_for("round_formed", world_size=2, cause="restart")
    grown = run.wait_for("round_formed", count=grown_before + 1, world_size=3, cause="scale-up", timeout_s=120)
    steps = trace.stop_at(trace.commits()[-1].step + 6)
    result = run.join()
    kill = trace.fired()[0]
    restores = {r["round"]: r for r in read_restores(str(trace.dir))}
    shrink, grow = restores[shrunk["round_id"]], restores[grown["round_id"]]
    assert shrink["source"] == "memory" and shrink["step"] in (kill.step, kill.step - 1), (kill, shrink)
    last_before_grow = max(c.step for c in trace.commits() if c.wall < grown["time"])
    assert grow["source"] == "memory" and grow["step"] == last_before_grow, "the resize lost no committed step"
    _exact(list(restores.values()))
    assert trace.redone() == kill.step - shrink["step"] <= 1
    before = {m["pid"] for m in read_members(str(trace.dir)) if m["round"] == formed["round_id"]} - {kill.pid}
    assert before <= {v["pid"] for v in result.return_values}, "survivors were never restarted"
    _check_log(result, steps)
    no_leaks(result.worker_pids, ports=trace.ports())


def test_row13_hsdp_node_frozen_while_its_sub_group_peers_wait_on_it_replaces_no_survivor(cluster, no_leaks, trace,
                                                                                          figures, tmp_path):
    """HSDP on a 2 x 2 mesh, 4 nodes: rank 1 stops itself before its step and its node is frozen (no connection
    is reset), while rank 0 waits on it in the forward's all-gather of their shard sub-group and rank 3 in the
    backward's all-reduce of their replicate sub-group. The three survivors leave the aborted round and go on
    at world 3 from memory; none is replaced. Was: a survivor whose sub-group connection the frozen rank had
    accepted (the sub-groups' addresses were never exchanged) stayed blocked and was killed and replaced."""
    ensure_nodes(cluster, 4)
    triggers = trace.dir / "triggers"
    triggers.mkdir()
    faults = FaultInjector(log_path=trace.faults_log, trigger_dir=str(triggers))
    run = BackgroundRun(tmp_path, fsdp_train, config={"steps": 10_000, "sleep_s": 0.05, "trace_dir": str(trace.dir),
                                                      "faults": faults, "hsdp": True},
                        min_nodes=3, max_nodes=4, max_restarts=1)
    frozen = None
    try:
        formed = _trained_at(run, trace, world_size=4, steps=2)
        request_fault(str(triggers), "hang", 1)
        deadline = time.monotonic() + 60
        while not trace.fired() and time.monotonic() < deadline:
            time.sleep(0.05)
        fired = trace.fired()[0]
        frozen = next(n for n in cluster.nodes if fired.pid in {p.pid for p in cluster.processes_of(n)})
        cluster.freeze_node(frozen)
        shrunk = run.wait_for("round_formed", world_size=3, cause="restart", timeout_s=60)
        trace.wait_for_round_commits(shrunk["round_id"], steps=2, alive=run.alive)
    finally:
        if frozen is not None:
            cluster.thaw_node(frozen)
    steps = trace.stop_at(trace.commits()[-1].step + 4)
    result = run.join()
    figures(13, "HSDP node frozen while sub-group peers wait on it", detection_s=detection_s(result.events, fired.wall),
            recovery_s=trace.recovery_s(fired), steps_redone=trace.redone(), restarts=result.restarts, budget=1)
    members = read_members(str(trace.dir))
    before = {m["pid"] for m in members if m["round"] == formed["round_id"]} - {fired.pid}
    after = {m["pid"] for m in members if m["round"] == shrunk["round_id"]}
    assert after == before, f"a survivor was replaced: {before} -> {after}; {[e.message for e in result.events]}"
    assert all(m["source"] == "memory" for m in members if m["round"] == shrunk["round_id"]), members
    assert trace.redone() == 0
    _exact(read_restores(str(trace.dir)))
    _check_log(result, steps)
    no_leaks(result.worker_pids, ports=trace.ports())
