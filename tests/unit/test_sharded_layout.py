"""Pure functions of sharded state: chunks, replica placement, the restore choice, the M -> N reshard plan."""

from __future__ import annotations

import itertools

import pytest
import torch

from ray_elastic.sharded.layout import (
    FlatLayout,
    Holding,
    LeafSpec,
    choose_restore,
    chunk_range,
    leaf_view,
    piece_nbytes,
    replica_holders,
    replica_sources,
    reshard_pieces,
    transfer_plan,
)

pytestmark = pytest.mark.timeout(30)


@pytest.mark.parametrize("size", [0, 1, 3, 5, 7, 8, 13])
@pytest.mark.parametrize("world", [1, 2, 3, 4, 5])
def test_chunk_range_matches_torch_chunk(size, world):
    rows = torch.arange(size)
    chunks = list(torch.chunk(rows, world)) if size else []
    for rank in range(world):
        start, stop = chunk_range(size, world, rank)
        expected = chunks[rank].tolist() if rank < len(chunks) else []
        assert list(range(start, stop)) == expected


def test_replicas_go_to_the_next_nodes_and_never_to_oneself():
    nodes = ["a", "a", "b", "b", "c", "c", "d", "d"]
    holders = replica_holders(nodes, 1)
    assert holders == [[2], [3], [4], [5], [6], [7], [0], [1]]
    assert replica_holders(nodes, 2)[0] == [2, 4]
    for replicas in (1, 2, 3):
        for rank, held_by in enumerate(replica_holders(nodes, replicas)):
            assert rank not in held_by and len(set(held_by)) == len(held_by) == replicas
            assert all(nodes[h] != nodes[rank] for h in held_by), "other nodes first"


def test_replicas_with_too_few_nodes_fall_back_to_the_same_node_or_none():
    assert replica_holders(["a", "a", "a"], 1) == [[1], [2], [0]]
    assert replica_holders(["a"], 1) == [[]]
    assert replica_holders(["a", "b"], 3) == [[1], [0]]
    assert replica_holders(["a", "b", "c"], 0) == [[], [], []]
    assert replica_holders(["a", "b", "b"], 1) == [[1], [0], [0]], "uneven nodes: index modulo the node's size"
    assert replica_sources(replica_holders(["a", "b", "b"], 1), 0) == [1, 2]


def test_losing_one_node_never_loses_a_shard_with_one_replica():
    nodes = [n for n in "abcd" for _ in range(2)]
    holders = replica_holders(nodes, 1)
    for lost_node in "abcd":
        alive = {r for r, n in enumerate(nodes) if n != lost_node}
        assert all(r in alive or set(holders[r]) & alive for r in range(len(nodes)))


def _holdings(world: int, alive: set[int], holders: list[list[int]], commit: int = 7) -> list[list[Holding]]:
    """What each survivor (renumbered in order) holds of commit `commit` in a world of `world`."""
    out = []
    for rank in sorted(alive):
        covers = frozenset({rank, *replica_sources(holders, rank)})
        out.append([Holding(commit, world, covers, True)])
    return out


def test_choose_restore_after_a_loss_takes_each_shard_from_a_survivor():
    holders = replica_holders(list("abcd"), 1)
    choice = choose_restore(_holdings(4, {0, 1, 3}, holders))
    assert choice.commit_id == 7 and choice.world == 4 and choice.rest_source == 0
    assert choice.sources[2] == 2, "old rank 2's shard comes from its replica on old rank 3 (new rank 2)"
    for k, src in enumerate(choice.sources):
        assert k in _holdings(4, {0, 1, 3}, holders)[src][0].covers


def _wire_bytes(specs, old_world: int, new_world: int, sources) -> int:
    """Bytes a restore moves between processes (a piece whose sender is its receiver stays local)."""
    plan = transfer_plan(specs, old_world, new_world, sources)
    return sum(piece_nbytes(specs[p.leaf], p) for (src, dst), pieces in plan.items() if src != dst for p in pieces)


@pytest.mark.parametrize("world,alive,replicas", [
    (4, {0, 1, 3}, 1), (4, {1, 2, 3}, 1), (4, {0, 2, 3}, 1), (4, {0, 1, 2}, 1), (6, {0, 1, 3, 4, 5}, 1),
    (4, {0, 2}, 2), (3, {0, 1, 2}, 1),
])
def test_choose_restore_sends_each_shard_from_the_holder_that_keeps_most_of_it_local(world, alive, replicas):
    holders = replica_holders([str(r) for r in range(world)], replicas)
    holdings = _holdings(world, alive, holders)
    if world == 3:  # a growth 3 -> 4: the newcomer (new rank 3) holds nothing
        holdings.append([])
    new_world = len(holdings)
    specs = [LeafSpec("w", (120, 5), 0, torch.float32), LeafSpec("b", (60,), 0, torch.float32)]
    choice = choose_restore(holdings)
    covers = [held[0].covers if held else frozenset() for held in holdings]
    candidates = [[r for r in range(new_world) if k in covers[r]] for k in range(world)]
    fewest = min(_wire_bytes(specs, world, new_world, pick) for pick in itertools.product(*candidates))
    assert _wire_bytes(specs, world, new_world, choice.sources) == fewest, choice.sources


def test_choose_restore_names_what_is_lost_when_a_shard_and_its_replicas_are_gone():
    holders = replica_holders(list("abcd"), 1)
    choice = choose_restore(_holdings(4, {0, 3}, holders))
    assert choice.commit_id == -1 and choice.lost == (1,) and choice.lost_commit_id == 7
    assert choose_restore([[], []]).commit_id == -1 and not choose_restore([[], []]).lost


def test_choose_restore_prefers_the_newest_complete_commit_and_falls_back_to_an_older_one():
    # commit 8 was interrupted: rank 1's replica of rank 0 never arrived, and rank 0 is gone
    newer_incomplete = [[Holding(8, 2, frozenset({1}), True), Holding(7, 2, frozenset({0, 1}), True)]]
    assert choose_restore(newer_incomplete).commit_id == 7
    complete = [[Holding(8, 2, frozenset({0, 1}), True), Holding(7, 2, frozenset({0, 1}), True)]]
    assert choose_restore(complete).commit_id == 8


@pytest.mark.parametrize("old_world,new_world", list(itertools.product([1, 2, 3, 4, 5], [1, 2, 3, 4, 5])))
def test_reshard_pieces_cover_every_new_shard_exactly(old_world, new_world):
    specs = [LeafSpec("w", (7, 3), 0, torch.float32), LeafSpec("b", (5,), 0, torch.float64),
             LeafSpec("t", (2, 9), 1, torch.float32), LeafSpec("z", (2, 2), 0, torch.int64)]
    pieces = reshard_pieces(specs, old_world, new_world)
    for j in range(new_world):
        for index, spec in enumerate(specs):
            size = spec.shape[spec.dim]
            start, stop = chunk_range(size, new_world, j)
            mine = sorted((p.start, p.stop) for p in pieces[j] if p.leaf == index)
            covered = [r for a, b in mine for r in range(a, b)]
            assert covered == list(range(start, stop))
            for p in pieces[j]:
                o0, o1 = chunk_range(specs[p.leaf].shape[specs[p.leaf].dim], old_world, p.old_rank)
                assert o0 <= p.start < p.stop <= o1
    sources = [k % new_world for k in range(old_world)]
    plan = transfer_plan(specs, old_world, new_world, sources)
    assert sum(len(v) for v in plan.values()) == sum(len(v) for v in pieces.values())


def test_flat_layout_views_are_aligned_and_disjoint():
    specs = [LeafSpec("a", (5, 3), 0, torch.float32), LeafSpec("b", (3,), 0, torch.float64),
             LeafSpec("c", (1,), 0, torch.int8)]
    for rank in range(4):
        layout = FlatLayout.of(specs, 4, rank)
        flat = torch.zeros(layout.total, dtype=torch.uint8)
        views = [leaf_view(flat, specs, layout, i, 4, rank) for i in range(len(specs))]
        for i, view in enumerate(views):
            view.fill_(i + 1)
        for i, view in enumerate(views):
            assert bool((view == i + 1).all()), "no view overlaps another"
        assert all(offset % 64 == 0 for offset in layout.offsets)


def test_hsdp_restore_takes_a_lost_ranks_shard_from_the_other_replica_group_and_feeds_every_group():
    # old mesh 2 x 2: ranks 0, 1 hold shards 0, 1; ranks 2, 3 hold them again. Rank 1 is lost; the 3 survivors
    # (old ranks 0, 2, 3) form a 1 x 3 mesh, then a newcomer makes it 2 x 2 with the ranks in another order.
    holdings = [[Holding(7, 2, frozenset({0}), True)], [Holding(7, 2, frozenset({0}), True)],
                [Holding(7, 2, frozenset({1}), True)]]
    choice = choose_restore(holdings, (0, 1, 2), 3)
    assert choice.commit_id == 7 and choice.sources[1] == 2, "shard 1 from its copy in the other replica group"
    assert choice.sources[0] in (0, 1)
    specs = [LeafSpec("w", (7, 3), 0, torch.float32)]
    grown = choose_restore(holdings + [[]], (1, 0, 1, 0), 2)
    assert grown.sources[0] == 1, "old shard 0 from new rank 1, which keeps all of it as its new shard 0"
    plan = transfer_plan(specs, 2, 2, grown.sources, (1, 0, 1, 0))
    for receiver, shard in enumerate((1, 0, 1, 0)):
        rows = sorted(r for (_, dst), pieces in plan.items() if dst == receiver for p in pieces
                      for r in range(p.start, p.stop))
        assert rows == list(range(*chunk_range(7, 2, shard))), (receiver, rows)
    assert all(src != 3 for src, _ in plan), "the newcomer holds nothing to send"
