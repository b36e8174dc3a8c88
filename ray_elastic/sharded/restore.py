"""Restoring sharded state on entering a round: from memory, resharded M -> N, or from storage.

Every rank of the new world calls `restore` together:

1. all-gather what each rank holds (commit, world, which old ranks' shards) and its node;
2. `layout.choose_restore` picks the newest commit every old shard of which some live
   rank holds (own or replica), and a sender for each;
3. the replicated part (skeletons, attributes) is broadcast from one holder, the shards
   move in one all-to-all (`comm.reshard`), and every rank loads its new shards;
4. if no commit can be rebuilt, the newest durable checkpoint is loaded resharded
   (`durable.ShardedCheckpoints`), and the caller reports which shards were lost.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from ray_elastic.errors import SnapshotLostError
from ray_elastic.sharded import comm
from ray_elastic.sharded.capture import ShardedItems, empty_shards, join_trees, load_state_dicts, place_in
from ray_elastic.sharded.layout import choose_restore, chunk_range, describe_lost, transfer_plan
from ray_elastic.sharded.store import ShardStore


@dataclass(frozen=True)
class Restored:
    """How this rank's state was restored.

    Attributes:
        source: "memory" (this process held the commit), "peer" (it received it), "storage", or "fresh".
        attrs: the committed plain attributes (None when fresh).
        commit_id: the commit restored (-1 when fresh).
        world: the world size that commit was taken in.
        lost: when from storage after a loss: which old ranks' shards were gone, and the commit they were of.
        lost_message: a sentence naming them, for an event.
    """

    source: str
    attrs: dict[str, Any] | None
    commit_id: int
    world: int
    lost: tuple[int, ...] = ()
    lost_commit_id: int = -1
    lost_message: str = ""


def restore(store: ShardStore, items: ShardedItems, rank: int, world: int, node_id: str, device: torch.device,
            group: Any = None, checkpoints: Any = None) -> Restored:
    """Rebuild the newest commit in this world's layout and load it into `items` (see module docstring).

    Raises:
        SnapshotLostError: some shard of the newest commit and all its replicas are gone, and no
            durable checkpoint exists.
    """
    multi = dist.is_initialized() and world > 1
    place = place_in(items.mesh, rank)
    mine = (node_id, store.holdings(), place.shard)
    everyone = comm.all_gather_objects(mine, group) if multi else [mine]
    nodes = tuple(node for node, _, _ in everyone)
    shard_of = tuple(shard for _, _, shard in everyone)
    store.begin_round(rank, world, nodes, group, shard_of, place.replica_groups)
    choice = choose_restore([list(held) for _, held, _ in everyone], shard_of, place.shards)
    if choice.commit_id >= 0:
        generation = store.generation(choice.commit_id, choice.world)
        rest = None
        if rank == choice.rest_source:
            assert generation is not None
            rest = {"specs": generation.specs, "nodes": generation.nodes, **generation.rest}
        rest = comm.broadcast_object(rest, choice.rest_source, group) if multi else rest
        assert rest is not None
        specs = rest["specs"]
        store.check_memory(specs, live_on_host=device.type == "cpu")
        plan = transfer_plan(specs, choice.world, place.shards, choice.sources, shard_of)
        flats = {}
        if generation is not None:
            flats = {k: generation.flat(k) for k in range(choice.world) if choice.sources[k] == rank}
        shards = empty_shards(specs, place.shards, place.shard)
        starts = [chunk_range(s.shape[s.dim], place.shards, place.shard)[0] for s in specs]
        comm.reshard(plan, specs, choice.world, rank, world, flats, shards, starts, group)
        load_state_dicts(items, join_trees(rest["items"], shards, specs, items.mesh, device))
        store.keep_only(generation, choice.commit_id)
        return Restored("memory" if generation is not None else "peer", rest["attrs"], choice.commit_id, choice.world)
    lost_message = ""
    if choice.lost:
        lost_message = _lost_sentence(store, choice.lost, choice.lost_commit_id)
    newest = None
    if checkpoints is not None:
        found = checkpoints.newest() if rank == 0 else None
        path = str(found[0]) if found is not None else None
        newest = comm.broadcast_object(path, 0, group) if multi else path
    if newest is not None:
        from pathlib import Path

        rest = checkpoints.read_rest(Path(newest))
        store.check_memory(rest["specs"], live_on_host=device.type == "cpu")
        shards = checkpoints.load(Path(newest), rest, place.shards, place.shard)
        load_state_dicts(items, join_trees(rest["items"], shards, rest["specs"], items.mesh, device))
        store.keep_only(None, rest["commit_id"])
        return Restored("storage", rest["attrs"], rest["commit_id"], rest["world"], choice.lost,
                        choice.lost_commit_id, lost_message)
    if choice.lost:
        raise SnapshotLostError(
            f"{lost_message}, and no durable checkpoint exists to fall back to. Raise shard_replicas (copies "
            f"on more nodes), or set storage_path= (with name=) so that sharded checkpoints are written."
        )
    store.keep_only(None, -1)
    return Restored("fresh", None, -1, world)


def _lost_sentence(store: ShardStore, lost: tuple[int, ...], commit_id: int) -> str:
    """Which shards of `commit_id` are gone, with their old ranks' nodes as far as this rank knows."""
    taken = next((g for g in (store.current, store.pending) if g is not None and g.commit_id == commit_id), None)
    if taken is not None and taken.replica_groups > 1:
        which = ", ".join(map(str, lost))
        return (f"commit {commit_id}: old shard{'s' if len(lost) > 1 else ''} {which} of the HSDP mesh and its "
                f"copy in every replica group are gone")
    old_nodes = dict(enumerate(taken.nodes)) if taken is not None else {}
    return f"commit {commit_id}: the shards of old {describe_lost(lost, old_nodes)} and every replica of them are gone"
