"""A rank about to be killed gives the sharded commits it holds to a peer (`ShardStore.export_held` / `adopt`)."""

from __future__ import annotations

import pytest
import torch

from ray_elastic.sharded.layout import choose_restore
from ray_elastic.sharded.store import Generation, ShardStore

pytestmark = pytest.mark.timeout(30)


def _store(*generations: Generation) -> ShardStore:
    store = ShardStore(replicas=1)
    store.current = generations[0]
    store.pending = generations[1] if len(generations) > 1 else None
    return store


def _generation(commit_id: int, world: int, rank: int, replicas: tuple[int, ...] = ()) -> Generation:
    """Shard k of commit c is 8 bytes of value 10 * c + k, wherever it is held."""
    def flat(shard: int) -> torch.Tensor:
        return torch.full((8,), 10 * commit_id + shard, dtype=torch.uint8)
    return Generation(commit_id, world, rank, [], flat(rank), {k: flat(k) for k in replicas}, {"items": {}})


def test_a_peer_keeps_the_shards_it_lacked_in_its_generation_of_the_same_commit_and_restore_counts_them():
    # World 4, one replica each: rank 2 holds shard 2 and rank 1's only replica; rank 1 is dead, rank 2 stuck.
    stuck = _store(_generation(5, 4, rank=2, replicas=(1,)), _generation(6, 4, rank=2))
    keeper = _store(_generation(5, 4, rank=0, replicas=(3,)))
    other = _store(_generation(5, 4, rank=3, replicas=(2,)))
    lost = choose_restore([keeper.holdings(), other.holdings()])
    assert lost.commit_id == -1 and lost.lost == (1,), "without the handover shard 1 is gone"

    assert keeper.adopt(stuck.export_held()) == [1, 2]
    assert keeper.current is not None and keeper.current.holding().covers == frozenset({0, 1, 2, 3})
    assert torch.equal(keeper.current.flat(1), torch.full((8,), 51, dtype=torch.uint8))
    assert stuck.current is not None
    assert keeper.current.flat(1).data_ptr() != stuck.current.replicas[1].data_ptr(), "a copy the keeper owns"
    assert keeper.pending is None, "commit 6, which the keeper never took, is not adopted"
    assert keeper.adopt(stuck.export_held()) == [], "nothing twice"

    choice = choose_restore([keeper.holdings(), other.holdings()])
    assert (choice.commit_id, choice.world) == (5, 4) and choice.sources[1] == 0, "shard 1 comes from the keeper"


def test_a_generation_of_another_world_or_no_sharded_state_is_not_mixed_in():
    keeper = _store(_generation(5, 3, rank=0))
    assert keeper.adopt(_store(_generation(5, 4, rank=2, replicas=(1,))).export_held()) == []
    assert keeper.current is not None and keeper.current.replicas == {}
    assert ShardStore().export_held() == []
