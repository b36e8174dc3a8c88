"""FaultInjector without Ray: faults by step, faults requested while running, and the fault log."""

from __future__ import annotations

import pickle
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from ray_elastic.context import Session, TrainContext, set_session
from ray_elastic.state import SnapshotHolder
from ray_elastic.testing import FaultInjector, InjectedFault, request_fault
from tests.faults.matrix import Trace

pytestmark = pytest.mark.timeout(30)


@pytest.fixture
def as_rank() -> Iterator:
    def enter(rank: int, restart_count: int = 0, round_id: int | None = None) -> None:
        round_id = restart_count if round_id is None else round_id
        ctx = TrainContext(rank=rank, local_rank=0, world_size=2, local_world_size=1, node_rank=rank, num_nodes=2,
                           restart_count=restart_count, round_id=round_id, run_id="t", node_id="n",
                           device=torch.device("cpu"))
        set_session(Session(ctx, SnapshotHolder()))

    yield enter
    set_session(None)


def test_step_faults_fire_on_their_rank_step_and_attempt_and_are_logged(as_rank, tmp_path):
    trace = Trace(tmp_path)
    faults = pickle.loads(pickle.dumps(FaultInjector(log_path=trace.faults_log).fail_at(rank=1, step=3)))
    as_rank(0)
    faults.check(3)
    as_rank(1, restart_count=1)
    faults.check(3)
    as_rank(1, round_id=4)  # a round that grew: the restart count stays, the round id moves on
    faults.check(2)
    with pytest.raises(InjectedFault, match="rank 1 at step 3"):
        faults.check(3)
    [fired] = trace.fired()
    assert (fired.kind, fired.rank, fired.step, fired.round_id) == ("raise", 1, 3, 4) and fired.wall > 0


def test_a_fault_in_a_rounds_first_step_is_placed_in_that_round(tmp_path):
    """Steps 1-4 commit in round 0, round 1 forms (a node joined), and rank 1 is killed after its step 5 but before
    its commit: the survivors still commit step 5 in round 1, and recovery is the first commit of round 2. From the
    fault's time alone the round hit looks like round 0 (round 1 had not committed yet)."""
    trace = Trace(tmp_path)
    lines = [f"{step} {float(step):.6f} 100 0 5000" for step in range(1, 5)]
    lines += ["5 4.600000 100 1 5001", "6 5.000000 100 2 5002"]
    (tmp_path / "steps.log").write_text("\n".join(lines) + "\n")
    Path(trace.faults_log).write_text("kill 1 5 4.500000 101 1\n")
    [fired] = trace.fired()
    assert trace.first_commit_after(fired).step == 6
    assert trace.recovery_s(fired) == pytest.approx(0.5)
    assert trace.first_commit_after(fired.wall).step == 5, "from a time alone, round 0 is the newest before it"


def test_requested_fault_fires_once_on_the_named_rank(as_rank, tmp_path):
    trace = Trace(tmp_path)
    faults = FaultInjector(log_path=trace.faults_log, trigger_dir=str(tmp_path))
    request_fault(str(tmp_path), "raise", rank=1)
    as_rank(0)
    faults.check(10)
    as_rank(1)
    with pytest.raises(InjectedFault):
        faults.check(11)
    faults.check(12)  # claimed: it does not fire again
    assert [(f.kind, f.rank, f.step) for f in trace.fired()] == [("raise", 1, 11)]
    with pytest.raises(ValueError, match="kind must be one of"):
        request_fault(str(tmp_path), "explode", rank=0)
