"""FaultInjector without Ray: faults by step, faults requested while running, and the fault log."""

from __future__ import annotations

import pickle
from collections.abc import Iterator

import pytest
import torch

from ray_elastic.context import Session, TrainContext, set_session
from ray_elastic.state import SnapshotHolder
from ray_elastic.testing import FaultInjector, InjectedFault, request_fault
from tests.faults.matrix import Trace

pytestmark = pytest.mark.timeout(30)


@pytest.fixture
def as_rank() -> Iterator:
    def enter(rank: int, restart_count: int = 0) -> None:
        ctx = TrainContext(rank=rank, local_rank=0, world_size=2, local_world_size=1, node_rank=rank, num_nodes=2,
                           restart_count=restart_count, round_id=restart_count, run_id="t", node_id="n",
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
    as_rank(1)
    faults.check(2)
    with pytest.raises(InjectedFault, match="rank 1 at step 3"):
        faults.check(3)
    [fired] = trace.fired()
    assert (fired.kind, fired.rank, fired.step) == ("raise", 1, 3) and fired.wall > 0


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
