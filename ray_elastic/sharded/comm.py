"""Collectives of sharded state on host (CPU) buffers: objects, the commit agreement, replicas, resharding.

Every function takes the process group to use (None: the default group). With gloo
that is the training group itself; with NCCL it is a gloo side group of the round
(see `ShardStore.comm_group`), since these buffers live in host memory.
"""

from __future__ import annotations

import pickle
import time
from collections.abc import Mapping, Sequence
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from ray_elastic.sharded.layout import FlatLayout, LeafSpec, Piece, leaf_view, piece_nbytes


def all_gather_objects(obj: Any, group: Any = None) -> list[Any]:
    """Every rank's `obj` (pickled), in rank order."""
    data = pickle.dumps(obj)
    world = dist.get_world_size(group)
    size = torch.tensor([len(data)], dtype=torch.int64)
    sizes = [torch.zeros(1, dtype=torch.int64) for _ in range(world)]
    dist.all_gather(sizes, size, group=group)
    longest = max(int(s.item()) for s in sizes)
    mine = torch.zeros(longest, dtype=torch.uint8)
    if data:
        mine[: len(data)] = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    out = [torch.empty(longest, dtype=torch.uint8) for _ in range(world)]
    dist.all_gather(out, mine, group=group)
    return [pickle.loads(t[: int(s.item())].numpy().tobytes()) for t, s in zip(out, sizes)]


def broadcast_object(obj: Any, src: int, group: Any = None) -> Any:
    """`obj` of rank `src` (group rank), on every rank."""
    rank = dist.get_rank(group)
    data = pickle.dumps(obj) if rank == src else b""
    size = torch.tensor([len(data)], dtype=torch.int64)
    dist.broadcast(size, src=_global(src, group), group=group)
    buffer = (torch.frombuffer(bytearray(data), dtype=torch.uint8) if rank == src
              else torch.empty(int(size.item()), dtype=torch.uint8))
    dist.broadcast(buffer, src=_global(src, group), group=group)
    return obj if rank == src else pickle.loads(buffer.numpy().tobytes())


def _global(rank: int, group: Any) -> int:
    return rank if group is None else dist.get_global_rank(group, rank)


def agree(flag: bool, group: Any = None) -> bool:
    """True on every rank if any rank passed True (a blocking MAX all-reduce)."""
    value = torch.tensor([1 if flag else 0], dtype=torch.int32)
    dist.all_reduce(value, op=dist.ReduceOp.MAX, group=group)
    return bool(value.item())


CHUNK = 4 << 20  # replicas travel in chunks of this many bytes, each sent as soon as it is packed


def chunks(total: int, size: int = CHUNK) -> list[tuple[int, int]]:
    """[start, stop) byte ranges that split a flat buffer of `total` bytes for sending."""
    return [(a, min(a + size, total)) for a in range(0, total, size)]


class ReplicaExchange:
    """One commit's replica transfer: this rank's flat buffer to its holders, its sources' into `buffers`.

    Receives are posted first; `send_ready(upto)` sends every chunk of `own` below byte `upto`
    (so sending overlaps packing); `finish()` waits for everything. `received` holds the sources
    whose buffer arrived complete, also when `finish` raises (a peer lost mid-way).

    A wait that times out ends the transfer for good: gloo then closes every connection of the
    group (peers see them closed, as after a sever), so nothing writes into the buffers later
    and they may be reused (tests/unit/test_replica_timeout.py holds gloo to that).
    """

    def __init__(self, own: torch.Tensor, rank: int, holders: Sequence[Sequence[int]], sizes: Mapping[int, int],
                 buffers: Mapping[int, torch.Tensor], group: Any = None):
        self.own, self.holders, self.group = own, list(holders[rank]), group
        self.received: set[int] = set()
        self._chunks = chunks(own.numel())
        self._sent = 0
        self._sends: list[Any] = []
        self._recvs: dict[int, list[Any]] = {}
        for source in (s for s, held_by in enumerate(holders) if rank in held_by):
            peer = _global(source, group)
            self._recvs[source] = [dist.irecv(buffers[source][a:b], peer, group=group, tag=i)
                                   for i, (a, b) in enumerate(chunks(sizes[source]))]

    def send_ready(self, upto: int) -> None:
        while self._sent < len(self._chunks) and self._chunks[self._sent][1] <= upto:
            a, b = self._chunks[self._sent]
            for holder in self.holders:
                self._sends.append(dist.isend(self.own[a:b], _global(holder, self.group), group=self.group,
                                              tag=self._sent))
            self._sent += 1

    def finish(self, timeout: timedelta | None = None) -> None:
        """Send what is left and wait for every transfer (all of them within `timeout`, if given)."""
        self.send_ready(self.own.numel())
        deadline = None if timeout is None else time.monotonic() + timeout.total_seconds()

        def wait(work: Any) -> None:
            if deadline is None:
                work.wait()
            else:
                work.wait(timedelta(seconds=max(0.001, deadline - time.monotonic())))
        error: BaseException | None = None
        for source, works in self._recvs.items():
            try:
                for work in works:
                    wait(work)
                self.received.add(source)
            except BaseException as exc:  # noqa: BLE001 - finish the others, then raise the first
                error = error or exc
        for work in self._sends:
            try:
                wait(work)
            except BaseException as exc:  # noqa: BLE001
                error = error or exc
        if error is not None:
            raise error


def reshard(plan: Mapping[tuple[int, int], list[Piece]], specs: Sequence[LeafSpec], old_world: int,
            rank: int, new_world: int, flats: Mapping[int, torch.Tensor], shards: list[torch.Tensor],
            new_starts: Sequence[int], group: Any = None) -> None:
    """One all-to-all: send the pieces this rank is the source of, fill `shards` (this rank's new local shards).

    Pieces this rank both sends and receives are copied in place, outside the all-to-all.

    Args:
        plan: (sending rank, receiving rank) -> pieces, from `layout.transfer_plan`.
        flats: old rank -> the flat buffer this rank holds for it (own or replica).
        shards: new local shards to fill, one per leaf.
        new_starts: first global row of this rank's new shard, per leaf.
    """
    layouts = {k: FlatLayout.of(specs, old_world, k) for k in flats}
    send_parts: list[torch.Tensor] = []
    send_sizes = []
    for dst in range(new_world):
        total = 0
        for piece in plan.get((rank, dst), []):
            spec = specs[piece.leaf]
            view = leaf_view(flats[piece.old_rank], specs, layouts[piece.old_rank], piece.leaf, old_world,
                             piece.old_rank)
            o_start = _old_start(spec, old_world, piece.old_rank)
            part = view.narrow(spec.dim, piece.start - o_start, piece.stop - piece.start)
            if dst == rank:
                rows = piece.stop - piece.start
                shards[piece.leaf].narrow(spec.dim, piece.start - new_starts[piece.leaf], rows).copy_(part)
                continue
            send_parts.append(part.contiguous().reshape(-1).view(torch.uint8))
            n = piece_nbytes(spec, piece)
            if _padded(n) > n:  # keep every piece aligned for the receiver's dtype view
                send_parts.append(torch.zeros(_padded(n) - n, dtype=torch.uint8))
            total += _padded(n)
        send_sizes.append(total)
    recv_sizes = [sum(_padded(piece_nbytes(specs[p.leaf], p)) for p in plan.get((src, rank), [])) if src != rank else 0
                  for src in range(new_world)]
    send = torch.cat(send_parts) if send_parts else torch.empty(0, dtype=torch.uint8)
    recv = torch.empty(sum(recv_sizes), dtype=torch.uint8)
    if new_world > 1:
        dist.all_to_all_single(recv, send, recv_sizes, send_sizes, group=group)
    else:
        recv.copy_(send)
    at = 0
    for src in (s for s in range(new_world) if s != rank):
        for piece in plan.get((src, rank), []):
            spec = specs[piece.leaf]
            n = piece_nbytes(spec, piece)
            rows = piece.stop - piece.start
            target = shards[piece.leaf].narrow(spec.dim, piece.start - new_starts[piece.leaf], rows)
            if n:
                target.copy_(recv[at : at + n].view(spec.dtype).view(target.shape))
            at += _padded(n)


def _padded(nbytes: int) -> int:
    return -(-nbytes // 16) * 16


def _old_start(spec: LeafSpec, world: int, rank: int) -> int:
    from ray_elastic.sharded.layout import chunk_range

    return chunk_range(spec.shape[spec.dim], world, rank)[0]
