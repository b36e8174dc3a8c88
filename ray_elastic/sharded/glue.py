"""What `State` does when its items are sharded (FSDP2): the per-session side of `store`, `restore`, `durable`.

`State` calls `enter` from its constructor and `commit` from `commit()`; the store
(generations, spare buffers) lives on the worker's `SnapshotHolder` across rounds.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
import torch.distributed as dist

from ray_elastic.sharded.capture import ShardedItems, place_in
from ray_elastic.sharded.durable import ShardedCheckpoints
from ray_elastic.sharded.restore import Restored, restore
from ray_elastic.sharded.store import ShardStore

logger = logging.getLogger("ray_elastic")


def store_of(holder: Any) -> ShardStore:
    """The worker's ShardStore, created on first use with the run's shard_replicas settings."""
    store = getattr(holder, "shards", None)
    if store is None:
        store = ShardStore(getattr(holder, "shard_replicas", 1), getattr(holder, "shard_replica_every", 1),
                           overlap=getattr(holder, "shard_replica_overlap", False))
        holder.shards = store
    return store


def checkpoints_of(store: ShardStore, checkpointer: Any) -> ShardedCheckpoints | None:
    if checkpointer is None:
        return None
    existing = getattr(store, "checkpoints", None)
    if existing is None or existing.run_dir != checkpointer.run_dir:
        existing = ShardedCheckpoints(checkpointer.run_dir, checkpointer.every, checkpointer.keep,
                                      safe_globals=getattr(checkpointer, "safe_globals", ()))
        store.checkpoints = existing  # type: ignore[attr-defined]
        store.set_busy(existing.busy)
    return existing


class ShardedSession:
    """One round's sharded-state work for one `State`.

    Args:
        session: the worker's Session of this round.
        items: the State's items, sorted by `capture.inspect_items`.
    """

    def __init__(self, session: Any, items: ShardedItems):
        self.session = session
        self.items = items
        self.store = store_of(session.snapshots)
        self.checkpoints = checkpoints_of(self.store, session.checkpointer)
        params = [p for m in items.models.values() for p in m.parameters()]
        self.device = params[0].to_local().device if params else torch.device("cpu")  # type: ignore[attr-defined]
        # HSDP: the replica groups hold the same shards; the first one writes the durable checkpoints
        self.place = place_in(items.mesh, session.context.rank)
        self.writes_checkpoints = self.place.replica_group == 0
        self.group = self._host_group()

    def _host_group(self) -> Any:
        """The group for host-memory collectives (None: the default group)."""
        if not dist.is_initialized() or dist.get_backend() == "gloo":
            return None
        group = getattr(self.session, "sharded_host_group", None)
        if group is None:  # NCCL training: shards move through a gloo group of the round, in host memory
            group, addresses = _new_gloo_group(self.session)
            self.session.sharded_host_group = group
            self.session.add_interrupt_handler(lambda reason: _sever(reason, addresses))
        return group

    def enter(self) -> Restored:
        """Restore the newest commit (memory, peers, or storage); report a loss that forced storage."""
        ctx = self.session.context
        if self.checkpoints is not None:
            self.checkpoints.abandon()  # a write of an earlier round waits for ranks that may be gone
        restored = restore(self.store, self.items, ctx.rank, ctx.world_size, ctx.node_id, self.device,
                           self.group, self.checkpoints)
        if restored.source == "storage" and restored.lost and ctx.rank == 0:
            shards = self.place.shards  # FSDP: the world size
            message = (f"{restored.lost_message}; restored the newest durable checkpoint (commit "
                       f"{restored.commit_id}) resharded from {restored.world} to {shards} shards")
            logger.warning(message)
            add_event = getattr(self.session, "add_event", None)
            if add_event is not None:
                add_event("restored_from_storage", message, lost_ranks=list(restored.lost),
                          lost_commit_id=restored.lost_commit_id, commit_id=restored.commit_id,
                          from_world=restored.world, world_size=ctx.world_size)
        return restored

    def commit(self, attrs: dict[str, Any]) -> bool:
        """Take the commit (see `store.ShardStore.commit`); start its durable write when due. True: world changes."""
        stop = self.store.commit(self.items, attrs, self.session.stop_requested)
        taken, checkpoints = self.store.latest(), self.checkpoints
        due = checkpoints is not None and taken is not None and checkpoints.due(taken.commit_id)
        if due and self.writes_checkpoints:
            assert checkpoints is not None and taken is not None
            checkpoints.save_async(taken, self.session.context.round_id, attrs.get("step"))
        if stop and checkpoints is not None:
            checkpoints.wait()  # every rank is here: let the write of this commit finish before the group goes
        return stop

    def finish_writes(self) -> None:
        """At the end of train_fn: let a replica transfer and a checkpoint write still running finish."""
        self.store.settle(timeout=None)  # every rank took the last commit: its transfer lands
        if self.checkpoints is not None:
            self.checkpoints.wait()


def _new_gloo_group(session: Any) -> tuple[Any, tuple[set[Any], set[Any]]]:
    """A gloo group over every rank, and the listening addresses that identify its connections.

    gloo cannot be aborted: a rank blocked in it is freed by shutting its connections down
    (see `ray_elastic.worker.process_group`). While it connects, the worker says it is busy:
    a peer lost mid-connect holds it for seconds, and it must not be killed for that.
    """
    from ray_elastic.worker.process_group import GLOO_CONNECT_WAIT_FACTOR, form_timeout_s, new_gloo_group

    world = dist.get_world_size()
    timeout_s = session.collective_timeout_s or dist.default_pg_timeout.total_seconds()
    bound = GLOO_CONNECT_WAIT_FACTOR * form_timeout_s(world)
    session.set_busy(f"forming the host gloo group of sharded state (gives up on a lost peer within ~{bound:.0f}s)")
    try:
        return new_gloo_group(dist.get_rank(), world, timeout_s)
    finally:
        session.set_busy(None)


def _sever(reason: str, addresses: tuple[set[Any], set[Any]]) -> None:
    """On an abort, shut down the host group's connections so a rank blocked in it raises at once."""
    from ray_elastic.worker.sever import shutdown_gloo_connections

    if reason == "abort":
        shutdown_gloo_connections(*addresses)
