"""ElasticSampler: every sample of an epoch exactly once, across resizes."""

from __future__ import annotations

import pytest
import torch

from ray_elastic.context import Session, TrainContext, set_session
from ray_elastic.sampler import ElasticSampler
from ray_elastic.state import SnapshotHolder

pytestmark = pytest.mark.timeout(30)


def _as_rank(rank: int, world: int) -> None:
    ctx = TrainContext(rank=rank, local_rank=0, world_size=world, local_world_size=1, node_rank=rank,
                       num_nodes=world, restart_count=0, round_id=0, run_id="t", node_id="n",
                       device=torch.device("cpu"))
    set_session(Session(ctx, SnapshotHolder()))


def _take(sampler: ElasticSampler, world: int, steps: int, batch: int) -> list[int]:
    """Run `steps` steps of `batch` samples per rank on every rank; return the samples consumed."""
    seen = []
    per_rank = {}
    for rank in range(world):
        _as_rank(rank, world)
        per_rank[rank] = list(iter(sampler))
    for step in range(steps):
        for rank in range(world):
            seen.extend(per_rank[rank][step * batch:(step + 1) * batch])
        _as_rank(0, world)
        sampler.record_batch(batch)
    return seen


@pytest.mark.parametrize("shuffle", [False, True])
def test_resize_mid_epoch_visits_each_sample_once(shuffle):
    sampler = ElasticSampler(num_samples=103, shuffle=shuffle, seed=7)
    seen = _take(sampler, world=4, steps=3, batch=5)          # 60 samples at world 4
    committed = sampler.state_dict()
    restored = ElasticSampler(num_samples=103, shuffle=shuffle, seed=0)
    restored.load_state_dict(committed)                        # what a newcomer receives
    seen += _take(restored, world=3, steps=100, batch=5)       # rest of the epoch at world 3
    assert sorted(seen) == list(range(103))
    set_session(None)


def test_new_epoch_starts_from_zero_with_a_new_order():
    sampler = ElasticSampler(num_samples=20, shuffle=True, seed=1)
    _as_rank(0, 1)
    first = list(iter(sampler))
    sampler.record_batch(20)
    assert list(iter(sampler)) == []
    sampler.set_epoch(1)
    second = list(iter(sampler))
    assert sorted(second) == list(range(20)) and second != first
    assert len(sampler) == 20
    set_session(None)


def test_steps_left_is_the_same_on_every_rank():
    sampler = ElasticSampler(num_samples=103, shuffle=False)
    lengths = set()
    for rank in range(4):
        _as_rank(rank, 4)
        lengths.add(sampler.steps_left(5))
        assert len(sampler) >= sampler.steps_left(5) * 5
    assert lengths == {5}
    set_session(None)
