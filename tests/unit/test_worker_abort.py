"""A worker aborted before its round's call began leaves that round at once (the calls race on its threads)."""

from __future__ import annotations

import os
import socket
import time

from ray_elastic.config import RunConfig
from ray_elastic.coordinator.types import Assignment, OutcomeKind, RoundSpec
from ray_elastic.worker.actor import ElasticWorker


def test_an_abort_that_comes_before_its_round_began_ends_that_round_at_once():
    saved = dict(os.environ)  # a round sets torchrun's variables in its process
    worker = ElasticWorker(RunConfig(run_id="abort-first", warmup_modules=()), lambda: None, None, "w0", "node")
    try:
        with socket.socket() as closed:
            closed.bind(("127.0.0.1", 0))  # bound, not listening: a store there refuses every connection
            a = Assignment("w0", "node", rank=0, local_rank=0, world_size=2, local_world_size=1, node_rank=0,
                           num_nodes=2)
            spec = RoundSpec(a, 3, restart_count=0, store_host="127.0.0.1", store_port=closed.getsockname()[1],
                             max_restarts=1)
            assert worker.abort(round_id=3) is None  # not begun yet: nothing to break, but remembered
            started = time.monotonic()
            outcome = worker.run_round(spec)  # without the abort it would retry the store for 30 s
        assert outcome.kind is OutcomeKind.ABORTED, outcome
        assert time.monotonic() - started < 2.0
        assert worker.abort(round_id=2) is None and 2 not in worker._aborted  # an older round's abort marks nothing
    finally:
        worker._pulse.close()
        os.environ.clear()
        os.environ.update(saved)
