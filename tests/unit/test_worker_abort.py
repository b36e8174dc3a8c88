"""A real worker's round before it has a session: an abort or a stop that comes first, and the wait while it forms."""

from __future__ import annotations

import os
import socket
import threading
import time
from collections.abc import Iterator

import pytest

from ray_elastic.config import RunConfig
from ray_elastic.context import get_session
from ray_elastic.coordinator.types import Assignment, OutcomeKind, RoundSpec
from ray_elastic.state import MembershipChange
from ray_elastic.store import RoundStore
from ray_elastic.worker.actor import ElasticWorker


def waits_for_its_interrupt() -> str:
    """A train_fn that waits on something other than collectives (as the CLI's script runner does)."""
    interrupted = threading.Event()
    get_session().add_interrupt_handler(lambda reason: interrupted.set())
    if not interrupted.wait(10):
        return "never interrupted"
    raise MembershipChange()


@pytest.fixture
def make_worker() -> Iterator:
    saved = dict(os.environ)  # a round sets torchrun's variables in its process
    made: list[ElasticWorker] = []

    def make(train_fn=lambda: None) -> ElasticWorker:
        made.append(ElasticWorker(RunConfig(run_id="unit", warmup_modules=()), train_fn, None, "w0", "node"))
        return made[-1]

    try:
        yield make
    finally:
        for worker in made:
            worker._pulse.close()
        os.environ.clear()
        os.environ.update(saved)


@pytest.fixture
def worker(make_worker) -> ElasticWorker:
    return make_worker()


def _spec(round_id: int, port: int, world_size: int = 2) -> RoundSpec:
    """Rank 0 of a world of `world_size` (one rank per node) whose store is at 127.0.0.1:`port`."""
    a = Assignment("w0", "node", rank=0, local_rank=0, world_size=world_size, local_world_size=1, node_rank=0,
                   num_nodes=world_size)
    return RoundSpec(a, round_id, restart_count=0, store_host="127.0.0.1", store_port=port, max_restarts=1)


def test_a_stop_that_comes_before_its_round_began_stops_that_round(make_worker):
    """The coordinator asks once: a stop that runs before its round's run_round (the two race on the actor's
    threads) is kept, and reaches a train_fn that only listens through an interrupt handler. Before, it was
    dropped and the round never re-formed (a CLI run stayed at its first world size)."""
    worker = make_worker(waits_for_its_interrupt)
    store = RoundStore("127.0.0.1")
    try:
        worker.request_stop(round_id=1)
        started = time.monotonic()
        outcome = worker.run_round(_spec(1, store.port, world_size=1))
    finally:
        store.close()
    assert outcome.kind is OutcomeKind.STOPPED, outcome
    assert time.monotonic() - started < 5.0
    worker.request_stop(round_id=0)
    assert worker._stop_round == 1, "an older round's stop marks nothing"


def test_an_abort_that_comes_before_its_round_began_ends_that_round_at_once(worker):
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))  # bound, not listening: a store there refuses every connection
        assert worker.abort(round_id=3) is None  # not begun yet: nothing to break, but remembered
        started = time.monotonic()
        outcome = worker.run_round(_spec(3, closed.getsockname()[1]))  # without the abort: 30 s of retries
    assert outcome.kind is OutcomeKind.ABORTED, outcome
    assert time.monotonic() - started < 2.0
    assert worker.abort(round_id=2) is None and 2 not in worker._aborted  # an older round's abort marks nothing


def test_a_rank_forming_its_round_says_so_and_where_then_leaves_when_aborted(worker):
    """Ranks connect to their round before it has a session: that wait is shown (busy, with its stack), not
    "not in a round", so an abort gives it the forming bound instead of killing it with its commit."""
    store = RoundStore("127.0.0.1")
    try:
        outcome: list = []
        thread = threading.Thread(target=lambda: outcome.append(worker.run_round(_spec(1, store.port))), daemon=True)
        thread.start()  # rank 1 never comes: rank 0 waits for it while forming the group
        deadline = time.monotonic() + 10
        while not (beat := worker.probe(1)).busy and time.monotonic() < deadline:
            time.sleep(0.05)
        assert beat.busy.startswith("forming the round's process group"), beat
        report = worker.stacks()
        assert "wait_for_every_rank" in report.stack and report.note.startswith("busy forming"), report
        aborted_at = time.monotonic()
        worker.abort(1)
        store.close()  # as the coordinator does: the wait for the missing rank ends
        thread.join(10)
        assert outcome and outcome[0].kind is OutcomeKind.ABORTED, outcome
        assert time.monotonic() - aborted_at < 2.0
        assert worker.probe(1).busy == "" and worker.stacks().note == "not in a round"
    finally:
        store.close()
