"""This process's last committed snapshot, and how a commit fills it.

Three modes, chosen per run (`run(snapshot=...)`):

- ``"copy"``: every tensor is copied into buffers the holder owns, reused from
  one commit to the next. Any loop shape is safe.
- ``"live"``: tensors that only an optimizer held in the State changes (its
  parameters and its state, such as momentum) are kept by reference, with their
  version counters and, for the parameters, a checksum; everything else
  (buffers, schedulers, plain values) is copied. The live tensors are the
  snapshot until they change: an optimizer step, an in-place write (a version
  bump) or a write around the version counter (`.data`: the checksum) means
  this process no longer holds its commit (`held_commit_id()` is -1), and
  restore takes it from a rank that does. This is sound for the loop shape
  `ray_elastic.loop_shape` checks: `commit()` follows `optimizer.step()` with
  no collective in between. A peer lost before its step stops every survivor
  in the backward all-reduce, before their steps; a peer lost after it lets
  every survivor reach `commit()`, which snapshots before its own agreement
  all-reduce.
- ``"auto"`` (the default of `run`): copies while the first commit intervals
  are watched, live from then on if the loop has that shape, copies for good
  from the first break of it (see `ray_elastic.loop_shape`).

When a round ends (`end_round()`, before train_fn runs again), live tensors that
still hold the commit are copied into owned buffers: what the next round does to
objects kept across rounds (wrapping a kept module in DDP again broadcasts into
its parameters) cannot touch the commit.

A commit is identified by (commit number, round it was taken in): two processes
holding the same number from different rounds hold different commits.
"""

from __future__ import annotations

import copy
import weakref
from typing import Any

import torch

from ray_elastic.config import SNAPSHOT_MODES
from ray_elastic.errors import ConfigError
from ray_elastic.loop_shape import LoopShape, checksums, collective_count, optimizer_params

__all__ = ["SnapshotHolder", "collective_count", "commit_key", "key_commit_id"]

_ROUND_BITS = 24


def commit_key(commit_id: int, round_id: int) -> int:
    """One int64 ordering commits by number, then by the round they were taken in; -1 for none."""
    if commit_id < 0:
        return -1
    return (commit_id << _ROUND_BITS) | ((round_id + 1) & ((1 << _ROUND_BITS) - 1))


def key_commit_id(key: int) -> int:
    return -1 if key < 0 else key >> _ROUND_BITS


def _copy_into(dst: Any, src: Any, borrowed: frozenset[int] = frozenset(),
               live_keys: frozenset[tuple[Any, ...]] | None = None, out_live: list[torch.Tensor] | None = None) -> Any:
    """Copy `src` (a state_dict tree) into `dst`, reusing its tensors of matching shape; return the copy.

    Tensors whose key is in `live_keys` are kept by reference instead and appended to `out_live`;
    tensors of `dst` whose id is in `borrowed` are such references, never written into.
    """
    if isinstance(src, torch.Tensor):
        if live_keys and src.numel() and _tensor_key(src) in live_keys:
            held = src.detach()  # shares storage and version counter
            if out_live is not None:
                out_live.append(held)
            return held
        if (isinstance(dst, torch.Tensor) and id(dst) not in borrowed
                and dst.shape == src.shape and dst.dtype == src.dtype):
            dst.copy_(src.detach(), non_blocking=False)
            return dst
        return src.detach().to("cpu", copy=True)
    if isinstance(src, dict):
        old = dst if isinstance(dst, dict) else {}
        return {k: _copy_into(old.get(k), v, borrowed, live_keys, out_live) for k, v in src.items()}
    if isinstance(src, (list, tuple)):
        old_seq = dst if isinstance(dst, (list, tuple)) and len(dst) == len(src) else [None] * len(src)
        items = [_copy_into(d, s, borrowed, live_keys, out_live) for d, s in zip(old_seq, src)]
        return items if isinstance(src, list) else tuple(items)
    return copy.deepcopy(src)


def _own(tree: Any, live_ids: set[int]) -> Any:
    """`tree` with every tensor whose id is in `live_ids` replaced by an owned copy."""
    if isinstance(tree, torch.Tensor):
        return tree.detach().to("cpu", copy=True) if id(tree) in live_ids else tree
    if isinstance(tree, dict):
        return {k: _own(v, live_ids) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        items = [_own(v, live_ids) for v in tree]
        return items if isinstance(tree, list) else tuple(items)
    return tree


def _tensor_key(tensor: torch.Tensor) -> tuple[Any, ...]:
    return (tensor.device, tensor.data_ptr(), tuple(tensor.shape), tensor.dtype)


def _optimizer_tensors(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    """The tensors only `optimizer.step()` should change: its parameters and its per-parameter state."""
    tensors = optimizer_params(optimizer)
    for per_param in optimizer.state.values():
        tensors.extend(v for v in per_param.values() if isinstance(v, torch.Tensor))
    return tensors


class SnapshotHolder:
    """This process's last committed snapshot; outlives rounds (train_fn re-entries)."""

    def __init__(self, mode: str = "copy", shard_replicas: int = 1, shard_replica_every: int = 1,
                 shard_replica_overlap: bool = False) -> None:
        if mode not in SNAPSHOT_MODES:
            raise ConfigError(f"snapshot must be one of {SNAPSHOT_MODES}, got {mode!r}.")
        self.mode = mode
        self.commit_id = -1
        self.commit_round = -1  # the round the commit was taken in (its identity with commit_id)
        self.items: dict[str, Any] = {}
        self.attrs: dict[str, Any] = {}
        self.world_size = 0
        self._live: list[tuple[torch.Tensor, int]] = []  # held by reference, with the version at commit
        self._sums: list[tuple[torch.Tensor, int]] = []  # live parameters, with their checksum at commit
        # Optimizers whose tensors are held live (weak: a new optimizer may reuse a dead one's id).
        self._watched: weakref.WeakSet[torch.optim.Optimizer] = weakref.WeakSet()
        self._dirty = False  # a watched optimizer stepped since the commit
        self._lost = False  # the round ended with the live tensors moved past the commit
        self.shape = LoopShape(mode, on_step=self._optimizer_stepping)
        # Sharded (FSDP2) state is held apart, by `ray_elastic.sharded.store.ShardStore` (created on first use).
        self.shard_replicas = shard_replicas
        self.shard_replica_every = shard_replica_every
        self.shard_replica_overlap = shard_replica_overlap
        self.shards: Any = None

    # -- what is held -----------------------------------------------------------------------------
    def held_commit_id(self) -> int:
        """The commit this process can restore from memory, or -1 if live tensors moved on since."""
        return self.commit_id if self._intact() else -1

    def held_key(self) -> int:
        """`commit_key` of the commit held intact, -1 if none."""
        return commit_key(self.commit_id, self.commit_round) if self._intact() else -1

    def taken_key(self) -> int:
        """`commit_key` of the last commit this process took, held or not."""
        return commit_key(self.commit_id, self.commit_round)

    def _intact(self) -> bool:
        if self._lost or self._dirty or any(t._version != version for t, version in self._live):
            return False
        if self._sums:
            tensors = [t for t, _ in self._sums]
            return checksums(tensors) == [s for _, s in self._sums]
        return True

    def as_payload(self) -> dict[str, Any]:
        return {"commit_id": self.commit_id, "commit_round": self.commit_round, "items": self.items,
                "attrs": self.attrs, "world_size": self.world_size}

    def load_payload(self, payload: dict[str, Any]) -> None:
        """Hold `payload` (received or read from storage): owned tensors, nothing live."""
        self.commit_id = payload["commit_id"]
        self.commit_round = payload.get("commit_round", -1)
        self.items = payload["items"]
        self.attrs = payload["attrs"]
        self.world_size = payload["world_size"]
        self._forget_live()
        self._lost = False

    def _forget_live(self) -> None:
        self._live, self._sums, self._watched, self._dirty = [], [], weakref.WeakSet(), False

    def describe(self) -> tuple[str, str]:
        """How commits are kept now ("copy", "live", or "auto" while deciding), and why."""
        return self.shape.describe()

    # -- commit -------------------------------------------------------------------------------------
    def take(self, stateful: dict[str, Any], attrs: dict[str, Any], world_size: int, round_id: int = -1) -> None:
        """The local half of a commit: snapshot every item, then count the commit."""
        self.shape.before_commit()
        optimizers = [o for o in stateful.values() if isinstance(o, torch.optim.Optimizer)]
        live = self.shape.live_commit()
        live_keys = frozenset(_tensor_key(t) for o in optimizers for t in _optimizer_tensors(o)) if live else None
        borrowed = frozenset(id(t) for t, _ in self._live)
        held: list[torch.Tensor] = []
        for name, obj in stateful.items():
            self.items[name] = _copy_into(self.items.get(name), obj.state_dict(), borrowed, live_keys, held)
        self._live = [(t, t._version) for t in held]
        params = [p for o in optimizers for p in optimizer_params(o)] if self.shape.watching else []
        if live:
            param_keys = {_tensor_key(p) for p in params}
            watched = [t for t in held if _tensor_key(t) in param_keys]
            self._sums = list(zip(watched, checksums(watched)))
        else:
            self._sums = []
        self._watched = weakref.WeakSet(optimizers if live else ())
        self._dirty = self._lost = False
        self.attrs = copy.deepcopy(attrs)
        self.commit_id += 1
        self.commit_round = round_id
        self.world_size = world_size
        self.shape.step_hint = attrs.get("step")
        self.shape.begin_interval(params)

    def begin_interval(self) -> None:
        """Start a new commit interval (on entering a round)."""
        self.shape.begin_interval()

    def rebaseline(self) -> None:
        """The live objects were just loaded from this snapshot: what they hold now is the commit."""
        self._live = [(t, t._version) for t, _ in self._live]
        self._dirty = False

    def end_round(self) -> None:
        """train_fn left its round: copy live tensors that still hold the commit, or note they do not.

        After this, nothing the next round does to objects kept across rounds can change the commit.
        A sharded replica transfer still in flight is settled here, before the round's group goes.
        """
        if self.shards is not None:
            self.shards.end_round()
        if not self._live:
            self._forget_live()
            return
        if self._intact():
            live_ids = {id(t) for t, _ in self._live}
            self.items = _own(self.items, live_ids)
        else:
            self._lost = True
        self._forget_live()

    # -- optimizer hooks ----------------------------------------------------------------------------
    def track(self, optimizer: torch.optim.Optimizer) -> None:
        """Watch `optimizer.step()` (in "live" and "auto" modes)."""
        self.shape.track(optimizer)

    def _optimizer_stepping(self, optimizer: torch.optim.Optimizer) -> None:
        if optimizer in self._watched:
            self._dirty = True
