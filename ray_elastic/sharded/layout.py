"""Pure functions of sharded state: who holds which rows, where replicas go, how M shards become N.

A sharded leaf (a DTensor of a model or optimizer state dict, FSDP2's
`Shard(dim)` on a 1-D mesh, or on the shard dim of a 2-D HSDP mesh) is split along
`dim` the way `torch.chunk` splits: chunks of ceil(size / shards) rows, the last
ones shorter or empty. Here "world" and "rank" count shards (FSDP: ranks). Everything
here is a function of shapes, shard counts and indices, so every rank computes the
same plan without asking the others.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

ALIGN = 64  # byte alignment of each leaf inside a rank's flat buffer


@dataclass(frozen=True)
class LeafSpec:
    """One sharded tensor of the state: its path, global shape, sharded dim and dtype."""

    key: str
    shape: tuple[int, ...]
    dim: int
    dtype: torch.dtype

    @property
    def itemsize(self) -> int:
        return torch.empty((), dtype=self.dtype).element_size()

    @property
    def row_elems(self) -> int:
        """Elements in one index of the sharded dim."""
        n = 1
        for i, s in enumerate(self.shape):
            if i != self.dim:
                n *= s
        return n


@dataclass(frozen=True)
class LeafRef:
    """Stands for sharded leaf `index` inside a skeleton."""

    index: int


@dataclass(frozen=True)
class EmptyOptimizer:
    """An optimizer that has not stepped yet: only its hyperparameters are kept.

    (`get_optimizer_state_dict` would initialise its state with a zero-gradient step,
    which changes what the first real step does, e.g. Adam's bias correction.)
    """

    param_groups: tuple[dict[str, Any], ...]


SAFE_TYPES = (LeafSpec, LeafRef, EmptyOptimizer)  # what a sharded checkpoint's rest.pt may hold besides plain values


def chunk_range(size: int, world: int, rank: int) -> tuple[int, int]:
    """Rows [start, stop) of `rank` when `size` rows are chunked over `world` ranks like `torch.chunk`."""
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"rank {rank} outside a world of {world}")
    chunk = -(-size // world) if size else 0
    start = min(rank * chunk, size)
    return start, min(start + chunk, size)


def local_shape(spec: LeafSpec, world: int, rank: int) -> tuple[int, ...]:
    start, stop = chunk_range(spec.shape[spec.dim], world, rank)
    shape = list(spec.shape)
    shape[spec.dim] = stop - start
    return tuple(shape)


@dataclass(frozen=True)
class FlatLayout:
    """Where each leaf of one rank's shards sits in that rank's flat byte buffer."""

    offsets: tuple[int, ...]
    nbytes: tuple[int, ...]
    total: int

    @staticmethod
    def of(specs: Sequence[LeafSpec], world: int, rank: int) -> FlatLayout:
        offsets, sizes, at = [], [], 0
        for spec in specs:
            start, stop = chunk_range(spec.shape[spec.dim], world, rank)
            size = (stop - start) * spec.row_elems * spec.itemsize
            offsets.append(at)
            sizes.append(size)
            at += -(-size // ALIGN) * ALIGN
        return FlatLayout(tuple(offsets), tuple(sizes), at)


def leaf_view(flat: torch.Tensor, specs: Sequence[LeafSpec], layout: FlatLayout, index: int, world: int,
              rank: int) -> torch.Tensor:
    """Leaf `index` of rank `rank`'s flat buffer, as a tensor of its dtype and local shape (a view)."""
    spec = specs[index]
    start = layout.offsets[index]
    raw = flat[start : start + layout.nbytes[index]]
    return raw.view(spec.dtype).view(local_shape(spec, world, rank))


# -- replicas ----------------------------------------------------------------------------------------
def replica_holders(nodes: Sequence[str], replicas: int) -> list[list[int]]:
    """For each rank, the ranks that keep a copy of its committed shards.

    Ranks are grouped by node in order of first appearance. Rank r (local index i on
    its node) is held by the rank of local index i (modulo that node's size) on each of
    the next `replicas` nodes, cyclically: two adjacent nodes lost together are what it
    takes to lose a shard with replicas=1. With fewer other nodes than `replicas`,
    the remaining copies go to other ranks of the same node (they still cover a
    process crash); a world of one rank holds no replica.

    Args:
        nodes: node id of each rank of the world.
        replicas: copies wanted per shard (0 = none).

    Returns:
        holders[r]: distinct ranks other than r, at most `replicas` of them.
    """
    order: list[str] = []
    members: dict[str, list[int]] = {}
    for rank, node in enumerate(nodes):
        if node not in members:
            order.append(node)
            members[node] = []
        members[node].append(rank)
    out: list[list[int]] = []
    for rank, node in enumerate(nodes):
        index = members[node].index(rank)
        position = order.index(node)
        chosen: list[int] = []
        for step in range(1, len(order)):
            if len(chosen) == replicas:
                break
            peers = members[order[(position + step) % len(order)]]
            chosen.append(peers[index % len(peers)])
        same_node = [r for r in members[node] if r != rank]
        start = members[node].index(rank)
        same_node = same_node[start:] + same_node[:start]  # the next ones after this rank first
        for peer in same_node:
            if len(chosen) == replicas:
                break
            chosen.append(peer)
        out.append(chosen)
    return out


def replica_sources(holders: Sequence[Sequence[int]], rank: int) -> list[int]:
    """The ranks whose shards `rank` keeps a copy of."""
    return [source for source, held_by in enumerate(holders) if rank in held_by]


# -- choosing what to restore ------------------------------------------------------------------------
@dataclass(frozen=True)
class Holding:
    """What one rank of the new world holds of one committed generation."""

    commit_id: int
    world: int  # the world size the generation was committed in
    covers: frozenset[int]  # old ranks whose shards it holds complete (its own and replicas)
    has_rest: bool  # holds the replicated part (skeleton, attributes) of that commit


@dataclass(frozen=True)
class RestoreChoice:
    """The newest commit that the new world can rebuild in memory, and from whom.

    `sources[k]` is the new rank that sends old rank k's shard; `rest_source` the new
    rank that sends the replicated part. `commit_id` is -1 when nothing is held anywhere,
    and `lost` names the old ranks missing from the newest commit when it cannot be rebuilt.
    """

    commit_id: int
    world: int = 0
    sources: tuple[int, ...] = ()
    rest_source: int = -1
    lost: tuple[int, ...] = ()
    lost_commit_id: int = -1


def choose_restore(holdings: Sequence[Sequence[Holding]], new_shard_of: Sequence[int] = (),
                   new_shards: int = 0) -> RestoreChoice:
    """Pick the newest fully covered commit, and for each old shard the holder that keeps most of it local.

    Each old shard is sent by the holder (own copy or replica) whose new shard overlaps it most, so
    the most rows stay in that process and the fewest cross the wire; ties go to the least loaded.

    Args:
        holdings: per new rank, what it holds.
        new_shard_of: per new rank, the shard it will hold (default: its rank); `new_shards` of them (HSDP:
            fewer than ranks, each held by every replica group).

    Returns:
        The choice; `commit_id == -1` with `lost` set when the newest commit anyone took
        cannot be rebuilt (some shard and all its replicas are gone) and no older one can either.
    """
    by_commit: dict[tuple[int, int], dict[int, list[int]]] = {}
    rest: dict[tuple[int, int], list[int]] = {}
    for new_rank, held in enumerate(holdings):
        for h in held:
            cover = by_commit.setdefault((h.commit_id, h.world), {})
            for old in h.covers:
                cover.setdefault(old, []).append(new_rank)
            if h.has_rest:
                rest.setdefault((h.commit_id, h.world), []).append(new_rank)
    if not by_commit:
        return RestoreChoice(commit_id=-1)
    shard_of = list(new_shard_of) or list(range(len(holdings)))
    shards = new_shards or len(holdings)
    newest = max(by_commit)
    for key in sorted(by_commit, reverse=True):
        commit_id, world = key
        cover = by_commit[key]
        if all(k in cover for k in range(world)) and rest.get(key):
            load = [0] * len(holdings)
            sources = []
            for k in range(world):
                pick = max(cover[k], key=lambda r: (_overlap(k, world, shard_of[r], shards), -load[r], -r))
                load[pick] += 1
                sources.append(pick)
            return RestoreChoice(commit_id, world, tuple(sources), min(rest[key]))
    missing = tuple(k for k in range(newest[1]) if k not in by_commit[newest])
    return RestoreChoice(commit_id=-1, lost=missing, lost_commit_id=newest[0])


def _overlap(old_rank: int, old_world: int, new_rank: int, new_world: int) -> int:
    """How much of old rank's share of every dimension the new rank's share covers (in 1/(old*new) units)."""
    old = (old_rank * new_world, (old_rank + 1) * new_world)
    new = (new_rank * old_world, (new_rank + 1) * old_world)
    return max(0, min(old[1], new[1]) - max(old[0], new[0]))


# -- resharding ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Piece:
    """Rows [start, stop) (global, along the leaf's sharded dim) of leaf `leaf`, from old rank `old_rank`."""

    leaf: int
    old_rank: int
    start: int
    stop: int


def reshard_pieces(specs: Sequence[LeafSpec], old_world: int, new_world: int) -> dict[int, list[Piece]]:
    """For each new rank, the pieces of old shards that make up its new shards, in a fixed order."""
    out: dict[int, list[Piece]] = {j: [] for j in range(new_world)}
    for index, spec in enumerate(specs):
        size = spec.shape[spec.dim]
        for j in range(new_world):
            n0, n1 = chunk_range(size, new_world, j)
            if n0 == n1:
                continue
            for k in range(old_world):
                o0, o1 = chunk_range(size, old_world, k)
                a, b = max(n0, o0), min(n1, o1)
                if a < b:
                    out[j].append(Piece(index, k, a, b))
    return out


def transfer_plan(specs: Sequence[LeafSpec], old_world: int, new_world: int, sources: Sequence[int],
                  new_shard_of: Sequence[int] = ()) -> dict[tuple[int, int], list[Piece]]:
    """(sending new rank, receiving new rank) -> the pieces it sends, in order (self-sends included).

    `old_world` and `new_world` count shards; `new_shard_of[rank]` is the new shard a rank needs
    (default: its rank). HSDP: every replica group receives each new shard, from the same sender.
    """
    plan: dict[tuple[int, int], list[Piece]] = {}
    pieces = reshard_pieces(specs, old_world, new_world)
    for receiver, shard in enumerate(new_shard_of or range(new_world)):
        for piece in pieces[shard]:
            plan.setdefault((sources[piece.old_rank], receiver), []).append(piece)
    return plan


def piece_nbytes(spec: LeafSpec, piece: Piece) -> int:
    return (piece.stop - piece.start) * spec.row_elems * spec.itemsize


def bytes_needed(specs: Sequence[LeafSpec], world: int, replicas: int) -> int:
    """Host bytes a rank needs for its snapshots: own (2 buffers) and replicas (2 each), largest rank."""
    biggest = max((FlatLayout.of(specs, world, r).total for r in range(world)), default=0)
    return biggest * (2 + 2 * min(replicas, max(world - 1, 0)))


def memory_verdict(specs: Sequence[LeafSpec], world: int, replicas: int, available: int,
                   live_on_host: bool = True) -> str | None:
    """None if a rank of a world of `world` can hold its share of the state in `available` bytes, else why not.

    A rank holds its live shards (when they are on the host) and its snapshots: 2 buffers of its
    own shards and 2 per replica it keeps (see `bytes_needed`).
    """
    def needed(n: int) -> int:
        biggest = max((FlatLayout.of(specs, n, r).total for r in range(n)), default=0)
        return bytes_needed(specs, n, replicas) + (biggest if live_on_host else 0)

    if needed(world) <= available:
        return None
    fits = next((n for n in range(world + 1, 4 * world + 1025) if needed(n) <= available), None)
    advice = (f"run with at least {fits} ranks (raise min_nodes)" if fits is not None
              else "the state is too large for this machine's memory at any size tried")
    return (f"a world of {world} rank(s) cannot hold the sharded state in memory: each rank needs "
            f"{_human(needed(world))} (its live shards, 2 snapshot buffers and 2 per replica kept, with "
            f"shard_replicas={replicas}) but has {_human(available)} available; {advice}, or lower "
            f"shard_replicas.")


def _human(nbytes: int) -> str:
    value = float(nbytes)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} GiB"


def describe_lost(lost: Sequence[int], nodes: Mapping[int, str] | Sequence[str]) -> str:
    """'ranks 2 and 3 (nodes ab12, cd34)' for an error or event message."""
    names = [str(k) for k in lost]
    ranks = names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]
    where = sorted({str(nodes[k])[:8] for k in lost if (k in nodes if isinstance(nodes, Mapping) else k < len(nodes))})
    return f"rank{'s' if len(names) > 1 else ''} {ranks}" + (f" (node{'s' if len(where) > 1 else ''} "
                                                            f"{', '.join(where)})" if where else "")
