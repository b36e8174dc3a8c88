"""This process's committed shards and its copies of other ranks' shards; how a commit refreshes them.

A commit of sharded state, on every rank:

1. pack this rank's local shards into a spare flat host buffer (CUDA: pinned memory,
   non-blocking copies on a side stream);
2. if replicas are due: send that buffer to this rank's holders (`layout.replica_holders`)
   and receive the shards it holds for others into spare buffers;
3. a blocking all-reduce of the stop flag. It completes on a rank only once every rank
   has finished step 2, so from then on the commit is held complete (own + replicas)
   everywhere; only then do the spare buffers replace the previous generation.

A rank that fails in 2 or 3 keeps both: the previous generation, and this commit as
`pending` (with the replicas it received complete). Restore then rebuilds the newest
commit whose every shard some live rank holds, which is this commit whenever any rank
got past 3, so a rank lost at any point costs no step that commit() returned for.

With `every=N`, replicas are refreshed (and the generation replaced) every N-th commit
and at every commit where the world is about to change; after a failure at most N-1
committed steps are redone. Without replicas, every commit replaces the own shards.

With `overlap=True`, step 2 is only started inside commit c: the transfer runs in gloo's
transport threads while the next step trains, and commit c+1 waits for it before its
all-reduce of the stop flag, which again completes only once every rank's transfer of c
has landed; only then does c replace c-1. A rank lost while c's transfer is still in
flight may leave c unrebuildable, so the survivors go back to c-1: one more committed step
redone than without overlap (at most N with `every=N`). A commit where the world changes
is still refreshed synchronously (a planned resize redoes none).
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from ray_elastic.errors import ConfigError
from ray_elastic.sharded import comm
from ray_elastic.sharded.capture import ShardedItems, check_shards, live_state_dicts, split_trees
from ray_elastic.sharded.layout import (
    FlatLayout,
    Holding,
    LeafSpec,
    leaf_view,
    memory_verdict,
    replica_holders,
    replica_sources,
)

logger = logging.getLogger("ray_elastic")


@dataclass
class Generation:
    """One commit as this process holds it: its own shard of it, replicas of others', the replicated rest.

    `world` and `rank` count shards: the shards the commit was split into and the one this process
    holds (FSDP: the world size and the rank; HSDP: the mesh's shard dimension, `replica_groups` copies).
    """

    commit_id: int
    world: int
    rank: int
    specs: list[LeafSpec]
    own: torch.Tensor
    replicas: dict[int, torch.Tensor]  # by shard
    rest: dict[str, Any]  # {"items": skeletons, "attrs": ...}: the same on every rank
    nodes: tuple[str, ...] = ()  # node of each rank of the round it was taken in
    replica_groups: int = 1

    def holding(self) -> Holding:
        return Holding(self.commit_id, self.world, frozenset({self.rank, *self.replicas}), True)

    def flat(self, old_rank: int) -> torch.Tensor:
        return self.own if old_rank == self.rank else self.replicas[old_rank]

    def buffers(self) -> list[torch.Tensor]:
        return [self.own, *self.replicas.values()]


@dataclass
class InFlight:
    """An overlapped commit's replica transfer, still running: the exchange, the buffers it fills, its round."""

    exchange: comm.ReplicaExchange
    spares: dict[int, torch.Tensor]
    round: RoundInfo


@dataclass
class RoundInfo:
    """What the current round's commits need: the group for host collectives, where ranks live, who holds what.

    Shards are indexed in the mesh's shard dimension: with FSDP shard k is rank k's; with HSDP every
    replica group holds all `shards` of them (`shard_of[rank]`), and those groups are the replicas.
    """

    rank: int
    world: int
    nodes: tuple[str, ...]
    group: Any = None  # None: the default group
    holders: list[list[int]] = field(default_factory=list)
    checked: bool = False  # the memory check of this round's layout passed
    shard_of: tuple[int, ...] = ()  # per rank: the shard it holds (default: its rank)
    replica_groups: int = 1  # HSDP: how many copies of every shard the mesh itself keeps

    def __post_init__(self) -> None:
        self.shard_of = self.shard_of or tuple(range(self.world))

    @property
    def shards(self) -> int:
        return self.world // self.replica_groups

    @property
    def shard(self) -> int:
        return self.shard_of[self.rank]

    def keyed_by_shard(self, buffers: dict[int, torch.Tensor], ranks: set[int]) -> dict[int, torch.Tensor]:
        """Replica buffers received from `ranks` (of `buffers`, by sending rank), keyed by the shard they hold."""
        return {self.shard_of[k]: buffers[k] for k in ranks}


class ShardStore:
    """Per worker process, across rounds: the generations it holds and spare buffers to fill next.

    Args:
        replicas: copies of each rank's shards kept by other ranks (0: none).
        every: refresh replicas at every `every`-th commit.
        overlap: let a commit's replica transfer run during the next step (see the module docstring).
    """

    LAND_TIMEOUT = timedelta(seconds=2)  # a transfer left by an aborted round: severed, it fails at once;
    # one that times out instead is over too (gloo closes the group's connections), see comm.ReplicaExchange

    def __init__(self, replicas: int = 1, every: int = 1, available_bytes: Callable[[], int] | None = None,
                 overlap: bool = False) -> None:
        self.replicas = replicas
        self.every = every
        self.overlap = overlap
        self.inflight: InFlight | None = None  # the pending generation's replicas, still arriving
        self._available = available_bytes or _available_host_bytes
        self.commit_id = -1
        self.current: Generation | None = None
        self.pending: Generation | None = None
        self.round: RoundInfo | None = None
        self._pool: list[torch.Tensor] = []
        self._busy: Callable[[], set[int]] = lambda: set()  # buffers a background writer still reads
        self._stream: Any = None

    # -- rounds ---------------------------------------------------------------------------------------
    def begin_round(self, rank: int, world: int, nodes: tuple[str, ...], group: Any = None,
                    shard_of: tuple[int, ...] = (), replica_groups: int = 1) -> None:
        """Start a round. HSDP (`replica_groups` > 1): the mesh's replica groups are the copies; none are sent."""
        holders = replica_holders(nodes, self.replicas) if replica_groups == 1 else [[] for _ in nodes]
        self.round = RoundInfo(rank, world, nodes, group, holders, shard_of=shard_of, replica_groups=replica_groups)

    def end_round(self) -> None:
        """The round is over: land its transfer and let go of its groups."""
        self.settle()
        self.round = None

    def copies_sent(self) -> int:
        """Replicas this round sends of each shard (HSDP: none, its replica groups hold the copies)."""
        return self.replicas if self.round is None or self.round.replica_groups == 1 else 0

    def check_memory(self, specs: list[LeafSpec], live_on_host: bool) -> None:
        """Raise ConfigError on every rank if some rank cannot hold its share of the state (a collective).

        Each rank compares what it would need with the memory available to it (its node's free
        memory shared by the ranks there, plus the snapshot buffers it already holds).
        """
        info = self.round
        assert info is not None
        local = max(1, sum(1 for n in info.nodes if n == info.nodes[info.rank]))
        available = self._available() // local + self.bytes_held() + sum(b.numel() for b in self._pool)
        verdict = memory_verdict(specs, info.shards, self.copies_sent(), available, live_on_host)
        multi = info.world > 1 and dist.is_initialized()
        if (comm.agree(verdict is not None, info.group) if multi else verdict is not None):
            raise ConfigError(verdict or "another rank cannot hold its share of the sharded state in memory; "
                                         "see its error, and raise min_nodes or lower shard_replicas.")
        info.checked = True

    def holdings(self) -> list[Holding]:
        self.settle()
        return [g.holding() for g in (self.current, self.pending) if g is not None]

    def latest(self) -> Generation | None:
        """The generation of the last commit taken (its own shards complete), if this process packed one."""
        for g in (self.pending, self.current):
            if g is not None and g.commit_id == self.commit_id:
                return g
        return None

    def generation(self, commit_id: int, world: int) -> Generation | None:
        for g in (self.current, self.pending):
            if g is not None and (g.commit_id, g.world) == (commit_id, world):
                return g
        return None

    def keep_only(self, chosen: Generation | None, commit_id: int) -> None:
        """After a restore: hold `chosen` (possibly None) as the current generation, recycle the rest."""
        self.settle()
        for g in (self.current, self.pending):
            if g is not None and g is not chosen:
                self._recycle(g.buffers())
        self.current, self.pending = chosen, None
        self.commit_id = commit_id

    # -- buffers --------------------------------------------------------------------------------------
    def _take(self, nbytes: int, pinned: bool) -> torch.Tensor:
        busy = self._busy()
        fits = [b for b in self._pool if b.numel() >= nbytes and b.data_ptr() not in busy]
        if fits:
            buf = min(fits, key=lambda b: b.numel())
            self._pool = [b for b in self._pool if b is not buf]
            return buf[:nbytes]
        return torch.empty(nbytes, dtype=torch.uint8, pin_memory=pinned)

    def _recycle(self, buffers: list[torch.Tensor]) -> None:
        self._pool.extend(buffers)
        if len(self._pool) > 4 + 2 * self.replicas:  # a resize left buffers of other sizes: drop the oldest
            self._pool = self._pool[-(4 + 2 * self.replicas):]

    def set_busy(self, busy: Callable[[], set[int]]) -> None:
        self._busy = busy

    # -- commit ---------------------------------------------------------------------------------------
    def commit(self, items: ShardedItems, attrs: dict[str, Any], stop_requested: Callable[[], bool]) -> bool:
        """Snapshot the live shards as the next commit (see the module docstring); True if the world changes.

        Raises:
            whatever a collective raises when a peer is lost (the commit is then kept as `pending`).
        """
        info = self.round
        assert info is not None, "begin_round first"
        commit_id = self.commit_id + 1
        multi = info.world > 1 and dist.is_initialized()
        sources = replica_sources(info.holders, info.rank) if multi else []
        replicate = multi and self.replicas > 0 and bool(info.holders[info.rank] or sources)
        due = replicate and commit_id % self.every == 0
        if self.overlap and replicate:
            return self._commit_overlapped(items, attrs, stop_requested, commit_id, info, sources, due)
        box: list[Generation] = []  # the commit taken, once its own shards are packed
        received: set[int] = set()
        spares: dict[int, torch.Tensor] = {}
        try:
            if due or not replicate:
                self._take_commit(items, attrs, commit_id, info, sources if due else None, received, spares, box)
            stop = comm.agree(stop_requested(), info.group) if multi else stop_requested()
            if stop and replicate and not due:  # the world changes here: refresh whatever the cadence
                self._take_commit(items, attrs, commit_id, info, sources, received, spares, box)
                comm.agree(False, info.group)
        except BaseException:
            if box:  # keep this commit beside the previous one: restore decides which is whole
                self._keep_pending(box[-1], spares, received)
            raise
        if box:
            box[-1].replicas = info.keyed_by_shard(spares, received)
            self._replace_current(box[-1])
        self.commit_id = commit_id
        return stop

    def _keep_pending(self, taken: Generation, spares: dict[int, torch.Tensor], received: set[int]) -> None:
        assert self.round is not None
        taken.replicas = self.round.keyed_by_shard(spares, received)
        self.pending = taken
        self._recycle([b for k, b in spares.items() if k not in received])

    def _replace_current(self, generation: Generation) -> None:
        if self.current is not None:
            self._recycle(self.current.buffers())
        self.current = generation

    def _commit_overlapped(self, items: ShardedItems, attrs: dict[str, Any], stop_requested: Callable[[], bool],
                           commit_id: int, info: RoundInfo, sources: list[int], due: bool) -> bool:
        """`commit` with overlap: land the previous transfer, agree, then start this one (or, at a resize, do it)."""
        self.land()
        stop = comm.agree(stop_requested(), info.group)
        if self.pending is not None:  # every rank's transfer of it landed: it is whole everywhere
            self._replace_current(self.pending)
            self.pending = None
        if stop or due:
            box: list[Generation] = []
            received: set[int] = set()
            spares: dict[int, torch.Tensor] = {}
            try:
                self._take_commit(items, attrs, commit_id, info, sources, received, spares, box, wait=stop)
                if stop:
                    comm.agree(False, info.group)
            except BaseException:
                if box:
                    self._keep_pending(box[-1], spares, received)
                raise
            if stop:
                box[-1].replicas = info.keyed_by_shard(spares, received)
                self._replace_current(box[-1])
            else:
                self.pending = box[-1]  # its replicas arrive in flight (land)
        self.commit_id = commit_id
        return stop

    def land(self, timeout: timedelta | None = None) -> None:
        """Wait for the in-flight transfer; the pending generation then holds the replicas that arrived whole.

        Raises:
            what the transfer raised (a peer lost); the pending generation keeps what arrived.
        """
        flight, self.inflight = self.inflight, None
        if flight is None:
            return
        assert self.pending is not None
        try:
            flight.exchange.finish(timeout)
        finally:
            got = flight.exchange.received
            self.pending.replicas = flight.round.keyed_by_shard(flight.spares, got)
            self._recycle([b for k, b in flight.spares.items() if k not in got])

    def settle(self, timeout: timedelta | None = LAND_TIMEOUT) -> None:
        """Land a transfer still in flight, keeping what arrived; a failure is logged, not raised.

        After an aborted round the connections are severed and it ends at once; `timeout` only
        bounds a wait on connections nobody severed. None: wait however long it takes (peers alive).
        """
        if self.inflight is None:
            return
        try:
            self.land(timeout)
        except Exception as exc:  # noqa: BLE001 - expected after a loss: restore takes what arrived
            logger.debug("replica transfer of commit %s ended with %r", self.commit_id, exc)

    def _take_commit(self, items: ShardedItems, attrs: dict[str, Any], commit_id: int, info: RoundInfo,
                     sources: list[int] | None, received: set[int], spares: dict[int, torch.Tensor],
                     box: list[Generation], wait: bool = True) -> None:
        """Pack the live shards into a new generation (appended to `box`); with `sources`, exchange replicas.

        Each chunk of the packed buffer is sent as soon as it is complete, so the transfer overlaps the
        copy. If the exchange fails, the packing is still finished (it is local) before the error leaves.
        """
        skeleton, specs, shards = split_trees(live_state_dicts(items))
        check_shards(specs, shards, info.shards, info.shard)
        on_gpu = any(s.is_cuda for s in shards)
        if not info.checked:
            self.check_memory(specs, live_on_host=not on_gpu)
        layout = FlatLayout.of(specs, info.shards, info.shard)
        own = self._take(layout.total, pinned=on_gpu)
        views = [leaf_view(own, specs, layout, i, info.shards, info.shard) for i in range(len(specs))]
        rest = {"items": skeleton, "attrs": copy.deepcopy(attrs)}
        taken = Generation(commit_id, info.shards, info.shard, specs, own, {}, rest, info.nodes, info.replica_groups)
        exchange = None
        if sources is not None:
            sizes = {s: FlatLayout.of(specs, info.shards, info.shard_of[s]).total for s in sources}
            spares.update({s: self._take(sizes[s], on_gpu) for s in sources})
            exchange = comm.ReplicaExchange(own, info.rank, info.holders, sizes, spares, info.group)
        try:
            if on_gpu:
                self._copy_from_gpu(views, shards)
            else:
                for index, (view, shard) in enumerate(zip(views, shards)):
                    view.copy_(shard)
                    if exchange is not None:
                        exchange.send_ready(layout.offsets[index] + layout.nbytes[index])
        except BaseException:
            for view, shard in zip(views, shards):
                view.copy_(shard)
            box.append(taken)
            raise
        box.append(taken)
        if exchange is not None and not wait:
            exchange.send_ready(own.numel())
            self.inflight = InFlight(exchange, spares, info)
        elif exchange is not None:
            try:
                exchange.finish()
            finally:
                received.update(exchange.received)

    def _copy_from_gpu(self, views: list[torch.Tensor], shards: list[torch.Tensor]) -> None:
        """Device-to-host copies into pinned memory on a side stream, then wait for them (not for the step)."""
        if self._stream is None:
            self._stream = torch.cuda.Stream()
        self._stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(self._stream):
            for view, shard in zip(views, shards):
                view.copy_(shard, non_blocking=True)
                shard.record_stream(self._stream)
        self._stream.synchronize()

    # -- handing shards over --------------------------------------------------------------------------
    def export_held(self) -> list[dict[str, Any]]:
        """The commits this process holds whole (its own shard and the replicas that arrived), for a peer to keep.

        Read from another thread while the training thread may be stuck in a collective: it takes only
        `current` and `pending` (complete once assigned) and never waits for a transfer in flight.
        """
        return [
            {"commit_id": g.commit_id, "world": g.world, "shards": {g.rank: g.own, **g.replicas}}
            for g in (self.current, self.pending) if g is not None
        ]

    def adopt(self, held: list[dict[str, Any]]) -> list[int]:
        """Keep the shards of `held` (another process's `export_held`) that this process lacks, in its generation
        of the same commit; return the shards newly kept. A commit this process does not hold is skipped."""
        adopted = []
        for entry in held:
            generation = self.generation(entry["commit_id"], entry["world"])
            if generation is None:
                continue
            for shard, flat in entry["shards"].items():
                if shard != generation.rank and shard not in generation.replicas:
                    generation.replicas[shard] = flat.clone()  # owned: the buffer may be recycled as a spare
                    adopted.append(shard)
        return sorted(set(adopted))

    def bytes_held(self) -> int:
        return sum(b.numel() for g in (self.current, self.pending) if g is not None for b in g.buffers())


def _available_host_bytes() -> int:
    import psutil

    return int(psutil.virtual_memory().available)
