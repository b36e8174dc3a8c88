"""Elastic training state: in-memory commits, restored from a peer after a membership change.

`State(**items)` holds objects with `state_dict`/`load_state_dict` (modules,
optimizers, schedulers, samplers) and plain values (attributes such as `step`).
`commit()` fills this process's snapshot (see `ray_elastic.snapshot`: a copy of
every item, or optimizer-owned tensors by reference), then agrees with the other
ranks; it is the one point where membership changes take effect. On (re-)entry of
train_fn, constructing a `State` restores the newest commit held by any rank:
survivors load their own copy, newcomers receive it by broadcast, and with no
snapshot anywhere the durable checkpoint (if any) is loaded, else rank 0's
fresh state is broadcast. All ranks leave the constructor identical.
"""

from __future__ import annotations

import copy
import pickle
import sys
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist

from ray_elastic.context import Session, TrainContext, get_session
from ray_elastic.errors import SnapshotLostError
from ray_elastic.snapshot import SnapshotHolder, key_commit_id


class MembershipChange(BaseException):
    """Raised by `commit()` on every rank at once to leave the round for a re-form.

    A BaseException so that `except Exception` in user code does not swallow it.
    """


def _split_tensors(tree: Any, tensors: list[torch.Tensor]) -> Any:
    """Replace tensors in a tree by placeholders, collecting them in order."""
    if isinstance(tree, torch.Tensor):
        tensors.append(tree)
        return _TensorSlot(len(tensors) - 1)
    if isinstance(tree, dict):
        return {k: _split_tensors(v, tensors) for k, v in tree.items()}
    if isinstance(tree, list):
        return [_split_tensors(v, tensors) for v in tree]
    if isinstance(tree, tuple):
        return tuple(_split_tensors(v, tensors) for v in tree)
    return tree


def _join_tensors(tree: Any, tensors: list[torch.Tensor]) -> Any:
    if isinstance(tree, _TensorSlot):
        return tensors[tree.index]
    if isinstance(tree, dict):
        return {k: _join_tensors(v, tensors) for k, v in tree.items()}
    if isinstance(tree, list):
        return [_join_tensors(v, tensors) for v in tree]
    if isinstance(tree, tuple):
        return tuple(_join_tensors(v, tensors) for v in tree)
    return tree


class _TensorSlot:
    __slots__ = ("index",)

    def __init__(self, index: int):
        self.index = index

    def __reduce__(self):
        return (_TensorSlot, (self.index,))


def _broadcast_bytes(data: bytes, src: int, device: torch.device) -> bytes:
    """Broadcast a small byte string (torch's object broadcast needs numpy; this does not)."""
    size = torch.tensor([len(data)], dtype=torch.int64, device=device)
    dist.broadcast(size, src=src)
    if dist.get_rank() == src:
        buffer = torch.frombuffer(bytearray(data), dtype=torch.uint8).to(device)
    else:
        buffer = torch.empty(int(size.item()), dtype=torch.uint8, device=device)
    dist.broadcast(buffer, src=src)
    return data if dist.get_rank() == src else bytes(buffer.cpu().tolist())


def broadcast_payload(payload: dict[str, Any] | None, src: int, device: torch.device) -> dict[str, Any]:
    """Send a snapshot from rank `src` to every rank: structure by pickle, tensors flat per dtype."""
    tensors: list[torch.Tensor] = []
    skeleton = _split_tensors(payload, tensors) if dist.get_rank() == src else None
    specs = [(tuple(t.shape), t.dtype) for t in tensors]
    header = _broadcast_bytes(pickle.dumps((skeleton, specs)) if dist.get_rank() == src else b"", src, device)
    skeleton, specs = pickle.loads(header)
    by_dtype: dict[torch.dtype, list[int]] = {}
    for index, (_, dtype) in enumerate(specs):
        by_dtype.setdefault(dtype, []).append(index)
    received: list[torch.Tensor | None] = [None] * len(specs)
    for dtype, indices in sorted(by_dtype.items(), key=lambda kv: str(kv[0])):
        numel = sum(int(torch.Size(specs[i][0]).numel()) for i in indices)
        if dist.get_rank() == src:
            flat = torch.cat([tensors[i].reshape(-1) for i in indices]).to(device)
        else:
            flat = torch.empty(numel, dtype=dtype, device=device)
        dist.broadcast(flat, src=src)
        flat = flat.cpu()
        offset = 0
        for i in indices:
            n = int(torch.Size(specs[i][0]).numel())
            received[i] = flat[offset : offset + n].view(specs[i][0]).clone()
            offset += n
    return _join_tensors(skeleton, [t for t in received if t is not None])


def _sharded_session(session: Session, stateful: dict[str, Any]) -> Any:
    """A `ShardedSession` when an item is an FSDP2 module (see ray_elastic.sharded), else None.

    Raises:
        ConfigError: sharded items that cannot work (an FSDP1 module, an optimizer not built
            from the sharded parameters, a 2-D mesh).
    """
    if not any(name in sys.modules for name in ("torch.distributed.fsdp", "torch.distributed.tensor")):
        return None  # nothing sharded can exist: no cost for replicated state
    from ray_elastic.sharded.capture import inspect_items

    items = inspect_items(stateful)
    if items is None:
        return None
    from ray_elastic.sharded.glue import ShardedSession

    return ShardedSession(session, items)


def _is_stateful(value: Any) -> bool:
    return callable(getattr(value, "state_dict", None)) and callable(getattr(value, "load_state_dict", None))


class State:
    """Training state that survives failures and membership changes without a restart.

    Args:
        **items: objects with `state_dict`/`load_state_dict` and plain picklable values.
            Plain values are attributes (`state.step += 1`).
    """

    def __init__(self, **items: Any):
        object.__setattr__(self, "_session", get_session())
        object.__setattr__(self, "_stateful", {k: v for k, v in items.items() if _is_stateful(v)})
        object.__setattr__(self, "_attrs", {k: v for k, v in items.items() if not _is_stateful(v)})
        object.__setattr__(self, "_callbacks", [])
        object.__setattr__(self, "restored_from", "fresh")
        object.__setattr__(self, "world_changed", False)
        object.__setattr__(self, "_sharded", _sharded_session(self._session, self._stateful))
        if self._sharded is not None:  # FSDP2 state: its own snapshots, replicas and restore (ray_elastic.sharded)
            self._restore_sharded()
            return
        holder = self._session.snapshots
        for obj in self._stateful.values():
            if isinstance(obj, torch.optim.Optimizer):
                holder.track(obj)
        holder.begin_interval()
        self._restore()

    # -- attributes ------------------------------------------------------------------------------
    def __getattr__(self, name: str) -> Any:
        for table in ("_attrs", "_stateful"):
            values = object.__getattribute__(self, table)
            if name in values:
                return values[name]
        raise AttributeError(f"State has no item {name!r}")

    def __setattr__(self, name: str, value: Any) -> None:
        if name in self._stateful:
            raise AttributeError(f"State item {name!r} holds a stateful object; load into it instead")
        self._attrs[name] = value

    @property
    def context(self) -> TrainContext:
        return self._session.context

    @property
    def commit_id(self) -> int:
        if self._sharded is not None:
            return self._sharded.store.commit_id
        return self._session.snapshots.commit_id

    # -- commit ------------------------------------------------------------------------------------
    def commit(self) -> None:
        """Take the in-memory snapshot; apply a pending membership change on all ranks together.

        A stop request (a membership change) seen at one commit is agreed on by an all-reduce that
        completes during the next step, and every rank leaves at that next commit.

        Raises:
            MembershipChange: (internal) on every rank at once when the world is about to change;
                the worker catches it, re-forms, and calls train_fn again.
        """
        session: Session = self._session
        if self._sharded is not None:
            self._commit_sharded()
            return
        holder = session.snapshots
        # The local half first: a peer lost after its backward all-reduce lets every survivor get
        # here, and each then holds this step even though the agreement below fails.
        holder.take(self._stateful, self._attrs, session.context.world_size, session.context.round_id)
        step = self._attrs.get("step")
        session.last_committed_step = step if isinstance(step, int) else holder.commit_id
        session.mark_progress()
        if dist.is_initialized() and dist.get_world_size() > 1:
            # Agreement, one commit behind: the flags all-reduced since the previous commit decide
            # whether every rank leaves here, and this commit's flags go out without waiting, so
            # no rank waits for the slowest one twice a step (DDP's all-reduce already syncs them).
            stop = session.finish_agreement()
            if not stop:
                flag = torch.tensor([1 if session.stop_requested() else 0], dtype=torch.int32,
                                    device=self._comm_device())
                work = dist.all_reduce(flag, op=dist.ReduceOp.MAX, async_op=True)
                session.pending_agreement = (work, flag)
        else:
            stop = session.stop_requested()
        if session.checkpointer is not None:
            session.checkpointer.maybe_save(holder, session.context)
        if stop:
            raise MembershipChange()

    def register_reset_callback(self, callback: Callable[[TrainContext], None]) -> None:
        """Run `callback(ctx)` after each membership change (re-scale LR, re-shard data).

        Registration happens on every (re-)entry of train_fn; when this entry follows a
        change of world size, the callback runs at once with the new context.
        """
        self._callbacks.append(callback)
        if self.world_changed:
            callback(self.context)

    # -- restore -----------------------------------------------------------------------------------
    def _comm_device(self) -> torch.device:
        if dist.is_initialized() and dist.get_backend() == "nccl":
            return self.context.device
        return torch.device("cpu")

    def _load(self, payload: dict[str, Any]) -> None:
        for name, obj in self._stateful.items():
            if name in payload["items"]:
                # A private copy: optimizers may keep the tensors they are given, and the
                # snapshot must not change when training mutates them in place.
                obj.load_state_dict(copy.deepcopy(payload["items"][name]))
        for name, value in payload["attrs"].items():
            self._attrs[name] = copy.deepcopy(value)

    def _restore(self) -> None:
        session: Session = self._session
        holder = session.snapshots
        distributed = dist.is_initialized() and dist.get_world_size() > 1
        if holder.commit_id < 0 and session.checkpointer is not None and not distributed:
            self._load_from_storage(holder)
        if not distributed:
            mine = holder.held_commit_id()
            if mine < holder.commit_id:
                raise SnapshotLostError.for_commit(holder.commit_id, holder.attrs.get("step"))
            if mine >= 0:
                self._restore_own(holder)
            return
        device = self._comm_device()
        rank, world = dist.get_rank(), dist.get_world_size()
        # Commits are compared by key (number, then the round they were taken in): equal numbers from
        # different rounds are different commits. The newest key any rank holds intact, and the newest
        # any rank took (they differ only when live tensors moved past the last commit everywhere).
        mine = holder.held_key()
        newest_t = torch.tensor([mine, holder.taken_key()], dtype=torch.int64, device=device)
        dist.all_reduce(newest_t, op=dist.ReduceOp.MAX)
        newest, newest_taken = int(newest_t[0].item()), int(newest_t[1].item())
        if newest < newest_taken:
            raise SnapshotLostError.for_commit(key_commit_id(newest_taken), holder.attrs.get("step"))
        from_storage = newest < 0 and session.checkpointer is not None
        if from_storage:
            # No live rank holds a commit (a resumed run, or every worker lost): rank 0 reads
            # the newest durable checkpoint and the broadcast below hands it to the others.
            if rank == 0:
                self._load_from_storage(holder)
            newest_t = torch.tensor([holder.held_key()], dtype=torch.int64, device=device)
            dist.broadcast(newest_t, src=0)
            mine, newest = holder.held_key(), int(newest_t[0].item())
        has = mine == newest
        # One MIN all-reduce answers both: the lowest rank holding the newest commit, and
        # (negated) whether any rank lacks it.
        probe = torch.tensor([rank if has else world, 0 if has else -1], dtype=torch.int64, device=device)
        dist.all_reduce(probe, op=dist.ReduceOp.MIN)
        src, someone_lacks = int(probe[0].item()), bool(probe[1].item() < 0)
        if newest < 0:
            # Nobody committed yet: make every rank start from rank 0's fresh state.
            payload = broadcast_payload(self._fresh_payload() if rank == 0 else None, 0, device)
            self._load(payload)
            return
        if someone_lacks:
            payload = broadcast_payload(holder.as_payload() if rank == src else None, src, device)
            if not has:
                holder.load_payload(payload)
                object.__setattr__(self, "restored_from", "storage" if from_storage else "peer")
        self._restore_own(holder)

    def _load_from_storage(self, holder: SnapshotHolder) -> None:
        loaded = self._session.checkpointer.load_latest()
        if loaded is not None:
            holder.load_payload(loaded)
            object.__setattr__(self, "restored_from", "storage")

    def _restore_own(self, holder: SnapshotHolder) -> None:
        self._load(holder.as_payload())
        holder.rebaseline()  # live tensors the objects share with the snapshot were just rewritten
        if self.restored_from == "fresh":
            object.__setattr__(self, "restored_from", "memory")
        object.__setattr__(self, "world_changed", holder.world_size != self.context.world_size)

    # -- sharded state (FSDP2) ---------------------------------------------------------------------------
    def _restore_sharded(self) -> None:
        restored = self._sharded.enter()
        if restored.attrs is not None:
            self._attrs.update(copy.deepcopy(restored.attrs))
        object.__setattr__(self, "restored_from", restored.source)
        object.__setattr__(self, "world_changed", restored.commit_id >= 0 and restored.world != self.context.world_size)
        self._session.on_train_fn_return(self._sharded.finish_writes)

    def _commit_sharded(self) -> None:
        session: Session = self._session
        stop = self._sharded.commit(self._attrs)
        step = self._attrs.get("step")
        session.last_committed_step = step if isinstance(step, int) else self._sharded.store.commit_id
        session.mark_progress()
        if stop:
            raise MembershipChange()

    def _fresh_payload(self) -> dict[str, Any]:
        return {
            "commit_id": -1,
            "items": {name: obj.state_dict() for name, obj in self._stateful.items()},
            "attrs": self._attrs,
            "world_size": self.context.world_size,
        }
